"""Start-up of the ``recsys`` commands: this checkout beside an older commit, median of ``--runs``.

    python scripts/bench_startup.py                          # this checkout vs ac0ab83, 5 runs each
    python scripts/bench_startup.py --baseline ac0ab83 --runs 3 --no-doc

Each checkout (this one, and ``--baseline`` checked out by ``git worktree`` under
runs/bench_startup/<commit>) runs with the same virtual environment, the package imported from the
checkout; the runs of the two alternate. Per checkout, set up once: ``configs/movielens/base.yaml``
trained for one epoch on ml100k-ctr and exported at fp32, data preparation included, by that
checkout's own code. Timed, as
wall time of a fresh process:

- ``recsys --help`` and ``recsys fit --help``: until the process exits;
- ``recsys serve EXPORT``: from the process start until ``GET /healthz`` first answers 200 (the
  server can score), polled every 20 ms;
- ``recsys eval --ckpt CKPT --split test``: until the process exits (the ml100k test split, 10,439
  rows, report written).

Writes runs/bench_startup/results.json and the ``bench_startup`` block of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
from benchdoc import machine, publish
from checkouts import ROOT, check_imports_from, checkout_of, environment, prepared_data, recsys, this_checkout

OUT = ROOT / "runs" / "bench_startup"
TARGETS = {"recsys --help": 1.0, "recsys fit --help": 3.5, "recsys serve → /healthz 200": 6.0, "recsys eval": 6.0}


def prepare(checkout: Path, name: str) -> tuple[Path, Path]:
    """A one-epoch base model and its fp32 export, made by ``checkout``'s code (its own formats)."""
    check_imports_from(checkout)
    work = OUT / "models" / name  # made once per checkout name (commit): delete it after editing the code
    ckpt, export, data = work / "base" / "checkpoints" / "last.ckpt", work / "export", work / "ml100k-ctr"
    if not export.exists():
        shutil.rmtree(work, ignore_errors=True)
        data = prepared_data(checkout, name)  # its own schema
        fit = ["fit", "--config", "configs/movielens/base.yaml", "--data.path", str(data)]
        fit += ["--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", "--seed_everything", "1"]
        fit += ["--trainer.logger.init_args.save_dir", str(work), "--trainer.logger.init_args.name", ""]
        fit += ["--trainer.logger.init_args.version", "base"]
        subprocess.run(recsys(*fit), cwd=checkout, env=environment(), check=True, capture_output=True)
        if not ckpt.exists():  # a checkout whose config keeps only best.ckpt
            ckpt = next((work / "base" / "checkpoints").glob("*.ckpt"))
        exported = ["export", "--ckpt", str(ckpt), "--out", str(export), "--dtype", "fp32"]
        subprocess.run(recsys(*exported), cwd=checkout, env=environment(), check=True, capture_output=True)
    if not ckpt.exists():
        ckpt = next((work / "base" / "checkpoints").glob("*.ckpt"))
    return ckpt, export  # eval times the checkpoint that was exported


def timed_exit(checkout: Path, args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(recsys(*args), cwd=checkout, env=environment(), check=True, capture_output=True)
    return time.perf_counter() - start


def timed_health(checkout: Path, export: Path, port: int) -> float:
    """Seconds from ``recsys serve`` starting until /healthz answers 200."""
    start = time.perf_counter()
    args = ["serve", str(export), "--port", str(port)]
    server = subprocess.Popen(
        recsys(*args), cwd=checkout, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        while time.perf_counter() - start < 120:
            if server.poll() is not None:
                raise RuntimeError(f"recsys serve exited: {server.stderr.read().decode()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    return time.perf_counter() - start
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError("recsys serve did not answer /healthz 200 within 120 s")
    finally:
        server.terminate()
        server.wait()


def measure(checkouts: dict[str, Path], runs: int, port: int) -> dict[str, dict[str, list[float]]]:
    models = {name: prepare(path, name) for name, path in checkouts.items()}
    times: dict[str, dict[str, list[float]]] = {name: {t: [] for t in TARGETS} for name in checkouts}
    for i in range(runs):
        for name, path in checkouts.items():  # alternating, so a slow minute hits both
            ckpt, export = models[name]
            cell = times[name]
            cell["recsys --help"].append(timed_exit(path, ["--help"]))
            cell["recsys fit --help"].append(timed_exit(path, ["fit", "--help"]))
            cell["recsys serve → /healthz 200"].append(timed_health(path, export, port))
            out = OUT / "eval" / name
            cell["recsys eval"].append(
                timed_exit(path, ["eval", "--ckpt", str(ckpt), "--split", "test", "--out", str(out)])
            )
        print(
            f"run {i + 1}/{runs}: " + ", ".join(f"{n} {np.median(times[n]['recsys fit --help']):.1f} s" for n in times)
        )
    return times


def markdown(times: dict, args: argparse.Namespace, load: float) -> str:
    names = list(times)
    lines = [
        f"`python scripts/bench_startup.py --baseline {args.baseline} --runs {args.runs}` — {machine()}; "
        f"OMP_NUM_THREADS={environment()['OMP_NUM_THREADS']}, load average {load:.2f} at the start. Wall "
        f"time of a fresh process, median [min–max] of {args.runs} runs, the two checkouts alternating, "
        "one virtual environment (the package imported from each checkout). serve: until /healthz first "
        "answers 200 (the export loaded, able to score); eval: the ml100k-ctr test split of a one-epoch "
        "base model, report written.",
        "",
        "| command | " + " | ".join(names) + " | target |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    for target, limit in TARGETS.items():
        cells = []
        for name in names:
            v = np.array(times[name][target])
            cells.append(f"{np.median(v):.2f} s [{v.min():.2f}–{v.max():.2f}]")
        head = np.median(times[names[0]][target])
        verdict = "met" if head <= limit else "not met"
        lines.append(f"| `{target}` | " + " | ".join(cells) + f" | ≤ {limit:g} s: {verdict} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="ac0ab83", help="the commit to compare with")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--port", type=int, default=18431)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    checkouts = {this_checkout(): ROOT, args.baseline: checkout_of(args.baseline)}
    times = measure(checkouts, args.runs, args.port)
    publish(OUT / "results.json", times, "bench_startup", markdown(times, args, load), not args.no_doc)


if __name__ == "__main__":
    main()
