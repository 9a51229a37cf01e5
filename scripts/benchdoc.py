"""What every benchmark script shares: the machine line of its table and the doc block it rewrites.

from benchdoc import machine, write_doc_section      # (scripts/ is on sys.path when a script runs)
write_doc_section("docs/benchmarks.md", "bench_train", f"Machine: {machine()} ...")
publish(OUT / "results.json", results, "bench_train", markdown, doc=True)   # results + table + doc block
spread([3.1, 2.9, 3.4], ".1f")                       # "3.1 [2.9–3.4]": median [min–max]
result = reused_or_run(run_dir, [config_text, block, seed], lambda: {...})   # a run reused only if the same
"""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path

import torch


def write_doc_section(path: str | Path, name: str, markdown: str) -> None:
    """Replaces (or appends) the ``<!-- name:start -->``…``<!-- name:end -->`` block of a doc.

    Each benchmark script owns one block of docs/benchmarks.md and rewrites only that.
    """
    path = Path(path)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def publish(results_file: Path, results: object, section: str, markdown: str, doc: bool = True) -> None:
    """Writes a run's raw results as JSON, prints its table, and (``doc``) rewrites its block of
    docs/benchmarks.md."""
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results_file.write_text(json.dumps(results, indent=2))
    print(markdown)
    if doc:
        write_doc_section(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md", section, markdown)


def spread(values: list[float], fmt: str) -> str:
    """Median [min–max] of repeated measurements, each formatted with ``fmt``."""
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}–{max(values):{fmt}}]"


def machine() -> str:
    """CPU model, cores and torch build, for benchmark tables."""
    import os
    import platform

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}"


def fingerprint(parts: object) -> str:
    """Hash of what a run's result depends on (config text, blocks, seed, options), as JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reused_or_run(run_dir: Path, parts: object, compute: Callable[[], dict]) -> dict:
    """``run_dir/result.json`` when it was written for the same ``parts``; otherwise ``run_dir`` is
    cleared (a stale checkpoint must not be scored), ``compute()`` runs and its result is stored with
    the fingerprint. So a table never mixes results of two configs."""
    done, key = Path(run_dir) / "result.json", fingerprint(parts)
    if done.exists():
        stored = json.loads(done.read_text())
        if stored.get("fingerprint") == key:
            return stored
    shutil.rmtree(run_dir, ignore_errors=True)
    result = {**compute(), "fingerprint": key}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result, indent=2))
    return result


def data_identity(path: str | Path) -> str:
    """What a generated dataset was made from (its GENERATED.json), so a reused run is keyed by the data and
    not only by its path; "" for a prepared dataset without one."""
    generated = Path(path) / "GENERATED.json"
    return generated.read_text() if generated.exists() else ""
