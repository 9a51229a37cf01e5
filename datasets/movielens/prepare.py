"""MovieLens-100k as the ml100k-ctr task of docs/protocols.md, written in the recsys dataset contract.

By default the raw files come out of the ``recbole==1.2.1`` wheel (fetched with ``pip download``,
no install); ``--source DIR`` takes a local ml-100k directory instead, in RecBole's atomic format
(``ml-100k.inter/.item/.user``) or GroupLens' original one (``u.data``, ``u.item``, ``u.user``).

    python datasets/movielens/prepare.py --out data/ml100k-ctr
    python datasets/movielens/prepare.py --out data/ml100k-cold --cold-items 0.2      # cold-start variant

Protocol (docs/protocols.md, ml100k-ctr): label = rating >= 4; each user's interactions ordered by
(timestamp, item_id); behavior sequence = the items rated before, most recent last, at most 50,
with the first genre of each beside it; per-user split, k = ceil(0.1 n) last rows to test, the k
before them to val, the rest to train (79,122 / 10,439 / 10,439 rows).

ml100k-cold (``--cold-items S``, docs/datasets.md): after that split, a share S of the items of the
item file (drawn with ``--cold-seed``, the same for every model seed) is cold: their train rows are
dropped and they are removed from train rows' histories (the genre sequence beside them too); val and
test stay as they are. ``items.parquet`` lists every item of the item file (the retrieval catalogue)
and PREPARED.json the cold ids.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

PROTOCOL = "ml100k-ctr/1"
COLD_PROTOCOL = "ml100k-cold/1"
ITEM_COLUMNS = ["item_id", "genre", "genres", "release_year", "movie_title"]
MAX_HISTORY = 50
WHEEL = "recbole==1.2.1"
WHEEL_PREFIX = "recbole/dataset_example/ml-100k/ml-100k"
SHA256 = {  # of the files inside the recbole 1.2.1 wheel
    "inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}
GENRES = [  # u.genre order; RecBole's "class" lists genres in this order too
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]
SCHEMA = """\
# ml100k-ctr (docs/protocols.md): MovieLens-100k ratings as clicks (rating >= 4), with behavior sequences.
label: label
group: user_id
features:
  - {name: user_id, type: categorical}
  - {name: item_id, type: categorical}
  - {name: genre, type: categorical}            # first genre of the item
  - {name: genres, type: categorical_list}      # all genres of the item (multi-hot)
  - {name: release_year, type: numeric}
  - {name: age, type: numeric}
  - {name: gender, type: categorical}
  - {name: occupation, type: categorical}
  - {name: zip_prefix, type: categorical}       # first character of the zip code
  - {name: hist_item_id, type: sequence, target: item_id, max_len: 50}
  - {name: hist_genre, type: sequence, target: genre, max_len: 50}
  - {name: movie_title, type: text, item: item_id}  # the title describes the item
"""


class PrepareError(RuntimeError):
    pass


# -- reading the raw files ------------------------------------------------------------------
def _atomic_frame(raw: bytes, name: str) -> pd.DataFrame:
    frame = pd.read_csv(io.BytesIO(raw), sep="\t", dtype=str, keep_default_na=False, quoting=3, encoding="utf-8")
    frame.columns = [c.split(":")[0] for c in frame.columns]
    return frame


def read_wheel(cache: Path) -> dict[str, pd.DataFrame]:
    """ml-100k out of the recbole wheel (downloaded once into ``cache``), checksums verified."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("recbole-1.2.1-*.whl"))
    if not wheels:
        print(f"[movielens] fetching the {WHEEL} wheel (2 MB) into {cache}", flush=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            WHEEL,
            "-d",
            str(cache),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(cache.glob("recbole-1.2.1-*.whl"))
        if result.returncode != 0 or not wheels:
            raise PrepareError(f"could not download {WHEEL} with pip: {result.stderr.strip()[-500:]}")
    frames = {}
    with zipfile.ZipFile(wheels[0]) as wheel:
        for part, digest in SHA256.items():
            raw = wheel.read(f"{WHEEL_PREFIX}.{part}")
            if hashlib.sha256(raw).hexdigest() != digest:
                raise PrepareError(f"{wheels[0]}: {WHEEL_PREFIX}.{part} does not match its known SHA-256")
            frames[part] = _atomic_frame(raw, part)
    return frames


def read_directory(source: Path) -> dict[str, pd.DataFrame]:
    """A local ml-100k directory, RecBole atomic files or the GroupLens originals."""
    atomic = {p: source / f"ml-100k.{p}" for p in ("inter", "item", "user")}
    if all(f.exists() for f in atomic.values()):
        return {p: _atomic_frame(f.read_bytes(), p) for p, f in atomic.items()}
    original = {p: source / f"u.{p}" for p in ("data", "item", "user")}
    missing = [str(f) for f in original.values() if not f.exists()]
    if missing:
        raise PrepareError(
            f"{source}: neither ml-100k.inter/.item/.user nor u.data/u.item/u.user found (missing {missing})"
        )
    inter = pd.read_csv(
        original["data"], sep="\t", header=None, dtype=str, names=["user_id", "item_id", "rating", "timestamp"]
    )
    item_cols = ["item_id", "title", "release_date", "video", "url"] + GENRES
    item = pd.read_csv(
        original["item"], sep="|", header=None, dtype=str, names=item_cols, encoding="latin-1", keep_default_na=False
    )
    flags = item[GENRES].to_numpy() == "1"
    item = pd.DataFrame(
        {
            "item_id": item["item_id"],
            "movie_title": item["title"].str.replace(r"\s*\(\d{4}\)\s*$", "", regex=True),
            "release_year": item["release_date"].str[-4:],
            "class": [" ".join(g for g, f in zip(GENRES, row, strict=True) if f) for row in flags],
        }
    )
    user = pd.read_csv(
        original["user"], sep="|", header=None, dtype=str, names=["user_id", "age", "gender", "occupation", "zip_code"]
    )
    return {"inter": inter, "item": item, "user": user}


# -- the protocol -------------------------------------------------------------------------
def item_table(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The item file as ``ITEM_COLUMNS``: first genre, all genres, release year (median when unusable)."""
    item = frames["item"].copy()
    item["item_id"] = item["item_id"].astype(np.int64)
    item["genres"] = item["class"].str.split()
    item["genres"] = item["genres"].apply(lambda g: g if g else ["unknown"])
    item["genre"] = item["genres"].str[0]
    year = pd.to_numeric(item["release_year"], errors="coerce")
    # two items have no usable year ("unkonwn", "V"): give them the median so the column stays numeric
    item["release_year"] = year.fillna(year.median()).astype(np.float64)
    return item[ITEM_COLUMNS]


def build(frames: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    inter = frames["inter"].astype(
        {"user_id": np.int64, "item_id": np.int64, "rating": np.float64, "timestamp": np.int64}
    )
    item = item_table(frames)
    user = frames["user"].copy()
    user["user_id"] = user["user_id"].astype(np.int64)
    user["age"] = user["age"].astype(np.float64)
    user["zip_prefix"] = user["zip_code"].str[:1]

    missing_items = set(inter["item_id"]) - set(item["item_id"])
    if missing_items:
        raise PrepareError(
            f"ratings reference {len(missing_items)} item(s) missing "
            f"from the item file, e.g. {sorted(missing_items)[:5]}"
        )
    df = inter.merge(item[["item_id", "movie_title", "release_year", "genre", "genres"]], on="item_id", how="left")
    df = df.merge(user[["user_id", "age", "gender", "occupation", "zip_prefix"]], on="user_id", how="left")
    if df["age"].isna().any():
        raise PrepareError("ratings reference users missing from the user file")
    df["label"] = (df["rating"] >= 4).astype(np.int8)

    df = df.sort_values(["user_id", "timestamp", "item_id"], kind="stable").reset_index(drop=True)
    users = df["user_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    sizes = np.diff(np.r_[starts, len(df)])
    position = np.arange(len(df)) - np.repeat(starts, sizes)
    n = np.repeat(sizes, sizes)
    k = np.ceil(0.1 * n).astype(np.int64)
    split = np.where(position >= n - k, "test", np.where(position >= n - 2 * k, "val", "train"))

    items = df["item_id"].to_numpy()
    genres = df["genre"].to_numpy()
    first = np.repeat(starts, sizes)
    lo = np.maximum(first, np.arange(len(df)) - MAX_HISTORY)
    df["hist_item_id"] = [items[a:b].tolist() for a, b in zip(lo, np.arange(len(df)), strict=True)]
    df["hist_genre"] = [genres[a:b].tolist() for a, b in zip(lo, np.arange(len(df)), strict=True)]

    columns = [
        "label",
        "user_id",
        "item_id",
        "genre",
        "genres",
        "release_year",
        "age",
        "gender",
        "occupation",
        "zip_prefix",
        "hist_item_id",
        "hist_genre",
        "movie_title",
        "timestamp",
    ]
    return {name: df.loc[split == name, columns].reset_index(drop=True) for name in ("train", "val", "test")}


def make_cold(
    splits: dict[str, pd.DataFrame], item_ids: np.ndarray, share: float, seed: int
) -> tuple[dict[str, pd.DataFrame], list[int]]:
    """ml100k-cold: ``round(share · items)`` items drawn with ``seed`` lose their train rows and leave
    train histories (with the genre beside each); val and test are unchanged. Returns the splits and
    the sorted cold ids."""
    if not 0 < share < 1:
        raise PrepareError(f"--cold-items {share}: a share of the items strictly between 0 and 1")
    pool = np.sort(np.unique(item_ids))
    cold = sorted(np.random.default_rng(seed).choice(pool, size=round(share * len(pool)), replace=False).tolist())
    is_cold = set(cold)
    train = splits["train"][~splits["train"]["item_id"].isin(is_cold)].copy()
    keep = [[i not in is_cold for i in h] for h in train["hist_item_id"]]
    for column in ("hist_item_id", "hist_genre"):
        train[column] = [[v for v, k in zip(h, m, strict=True) if k] for h, m in zip(train[column], keep, strict=True)]
    return {"train": train.reset_index(drop=True), "val": splits["val"], "test": splits["test"]}, cold


def write(splits: dict[str, pd.DataFrame], out: Path, catalogue: pd.DataFrame, prepared: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    arrow_schema = pa.schema(
        [
            ("label", pa.int8()),
            ("user_id", pa.int64()),
            ("item_id", pa.int64()),
            ("genre", pa.string()),
            ("genres", pa.list_(pa.string())),
            ("release_year", pa.float64()),
            ("age", pa.float64()),
            ("gender", pa.string()),
            ("occupation", pa.string()),
            ("zip_prefix", pa.string()),
            ("hist_item_id", pa.list_(pa.int64())),
            ("hist_genre", pa.list_(pa.string())),
            ("movie_title", pa.string()),
            ("timestamp", pa.int64()),
        ]
    )
    for name, frame in splits.items():
        (out / name).mkdir(exist_ok=True)
        table = pa.Table.from_pandas(frame, schema=arrow_schema, preserve_index=False)
        # row groups of 8k rows let dataloader workers and ranks split a split between them
        pq.write_table(table, out / name / "part-0.parquet", row_group_size=8192)
    (out / "schema.yaml").write_text(SCHEMA)
    item_schema = pa.schema([arrow_schema.field(c) for c in ITEM_COLUMNS])
    pq.write_table(pa.Table.from_pandas(catalogue, schema=item_schema, preserve_index=False), out / "items.parquet")
    stats = {name: {"rows": len(f), "positive_rate": round(float(f["label"].mean()), 4)} for name, f in splits.items()}
    (out / "PREPARED.json").write_text(json.dumps({**prepared, "splits": stats}, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/ml100k-ctr"), help="dataset directory to write")
    parser.add_argument("--source", type=Path, help="local ml-100k directory instead of the recbole wheel")
    parser.add_argument("--cache", type=Path, default=Path("data/raw"), help="where the downloaded wheel is kept")
    parser.add_argument("--force", action="store_true", help="rebuild even if --out is already prepared")
    parser.add_argument(
        "--cold-items", type=float, metavar="SHARE", help="ml100k-cold: this share of the items has no train row"
    )
    parser.add_argument("--cold-seed", type=int, default=0, help="which items are cold (default 0)")
    args = parser.parse_args(argv)
    if args.cold_items is None:
        prepared = {"protocol": PROTOCOL}
    else:
        prepared = {"protocol": COLD_PROTOCOL, "cold": {"share": args.cold_items, "seed": args.cold_seed}}

    marker = args.out / "PREPARED.json"
    done = json.loads(marker.read_text()) if marker.exists() else {}
    same = done.get("protocol") == prepared["protocol"] and all(
        done.get("cold", {}).get(k) == v for k, v in prepared.get("cold", {}).items()
    )
    if same and not args.force:
        print(f"[movielens] {args.out} already prepared ({prepared['protocol']}); --force rebuilds it")
        schema = args.out / "schema.yaml"
        if schema.read_text() != SCHEMA:  # same rows; the schema gained keys (e.g. the item a text describes)
            schema.write_text(SCHEMA)
            print(f"[movielens] updated {schema}")
        return 0
    try:
        frames = read_directory(args.source) if args.source else read_wheel(args.cache)
        splits = build(frames)
        catalogue = item_table(frames)
        if args.cold_items is not None:
            splits, cold = make_cold(splits, catalogue["item_id"].to_numpy(), args.cold_items, args.cold_seed)
            prepared["cold"] |= {"items": len(cold), "of": len(catalogue), "ids": cold}
    except PrepareError as err:
        print(f"[movielens] error: {err}", file=sys.stderr)
        return 2
    write(splits, args.out, catalogue, prepared)
    for name, frame in splits.items():
        print(f"[movielens] {name:5s} {len(frame):6,d} rows  positive rate {frame['label'].mean():.3f}")
    print(f"[movielens] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
