"""Resumable runs (configs/run/preemptible.yaml): a directory per config, a refused mismatched resume, a lock."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.train.cli import run
from recsys.train.runs import RunError, RunLock, identity, run_version
from tests.conftest import ROOT, write_dataset

BASE = str(ROOT / "configs/movielens/base.yaml")
PREEMPTIBLE = str(ROOT / "configs/run/preemptible.yaml")


def _fit(data: Path, runs: Path, *extra: str) -> None:
    run(
        [
            "fit",
            "--config",
            BASE,
            "--config",
            PREEMPTIBLE,
            "--data.path",
            str(data),
            "--trainer.max_epochs",
            "1",
            "--data.batch_size",
            "512",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger.init_args.save_dir",
            str(runs),
            "--model.init_args.embedding",
            '{"dim": 8}',
            *extra,
        ]
    )


def test_the_run_directory_is_the_config_and_resumable_keys_do_not_change_it() -> None:
    config = {
        "model": {"init_args": {"optimizer": {"init_args": {"lr": 0.003}}}},
        "trainer": {"max_epochs": 8},
        "ckpt_path": "last",
    }
    longer = config | {"trainer": {"max_epochs": 12}, "ckpt_path": "runs/x/last.ckpt"}
    faster = {"model": {"init_args": {"optimizer": {"init_args": {"lr": 0.01}}}}, "trainer": {"max_epochs": 8}}
    assert run_version(config, "base") == run_version(longer, "base")  # more epochs: the same run, resumed
    assert run_version(config, "base") != run_version(faster, "base")  # another learning rate: another run
    assert run_version(config, "base").startswith("base-")
    assert identity(config) == {"model.init_args.optimizer.init_args.lr": 0.003}


def test_configs_do_not_share_a_directory_and_a_pinned_one_refuses_another_config(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = write_dataset(tmp_path / "tiny")
    runs = tmp_path / "runs"
    _fit(data, runs)
    _fit(data, runs, "--model.init_args.optimizer.init_args.lr", "0.0123")  # not the shipped config's value
    directories = sorted(p.name for p in (runs / "movielens" / "base").iterdir())
    assert len(directories) == 2 and all(d.startswith("base-") for d in directories)
    for directory in directories:  # one best.ckpt each, no best-v1.ckpt beside it
        assert sorted(p.name for p in (runs / "movielens/base" / directory / "checkpoints").iterdir()) == [
            "best.ckpt",
            "last.ckpt",
        ]
    _fit(data, runs, "--trainer.max_epochs", "2")  # more epochs: resumes the first run, no third directory
    assert len(list((runs / "movielens" / "base").iterdir())) == 2
    pinned = ["--trainer.logger.init_args.version", directories[0]]
    with pytest.raises(SystemExit):
        _fit(data, runs, *pinned, "--model.init_args.optimizer.init_args.lr", "0.05")
    err = capsys.readouterr().err
    assert "holds a run with another config (model.init_args.optimizer.init_args.lr" in err


def test_a_second_run_into_the_same_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_dataset(tmp_path / "tiny")
    runs = tmp_path / "runs"
    held = RunLock(runs / "movielens" / "base" / "job")  # another process training there
    try:
        with pytest.raises(SystemExit):
            _fit(data, runs, "--trainer.logger.init_args.version", "job")
        assert "is being trained by pid" in capsys.readouterr().err
    finally:
        held.release()
    with pytest.raises(RunError, match="is being trained by"):
        second = RunLock(runs / "x")
        try:
            RunLock(runs / "x")
        finally:
            second.release()


def test_a_truncated_last_checkpoint_is_named_and_the_previous_good_one_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import os
    import shutil

    from recsys.train.runs import resume_from

    data = write_dataset(tmp_path / "tiny")
    runs = tmp_path / "runs"
    _fit(data, runs, "--trainer.logger.init_args.version", "job")
    checkpoints = runs / "movielens/base/job/checkpoints"
    shutil.copy(checkpoints / "last.ckpt", checkpoints / "epoch-end.ckpt")
    os.utime(checkpoints / "epoch-end.ckpt", ns=(1, 1))  # older than last.ckpt
    (checkpoints / "last.ckpt").write_bytes((checkpoints / "last.ckpt").read_bytes()[:1000])  # a kill mid-write
    with caplog.at_level(logging.WARNING, logger="recsys.train.runs"):
        assert resume_from(checkpoints) == str(checkpoints / "best.ckpt")  # the newest that reads
    assert "passing over unreadable checkpoint(s) last.ckpt (cannot be read" in caplog.text
    _fit(data, runs, "--trainer.logger.init_args.version", "job", "--trainer.max_epochs", "2")  # resumes, no traceback
    for file in checkpoints.iterdir():
        file.write_bytes(b"junk")
    with pytest.raises(RunError, match="no checkpoint there can be read"):
        resume_from(checkpoints)
