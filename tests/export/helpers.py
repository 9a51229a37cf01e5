"""Trained checkpoints of every table kind on the tiny dataset (the `trained` fixture, registered in
tests/conftest.py) and raw request rows, for the export and serve tests."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recsys.commands.optembed import main as optembed_main
from recsys.train.cli import run
from tests.conftest import ROOT, write_dataset

CONFIGS = ROOT / "configs" / "movielens"


def fit(data: Path, logs: Path, name: str, *extra: str, embedding: dict | None = None) -> Path:
    run(
        [
            "fit",
            "--config",
            str(CONFIGS / "base.yaml"),
            *extra,
            "--data.path",
            str(data),
            "--trainer.max_epochs",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--model.init_args.embedding",
            json.dumps(embedding or {"dim": 8}),
            "--data.batch_size",
            "256",
            "--trainer.logger.init_args.save_dir",
            str(logs),
            "--trainer.logger.init_args.name",
            name,
        ]
    )
    return next((logs / name).rglob("best.ckpt"))


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"data", "base", "din", "unified", "optembed", "supernet", "text"} → dataset dir and best checkpoints."""
    root = tmp_path_factory.mktemp("export")
    data = write_dataset(root / "tiny")
    logs = root / "runs"
    out = {"data": data, "base": fit(data, logs, "base")}
    out["din"] = fit(data, logs, "din", "--config", str(CONFIGS / "din.yaml"))
    out["unified"] = fit(data, logs, "unified", embedding={"kind": "unified", "rows": 50, "dim": 4, "probes": 2})
    out["supernet"] = fit(data, logs, "supernet", embedding={"kind": "optembed", "dim": 8})
    assert (
        optembed_main(
            [
                "search",
                "--ckpt",
                str(out["supernet"]),
                "--out",
                str(root / "search"),
                "--budget",
                "0.5",
                "--population",
                "6",
                "--generations",
                "2",
            ]
        )
        == 0
    )
    out["optembed"] = fit(
        data,
        logs,
        "optembed",
        embedding={"kind": "optembed", "stage": "compact", "dim": 8, "artifact": str(root / "search")},
    )
    out["text"] = fit(
        data,
        logs,
        "text",
        "--config",
        str(CONFIGS / "din.yaml"),
        "--config",
        str(ROOT / "configs" / "text" / "mean.yaml"),
    )
    return out


def raw_rows(data: Path, split: str = "test", n: int | None = None) -> list[dict]:
    """Rows as they sit in the Parquet files, minus the columns the schema does not know."""
    table = pq.read_table(data / split / "part-0.parquet").drop_columns(["row_id"])
    return table.to_pylist()[:n]
