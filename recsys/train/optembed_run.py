"""``recsys optembed run``: OptEmbed end to end for any model: supernet → search → compact retrain → test.

    recsys optembed run --config configs/movielens/din.yaml --config configs/embedding/optembed_supernet.yaml \\
        --out runs/optembed/din [--budget 0.5] [--seed 1] [-- --trainer.max_epochs 4]

The configs must give the model ``embedding: {kind: optembed, stage: supernet, ...}``; options after
``--`` go to both training runs. Each stage writes into ``--out``::

    supernet/<fp>/checkpoints/best.ckpt  stage 1: recsys fit with the configs (the supernet)
    search/<fp>/optembed.pt, search.json stage 2: the evolutionary widths search on val (pareto.csv/png)
    compact/<fp>/checkpoints/best.ckpt   stage 3: recsys fit, embedding stage compact from search/
    compact/<fp>/eval_test/report.json   the compact model on the test split (read once)
    result.json                          the summary printed at the end

``<fp>`` is the stage's fingerprint: a hash of the resolved config (the LightningCLI config after
every ``--config`` and option, logger paths left out) and, from the search on, the search settings.
A stage whose ``FINGERPRINT`` file holds the same one is skipped; anything else reruns it and the
stages after it into a new ``<fp>`` directory (nothing is deleted), so a rerun after a crash
resumes where it stopped and another budget reuses the supernet.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from recsys.embedding.spec import EmbeddingSpec

STAGES = ("supernet", "search", "compact")


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _done(directory: Path, fingerprint: str) -> bool:
    marker = directory / "FINGERPRINT"
    return marker.exists() and marker.read_text().strip() == fingerprint


def _finish(directory: Path, fingerprint: str) -> None:
    (directory / "FINGERPRINT").write_text(fingerprint + "\n")


def _best(out: Path, stage: str, fingerprint: str) -> Path:
    return out / stage / fingerprint / "checkpoints" / "best.ckpt"


def _fit(args: list[str], out: Path, stage: str, fingerprint: str) -> Path:
    from recsys.train.cli import run

    run_dir = out / stage / fingerprint
    if run_dir.exists():  # a run of this stage that was interrupted: kept aside, not mixed with the new one
        aside = run_dir.with_name(
            f"{fingerprint}.interrupted-{sum(1 for _ in run_dir.parent.glob(f'{fingerprint}.*')) + 1}"
        )
        run_dir.rename(aside)
        print(f"[optembed] {run_dir} holds an interrupted run: moved to {aside.name}", flush=True)
    run(
        [
            "fit",
            *args,
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger.init_args.save_dir",
            str(out),
            "--trainer.logger.init_args.name",
            stage,
            "--trainer.logger.init_args.version",
            fingerprint,
        ]
    )
    best = _best(out, stage, fingerprint)
    if not best.exists():
        raise FileNotFoundError(
            f"{best}: the {stage} run wrote no best checkpoint (its config needs a ModelCheckpoint "
            f"with filename: best, as configs/movielens/*.yaml have)"
        )
    return best


def pipeline(configs: list[str], out: Path, search_args: argparse.Namespace, extra: list[str]) -> dict:
    from recsys.eval.report import evaluate
    from recsys.train.cli import resolved_config
    from recsys.train.optembed import search, search_config

    fit_args = [a for c in configs for a in ("--config", c)] + extra
    resolved = resolved_config(fit_args)
    block = dict(((resolved.get("model") or {}).get("init_args") or {}).get("embedding") or {})
    if block.get("kind") != "optembed" or block.get("stage", "supernet") != "supernet":
        raise ValueError(
            "the configs must give the model an OptEmbed supernet: add --config "
            "configs/embedding/optembed_supernet.yaml (model.init_args.embedding: {kind: optembed, "
            f"stage: supernet}}); got {block or 'no embedding block'}"
        )
    config = search_config(search_args)
    if config.budget is None and block.get("budget") is not None:
        config.budget = float(block["budget"])
    out.mkdir(parents=True, exist_ok=True)
    printed = {"configs": configs, "out": str(out), "search": None}

    supernet_key = _fingerprint("supernet", resolved)
    supernet = _best(out, "supernet", supernet_key)
    if not _done(out / "supernet", supernet_key):
        print(f"[optembed] stage 1/3: supernet → {supernet.parent.parent}", flush=True)
        _fit(fit_args, out, "supernet", supernet_key)
        _finish(out / "supernet", supernet_key)
    search_key = _fingerprint(supernet_key, vars(config))
    search_dir = out / "search" / search_key  # one per budget and settings: none overwrites another
    if not _done(search_dir, search_key):
        print(f"[optembed] stage 2/3: search (budget {config.budget}) → {search_dir}", flush=True)
        search(supernet, search_dir, config, batch_size=search_args.batch_size)
        _finish(search_dir, search_key)
    found = json.loads((search_dir / "search.json").read_text())
    compact_block = {**block, "stage": "compact", "artifact": str(search_dir)}
    EmbeddingSpec.parse(compact_block, _schema(resolved))  # a bad block stops here, not after training
    compact_key = _fingerprint(search_key, resolved)
    compact = _best(out, "compact", compact_key)
    report_file = compact.parent.parent / "eval_test" / "report.json"
    if not _done(out / "compact", compact_key):
        print(f"[optembed] stage 3/3: compact retrain → {compact.parent.parent}", flush=True)
        _fit([*fit_args, "--model.init_args.embedding", json.dumps(compact_block)], out, "compact", compact_key)
        evaluate(compact, split="test", out=report_file.parent, bootstrap=0)
        _finish(out / "compact", compact_key)
    report = json.loads(report_file.read_text())
    printed["search"] = str(search_dir)
    result = printed | {
        "test_auc": report["auc"],
        "test_gauc": report["gauc"],
        "test_logloss": report["logloss"],
        "sparsity": found["sparsity"],
        "row_sparsity": found["row_sparsity"],
        "params": found["params"],
        "full_params": found["full_params"],
        "search_val_auc": found["val_auc"],
        "supernet_val_auc": found["full_dims_val_auc"],
        "dims": found["dims"],
        "kept_rows": found["kept_rows"],
        "checkpoint": str(compact),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def _schema(resolved: dict):  # noqa: ANN202
    from recsys.data.schema import load_schema

    return load_schema(((resolved.get("data") or {}).get("path")) or "data/ml100k-ctr")
