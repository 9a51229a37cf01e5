"""What every benchmark script shares: the machine line of its table and the doc block it rewrites.

from benchdoc import machine, write_doc_section      # (scripts/ is on sys.path when a script runs)
write_doc_section("docs/benchmarks.md", "bench_train", f"Machine: {machine()} ...")
"""

from __future__ import annotations

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
