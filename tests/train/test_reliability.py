"""Kill-and-resume without losing or repeating a row, and the non-finite guard."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from recsys.train.callbacks import read_ledger
from recsys.train.checkpoint import load_model
from recsys.train.cli import run
from recsys.train.module import NonFiniteError
from tests.conftest import ROOT, write_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("reliable") / "tiny")


def _config(
    path: Path, data: Path, runs: Path, version: str, callbacks: list[dict], workers: int = 0, every: int | None = 10
) -> Path:
    """A resumable EmbeddingMLP run (ledger, final weights); ``every``: a checkpoint every so many steps
    (None: at the end of each epoch)."""
    steps = {"every_n_train_steps": every} if every else {}
    config = {
        "seed_everything": 42,
        "ckpt_path": "last",
        "model": {
            "class_path": "recsys.models.base.EmbeddingMLP",
            "init_args": {
                "embedding": {"dim": 8},
                "dnn_hidden_units": [32],
                "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}},
            },
        },
        "data": {"path": str(data), "batch_size": 60, "num_workers": workers},
        "trainer": {
            "max_epochs": 2,
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "log_every_n_steps": 1,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(runs), "name": "", "version": version},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {**steps, "save_top_k": 0, "save_last": True},
                },
                {
                    "class_path": "recsys.train.callbacks.RowLedger",
                    "init_args": {"dirpath": str(runs / version / "ledger")},
                },
                {
                    "class_path": "tests.train.faults.SaveFinal",
                    "init_args": {"path": str(runs / version / "final.ckpt")},
                },
                *callbacks,
            ],
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(config: Path, *extra: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``recsys fit`` in its own session (the fault kills the job's whole process group, as a preemption
    would), started by ``launcher`` if given (torchrun). Its return code is the command's; when that is 0,
    every process the command started (rank 1 of a 2-rank run, loader workers) must have ended with 0
    too: nothing else reads rank 1's status."""
    recsys = Path(sys.executable).parent / "recsys"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    codes = config.parent / f"{config.stem}.exit_codes.json"
    driver = [sys.executable, "-m", "tests.train.exit_codes", str(codes), "600"]  # kills the job after 600 s
    done = subprocess.run(
        [*driver, *launcher, str(recsys), "fit", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        env=env,
        cwd=config.parent,
        timeout=660,
    )
    assert done.returncode == 0, done.stderr[-3000:]  # the driver's own
    ended = json.loads(codes.read_text())
    if ended["command"] == 0:
        ranks = int(extra[extra.index("--trainer.devices") + 1]) if "--trainer.devices" in extra else 1
        ranks = 1 if launcher else ranks  # torchrun waits for its ranks itself, and fails when one does
        assert len(ended["all"]) >= ranks, f"the driver did not see every rank end: {ended}"
        assert ended["all"] == [0] * len(ended["all"]), f"a process of the finished run did not exit 0: {ended}"
    return subprocess.CompletedProcess(done.args, ended["command"], done.stdout, done.stderr)


def _state(path: Path) -> dict[str, torch.Tensor]:
    state = load_model(path).state_dict()  # (a managed table's extra state is a dict: left out)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


@pytest.mark.parametrize("devices", [1, 2])
def test_sigkill_mid_epoch_then_the_same_command_resumes_without_losing_or_repeating_a_row(
    tiny: Path, tmp_path: Path, devices: int
) -> None:
    runs = tmp_path / "runs"
    extra = ["--trainer.strategy", "torchrec", "--trainer.devices", "2"] if devices == 2 else []
    workers = 2 if devices == 1 else 0
    full = _fit(_config(tmp_path / "full.yaml", tiny, runs, "full", [], workers), *extra)
    assert full.returncode == 0, full.stderr[-3000:]
    for note in ("is_fx_tracing", "LeafSpec", "Tip:"):  # libraries' deprecations and Lightning's adverts
        assert note not in full.stdout + full.stderr, full.stderr[-3000:]

    config = _config(
        tmp_path / "job.yaml",
        tiny,
        runs,
        "job",
        [{"class_path": "tests.train.faults.KillAt", "init_args": {"step": 27}}],
        workers,
    )
    killed = _fit(config, *extra)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (runs / "job" / "final.ckpt").exists()
    killed_ledgers = {p.name: read_ledger(p) for p in (runs / "job" / "ledger").iterdir()}
    assert max(step for lines in killed_ledgers.values() for step, *_ in lines) >= 27  # died mid-epoch 0
    for p in (runs / "job" / "ledger").iterdir():
        p.rename(p.with_suffix(".killed"))

    resumed = _fit(config, *extra)  # the same command
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name, killed_lines in killed_ledgers.items():
        kept = [line for line in killed_lines if line[0] <= 20]  # up to the last checkpoint (step 20)
        after = read_ledger(runs / "job" / "ledger" / name)
        assert after[0][:3] == (21, 0, 20)  # resumed at the next step, mid-epoch 0
        assert kept + after == read_ledger(runs / "full" / "ledger" / name)  # same rows, same steps
        positions = [p for _, epoch, _, ps in kept + after if epoch == 0 for p in ps]
        assert len(positions) == len(set(positions))  # no row twice in an epoch
    a, b = _state(runs / "full" / "final.ckpt"), _state(runs / "job" / "final.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


def test_torchrun_starts_the_same_2_rank_run_as_lightnings_launcher_and_it_logs_each_thing_once(
    tiny: Path, tmp_path: Path
) -> None:
    """How a cluster job starts it: ``torchrun --nproc_per_node 2 recsys fit`` ends as the run Lightning's
    own launcher starts does — every process exits 0 (torchrun reads its ranks' exit status itself), the
    same final weights (same seed, same shards of rows) — and rank 1 adds no info lines of its own, nor
    do torchrec's or Lightning's deprecations."""
    runs = tmp_path / "runs"
    extra = ["--trainer.strategy", "torchrec", "--trainer.devices", "2"]
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    own = _fit(_config(tmp_path / "own.yaml", tiny, runs, "own", []), *extra)
    assert own.returncode == 0, own.stderr[-3000:]
    started = _fit(_config(tmp_path / "torchrun.yaml", tiny, runs, "torchrun", []), *extra, launcher=torchrun)
    assert started.returncode == 0, started.stderr[-3000:]  # torchrun's: non-zero when a rank's is
    a, b = _state(runs / "own" / "final.ckpt"), _state(runs / "torchrun" / "final.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
    for done in (own, started):
        log = done.stdout + done.stderr
        for split in ("train", "val"):  # by rank 0 alone, once (it read val twice)
            assert log.count(f"{split}/part-0.parquet: ignoring column(s) not in the schema") == 1, log[-3000:]
        for note in ("broadcast_buffers", "sync_dist=True", "LeafSpec", "is_fx_tracing", "Tip:"):
            assert note not in log, log[-3000:]


def test_a_run_started_in_process_is_as_quiet_as_the_command(tiny: Path, tmp_path: Path) -> None:
    """``recsys.train.cli.run`` (what scripts/compare_models.py and tune_models.py call) leaves out the
    same library notes and adverts as ``recsys fit``: they are filtered where both paths pass. The
    scripts import torchrec (whose fbgemm_gpu logs at import, giving the root logger a handler) before
    Lightning: each of Lightning's lines is still said once."""
    config = _config(tmp_path / "cfg.yaml", tiny, tmp_path / "runs", "inprocess", [])
    code = f"import recsys.eval.report; from recsys.train.cli import run; run(['fit', '--config', {str(config)!r}])"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs" / "inprocess" / "final.ckpt").exists()
    said = done.stdout + done.stderr
    for note in ("LeafSpec", "Tip:", "is_fx_tracing"):
        assert note not in said, done.stderr[-3000:]
    assert said.count("`Trainer.fit` stopped") == 1, done.stderr[-3000:]


def _run_inprocess(tiny: Path, tmp_path: Path, poison: dict, *extra: str) -> Path:
    runs = tmp_path / "runs"
    config = _config(
        tmp_path / "cfg.yaml", tiny, runs, "nan", [{"class_path": "tests.train.faults.PoisonAt", "init_args": poison}]
    )
    run(["fit", "--config", str(config), *extra])
    return runs / "nan"


def test_nan_loss_stops_with_step_and_batch_after_saving_a_checkpoint(tiny: Path, tmp_path: Path) -> None:
    said = logging.Handler()
    said.emit = (lines := []).append  # what Lightning says while saving (its handlers may print elsewhere)
    connector = logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector")
    connector.addHandler(said)
    try:
        with pytest.raises(
            NonFiniteError, match=r"non-finite loss at global step 13 \(epoch 0, batch 13, rows at positions"
        ):
            _run_inprocess(tiny, tmp_path, {"step": 13, "what": "loss"})
    finally:
        connector.removeHandler(said)
    assert not [r for r in lines if "weights_only" in r.getMessage()]  # a full checkpoint asked for, not defaulted
    saved = next((tmp_path / "runs" / "nan").rglob("nonfinite-step13.ckpt"))
    checkpoint = torch.load(saved, weights_only=True)
    assert checkpoint["global_step"] == 13
    weights = checkpoint["state_dict"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    # nothing was updated by the bad step: the checkpoint at step 10 + 3 good steps is what we hold
    ledger = read_ledger(tmp_path / "runs" / "nan" / "ledger" / "ledger.rank0.tsv")
    assert [line[0] for line in ledger] == list(range(1, 14))


@pytest.mark.parametrize("what", ["loss", "gradient", "embedding"])
def test_skip_policy_drops_the_bad_batch_and_keeps_training(tiny: Path, tmp_path: Path, what: str) -> None:
    report = tmp_path / "poisoned_step.txt"
    said = {"loss": "loss", "gradient": "gradient", "embedding": "embedding gradient"}[what]
    with pytest.warns(UserWarning, match=f"non-finite {said} at global step 13"):
        out = _run_inprocess(tiny, tmp_path, {"step": 13, "what": what, "report": str(report)}, "--nonfinite", "skip")
    assert report.read_text() == "unchanged"  # the bad batch updated nothing (tables, MLP, optimizer-driven state)
    state = _state(out / "final.ckpt")
    assert all(torch.isfinite(v).all() for v in state.values())
    ledger = read_ledger(out / "ledger" / "ledger.rank0.tsv")
    assert len(ledger) == 100 and [line[2] for line in ledger[:51]] == list(range(50)) + [0]  # training went on
