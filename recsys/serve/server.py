"""``recsys serve DIR``: HTTP JSON scoring of an export directory.

    recsys serve exports/base-int8 --port 8080
    curl -s localhost:8080/healthz
    curl -s localhost:8080/metadata
    curl -s -X POST localhost:8080/score -d '[{"user_id": 196, "item_id": 242, ...}]'
      → {"scores": [0.71], "rows": 1}

``POST /score`` takes a JSON list of rows (or ``{"rows": [...]}``), raw feature values as in the
Parquet data. Bad input gets a 4xx whose JSON ``error`` names the row and feature
(``field``); the server keeps serving. Limits: ``--max-bytes`` per request body (413 beyond),
``--max-rows`` per request (413 beyond). Requests are handled on threads; scoring runs one
batch at a time (``torch`` uses ``--threads`` threads inside it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from recsys.export.loader import ExportError, RowError, Scorer, load

log = logging.getLogger(__name__)


class ScoringServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], scorer: Scorer, max_bytes: int = 8 << 20, max_rows: int = 4096) -> None:
        super().__init__(address, Handler)
        self.scorer, self.max_bytes, self.max_rows = scorer, max_bytes, max_rows
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    server: ScoringServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (BaseHTTPRequestHandler's name)
        log.debug("%s " + format, self.address_string(), *args)

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, field: str | None = None) -> None:
        self._reply(status, {"error": message, **({"field": field} if field else {})})

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/healthz":
            self._reply(HTTPStatus.OK, {"status": "ok"})
        elif self.path == "/metadata":
            self._reply(HTTPStatus.OK, self.server.scorer.metadata())
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no route GET {self.path}; try POST /score, GET /healthz, GET /metadata")

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/score":
            self._error(HTTPStatus.NOT_FOUND, f"no route POST {self.path}; try POST /score")
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length header required")
            self.close_connection = True
            return
        if int(length) > self.server.max_bytes:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {int(length)} bytes exceeds the limit of {self.server.max_bytes}")
            self.close_connection = True  # the unread body must not be parsed as the next request
            return
        body = self.rfile.read(int(length))
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            self._error(HTTPStatus.BAD_REQUEST, f"malformed JSON: {err}")
            return
        rows = payload.get("rows") if isinstance(payload, dict) else payload
        if not isinstance(rows, list):
            self._error(HTTPStatus.BAD_REQUEST, 'expected a JSON list of rows or {"rows": [...]}')
            return
        if not rows:
            self._error(HTTPStatus.BAD_REQUEST, "empty batch: send at least one row")
            return
        if len(rows) > self.server.max_rows:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{len(rows)} rows exceed the limit of {self.server.max_rows} per request")
            return
        try:
            with self.server.lock:
                scores = self.server.scorer.score(rows)
        except RowError as err:
            self._error(HTTPStatus.BAD_REQUEST, str(err), err.field)
            return
        except Exception as err:  # the server keeps serving; the client learns what happened
            log.exception("scoring failed")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"scoring failed: {type(err).__name__}: {err}")
            return
        self._reply(HTTPStatus.OK, {"scores": [float(s) for s in scores], "rows": len(rows)})


def serve(directory: str, host: str = "127.0.0.1", port: int = 8080, max_bytes: int = 8 << 20, max_rows: int = 4096) -> ScoringServer:
    """A started server (its thread is a daemon); ``server.shutdown()`` stops it."""
    server = ScoringServer((host, port), load(directory), max_bytes, max_rows)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recsys serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="export directory (recsys export --out)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--max-bytes", type=int, default=8 << 20, help="largest request body (bytes)")
    parser.add_argument("--max-rows", type=int, default=4096, help="most rows per request")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for scoring (0: torch's default)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        scorer = load(args.directory)
    except (ExportError, FileNotFoundError) as err:
        print(f"recsys serve: {err}", file=sys.stderr)
        return 1
    server = ScoringServer((args.host, args.port), scorer, args.max_bytes, args.max_rows)
    print(f"serving {args.directory} ({scorer.manifest['dtype']}, {scorer.manifest['model']['class']}) "
          f"on http://{args.host}:{server.server_address[1]}  (POST /score, GET /healthz, GET /metadata)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
