"""``recsys optembed search``: OptEmbed's evolutionary search of per-table embedding widths, for any model.

    recsys optembed search --ckpt runs/optembed/supernet/run/checkpoints/best.ckpt --out runs/optembed/search
    recsys optembed search --ckpt ... --out ... --budget 0.5      # at most half the full tables' parameters

(``recsys optembed run`` runs supernet → search → compact retrain in one command: ``recsys.train.optembed_run``.)

A candidate is one width per table, a multiple of ``--dim-step`` (4: FBGEMM's table-batched
kernels, which sharded training uses, need widths that are multiples of 4). Its fitness is the
validation AUC of the supernet with the candidate's widths and the supernet's learned row masks.
The val split goes through the embedding layer once (full widths, rows masked); a candidate then
costs one pass of the model's head over those cached outputs with the columns beyond its widths
zeroed, which is exactly the supernet's forward with ``eval_dims`` (for DIN too: its attention is
part of the head).

Search (as in the paper, after SPOS): a random initial population, then ``--generations``
rounds of ``--mutations`` mutants (each table's dim redrawn with probability ``--mutation-prob``)
and ``--crossovers`` children (each table's dim taken from either parent: crossover over
*tables*), parents drawn from the ``--keep`` best so far. With ``--budget B`` every candidate
has at most ``B · Σ_t rows_t · D_t`` parameters (kept rows × dims); over-budget draws are repaired by
narrowing random tables. Deterministic under ``--seed``.

Writes into ``--out``: ``optembed.pt`` (dims + row masks; the retrain stage's input),
``search.json`` (the winner, sparsity, history), ``pareto.csv`` and ``pareto.png`` (the
(parameters, val AUC) Pareto front of every candidate scored).
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from recsys.data.parquet import ParquetStream
from recsys.data.vocab import Vocabulary, check_same_content
from recsys.embedding.optembed import ARTIFACT, sparsity
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


def search_arguments(seed: int, budget: float | None = None, batch_size: int = 8192) -> argparse.Namespace:
    """The arguments ``recsys optembed run`` parses, at the search's defaults: for scripts that call the pipeline."""
    defaults = SearchConfig()
    return argparse.Namespace(**{**defaults.__dict__, "seed": seed, "budget": budget, "batch_size": batch_size})


class ValCache:
    """The val split through a supernet once (full widths, learned row masks): the embedding layer's
    outputs and the dense features of every batch. A candidate's fitness then narrows the cached
    outputs to its widths and runs only the model's head, which is exactly the supernet's forward
    with ``set_eval_dims(candidate)``, for any model."""

    def __init__(self, model: torch.nn.Module, stream: ParquetStream) -> None:
        layer = getattr(model, "embedding", None)
        if layer is None or getattr(layer, "optembed", None) is None:
            raise TypeError(
                "the checkpoint is not an OptEmbed supernet (model.init_args.embedding: "
                "{kind: optembed, stage: supernet})"
            )
        model.eval()
        layer.set_eval_dims(None)
        self.model, self.layer = model, layer
        batches, labels = [], []
        with torch.inference_mode():
            for batch in tqdm(stream, desc="embedding val", unit="batch", leave=False):
                # narrowable: the layer's outputs; else (text summed into the rows) the batch, re-run per candidate
                batches.append((layer(batch), batch.dense) if layer.narrowable else batch)
                labels.append(batch.labels)
        self.batches = batches
        self.labels = torch.cat(labels).numpy()

    def score(self, dims: np.ndarray) -> float:
        """Val AUC with per-table widths ``dims`` (in ``layer.optembed.owners`` order)."""
        widths = dict(zip(self.layer.optembed.owners, (int(d) for d in dims), strict=True))
        with torch.inference_mode():
            if self.layer.narrowable:
                logits = torch.cat(
                    [self.model.head(self.layer.narrow(embedded, widths), dense) for embedded, dense in self.batches]
                )
            else:
                self.layer.set_eval_dims(widths)
                logits = torch.cat([self.model(batch) for batch in self.batches])
                self.layer.set_eval_dims(None)
        return auc(self.labels, logits.float().numpy())


class Search:
    """The evolutionary loop over integer widths per table; ``fitness`` maps widths → val AUC."""

    def __init__(
        self, kept_rows: np.ndarray, total_rows: np.ndarray, full_dims: np.ndarray, config: SearchConfig
    ) -> None:
        self.kept_rows, self.total_rows, self.full_dims, self.config = kept_rows, total_rows, full_dims, config
        self.rng = np.random.default_rng(config.seed)
        if not 1 <= config.dim_step <= int(full_dims.min()):
            raise ValueError(f"dim_step must lie in 1..{int(full_dims.min())}, got {config.dim_step}")
        self.step = config.dim_step
        # each table's candidates: its full width and every step below it
        self.choices = [np.arange(int(d), 0, -config.dim_step)[::-1] for d in full_dims]
        self.narrowest = np.array([c[0] for c in self.choices])
        self.limit = None if config.budget is None else config.budget * float((total_rows * full_dims).sum())
        self.scored: dict[tuple[int, ...], float] = {}
        if self.limit is not None and self.params(self.narrowest) > self.limit:
            raise ValueError(
                f"--budget {config.budget} allows {self.limit:,.0f} parameters, but the narrowest candidate "
                f"(every table at its narrowest width over its kept rows) has "
                f"{self.params(self.narrowest):,}; raise the budget or lower --dim-step"
            )

    def params(self, dims: np.ndarray) -> int:
        return int((self.kept_rows * dims).sum())

    def _draw(self, tables: np.ndarray) -> np.ndarray:
        return np.array([self.rng.choice(self.choices[t]) for t in tables], dtype=np.int64)

    def repair(self, dims: np.ndarray) -> np.ndarray | None:
        """Narrows random tables (weighted by their kept rows) until the candidate fits the budget."""
        dims = dims.copy()
        if self.limit is None:
            return dims
        while self.params(dims) > self.limit:
            wide = np.flatnonzero((dims > self.narrowest) & (self.kept_rows > 0))
            if wide.size == 0:
                return None
            weights = self.kept_rows[wide] / self.kept_rows[wide].sum()
            dims[self.rng.choice(wide, p=weights)] -= self.step
        return dims

    def random(self) -> np.ndarray | None:
        return self.repair(self._draw(np.arange(len(self.kept_rows))))

    def mutate(self, parent: np.ndarray) -> np.ndarray | None:
        child = parent.copy()
        redraw = np.flatnonzero(self.rng.random(len(child)) < self.config.mutation_prob)
        child[redraw] = self._draw(redraw)
        return self.repair(child)

    def crossover(self, a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
        return self.repair(np.where(self.rng.random(len(a)) < 0.5, a, b))

    def run(self, fitness, progress: bool = True) -> tuple[np.ndarray, float]:  # noqa: ANN001
        cfg = self.config

        def add(candidates: list[np.ndarray | None]) -> None:
            for c in candidates:
                if c is not None and tuple(c) not in self.scored:
                    self.scored[tuple(int(x) for x in c)] = fitness(c)

        add([self.full_dims.copy()] if self.limit is None else [])
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


def search(
    ckpt: str | Path,
    out: str | Path,
    config: SearchConfig,
    data: str | Path | None = None,
    batch_size: int = 8192,
    progress: bool = True,
) -> dict:
    """Runs the search on a supernet checkpoint and writes the artifacts; returns ``search.json``'s dict."""
    from recsys.train.checkpoint import load_model

    model = load_model(str(ckpt))
    data_dir = Path(data) if data else Path(model.info.path)
    vocab = Vocabulary.load_or_build(data_dir)
    check_same_content(model.info, vocab.info(), data_dir)
    stream = ParquetStream(data_dir, "val", vocab, batch_size=batch_size)
    cache = ValCache(model, stream)
    layer = model.embedding
    owners = layer.optembed.owners
    masks = layer.row_masks()
    kept = np.array([int(masks[o].sum()) for o in owners])
    rows = np.array([layer.plans[o].vocab_rows for o in owners])
    full_dims = np.array([layer.plans[o].dim for o in owners])
    engine = Search(kept, rows, full_dims, config)
    best, best_auc = engine.run(cache.score, progress=progress)
    dims = {o: int(d) for o, d in zip(owners, best, strict=True)}
    kept_rows = {o: int(k) for o, k in zip(owners, kept, strict=True)}
    table_rows = {o: int(r) for o, r in zip(owners, rows, strict=True)}
    widths = {o: int(d) for o, d in zip(owners, full_dims, strict=True)}
    full = int((rows * full_dims).sum())
    front = engine.pareto()

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "supernet": str(ckpt),
            "full_dims": widths,
            "dims": dims,
            "kept": masks,
            "rows": table_rows,
            "thresholds": {o: float(layer.optembed.threshold[i].detach()) for i, o in enumerate(owners)},
        },
        out / ARTIFACT,
    )
    with open(out / "pareto.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["params", "fraction_of_full", "val_auc", *[f"dim_{o}" for o in owners]])
        for params, score, d in front:
            writer.writerow([params, f"{params / full:.4f}", f"{score:.5f}", *d])
    _plot(engine, front, out / "pareto.png", full)
    result = {
        "supernet": str(ckpt),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "data": str(data_dir),
        "dims": dims,
        "kept_rows": kept_rows,
        "rows": table_rows,
        "full_dims": widths,
        "val_auc": best_auc,
        "full_dims_val_auc": cache.score(full_dims),
        "params": engine.params(best),
        "full_params": full,
        "sparsity": sparsity(kept_rows, dims, table_rows, widths),
        "row_sparsity": 1 - float(kept.sum() / rows.sum()),
        "candidates_scored": len(engine.scored),
        "config": asdict(config),
    }
    (out / "search.json").write_text(json.dumps(result, indent=2))
    return result


def search_config(args: argparse.Namespace) -> SearchConfig:
    if args.budget is not None and not 0 < args.budget <= 1:
        raise ValueError(f"--budget must lie in (0, 1], got {args.budget}")
    return SearchConfig(
        population=args.population,
        generations=args.generations,
        keep=args.keep,
        mutations=args.mutations,
        crossovers=args.crossovers,
        mutation_prob=args.mutation_prob,
        budget=args.budget,
        seed=args.seed,
        dim_step=args.dim_step,
    )
