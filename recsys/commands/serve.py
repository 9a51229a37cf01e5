"""``recsys serve DIR``: arguments and printing; the server is ``recsys.serve.server``."""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

import torch

from recsys.commands.table import example
from recsys.export.loader import ExportError
from recsys.serve import server as serving
from recsys.serve.server import ScoringServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="recsys serve",
        description=serving.__doc__,
        epilog=example("serve"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("directory", nargs="?", help="export directory (recsys export --out)")
    parser.add_argument(
        "--watch",
        metavar="DIR",
        help="serve the chain of exports in DIR (a full export, then deltas from recsys export --since) and "
        "apply each new delta while serving",
    )
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between looks at --watch DIR")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--max-bytes", type=int, default=8 << 20, help="largest request body (bytes)")
    parser.add_argument("--max-rows", type=int, default=4096, help="most rows per request")
    parser.add_argument("--workers", type=int, default=8, help="threads handling connections")
    parser.add_argument("--queue", type=int, default=64, help="connections waiting for a worker before 503")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds a connection may stay idle or slow")
    parser.add_argument("--backlog", type=int, default=1024, help="listen backlog of the socket")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for scoring (0: torch's default)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if (args.directory is None) == (args.watch is None):
        parser.error("give an export directory or --watch DIR (one of them)")
    if args.watch is not None and not Path(args.watch).is_dir():
        print(f"recsys serve: --watch {args.watch}: not a directory", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    from recsys.export.loader import read_manifest

    try:
        if args.directory is not None:
            read_manifest(args.directory)  # not an export: stop here, before the port is taken
    except (ExportError, FileNotFoundError) as err:
        print(f"recsys serve: {err}", file=sys.stderr)
        return 1
    try:
        server = ScoringServer(
            (args.host, args.port),
            None,
            args.directory,
            args.max_bytes,
            args.max_rows,
            args.workers,
            args.queue,
            args.timeout,
            args.backlog,
            watch=args.watch,
            poll=args.poll,
        )
    except OSError as err:
        reason = (
            "is in use (another server?); pass --port" if err.errno == errno.EADDRINUSE else f"cannot be opened ({err})"
        )
        print(f"recsys serve: {args.host}:{args.port} {reason}", file=sys.stderr)
        return 1
    what = args.directory or f"the exports in {args.watch} (new deltas applied as they arrive)"
    print(
        f"serving {what} on http://{args.host}:{server.server_address[1]} (POST /score, GET /healthz, "
        f"GET /metadata); /healthz answers 200 once the export is loaded",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 1 if server.load_error else 0
