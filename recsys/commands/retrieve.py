"""``recsys retrieve``: arguments and printing; the work is in ``recsys.retrieval.evaluate``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recsys.commands.table import example
from recsys.retrieval import evaluate
from recsys.retrieval.evaluate import Retriever, hybrid_tower_problem, markdown
from recsys.retrieval.index import CODECS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="recsys retrieve",
        description=evaluate.__doc__,
        epilog=example("retrieve"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--two-tower", required=True, help="TwoTower checkpoint (recsys fit --config configs/movielens/two_tower.yaml)"
    )
    parser.add_argument(
        "--hybrid-tower",
        help="a TwoTower checkpoint with item text, trained with item_id_dropout: the learned hybrid's ID side "
        "(cold items get a vector from their text); its scores are exact (dense), not searched in --index",
    )
    parser.add_argument("--din", help="DIN checkpoint for re-ranking (optional)")
    parser.add_argument("--data", help="dataset directory (default: the two-tower's)")
    parser.add_argument("--text-feature", default="movie_title")
    parser.add_argument(
        "--pooling", default="mean", help="pooling head for content vectors (parameter-free unless --text-head)"
    )
    parser.add_argument("--text-head", help="a DIN checkpoint with text features whose trained pooling head to use")
    parser.add_argument(
        "--text-with",
        nargs="*",
        default=[],
        help="item-level columns appended to the item text for content retrieval (e.g. genres)",
    )
    parser.add_argument(
        "--k", type=int, nargs="+", default=[50], help="cut-offs of Recall/NDCG@K (α is chosen at the largest)"
    )
    parser.add_argument(
        "--cold-floor",
        action="store_true",
        help="choose the learned hybrid's α among those whose val Recall@K on cold items is at least "
        "content-only's (default: the best val Recall@K)",
    )
    parser.add_argument("--rerank-depth", type=int, default=100)
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument(
        "--index",
        default="fp32",
        choices=CODECS,
        help="how the item vectors are stored and searched (ID and text lists): fp32 exact, fp16/int8 "
        "scalar quantization, pq product quantization, binary sign bits with Hamming search",
    )
    parser.add_argument(
        "--binary-rerank",
        type=int,
        default=10,
        metavar="R",
        help="with --index binary: re-rank the top R×depth Hamming candidates by fp32 inner product (0: off)",
    )
    parser.add_argument("--save-index", metavar="DIR", help="write the ID and text indexes to DIR/id and DIR/text")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.save_index and Path(args.save_index).exists() and any(Path(args.save_index).iterdir()):
        parser.error(f"--save-index {args.save_index}: exists and is not empty; choose a new directory")
    if args.binary_rerank < 0:
        parser.error(f"--binary-rerank {args.binary_rerank}: must be 0 (off) or a positive factor")
    from recsys.train.checkpoint import load_model

    tt = load_model(args.two_tower)
    data = Path(args.data or tt.info.path)
    head, pooling = None, args.pooling
    if args.text_head:
        text_model = load_model(args.text_head)
        if not len(text_model.embedding.item_text):
            parser.error(
                f"--text-head {args.text_head}: the model has no item "
                "text (train it with --config configs/text/<head>.yaml)"
            )
        head = next(iter(text_model.embedding.item_text.values()))  # ItemText: projection + head
        pooling = text_model.embedding.text_spec.pooling
    hybrid = load_model(args.hybrid_tower) if args.hybrid_tower else None
    problem = hybrid_tower_problem(hybrid, tt.item, args.text_feature) if hybrid is not None else None
    if problem:
        parser.error(f"--hybrid-tower {args.hybrid_tower}: {problem}")
    retriever = Retriever(
        tt,
        data,
        args.text_feature,
        pooling,
        head,
        text_with=args.text_with,
        index=args.index,
        binary_rerank=args.binary_rerank,
        hybrid_tower=hybrid,
    )
    din = load_model(args.din) if args.din else None
    report = retriever.evaluate(din, args.k, args.rerank_depth, args.split, cold_floor=args.cold_floor)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.save_index:
        source = {"two_tower": args.two_tower, "text_head": args.text_head, "pooling": pooling, "data": str(data)}
        for name, index in (("id", retriever.index_id), ("text", retriever.index_text)):
            index.save(Path(args.save_index) / name, source | {"vectors": name})
        print(f"wrote the ID and text indexes ({args.index}) to {args.save_index}/id and {args.save_index}/text")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    print(
        f"α (val, {report['alpha_rule']}) = {report['alpha']:.1f}; {report['users']} users, "
        f"{report['catalogue']} items ({report['cold_items']} cold); wrote {out}/report.json"
    )
    return 0
