"""Day-by-day training on the drifting stream: one day per epoch, next-day validation, the test split
after the range, missing days refused, and a SIGKILL mid-day resumed without losing or repeating a
row (with managed tables, whose pending ids and interval history ride in the checkpoint)."""

from __future__ import annotations

import importlib.util
import json
import re
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from recsys.data.arrow import DataError
from recsys.data.datamodule import CTRDataModule
from recsys.data.days import parse_days
from recsys.train.callbacks import read_ledger
from tests.conftest import ROOT
from tests.train.test_reliability import _config as reliability_config
from tests.train.test_reliability import _fit, _state

spec = importlib.util.spec_from_file_location("stream_generator", ROOT / "datasets" / "synthetic" / "stream.py")
stream_generator = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stream_generator)


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 days × 600 rows; C1 and C2 drift and have `vocabulary: none`."""
    out = tmp_path_factory.mktemp("stream") / "stream"
    stream_generator.generate(
        out,
        days=4,
        rows_per_day=600,
        num_dense=2,
        num_sparse=4,
        drifting=2,
        catalogue=300,
        static_cardinality=50,
        row_group_size=100,  # 6 row groups a day: 2 ranks read 3 each
    )
    schema = yaml.safe_load((out / "schema.yaml").read_text())
    for feature in schema["features"]:
        if feature["name"] in ("C1", "C2"):
            feature["vocabulary"] = "none"
    (out / "schema.yaml").write_text(yaml.safe_dump(schema))
    return out


def test_the_generator_renews_a_share_of_the_drifting_ids_each_day(stream: Path) -> None:
    info = json.loads((stream / "STREAM.json").read_text())
    assert [d["day"] for d in info["days"]] == ["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04"]
    assert all(share == 1.0 for share in info["days"][0]["new_id_share"])
    later = [s for d in info["days"][1:] for s in d["new_id_share"]]
    assert all(0.05 < s < 0.8 for s in later)  # new ids every day, old ones still around
    rows = pq.read_table(stream / "train" / "day=2024-01-02").num_rows
    assert rows == 600


def test_each_epoch_reads_its_day_and_validates_on_the_next(stream: Path) -> None:
    dm = CTRDataModule(str(stream), batch_size=100, days="2024-01-01:2024-01-03")
    assert dm.split_path("train") == "train/day=2024-01-01" and dm.split_path("val") == "train/day=2024-01-02"
    assert dm.split_path("test") == "train/day=2024-01-04"
    for epoch, day in ((1, "02"), (2, "03")):  # as the trainer moves on
        dm.trainer = SimpleNamespace(current_epoch=epoch)
        assert dm.split_path("train") == f"train/day=2024-01-{day}"
        assert dm.split_path("val") == f"train/day=2024-01-0{int(day) + 1}"
        read = np.concatenate([b.dense[:, 0].numpy() for b in dm.stream("train")])  # the day's I1, standardized
        mean, std = dm.vocab.numeric_stats["I1"]
        raw = pq.read_table(stream / "train" / f"day=2024-01-{day}").column("I1").to_numpy()
        np.testing.assert_allclose(np.sort(read), np.sort((raw - mean) / std), rtol=0, atol=1e-6)
        assert not dm.stream("train")._encoded  # a day is read once for training: nothing kept in memory
    dm.trainer = None
    # the vocabularies (C3, C4) come from the first day only; the raw features have none
    assert dm.vocab.num_embeddings("C1") == 0 and dm.vocab.num_embeddings("C3") > 1
    assert parse_days("2024-02-28:2024-03-01") == ["2024-02-28", "2024-02-29", "2024-03-01"]


@pytest.mark.parametrize(
    ("days", "message"),
    [
        ("2024-01-01:2024-01-04", "day=2024-01-05: the day after the range (last validation and the test split)"),
        ("2023-12-31:2024-01-02", "day=2023-12-31: a day of --data.days 2023-12-31:2024-01-02 is missing"),
        ("2024-01-03:2024-01-01", "the last day 2024-01-01 comes before the first 2024-01-03"),
        ("2024-01-01", "expected FIRST:LAST"),
        ("2024-01-01:2024-13-01", "'2024-13-01' is not a date"),
    ],
)
def test_a_missing_or_malformed_day_is_refused_naming_it(stream: Path, days: str, message: str) -> None:
    with pytest.raises((DataError, ValueError), match=re.escape(message)):
        CTRDataModule(str(stream), days=days)


def _config(path: Path, data: Path, runs: Path, version: str, kill_at: int | None, every: int | None = 4) -> Path:
    """The reliability tests' run, day by day over the stream with managed C1 and C2 (admit after 2, every
    3 steps); ``every``: a checkpoint every so many steps (None: at the end of each day)."""
    kill = [{"class_path": "tests.train.faults.KillAt", "init_args": {"step": kill_at}}] if kill_at is not None else []
    config = yaml.safe_load(reliability_config(path, data, runs, version, kill, every=every).read_text())
    managed = {"kind": "managed", "capacity": 160, "admit_after": 2, "interval": 3}
    config["model"]["init_args"] |= {"embedding": {"dim": 8, "features": {"C1": managed, "C2": managed}}}
    config["model"]["init_args"]["dnn_hidden_units"] = [16]
    config["data"]["days"] = "2024-01-01:2024-01-03"
    del config["trainer"]["max_epochs"]  # one epoch per day
    config["trainer"]["num_sanity_val_steps"] = 0
    path.write_text(yaml.safe_dump(config))
    return path


def test_sigkill_mid_day_then_the_same_command_resumes_the_day_exactly(stream: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    full = _fit(_config(tmp_path / "full.yaml", stream, runs, "full", None))
    assert full.returncode == 0, full.stderr[-3000:]
    reference = read_ledger(runs / "full" / "ledger" / "ledger.rank0.tsv")
    assert [sum(1 for line in reference if line[1] == e) for e in range(3)] == [10, 10, 10]  # 600 rows / 60
    for epoch in range(3):  # every row of the epoch's day, once
        positions = sorted(p for _, e, _, ps in reference if e == epoch for p in ps)
        assert positions == list(range(600))

    config = _config(tmp_path / "job.yaml", stream, runs, "job", kill_at=15)  # mid-day 2, after a checkpoint at 12
    killed = _fit(config)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ledger = runs / "job" / "ledger" / "ledger.rank0.tsv"
    kept = [line for line in read_ledger(ledger) if line[0] <= 12]
    ledger.rename(ledger.with_suffix(".killed"))
    resumed = _fit(config)  # the same command
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = read_ledger(ledger)
    assert after[0][:3] == (13, 1, 2)  # step 13: day 2 (epoch 1), its third batch
    assert kept + after == reference
    a, b = _state(runs / "full" / "final.ckpt"), _state(runs / "job" / "final.ckpt")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
    slots = "model.embedding.managed.C1.mch._mch_sorted_raw_ids"
    full_state = torch.load(runs / "full" / "final.ckpt", weights_only=True)["state_dict"]
    job_state = torch.load(runs / "job" / "final.ckpt", weights_only=True)["state_dict"]
    key = slots.removeprefix("model.")
    assert torch.equal(full_state[key], job_state[key])  # the same ids hold the same slots


def test_a_sharded_day_by_day_run_with_managed_tables_resumes_on_one_process(stream: Path, tmp_path: Path) -> None:
    """Days 1–2 on 2 ranks (tables sharded, managed slots on every rank), its end-of-day checkpoint (DCP)
    resumed by 1 rank for day 3: the slots and statistics carry over and day 3 trains every row once."""
    from recsys.train.checkpoint import load_model

    runs = tmp_path / "runs"
    config = _config(tmp_path / "two.yaml", stream, runs, "two", kill_at=None, every=None)
    two = _fit(
        config, "--trainer.strategy", "torchrec", "--trainer.devices", "2", "--data.days", "2024-01-01:2024-01-02"
    )
    assert two.returncode == 0, two.stderr[-3000:]
    last = runs / "two" / "checkpoints" / "last.ckpt"
    assert last.is_dir()  # a sharded (DCP) checkpoint
    after_two = load_model(last).embedding.managed["C1"]
    assert int(after_two.step) == 10  # 2 days × 600 rows / (2 ranks × 60): every rank counted every id
    one_config = _config(tmp_path / "one.yaml", stream, runs, "one", kill_at=None, every=None)
    loaded = yaml.safe_load(one_config.read_text())
    dump = {"class_path": "tests.train.faults.SaveManagedState", "init_args": {"path": str(tmp_path / "held.json")}}
    loaded["trainer"]["callbacks"].append(dump)
    one_config.write_text(yaml.safe_dump(loaded))
    one = _fit(
        one_config,
        "--ckpt_path",
        str(last),
        "--trainer.strategy",
        "torchrec",  # on 1 rank: a sharded checkpoint resumes under the strategy that reads it
    )  # days 1–3 on 1 process, from the end of day 2
    assert one.returncode == 0, one.stderr[-3000:]
    ledger = read_ledger(runs / "one" / "ledger" / "ledger.rank0.tsv")
    assert {epoch for _, epoch, _, _ in ledger} == {2}  # only day 3 trained
    # the resumed run held the 2-rank run's pending ids and interval phase (DCP fills tensors in place
    # only: the extra state is handed back by the strategy)
    from recsys.embedding.managed import _unpack

    saved = load_model(last).embedding.managed["C2"].get_extra_state()
    held = json.loads((tmp_path / "held.json").read_text())["C2"]
    assert held["pending"] == sorted(_unpack(saved["pending_ids"]).tolist()) and held["pending"]
    assert held["history"] == len(_unpack(saved["history"]["ids"])) > 0  # mid-interval sightings
    assert held["last_eviction_iter"] == saved["last_eviction_iter"]
    assert sorted(p for *_, ps in ledger for p in ps) == list(range(600))
    final = load_model(runs / "one" / "final.ckpt").embedding.managed["C1"]
    # the counters went on from the 2-rank state (a fresh table would restart them from 0)
    assert int(final.step) == 20 and int(final.admissions) > int(after_two.admissions)
