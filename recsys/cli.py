"""The ``recsys`` command."""

from __future__ import annotations

import logging
import sys

USAGE = """\
usage: recsys <command> [options]

Training (LightningCLI; `recsys fit --help` lists every option):
  fit        train a model:       recsys fit --config configs/movielens/base.yaml
  validate   score the val split: recsys validate --config ... --ckpt_path CKPT
  test       score the test split
  predict    write predictions.parquet for data.predict_split

Data:
  data check every problem of a dataset directory at once: recsys data check DIR [--json FILE]

Scaling out:
  plan       dry-run the sharding planner: recsys plan --config ... --world-size 8 [--device cuda]
  (train sharded with --trainer.strategy torchrec --trainer.devices N; see docs/architecture.md)

Embedding tables (any model; the kind is the model.init_args.embedding block, docs/configs.md):
  optembed   OptEmbed end to end (supernet → widths search → compact retrain → test report):
             recsys optembed run --config configs/movielens/din.yaml
                 --config configs/embedding/optembed_supernet.yaml --out DIR [--budget 0.5]
             or the search alone: recsys optembed search --ckpt SUPERNET --out DIR (docs/optembed.md)

Serving:
  export     a checkpoint → a self-describing directory (manifest, tables fp32/fp16/int8/int4, vocab):
             recsys export --ckpt CKPT --out DIR [--dtype int8]
  serve      HTTP JSON scoring of an export: recsys serve DIR [--port 8080]
             (POST /score, GET /healthz, GET /metadata; docs/export_format.md)

Retrieval:
  retrieve   ID / content / hybrid retrieval + DIN re-ranking, Recall@K and NDCG@K (overall, cold items):
             recsys retrieve --two-tower TT.ckpt [--din DIN.ckpt] --out DIR

Evaluation:
  eval       offline CTR report (AUC, GAUC, logloss, RelaImpr, bootstrap CIs, calibration plot):
             recsys eval --ckpt CKPT [--data DIR] [--split test] [--out DIR] [--baseline REPORT.json]
"""

LIGHTNING = {"fit", "validate", "test", "predict"}


def _configure_logging() -> None:
    # recsys' own INFO lines (ignored columns, vocab builds, unused text features) reach the user
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[recsys] %(message)s"))
    logger = logging.getLogger("recsys")
    if not logger.handlers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    # torchrec calls torch.fx.is_fx_tracing on import; the deprecation note it triggers is not ours
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _configure_logging()
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command in LIGHTNING:
        from recsys.train.cli import run

        run([command, *rest])
        return 0
    if command == "plan":
        from recsys.train.plan import main as plan_main

        return plan_main(rest)
    if command == "data":
        from recsys.data.check import main as data_main

        return data_main(rest)
    if command == "optembed":
        from recsys.train.optembed import main as optembed_main

        return optembed_main(rest)
    if command == "export":
        from recsys.export.exporter import main as export_main

        return export_main(rest)
    if command == "serve":
        from recsys.serve.server import main as serve_main

        return serve_main(rest)
    if command == "retrieve":
        from recsys.retrieval.evaluate import main as retrieve_main

        return retrieve_main(rest)
    if command == "eval":
        from recsys.eval.report import main as eval_main

        return eval_main(rest)
    print(f"recsys: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
