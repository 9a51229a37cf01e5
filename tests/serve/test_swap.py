"""`recsys serve --watch`: deltas applied while concurrent clients score, no request failing or seeing
a half-applied version, a bad delta refused while the last good version keeps serving."""

from __future__ import annotations

import gc
import shutil
import threading
import weakref
from pathlib import Path

import numpy as np

from recsys.export.exporter import export
from recsys.export.loader import load
from recsys.serve.server import serve
from recsys.serve.watch import wait_for
from tests.export.helpers import raw_rows
from tests.export.test_delta import retrained
from tests.serve.test_server import request, score


def _arrive(source: Path, watch: Path) -> None:
    """An export appears at once in the watched directory (copied beside it, then renamed in)."""
    staging = watch.parent / f".incoming-{source.name}"
    shutil.copytree(source, staging)
    staging.rename(watch / source.name)


def test_deltas_swap_in_under_concurrent_load_and_a_bad_one_is_refused(trained: dict, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    staging, watch = tmp_path / "staging", tmp_path / "watch"
    staging.mkdir()
    watch.mkdir()
    day2 = retrained(trained["base"], tmp_path / "day2.ckpt", {"t_user": list(range(1, 30))}, 0.5)
    day3 = retrained(day2, tmp_path / "day3.ckpt", {"t_item": list(range(1, 40))}, -0.5)
    exports = [export(trained["base"], staging / "day1", "int8", progress=False)]
    exports.append(export(day2, staging / "day2", "int8", progress=False, since=exports[0]))
    exports.append(export(day3, staging / "day3", "int8", progress=False, since=exports[1]))
    rows = raw_rows(trained["data"], n=32)
    versions = [load(exports[0], exports[1:k]).score(rows) for k in (1, 2, 3)]
    assert not np.array_equal(versions[0], versions[1]) and not np.array_equal(versions[1], versions[2])

    _arrive(exports[0], watch)
    server = serve(None, port=0, watch=str(watch), poll=0.05)
    try:
        assert wait_for(lambda: request(server, "GET", "/healthz")[0] == 200)
        first = weakref.ref(server.scorer)  # replaced versions must be freed, not kept frozen
        seen: list[list[tuple[int, int | None]]] = [[] for _ in range(4)]
        stop = threading.Event()

        def client(log: list) -> None:  # noqa: ANN001
            while not stop.is_set():
                status, body = score(server, rows)
                match = [
                    v for v, expected in enumerate(versions) if status == 200 and body["scores"] == expected.tolist()
                ]
                log.append((status, match[0] if match else None))

        threads = [threading.Thread(target=client, args=(log,)) for log in seen]
        for t in threads:
            t.start()

        def sequence() -> int:
            return request(server, "GET", "/healthz")[1]["sequence"]

        wait_for(lambda: sum(map(len, seen)) > 20)
        _arrive(exports[1], watch)
        assert wait_for(lambda: sequence() == 1)
        bad = staging / "bad" / "day3"  # day3 with a truncated table: refused, day2 keeps serving
        shutil.copytree(exports[2], bad)
        table = next((bad / "tables").iterdir())
        table.write_bytes(table.read_bytes()[:-8])
        _arrive(bad, watch)
        assert wait_for(lambda: "not applied" in capsys.readouterr().err, timeout=10)
        assert sequence() == 1
        shutil.rmtree(watch / "day3")
        _arrive(exports[2], watch)  # the good day3: applied
        assert wait_for(lambda: sequence() == 2)
        wait_for(lambda: sum(1 for log in seen for _, v in log if v == 2) > 20)
        stop.set()
        for t in threads:
            t.join()
    finally:
        server.shutdown()
        server.server_close()
    gc.collect()
    assert first() is None
    answers = [a for log in seen for a in log]
    assert all(status == 200 for status, _ in answers)  # no request failed during a swap
    assert all(version is not None for _, version in answers)  # each answer is one whole version
    for log in seen:  # a client never goes back to an older version
        order = [v for _, v in log]
        assert order == sorted(order)
    assert {v for _, v in answers} == {0, 1, 2}
