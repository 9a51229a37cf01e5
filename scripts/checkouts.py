"""Running ``recsys`` commands of this checkout and of an older commit side by side (benchmarks).

from checkouts import checkout_of, prepared_data, recsys, environment   # (scripts/ is on sys.path)
old = checkout_of("ac0ab83")                        # a git worktree under runs/checkouts/ac0ab83
data = prepared_data(old, "ac0ab83")                # ml100k-ctr made by that commit's own prepare.py
subprocess.run(recsys("fit", "--help"), cwd=old, env=environment())

Each checkout runs with this virtual environment, the ``recsys`` package imported from the checkout
(the command line below imports from the working directory).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "ml100k-ctr"
CHECKOUTS = ROOT / "runs" / "bench_startup"  # (where the first benchmark that needed them put them)
RECSYS = "import sys; from recsys.cli import main; sys.exit(main())"  # the console script, from the cwd's package


def recsys(*args: str) -> list[str]:
    """The command line of ``recsys ARGS`` run with the package of the working directory."""
    return [sys.executable, "-c", RECSYS, *args]


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2")}


def this_checkout() -> str:
    """The row name of this working tree in a benchmark table: ``this checkout (<short HEAD>)``."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return f"this checkout ({head.stdout.strip()})"


def checkout_of(commit: str) -> Path:
    """A worktree of ``commit`` (made once; only that directory is ever replaced)."""
    path = CHECKOUTS / commit
    if not (path / "recsys").is_dir():
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], cwd=ROOT, check=True)
    return path


def check_imports_from(checkout: Path) -> None:
    """Refuses to time a checkout whose commands would import another copy of the package."""
    where = [sys.executable, "-c", "import recsys; print(recsys.__file__)"]
    package = subprocess.run(where, cwd=checkout, env=environment(), capture_output=True, text=True, check=True)
    if not Path(package.stdout.strip()).resolve().is_relative_to(checkout.resolve()):
        raise RuntimeError(f"{checkout}: the package imported is {package.stdout.strip()}, not the checkout's")


def prepared_data(checkout: Path, name: str) -> Path:
    """ml100k-ctr as ``checkout``'s own ``prepare.py`` writes it (an older schema parser may not read
    today's keys); this checkout's is data/ml100k-ctr (``make data``)."""
    if checkout.resolve() == ROOT:
        return DATA
    data = CHECKOUTS / "models" / name / "ml100k-ctr"
    if not (data / "PREPARED.json").exists():
        dataset = [sys.executable, "datasets/movielens/prepare.py", "--out", str(data), "--force"]
        dataset += ["--cache", str(DATA.parent / "raw")]
        subprocess.run(dataset, cwd=checkout, env=environment(), check=True, capture_output=True)
    return data
