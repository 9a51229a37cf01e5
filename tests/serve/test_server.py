import http.client
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from recsys.export.exporter import export
from recsys.export.loader import load
from recsys.serve.server import serve
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
    assert request(server, "GET", "/healthz") == (200, {"status": "ok"})
    status, meta = request(server, "GET", "/metadata")
    assert status == 200 and meta["dtype"] == "int8" and "item" in meta["features"] and meta["format_version"] == 2
    rows = raw_rows(trained["data"], n=20)
    status, body = score(server, rows)
    assert status == 200 and body["rows"] == 20
    expected = server.scorer.score(rows)
    np.testing.assert_allclose(body["scores"], expected, atol=1e-7)
    # the same rows in another batch size (float sums in another order: equal to ~1e-7)
    np.testing.assert_allclose(score(server, {"rows": rows[:3]})[1]["scores"], body["scores"][:3], atol=1e-6)


def test_every_bad_input_gets_a_4xx_naming_the_field_and_the_server_keeps_serving(server, trained: dict) -> None:  # noqa: ANN001
    row = raw_rows(trained["data"], n=1)[0]
    cases = [
        (b"{not json", 400, "malformed JSON", None),
        (json.dumps({"rows": "x"}).encode(), 400, "expected a JSON list", None),
        (json.dumps([]).encode(), 400, "empty batch", None),
        (json.dumps([{k: v for k, v in row.items() if k != "user"}]).encode(), 400, "missing feature 'user'", "user"),
        (json.dumps([row | {"bogus": 1}]).encode(), 400, "unknown feature 'bogus'", "bogus"),
        (json.dumps([row | {"price": "12"}]).encode(), 400, "'price' must be a number", "price"),
        (json.dumps([row | {"user": [1000]}]).encode(), 400, "'user' .*must be one int id", "user"),
        (json.dumps([row | {"tags": {"a": 1}}]).encode(), 400, "'tags' .*must be a list", "tags"),
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
    assert score(server, [row])[0] == 200


def test_concurrent_requests_get_their_own_scores(server, trained: dict) -> None:  # noqa: ANN001
    rows = raw_rows(trained["data"], n=64)
    batches = [rows[i:i + 8] for i in range(0, 64, 8)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda b: score(server, b), batches * 3))
    expected = server.scorer.score(rows)
    for i, (status, body) in enumerate(replies):
        assert status == 200
        k = i % len(batches)
        np.testing.assert_allclose(body["scores"], expected[k * 8:(k + 1) * 8], atol=1e-6)


def test_serve_cli_refuses_a_broken_export(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from recsys.cli import main

    assert main(["serve", str(tmp_path)]) == 1
    assert "manifest.json: not found" in capsys.readouterr().err


def test_scorer_of_every_model_kind_serves_raw_rows(trained: dict, tmp_path: Path) -> None:
    rows = raw_rows(trained["data"], n=5)
    for kind in ("din", "unified", "optembed", "supernet", "text"):
        scorer = load(export(trained[kind], tmp_path / kind, "int8", progress=False))
        probs = scorer.score(rows)
        assert probs.shape == (5,) and np.all((probs > 0) & (probs < 1))
