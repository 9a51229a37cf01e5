import http.client
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from recsys.data.datamodule import CTRDataModule
from recsys.eval.report import predict_split
from recsys.export.exporter import export
from recsys.export.loader import load
from recsys.serve.server import serve
from recsys.train.checkpoint import load_model
from tests.export.helpers import raw_rows


@pytest.fixture(scope="module")
def server(trained: dict, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    out = export(trained["base"], tmp_path_factory.mktemp("serve") / "export", "int8", progress=False)
    running = serve(str(out), port=0, max_bytes=200_000, max_rows=64)
    yield running
    running.shutdown()
    running.server_close()


def request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:  # noqa: ANN001
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    status, data = response.status, json.loads(response.read())
    conn.close()
    return status, data


def score(server, payload) -> tuple[int, dict]:  # noqa: ANN001
    return request(server, "POST", "/score", json.dumps(payload).encode(), {"Content-Type": "application/json"})


def test_health_metadata_and_scores(server, trained: dict) -> None:  # noqa: ANN001
    assert request(server, "GET", "/healthz") == (200, {"status": "ok", "sequence": 0})
    status, meta = request(server, "GET", "/metadata")
    assert status == 200 and meta["dtype"] == "int8" and "item" in meta["features"] and meta["format_version"] == 2
    rows = raw_rows(trained["data"], n=20)
    status, body = score(server, rows)
    assert status == 200 and body["rows"] == 20
    # the trained fp32 model's probabilities of the same rows (the first test rows), within int8's bound
    test_split = CTRDataModule(str(trained["data"]), eval_batch_size=256).stream("test")
    expected = predict_split(load_model(trained["base"]), test_split)["prob"][:20]
    assert float(np.abs(np.array(body["scores"]) - expected).max()) <= 1e-2
    # the same rows in another batch size (float sums in another order: equal to ~1e-7)
    np.testing.assert_allclose(score(server, {"rows": rows[:3]})[1]["scores"], body["scores"][:3], atol=1e-6)


def test_every_bad_input_gets_a_4xx_naming_the_field_and_the_server_keeps_serving(server, trained: dict) -> None:  # noqa: ANN001
    row = raw_rows(trained["data"], n=1)[0]
    cases = [
        (b"{not json", 400, "malformed JSON", None),
        (json.dumps({"rows": "x"}).encode(), 400, "expected a JSON list", None),
        (json.dumps([]).encode(), 400, "empty batch", None),
        (json.dumps([{k: v for k, v in row.items() if k != "user"}]).encode(), 400, "missing feature 'user'", "user"),
        (
            json.dumps([row | {"price": 1e160}]).encode(),
            400,
            "'price' must be a finite number the model can represent",
            "price",
        ),
        (b'[{"price": NaN}]', 400, "NaN is not a JSON number", None),
        (json.dumps([row | {"user": 2**63}]).encode(), 400, "'user': id 9223372036854775808 does not fit", "user"),
        (json.dumps([row | {"user": -(2**63) - 1}]).encode(), 400, "does not fit a signed 64-bit integer", "user"),
        (b"[" * 90_000 + b"]" * 90_000, 400, "nested too deeply", None),
        (json.dumps([row | {"price": 10**400}]).encode(), 400, "'price' must be a finite number", "price"),
        (json.dumps([row | {"city": "\ud800"}]).encode(), 400, "'city' holds a string that is not valid UTF-8", "city"),
        (json.dumps([row | {"price": "12"}]).encode(), 400, "'price' must be a number", "price"),
        (json.dumps([row | {"user": [1000]}]).encode(), 400, "'user' .*must be one int id", "user"),
        (json.dumps([row | {"tags": {"a": 1}}]).encode(), 400, "'tags' .*must be a list", "tags"),
        # values Arrow would coerce if told the type (1.5 → 1, True → 1): refused, not truncated
        (json.dumps([row, row | {"user": 1.5}]).encode(), 400, "row 1: feature 'user' takes int ids, got fl", "user"),
        (json.dumps([row | {"user": True}]).encode(), 400, "'user' takes int ids, got bool True", "user"),
        (json.dumps([row | {"user": 2**63 + 1}]).encode(), 400, "does not fit a signed 64-bit integer", "user"),
        (json.dumps([row | {"tags": ["a", 1]}]).encode(), 400, "'tags' takes str ids, got int 1", "tags"),
        (json.dumps([row | {"city": 7}]).encode(), 400, "'city' takes str ids, got int 7", "city"),
        (json.dumps([row, row | {"tags": None}]).encode(), 400, "row 1: feature 'tags' .*must be a list", "tags"),
        (json.dumps([row] * 65).encode(), 413, "65 rows exceed the limit of 64", None),
        (json.dumps([row | {"title": "x" * 300_000}]).encode(), 413, "exceeds the limit of 200000", None),
        (json.dumps(["a row"]).encode(), 400, "row 0: expected an object", None),
    ]
    import re

    for body, status, message, field in cases:
        got_status, got = request(server, "POST", "/score", body, {"Content-Type": "application/json"})
        assert got_status == status, (message, got)
        assert re.search(message, got["error"]), (message, got)
        assert got.get("field") == field
        assert request(server, "GET", "/healthz")[0] == 200  # still serving
    assert request(server, "GET", "/nope")[0] == 404
    assert request(server, "POST", "/nope", b"[]")[0] == 404
    import socket

    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as raw:  # "²".isdigit() is True
        raw.sendall("POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: \u00b2\r\n\r\n".encode("latin-1"))
        assert raw.recv(4096).startswith(b"HTTP/1.1 411")
    assert score(server, [row])[0] == 200


def test_fields_the_model_does_not_read_are_ignored_and_listed(server, trained: dict) -> None:  # noqa: ANN001
    import pyarrow.parquet as pq

    as_stored = pq.read_table(trained["data"] / "test" / "part-0.parquet").to_pylist()[:5]  # with its row_id column
    status, body = score(server, [r | {"timestamp": 881250949} for r in as_stored])
    # the label, an extra column, and the item text this (id-only) model does not read
    assert status == 200 and body["ignored_fields"] == ["click", "row_id", "timestamp", "title"]
    np.testing.assert_allclose(body["scores"], server.scorer.score(raw_rows(trained["data"], n=5)), atol=1e-6)


def test_busy_server_answers_503_and_drops_idle_clients(trained: dict, tmp_path: Path) -> None:
    import socket
    import time

    out = export(trained["base"], tmp_path / "export", "int8", progress=False)
    busy = serve(str(out), port=0, workers=1, queue=1, timeout=0.5)
    try:
        address = ("127.0.0.1", busy.server_address[1])
        idle = [socket.create_connection(address) for _ in range(2)]  # one holds the worker, one waits in the queue
        time.sleep(0.1)
        status, body = request(busy, "GET", "/healthz")
        assert status == 503 and "server busy" in body["error"]
        time.sleep(1.5)  # the idle clients are dropped after the 0.5 s timeout; the worker is free again
        assert request(busy, "GET", "/healthz") == (200, {"status": "ok", "sequence": 0})
        for sock in idle:
            sock.close()
        # a client trickling one byte just inside the read timeout is cut at the request deadline (3 × 0.5 s)
        trickle = socket.create_connection(address)
        started = time.perf_counter()
        try:
            for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":
                trickle.sendall(bytes([byte]))
                time.sleep(0.3)
        except OSError:
            pass  # the server closed it
        assert time.perf_counter() - started < 5  # (the whole request would take 11 s)
        trickle.close()
        assert request(busy, "GET", "/healthz") == (200, {"status": "ok", "sequence": 0})
    finally:
        busy.shutdown()
        busy.server_close()


def test_healthz_says_ready_only_once_the_export_can_score(
    trained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import recsys.serve.server as server_module

    out = export(trained["base"], tmp_path / "export", "int8", progress=False)
    release = threading.Event()
    real_load = server_module.load

    def slow_load(directory):  # noqa: ANN001, ANN202
        release.wait(10)
        return real_load(directory)

    monkeypatch.setattr(server_module, "load", slow_load)
    loading = serve(str(out), port=0, wait=False)
    try:
        assert request(loading, "GET", "/healthz") == (
            503,
            {"status": "loading", "error": "the export is still loading"},
        )
        assert score(loading, raw_rows(trained["data"], n=1))[0] == 503
        release.set()
        for _ in range(100):
            if request(loading, "GET", "/healthz")[0] == 200:
                break
            import time

            time.sleep(0.05)
        assert request(loading, "GET", "/healthz") == (200, {"status": "ok", "sequence": 0})
        assert score(loading, raw_rows(trained["data"], n=1))[0] == 200
    finally:
        loading.shutdown()
        loading.server_close()


def test_a_busy_port_is_named_not_a_traceback(server, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    from recsys.commands.serve import main

    directory = server.scorer.directory
    assert main([str(directory), "--port", str(server.server_address[1])]) == 1
    err = capsys.readouterr().err
    assert f"127.0.0.1:{server.server_address[1]} is in use" in err and "Traceback" not in err


def test_concurrent_requests_get_their_own_scores(server, trained: dict) -> None:  # noqa: ANN001
    rows = raw_rows(trained["data"], n=64)
    batches = [rows[i : i + 8] for i in range(0, 64, 8)]
    with ThreadPoolExecutor(64) as pool:  # 64 clients at once: every request answered, none dropped
        replies = list(pool.map(lambda b: score(server, b), batches * 24))
    expected = server.scorer.score(rows)
    for i, (status, body) in enumerate(replies):
        assert status == 200
        k = i % len(batches)
        np.testing.assert_allclose(body["scores"], expected[k * 8 : (k + 1) * 8], atol=1e-6)


def test_serve_cli_refuses_a_broken_export(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from recsys.cli import main

    assert main(["serve", str(tmp_path)]) == 1
    assert "manifest.json: not found" in capsys.readouterr().err


def test_scorer_of_every_model_kind_serves_raw_rows(trained: dict, tmp_path: Path) -> None:
    """int8 and int4 exports of every model kind score raw rows within their bound of the fp32 model."""
    rows = raw_rows(trained["data"], n=5)
    test_split = CTRDataModule(str(trained["data"]), eval_batch_size=256).stream("test")
    for kind in ("din", "unified", "optembed", "supernet", "text"):
        expected = predict_split(load_model(trained[kind]), test_split)["prob"][:5]  # the first test rows
        for dtype, bound in (("int8", 1e-2), ("int4", 0.1)):
            probs = load(export(trained[kind], tmp_path / f"{kind}-{dtype}", dtype, progress=False)).score(rows)
            assert probs.shape == (5,)
            assert float(np.abs(probs - expected).max()) <= bound, (kind, dtype, np.abs(probs - expected).max())


def test_replies_are_not_held_back_by_nagles_algorithm(server, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    # the reply's headers and body leave in two writes; with Nagle on, the body waits ~40 ms for the
    # client's delayed ACK (a 256-row request took 60 ms instead of 15): every connection sets TCP_NODELAY
    import socket

    from recsys.serve.server import Handler

    seen = []
    setup = Handler.setup

    def recording(self) -> None:  # noqa: ANN001
        setup(self)
        seen.append(self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(Handler, "setup", recording)
    assert request(server, "GET", "/healthz")[0] == 200
    assert seen and all(seen)


def test_the_loaded_export_is_left_out_of_garbage_collection(trained: dict, tmp_path: Path) -> None:
    # a full collection walked every torch/Lightning object: a 300 ms pause every few hundred requests
    import gc

    from recsys.serve.server import ScoringServer

    scorer = load(export(trained["base"], tmp_path / "export", "fp32", progress=False))
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    server = ScoringServer(("127.0.0.1", 0), scorer)
    try:
        assert gc.get_freeze_count() > 100_000  # torch alone brings more objects than that
    finally:
        server.server_close()
