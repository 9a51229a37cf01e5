"""Datasets partitioned by day: ``train/day=YYYY-MM-DD/*.parquet``, trained one day per epoch.

::

    <dir>/schema.yaml
    <dir>/train/day=2024-01-01/part-0.parquet     the day's rows (any number of files)
    <dir>/train/day=2024-01-02/...

``recsys fit --data.days 2024-01-01:2024-01-07`` trains day ``k`` of the range in epoch ``k``; validation
is the day after the one just trained (``val/auc`` is the next-day AUC); the test split is the day after
the range. Vocabularies come from the dataset's first day (what existed when training began; features
with ``vocabulary: none`` need none). A day is addressed as the split ``train/day=YYYY-MM-DD``.

Example::

    days = parse_days("2024-01-01:2024-01-03")      # ['2024-01-01', '2024-01-02', '2024-01-03']
    day_split(days[0])                               # 'train/day=2024-01-01'
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from recsys.data.arrow import SPLITS, DataError

PREFIX = "day="
DAY_SPLIT = re.compile(r"^train/day=\d{4}-\d{2}-\d{2}$")


def day_split(day: str) -> str:
    """The split name (a folder under the dataset) of one day."""
    return f"train/{PREFIX}{day}"


def is_split(name: str) -> bool:
    """``train``, ``val``, ``test`` or one day's ``train/day=YYYY-MM-DD`` (nothing else: no paths)."""
    return name in SPLITS or bool(DAY_SPLIT.match(name))


def partitions(data_dir: str | Path) -> list[str]:
    """The days under ``<dir>/train/`` (sorted), or [] for a dataset that is not partitioned by day."""
    folder = Path(data_dir) / "train"
    if not folder.is_dir():
        return []
    return sorted(p.name[len(PREFIX) :] for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def _date(text: str, where: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not a date (YYYY-MM-DD)") from None


def parse_days(spec: str, where: str = "data.days") -> list[str]:
    """``FIRST:LAST`` (inclusive) → every day in between, as ``YYYY-MM-DD``."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"{where}: expected FIRST:LAST, e.g. 2024-01-01:2024-01-07, got {spec!r}")
    first, last = (_date(part.strip(), where) for part in spec.split(":"))
    if last < first:
        raise ValueError(f"{where}: the last day {last} comes before the first {first}")
    return [(first + dt.timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]


def next_day(day: str) -> str:
    return (dt.date.fromisoformat(day) + dt.timedelta(days=1)).isoformat()


def check_days(data_dir: str | Path, days: list[str]) -> None:
    """Every day of the range and the day after (the last day's validation, the test split) must exist."""
    present = set(partitions(data_dir))
    if not present:
        raise DataError(
            f"{data_dir}: --data.days needs the train split partitioned by day ({Path(data_dir) / 'train'}/"
            f"{PREFIX}YYYY-MM-DD/*.parquet); this dataset has none"
        )
    for day in [*days, next_day(days[-1])]:
        if day not in present:
            role = "the day after the range (last validation and the test split)" if day not in days else "a day"
            raise DataError(
                f"{Path(data_dir) / day_split(day)}: {role} of --data.days {days[0]}:{days[-1]} is missing "
                f"(days present: {sorted(present)[0]} … {sorted(present)[-1]}, {len(present)} in all)"
            )
