"""``recsys serve DIR``: HTTP JSON scoring of an export directory.

    recsys serve exports/base-int8 --port 8080
    curl -s localhost:8080/healthz          # 200 {"status": "ok", "sequence": 0} once loaded; 503 before
    curl -s localhost:8080/metadata
    curl -s -X POST localhost:8080/score -d '[{"user_id": 196, "item_id": 242, ...}]'
      → {"scores": [0.71], "rows": 1, "ignored_fields": []}

``POST /score`` takes a JSON list of rows (or ``{"rows": [...]}``), raw feature values as in the
Parquet data; fields the model does not read are ignored and listed under ``ignored_fields``. Bad
input gets a 4xx whose JSON ``error`` names the row and ``field``; it never gets a 500 or a dropped
connection, and the server keeps serving.

Under load: the socket listens with a backlog of ``--backlog``; ``--workers`` threads handle
connections and at most ``--queue`` more wait for one, beyond which a connection is answered 503
(``Retry-After: 1``) at once; a client idle or slow for ``--timeout`` seconds is dropped (a slow
client cannot hold a worker forever); a worker serving a keep-alive connection hands it back after
each response when others are waiting; a whole request must arrive and be answered within 3 ×
``--timeout``. JSON parsing runs on the workers; validation and encoding (Python, under the GIL)
run one batch at a time, and so does scoring (``torch``, ``--threads`` threads, the GIL released),
so one batch is encoded while the previous one is scored.
Limits: ``--max-bytes`` per request body and ``--max-rows`` per request (413 beyond).

``recsys serve --watch DIR`` serves a chain of exports instead (a full export, then the deltas of
``recsys export --since``), applying each new delta while serving (``recsys.serve.watch``); ``/healthz``
and ``/metadata`` say the ``sequence`` being served.
"""

from __future__ import annotations

import gc
import json
import logging
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from recsys.export.loader import RowError, Scorer, load

log = logging.getLogger(__name__)

REQUEST_DEADLINE = 3  # × --timeout: the most a request (with its reply) may take from its first byte


class ScoringServer(HTTPServer):
    """An HTTP server with a bounded pool of worker threads and a bounded wait queue.

    Args:
        address: (host, port); port 0 picks a free one.
        scorer: a loaded export, or None to load ``directory`` in the background (``/healthz`` answers
            503 until it is ready).
        directory: the export to load when ``scorer`` is None.
    """

    allow_reuse_address = True
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        scorer: Scorer | None = None,
        directory: str | None = None,
        max_bytes: int = 8 << 20,
        max_rows: int = 4096,
        workers: int = 8,
        queue: int = 64,
        timeout: float = 10.0,
        backlog: int = 1024,
        watch: str | None = None,
        poll: float = 1.0,
    ) -> None:
        self.request_queue_size = backlog  # the listen() backlog (the stdlib's default is 5)
        super().__init__(address, Handler)
        self.scorer, self.max_bytes, self.max_rows, self.timeout_s = scorer, max_bytes, max_rows, timeout
        self.load_error: str | None = None
        self.encoding = threading.Lock()  # one batch validated and encoded at a time
        self.lock = threading.Lock()  # one batch scored at a time
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="recsys-serve")
        self.slots = threading.BoundedSemaphore(workers + queue)
        self.waiting = 0  # connections accepted but not yet picked up by a worker
        self.counter = threading.Lock()
        self.watcher = None
        if watch is not None:  # the watcher loads the chain's full export, then follows its deltas
            from recsys.serve.watch import ExportWatcher

            self.watcher = ExportWatcher(self, watch, poll)
            self.watcher.start()
        elif scorer is None:
            threading.Thread(target=self._load, args=(directory,), daemon=True).start()
        else:
            _leave_out_of_collection()

    def _load(self, directory: str) -> None:
        try:
            scorer = load(directory)
            _leave_out_of_collection()
            self.scorer = scorer
            log.info("loaded %s", directory)
        except Exception as err:  # /healthz and /score say so until the server stops
            self.load_error = f"{type(err).__name__}: {err}"
            print(f"recsys serve: cannot load {directory}: {self.load_error}", file=sys.stderr, flush=True)
            threading.Thread(target=self.shutdown, daemon=True).start()

    # -- connections: bounded workers, bounded queue, 503 beyond ------------------------------------
    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self._refuse(request)
            return
        with self.counter:
            self.waiting += 1
        self.pool.submit(self._serve_connection, request, client_address)

    def _serve_connection(self, request: socket.socket, client_address: Any) -> None:
        with self.counter:
            self.waiting -= 1
        try:
            self.finish_request(request, client_address)
        except Exception:  # a broken connection: logged, never fatal
            log.debug("connection from %s failed", client_address, exc_info=True)
        finally:
            self.shutdown_request(request)
            self.slots.release()

    def _refuse(self, request: socket.socket) -> None:
        body = json.dumps({"error": "server busy: every worker and queue slot is taken; retry shortly"}).encode()
        head = (
            f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Retry-After: 1\r\nConnection: close\r\n\r\n"
        ).encode()
        try:
            request.settimeout(0.05)
            try:
                request.recv(1 << 16)  # what the client sent already: closing on unread input would reset the 503
            except OSError:
                pass
            request.settimeout(1.0)
            request.sendall(head + body)
        except OSError:
            pass
        finally:
            self.shutdown_request(request)

    def server_close(self) -> None:
        if getattr(self, "watcher", None) is not None:
            self.watcher.stop()
        super().server_close()
        if hasattr(self, "pool"):  # (a bind that failed closes the server before the pool exists)
            self.pool.shutdown(wait=False, cancel_futures=True)


def _leave_out_of_collection() -> None:
    """Moves every object alive now (torch, Lightning, the loaded model: millions) out of the garbage
    collector's reach. Requests allocate many small objects, and each full collection used to walk all
    of them: 4 of 300 requests took ~320 ms instead of ~100 (4 clients, base model, 256 rows)."""
    gc.collect()
    gc.freeze()


class Handler(BaseHTTPRequestHandler):
    server: ScoringServer
    protocol_version = "HTTP/1.1"
    # headers and body leave in two writes: with Nagle's algorithm the body waits for the client's
    # delayed ACK of the headers (~40 ms a response on Linux: one client's 256-row request took 60 ms, 15 without)
    disable_nagle_algorithm = True

    def setup(self) -> None:
        self.timeout = self.server.timeout_s  # idle and read timeout of each read on this connection
        super().setup()

    def handle_one_request(self) -> None:
        # a whole request must arrive and be answered within a deadline: a client trickling a byte
        # just inside the read timeout cannot hold a worker
        deadline = threading.Timer(self.server.timeout_s * REQUEST_DEADLINE, self._cut)
        deadline.start()
        try:
            super().handle_one_request()
        finally:
            deadline.cancel()

    def _cut(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (BaseHTTPRequestHandler's name)
        log.debug("%s " + format, self.address_string(), *args)

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.server.waiting > 0:  # others wait for a worker: hand this one back after the reply
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, field: str | None = None) -> None:
        self._reply(status, {"error": message, **({"field": field} if field else {})})

    def _unavailable(self) -> bool:
        if self.server.scorer is not None:
            return False
        if self.server.load_error:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, f"the export could not be loaded: {self.server.load_error}")
        else:
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "loading", "error": "the export is still loading"})
        return True

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/healthz":
            if not self._unavailable():
                self._reply(HTTPStatus.OK, {"status": "ok", "sequence": self.server.scorer.sequence})
        elif self.path == "/metadata":
            if not self._unavailable():
                self._reply(HTTPStatus.OK, self.server.scorer.metadata())
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no route GET {self.path}; try POST /score, GET /healthz, GET /metadata")

    def _body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length is None or not (length.isascii() and length.isdigit()):
            self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length header required")
            self.close_connection = True
            return None
        if int(length) > self.server.max_bytes:
            self._error(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"body of {int(length)} bytes exceeds the limit of {self.server.max_bytes}",
            )
            self.close_connection = True  # the unread body must not be parsed as the next request
            return None
        return self.rfile.read(int(length))

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/score":
            self._error(HTTPStatus.NOT_FOUND, f"no route POST {self.path}; try POST /score")
            return
        body = self._body()
        if body is None:
            return
        try:
            payload = parse_json(body)
        except ValueError as err:
            self._error(HTTPStatus.BAD_REQUEST, str(err))
            return
        rows = payload.get("rows") if isinstance(payload, dict) else payload
        if not isinstance(rows, list):
            self._error(HTTPStatus.BAD_REQUEST, 'expected a JSON list of rows or {"rows": [...]}')
            return
        if not rows:
            self._error(HTTPStatus.BAD_REQUEST, "empty batch: send at least one row")
            return
        if len(rows) > self.server.max_rows:
            self._error(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"{len(rows)} rows exceed the limit of {self.server.max_rows} per request",
            )
            return
        if self._unavailable():
            return
        scorer = self.server.scorer
        try:
            with self.server.encoding:  # Python under the GIL: in parallel it would only interleave
                batch = scorer.encode(rows)
            with self.server.lock:  # torch releases the GIL: the next batch is encoded meanwhile
                scores = scorer.score_encoded(batch)
        except RowError as err:
            self._error(HTTPStatus.BAD_REQUEST, str(err), err.field)
            return
        except Exception as err:  # a bug, not bad input: the server keeps serving and says what happened
            log.exception("scoring failed")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"scoring failed: {type(err).__name__}: {err}")
            return
        self._reply(
            HTTPStatus.OK,
            {"scores": [float(s) for s in scores], "rows": len(rows), "ignored_fields": scorer.ignored_fields(rows)},
        )


def parse_json(body: bytes) -> Any:
    """The request body as JSON; malformed or too deeply nested input is a ``ValueError`` with the reason."""
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as err:
        raise ValueError(f"malformed JSON: not UTF-8 ({err})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"malformed JSON: {err}") from None
    except RecursionError:  # the parser recurses per nesting level; rows are flat objects
        raise ValueError("malformed JSON: nested too deeply (rows are flat objects of feature values)") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"malformed JSON: {name} is not a JSON number")


def serve(
    directory: str | None,
    host: str = "127.0.0.1",
    port: int = 8080,
    max_bytes: int = 8 << 20,
    max_rows: int = 4096,
    workers: int = 8,
    queue: int = 64,
    timeout: float = 10.0,
    wait: bool = True,
    watch: str | None = None,
    poll: float = 1.0,
) -> ScoringServer:
    """A started server (its thread is a daemon); ``server.shutdown()`` stops it. ``wait``: return once
    the export is loaded (else it loads in the background and ``/healthz`` answers 503 until then).
    ``watch``: serve the chain of exports in that directory instead, following new deltas."""
    scorer = load(directory) if wait and watch is None else None
    server = ScoringServer(
        (host, port), scorer, directory, max_bytes, max_rows, workers, queue, timeout, watch=watch, poll=poll
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
