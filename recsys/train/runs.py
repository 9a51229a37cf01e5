"""Resumable runs (``ckpt_path: last``): one directory per run identity, a lock, no silent mix-ups.

A run that resumes itself after a kill must find its own checkpoints and nobody else's. Its
directory is the config's name plus a short hash of the resolved config, leaving out what may
change between a run and its resumption (``RESUMABLE_KEYS``: more epochs, logging verbosity, the
checkpoint to resume from): another learning rate is another run, in another directory. A run whose
directory is pinned by hand (``--trainer.logger.init_args.version``) and whose config differs from
the one recorded there (``run.json``) is refused, naming the keys. A lock file stops a second
process from training into the same directory at once.

Example::

    version = run_version(config, "din")          # "din-3fa9c0d21be4"
    with RunLock(run_dir): ...                    # a second run into run_dir stops with a message
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

# what may differ between a run and its resumption (dotted paths into the resolved config)
RESUMABLE_KEYS = (
    "ckpt_path",
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.logger",
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    "trainer.enable_model_summary",
    "nonfinite",
    "config",
)
RUN_FILE = "run.json"

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A resumable run cannot start here; the message says why and what to do."""


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for key, inner in value.items():
            out |= _flatten(inner, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: value}


def identity(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved config's keys that define the run (``RESUMABLE_KEYS`` left out), flattened."""
    flat = _flatten(config)
    return {k: v for k, v in flat.items() if not any(k == r or k.startswith(f"{r}.") for r in RESUMABLE_KEYS)}


def run_version(config: dict[str, Any], name: str) -> str:
    """``<name>-<12 hex>``: the run's directory under the logger's save_dir/name."""
    digest = hashlib.sha256(json.dumps(identity(config), sort_keys=True, default=str).encode()).hexdigest()
    return f"{name}-{digest[:12]}"


def check_run(run_dir: Path, config: dict[str, Any]) -> None:
    """Records the run's identity in ``run_dir/run.json``, or refuses a resumption whose config differs."""
    file = run_dir / RUN_FILE
    current = identity(config)
    if file.exists():
        recorded = json.loads(file.read_text())["identity"]
        differ = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
        if differ:
            shown = "; ".join(f"{k}: {recorded.get(k)!r} → {current.get(k)!r}" for k in differ[:8])
            raise RunError(
                f"{run_dir} holds a run with another config ({shown}); resuming it would train the old run "
                f"under the new settings. Use another logger version, or the run's own config "
                f"({file})"
            )
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps({"identity": current}, indent=2, default=str))


class RunLock:
    """An exclusive lock on ``run_dir`` for this process's lifetime (``fcntl``: released if it dies)."""

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / ".lock"
        self.handle = open(self.path, "a+")  # noqa: SIM115 (held until release or exit)
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            owner = self.handle.read().strip() or "another process"
            self.handle.close()
            raise RunError(
                f"{run_dir} is being trained by {owner}; two runs into one directory would overwrite each "
                f"other's checkpoints. Wait for it, or use another logger version"
            ) from None
        except OSError as err:
            self.handle.close()
            raise RunError(
                f"{run_dir}: cannot lock it ({err}); the filesystem may not support locks — put the run "
                f"directory (trainer.logger.init_args.save_dir) on one that does"
            ) from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()}")
        self.handle.flush()

    def release(self) -> None:
        if not self.handle.closed:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


def resume_from(directory: Path) -> str | None:
    """The checkpoint ``ckpt_path: last`` resumes from: the newest ``last*`` of ``directory`` that reads,
    else the newest other checkpoint that does (a kill while writing can leave a truncated file; it is
    named and passed over), else None (a fresh start)."""
    from recsys.train.checkpoint import CheckpointError, read_checkpoint

    if not directory.is_dir():
        return None
    found = sorted(
        (p for p in directory.iterdir() if p.name.endswith(".ckpt")),
        key=lambda p: (not p.name.startswith("last"), -p.stat().st_mtime_ns),
    )
    unreadable = []
    for candidate in found:
        try:
            read_checkpoint(candidate, mmap=candidate.is_file())  # mapped, not read into memory: only its loadability
        except (CheckpointError, FileNotFoundError) as err:
            unreadable.append(f"{candidate.name} ({str(err).split(': ', 1)[-1]})")
            continue
        if unreadable:
            log.warning(
                "%s: passing over unreadable checkpoint(s) %s; resuming from %s",
                directory,
                "; ".join(unreadable),
                candidate.name,
            )
        return str(candidate)
    if unreadable:
        raise RunError(
            f"{directory}: no checkpoint there can be read ({'; '.join(unreadable)}); move them away to start afresh"
        )
    return None
