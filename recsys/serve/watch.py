"""``recsys serve --watch DIR``: follow a chain of exports (one full, then deltas) while serving.

Every ``poll`` seconds the watcher lists ``DIR``'s export directories. It serves the full export
with every delta that follows it in sequence (``recsys.export.delta``); a new delta whose sequence is
the last applied + 1 is verified and applied into a new scorer *beside* the one serving, then swapped
in with one assignment: a request scores entirely on the old version or entirely on the new, never
on a mix, and none fails because of a swap. A delta that cannot be applied (another model, an older
or unknown base, a gap in the sequence, a truncated or altered file) is logged with its reason once
and skipped, and the last good version keeps serving; it is tried again if its manifest changes.

    watcher = ExportWatcher(server, "exports/", poll=1.0)    # server.scorer follows exports/
    watcher.start()
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

from recsys.export.exporter import MANIFEST, sha256
from recsys.export.loader import ExportError, load, read_manifest

log = logging.getLogger(__name__)


def _say(message: str) -> None:
    print(f"recsys serve --watch: {message}", file=sys.stderr, flush=True)


class ExportWatcher(threading.Thread):
    """Keeps ``server.scorer`` at the newest version of the chain in ``directory``."""

    def __init__(self, server: Any, directory: str | Path, poll: float = 1.0) -> None:
        super().__init__(name="recsys-watch", daemon=True)
        self.server, self.directory, self.poll = server, Path(directory), poll
        self.full: Path | None = None
        self.applied: list[Path] = []
        self.refused: dict[str, tuple] = {}  # export name -> its stamp when refused (reported once)
        self.stopped = threading.Event()
        self.swaps = 0

    def exports(self) -> list[tuple[Path, dict[str, Any]]]:
        """(directory, manifest) of every readable export in the watched directory (a link, or anything
        that leads out of it, is not read)."""
        found = []
        inside = self.directory.resolve()
        for path in sorted(p for p in self.directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not (path / MANIFEST).is_file() or self.refused.get(path.name) == self._stamp(path):
                continue
            if path.is_symlink() or path.resolve().parent != inside:
                self._refuse(path, f"{path} is a link; exports are read only from inside {self.directory}")
                continue
            try:
                manifest = read_manifest(path)
                if not isinstance(manifest.get("sequence", 0), int):
                    raise ExportError(f"{path / MANIFEST}: sequence {manifest.get('sequence')!r} is not an integer")
            except Exception as err:  # a manifest that is not even an object: refused like any other fault
                self._refuse(path, f"{type(err).__name__}: {err}")
                continue
            found.append((path, manifest))
        return found

    @staticmethod
    def _stamp(path: Path) -> tuple:
        """What identifies one version of an export directory (every file's name, size and mtime): a
        refused export that is replaced or repaired is tried again."""
        try:
            files = [(p, p.stat()) for p in path.rglob("*") if p.is_file()]
            return tuple(sorted((str(p.relative_to(path)), st.st_size, st.st_mtime_ns) for p, st in files))
        except OSError:
            return ()

    def _refuse(self, path: Path, reason: str) -> None:
        stamp = self._stamp(path)
        if self.refused.get(path.name) != stamp:
            self.refused[path.name] = stamp
            _say(f"{path.name} not applied: {reason}; still serving sequence {self.sequence}")

    @property
    def sequence(self) -> int | None:
        return None if self.full is None else len(self.applied)

    def step(self) -> bool:
        """One look at the directory; True when a new version went live."""
        found = self.exports()
        if self.full is None:
            fulls = [p for p, m in found if m.get("kind", "full") == "full"]
            if not fulls:
                return False
            if len(fulls) > 1:
                _say(f"{len(fulls)} full exports in {self.directory}; following the first, {fulls[0].name}")
            return self._swap(fulls[0], [])
        last = self.applied[-1] if self.applied else self.full
        base = sha256(last / MANIFEST)
        for path, manifest in found:  # the delta on what is served now (another chain's are passed over)
            if manifest.get("kind") == "delta" and manifest.get("base_manifest_sha256") == base:
                if self._swap(self.full, [*self.applied, path]):
                    return True
        return False

    def _swap(self, full: Path, deltas: list[Path]) -> bool:
        try:
            scorer = load(full, deltas)
        except Exception as err:  # whatever is wrong with it, the last good version keeps serving
            self._refuse(deltas[-1] if deltas else full, f"{type(err).__name__}: {err}")
            return False
        gc.unfreeze()  # the serving scorer was frozen out of collection: let it be collected once replaced
        self.server.scorer = scorer  # one assignment: each request holds the scorer it started with
        time.sleep(0.2)  # requests that began on the old version finish with it
        from recsys.serve.server import _leave_out_of_collection

        _leave_out_of_collection()
        self.full, self.applied = full, deltas
        self.swaps += 1
        name = deltas[-1].name if deltas else full.name
        _say(f"serving {name} (sequence {scorer.sequence})")
        return True

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                while self.step():  # apply every delta that is already there
                    pass
            except Exception as err:  # never fatal: the last good version keeps serving
                log.exception("watching %s failed", self.directory)
                _say(f"watching failed ({type(err).__name__}: {err}); retrying")
            self.stopped.wait(self.poll)

    def stop(self) -> None:
        self.stopped.set()


def wait_for(condition: Any, timeout: float = 30.0, every: float = 0.05) -> bool:
    """Polls ``condition()`` until it is true or ``timeout`` passes (tests and scripts)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(every)
    return bool(condition())
