"""``recsys optembed search``: OptEmbed's evolutionary search of per-table embedding dims.

    recsys optembed search --ckpt runs/optembed/supernet/checkpoints/last.ckpt --out runs/optembed/search
    recsys optembed search --ckpt ... --out ... --budget 0.5      # at most half the full tables' parameters

A candidate is one width per table, a multiple of ``--dim-step`` (4: FBGEMM's table-batched
kernels, which sharded training uses, need widths that are multiples of 4). Its fitness is the validation AUC of the supernet with the
candidate's dims and the supernet's learned row masks. The val split is embedded once (all
``D`` columns, rows masked); a candidate then costs one MLP pass over those cached vectors with
the columns beyond its dims zeroed, which is exactly the supernet's forward with ``eval_dims``.

Search (as in the paper, after SPOS): a random initial population, then ``--generations``
rounds of ``--mutations`` mutants (each table's dim redrawn with probability ``--mutation-prob``)
and ``--crossovers`` children (each table's dim taken from either parent: crossover over
*tables*), parents drawn from the ``--keep`` best so far. With ``--budget B`` every candidate
has at most ``B · Σ_t rows_t · D`` parameters (kept rows × dims); over-budget draws are repaired by
narrowing random tables. Deterministic under ``--seed``.

Writes into ``--out``: ``optembed.pt`` (dims + row masks; the retrain stage's input),
``search.json`` (the winner, sparsity, history), ``pareto.csv`` and ``pareto.png`` (the
(parameters, val AUC) Pareto front of every candidate scored).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from recsys.data.parquet import ParquetStream
from recsys.data.vocab import Vocabulary
from recsys.embedding.optembed import ARTIFACT, OptEmbedBag, sparsity
from recsys.eval.metrics import auc


@dataclass
class SearchConfig:
    population: int = 50
    generations: int = 30
    keep: int = 15
    mutations: int = 10
    crossovers: int = 10
    mutation_prob: float = 0.1
    budget: float | None = None
    seed: int = 0
    dim_step: int = 4  # FBGEMM's table-batched kernels need widths that are multiples of 4


class ValCache:
    """The val split embedded once by a supernet: pooled ``[N, ΣD]``, dense, labels."""

    def __init__(self, model: torch.nn.Module, stream: ParquetStream) -> None:
        tables = model.tables
        if not isinstance(tables, OptEmbedBag):
            raise TypeError("the checkpoint is not an OptEmbed supernet (model.init_args.optembed.stage=supernet)")
        model.eval()
        tables.set_eval_dims(None)
        pooled, dense, labels = [], [], []
        with torch.inference_mode():
            for batch in tqdm(stream, desc="embedding val", unit="batch", leave=False):
                pooled.append(model.pooled(batch))
                dense.append(batch.dense)
                labels.append(batch.labels)
        self.model = model
        self.pooled, self.dense = torch.cat(pooled), torch.cat(dense)
        self.labels = torch.cat(labels).numpy()
        # the owning table of every pooled column
        owners = [tables.owners[f] for f in model.pooled_order]
        self.column_table = torch.tensor([tables.index[o] for o in owners]).repeat_interleave(tables.dim)
        self.column_offset = torch.arange(tables.dim).repeat(len(owners))

    def score(self, dims: np.ndarray) -> float:
        """Val AUC with per-table ``dims`` (in ``tables.table_owners`` order)."""
        keep = self.column_offset < torch.as_tensor(dims)[self.column_table]
        with torch.inference_mode():
            logits = self.model.head(self.pooled * keep, self.dense)
        return auc(self.labels, logits.float().numpy())


class Search:
    """The evolutionary loop over integer dims vectors; ``fitness`` maps dims → val AUC."""

    def __init__(self, kept_rows: np.ndarray, total_rows: np.ndarray, dim: int, config: SearchConfig) -> None:
        self.kept_rows, self.total_rows, self.dim, self.config = kept_rows, total_rows, dim, config
        self.rng = np.random.default_rng(config.seed)
        if not 1 <= config.dim_step <= dim:
            raise ValueError(f"dim_step must lie in 1..{dim}, got {config.dim_step}")
        self.step = config.dim_step
        self.choices = np.arange(dim, 0, -config.dim_step)[::-1]  # D and every step below it
        self.limit = None if config.budget is None else config.budget * float(total_rows.sum()) * dim
        self.scored: dict[tuple[int, ...], float] = {}
        smallest = self.params(np.full(len(kept_rows), self.choices[0]))
        if self.limit is not None and smallest > self.limit:
            raise ValueError(f"--budget {config.budget} allows {self.limit:,.0f} parameters, but the narrowest candidate "
                             f"(every table {self.choices[0]} wide over its kept rows) has {smallest:,}; raise the budget "
                             f"or lower --dim-step")

    def params(self, dims: np.ndarray) -> int:
        return int((self.kept_rows * dims).sum())

    def repair(self, dims: np.ndarray) -> np.ndarray | None:
        """Narrows random tables (weighted by their kept rows) until the candidate fits the budget."""
        dims = dims.copy()
        if self.limit is None:
            return dims
        while self.params(dims) > self.limit:
            wide = np.flatnonzero((dims > self.choices[0]) & (self.kept_rows > 0))
            if wide.size == 0:
                return None
            weights = self.kept_rows[wide] / self.kept_rows[wide].sum()
            dims[self.rng.choice(wide, p=weights)] -= self.step
        return dims

    def random(self) -> np.ndarray | None:
        return self.repair(self.rng.choice(self.choices, size=len(self.kept_rows)))

    def mutate(self, parent: np.ndarray) -> np.ndarray | None:
        child = parent.copy()
        redraw = self.rng.random(len(child)) < self.config.mutation_prob
        child[redraw] = self.rng.choice(self.choices, size=int(redraw.sum()))
        return self.repair(child)

    def crossover(self, a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
        return self.repair(np.where(self.rng.random(len(a)) < 0.5, a, b))

    def run(self, fitness, progress: bool = True) -> tuple[np.ndarray, float]:  # noqa: ANN001
        cfg = self.config

        def add(candidates: list[np.ndarray | None]) -> None:
            for c in candidates:
                if c is not None and tuple(c) not in self.scored:
                    self.scored[tuple(int(x) for x in c)] = fitness(c)

        add([np.full(len(self.kept_rows), self.dim)] if self.limit is None else [])
        add([self.random() for _ in range(cfg.population)])
        for _ in tqdm(range(cfg.generations), desc="evolution", unit="gen", disable=not progress):
            top = [np.array(k) for k, _ in sorted(self.scored.items(), key=lambda kv: -kv[1])[: cfg.keep]]
            children = [self.mutate(top[self.rng.integers(len(top))]) for _ in range(cfg.mutations)]
            for _ in range(cfg.crossovers):
                i, j = self.rng.choice(len(top), size=2, replace=len(top) < 2)
                children.append(self.crossover(top[i], top[j]))
            add(children)
        best = max(self.scored.items(), key=lambda kv: kv[1])
        return np.array(best[0]), best[1]

    def pareto(self) -> list[tuple[int, float, tuple[int, ...]]]:
        """(params, val AUC, dims) of every candidate no other beats on both, by params."""
        points = sorted(((self.params(np.array(d)), a, d) for d, a in self.scored.items()), key=lambda p: (p[0], -p[1]))
        front, best = [], -np.inf
        for params, score, dims in points:
            if score > best:
                front.append((params, score, dims))
                best = score
        return front


def _plot(search: Search, front: list, path: Path, full: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [search.params(np.array(d)) / full for d in search.scored]
    ax.scatter(xs, list(search.scored.values()), s=8, alpha=0.4, label="candidates")
    ax.plot([p / full for p, _, _ in front], [a for _, a, _ in front], "r.-", label="Pareto front")
    ax.set_xlabel("embedding parameters / full tables")
    ax.set_ylabel("val AUC (supernet weights)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def search(ckpt: str | Path, out: str | Path, config: SearchConfig, data: str | Path | None = None,
           batch_size: int = 8192, progress: bool = True) -> dict:
    """Runs the search on a supernet checkpoint and writes the artifacts; returns ``search.json``'s dict."""
    from recsys.train.module import load_model

    model = load_model(str(ckpt))
    data_dir = Path(data) if data else Path(model.info.path)
    stream = ParquetStream(data_dir, "val", Vocabulary.load_or_build(data_dir), batch_size=batch_size)
    cache = ValCache(model, stream)
    tables: OptEmbedBag = model.tables
    owners = tables.table_owners
    masks = tables.row_masks()
    kept = np.array([int(masks[o].sum()) for o in owners])
    rows = np.array([tables.rows[o] for o in owners])
    engine = Search(kept, rows, tables.dim, config)
    best, best_auc = engine.run(cache.score, progress=progress)
    dims = {o: int(d) for o, d in zip(owners, best, strict=True)}
    kept_rows = {o: int(k) for o, k in zip(owners, kept, strict=True)}
    full = int(rows.sum()) * tables.dim
    front = engine.pareto()

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"supernet": str(ckpt), "dim": tables.dim, "dims": dims, "kept": masks, "rows": dict(tables.rows),
                "thresholds": {o: float(tables.threshold[i].detach()) for i, o in enumerate(owners)}}, out / ARTIFACT)
    with open(out / "pareto.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["params", "fraction_of_full", "val_auc", *[f"dim_{o}" for o in owners]])
        for params, score, d in front:
            writer.writerow([params, f"{params / full:.4f}", f"{score:.5f}", *d])
    _plot(engine, front, out / "pareto.png", full)
    result = {
        "supernet": str(ckpt),
        "data": str(data_dir),
        "dims": dims,
        "kept_rows": kept_rows,
        "rows": dict(tables.rows),
        "dim": tables.dim,
        "val_auc": best_auc,
        "full_dims_val_auc": cache.score(np.full(len(owners), tables.dim)),
        "params": engine.params(best),
        "full_params": full,
        "sparsity": sparsity(kept_rows, dims, dict(tables.rows), tables.dim),
        "row_sparsity": 1 - float(kept.sum() / rows.sum()),
        "candidates_scored": len(engine.scored),
        "config": asdict(config),
    }
    (out / "search.json").write_text(json.dumps(result, indent=2))
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys optembed search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="supernet checkpoint (.ckpt file or sharded checkpoint dir)")
    parser.add_argument("--out", required=True, help="output directory (optembed.pt, search.json, pareto.csv/png)")
    parser.add_argument("--data", help="dataset directory (default: the one the supernet was trained on)")
    parser.add_argument("--budget", type=float, help="max embedding parameters as a fraction of the full tables' (0-1]")
    defaults = SearchConfig()
    for name in ("population", "generations", "keep", "mutations", "crossovers", "seed", "dim_step"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--mutation-prob", type=float, default=defaults.mutation_prob)
    parser.add_argument("--batch-size", type=int, default=8192)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "search":
        print("usage: recsys optembed search --ckpt SUPERNET --out DIR [--budget B] (see --help)", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv[1:])
    if args.budget is not None and not 0 < args.budget <= 1:
        print(f"recsys optembed search: --budget must lie in (0, 1], got {args.budget}", file=sys.stderr)
        return 2
    config = SearchConfig(population=args.population, generations=args.generations, keep=args.keep,
                          mutations=args.mutations, crossovers=args.crossovers, mutation_prob=args.mutation_prob,
                          budget=args.budget, seed=args.seed, dim_step=args.dim_step)
    result = search(args.ckpt, args.out, config, data=args.data, batch_size=args.batch_size)
    print(json.dumps({k: result[k] for k in ("dims", "kept_rows", "val_auc", "full_dims_val_auc", "sparsity")}, indent=2))
    print(f"wrote {args.out}/{ARTIFACT}; retrain with --model.init_args.optembed.stage compact "
          f"--model.init_args.optembed.artifact {args.out}")
    return 0
