"""The one table of ``recsys`` commands: ``recsys --help`` and every command's ``--help`` example come from it.

A command is a module of ``recsys.commands`` with ``main(argv) -> int`` (argument parsing and
printing only); ``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI's own
(``recsys.train.cli``), spelled as Lightning spells them (``--ckpt_path``, ``--data.path``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    section: str
    summary: str
    example: str
    module: str | None = None  # recsys.commands.<module>; None: a LightningCLI subcommand


COMMANDS = [
    Command(
        "fit",
        "Training (LightningCLI; `recsys fit --help` lists every option)",
        "train a model",
        "recsys fit --config configs/movielens/base.yaml",
    ),
    Command(
        "validate",
        "Training (LightningCLI; `recsys fit --help` lists every option)",
        "score the val split",
        "recsys validate --config configs/movielens/base.yaml --ckpt_path CKPT",
    ),
    Command(
        "test",
        "Training (LightningCLI; `recsys fit --help` lists every option)",
        "score the test split",
        "recsys test --config configs/movielens/base.yaml --ckpt_path CKPT",
    ),
    Command(
        "predict",
        "Training (LightningCLI; `recsys fit --help` lists every option)",
        "write predictions.parquet for data.predict_split",
        "recsys predict --config configs/movielens/base.yaml --ckpt_path CKPT",
    ),
    Command(
        "data",
        "Data",
        "every problem of a dataset directory at once (exit 1 on errors)",
        "recsys data check data/ml100k-ctr --json findings.json",
        "data",
    ),
    Command(
        "plan",
        "Scaling out (train sharded with --trainer.strategy torchrec --trainer.devices N)",
        "dry-run the sharding planner for a config",
        "recsys plan --config configs/movielens/din.yaml --world-size 8 --device cuda",
        "plan",
    ),
    Command(
        "optembed",
        "Embedding tables (the kind is the model.init_args.embedding block, docs/configs.md)",
        "OptEmbed end to end (supernet → widths search → compact retrain → test), or the search alone",
        "recsys optembed run --config configs/movielens/din.yaml --config configs/embedding/optembed_supernet.yaml "
        "--out runs/optembed/din --budget 0.5\n  recsys optembed search --ckpt SUPERNET.ckpt --out DIR",
        "optembed",
    ),
    Command(
        "tables",
        "Embedding tables (the kind is the model.init_args.embedding block, docs/configs.md)",
        "a checkpoint's tables: kind, rows, width; managed tables' occupancy, admissions, evictions",
        "recsys tables runs/stream/base/version_0/checkpoints/last.ckpt",
        "tables",
    ),
    Command(
        "export",
        "Serving",
        "a checkpoint → a self-describing directory (manifest, tables fp32/fp16/int8/int4), or a delta",
        "recsys export --ckpt CKPT --out exports/base --dtype int8\n"
        "  recsys export --ckpt DAY2.ckpt --since exports/day1 --out exports/day2 --dtype int8",
        "export",
    ),
    Command(
        "serve",
        "Serving",
        "HTTP JSON scoring of an export (POST /score, GET /healthz, GET /metadata); --watch follows deltas",
        "recsys serve exports/base --port 8080\n  recsys serve --watch exports/ --port 8080",
        "serve",
    ),
    Command(
        "retrieve",
        "Retrieval",
        "ID / content / hybrid retrieval + DIN re-ranking: Recall@K, NDCG@K",
        "recsys retrieve --two-tower TT.ckpt --din DIN.ckpt --out runs/retrieval",
        "retrieve",
    ),
    Command(
        "eval",
        "Evaluation",
        "offline CTR report: AUC, GAUC, logloss, RelaImpr, bootstrap CIs, calibration",
        "recsys eval --ckpt CKPT --split test --baseline runs/base/eval_test/report.json",
        "eval",
    ),
]
BY_NAME = {c.name: c for c in COMMANDS}


def example(name: str) -> str:
    """The ``--help`` epilog of command ``name``."""
    return f"example:\n  {BY_NAME[name].example}"


def usage() -> str:
    """``recsys --help``: every command of the table, by section."""
    lines = ["usage: recsys <command> [options]   (recsys <command> --help)"]
    section = None
    for command in COMMANDS:
        if command.section != section:
            section = command.section
            lines += ["", f"{section}:"]
        lines.append(f"  {command.name:<9} {command.summary}")
        lines += [f"            {line.strip()}" for line in command.example.splitlines()]
    return "\n".join(lines)
