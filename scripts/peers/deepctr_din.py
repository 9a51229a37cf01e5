"""DeepCTR-Torch 0.3.0's DIN on ml100k-ctr, timed by part; run by scripts/bench_peers.py in its own
virtual environment (deepctr-torch, torch, pandas, pyarrow, scikit-learn; no recsys).

    runs/bench_peers/venv/bin/python scripts/peers/deepctr_din.py --work runs/bench_peers/deepctr --epochs 3

1. Data preparation: the ml100k-ctr rows built from the RecBole wheel by datasets/movielens/prepare.py
   (the same script and protocol recsys uses), then DeepCTR's inputs: ids of train values (0: unseen
   or padding), behavior sequences padded to 50, z-scored numbers.
2. Training: DIN with embedding width 16 and normalised attention weights (as configs/movielens/
   din.yaml), DeepCTR's other defaults, Adam at ``--lr``, batch 256; after each epoch the val AUC, the
   best epoch's weights kept (recsys keeps its best-val checkpoint the same way).
3. Evaluation: predict the test split with the kept weights, AUC (sklearn).

Prints one JSON line: seconds per part, val AUCs, test AUC.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[2]
CATEGORICAL = ["user_id", "item_id", "genre", "gender", "occupation", "zip_prefix"]
NUMERIC = ["release_year", "age"]
HISTORY = {"hist_item_id": "item_id", "hist_genre": "genre"}  # sequence -> the table it reads
MAX_LEN = 50
DIM = 16


def encode(frames: dict[str, pd.DataFrame]) -> tuple[dict, dict]:
    """DeepCTR's model inputs per split (name -> array) and the vocabulary sizes."""
    train = frames["train"]
    maps = {c: {v: i + 1 for i, v in enumerate(pd.unique(train[c]))} for c in CATEGORICAL}
    genres = {v: i + 1 for i, v in enumerate(sorted({g for row in train["genres"] for g in row}))}
    stats = {c: (train[c].mean(), train[c].std()) for c in NUMERIC}
    widest = max(len(row) for f in frames.values() for row in f["genres"])
    inputs = {}
    for split, frame in frames.items():
        x = {c: frame[c].map(maps[c]).fillna(0).astype(np.int64).to_numpy() for c in CATEGORICAL}
        for c in NUMERIC:
            x[c] = ((frame[c] - stats[c][0]) / stats[c][1]).astype(np.float32).to_numpy()
        for seq, target in HISTORY.items():
            padded = np.zeros((len(frame), MAX_LEN), dtype=np.int64)
            for i, row in enumerate(frame[seq]):
                ids = [maps[target].get(v, 0) for v in list(row)[-MAX_LEN:]]
                padded[i, : len(ids)] = ids
            x[seq] = padded
        x["seq_length"] = frame["hist_item_id"].map(lambda r: min(len(r), MAX_LEN)).to_numpy()
        multi = np.zeros((len(frame), widest), dtype=np.int64)
        for i, row in enumerate(frame["genres"]):
            multi[i, : len(row)] = [genres.get(g, 0) for g in row]
        x["genres"] = multi
        inputs[split] = (x, frame["label"].to_numpy().astype(np.float32))
    sizes = {c: len(m) + 1 for c, m in maps.items()} | {"genres": len(genres) + 1, "genres_width": widest}
    return inputs, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="where the prepared rows go")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    # 1. data preparation
    began = time.perf_counter()
    data = args.work / "ml100k-ctr"
    prepare = [sys.executable, "datasets/movielens/prepare.py", "--out", str(data), "--force"]
    subprocess.run(prepare + ["--cache", "data/raw"], cwd=ROOT, check=True, capture_output=True)
    columns = ["label", *CATEGORICAL, *NUMERIC, "genres", *HISTORY]
    frames = {s: pd.read_parquet(data / s, columns=columns) for s in ("train", "val", "test")}
    inputs, sizes = encode(frames)
    prepared = time.perf_counter() - began

    import torch
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat
    from deepctr_torch.models import DIN
    from sklearn.metrics import roc_auc_score

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    columns = [SparseFeat(c, sizes[c], embedding_dim=DIM) for c in CATEGORICAL]
    columns += [DenseFeat(c, 1) for c in NUMERIC]
    columns += [
        VarLenSparseFeat(SparseFeat("genres", sizes["genres"], embedding_dim=DIM), sizes["genres_width"], "mean"),
        *(
            VarLenSparseFeat(
                SparseFeat(seq, sizes[target], embedding_dim=DIM, embedding_name=target), MAX_LEN, "mean", "seq_length"
            )
            for seq, target in HISTORY.items()
        ),
    ]

    # 2. training, best epoch on val
    began = time.perf_counter()
    model = DIN(columns, list(HISTORY.values()), att_weight_normalization=True, device="cpu", seed=args.seed)
    model.compile(torch.optim.Adam(model.parameters(), lr=args.lr), "binary_crossentropy")
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = inputs["train"], inputs["val"], inputs["test"]
    val_aucs, best = [], None
    for _ in range(args.epochs):
        model.fit(x_train, y_train, batch_size=256, epochs=1, verbose=0)
        val_aucs.append(float(roc_auc_score(y_val, model.predict(x_val, batch_size=8192))))
        if val_aucs[-1] == max(val_aucs):
            best = copy.deepcopy(model.state_dict())
    model.load_state_dict(best)
    trained = time.perf_counter() - began

    # 3. evaluation (test read once, with the weights val chose)
    began = time.perf_counter()
    test_auc = float(roc_auc_score(y_test, model.predict(x_test, batch_size=8192)))
    evaluated = time.perf_counter() - began
    print(
        json.dumps(
            {
                "prepare_s": prepared,
                "train_s": trained,
                "eval_s": evaluated,
                "in_process_s": time.perf_counter() - START,
                "val_auc": val_aucs,
                "test_auc": test_auc,
                "train_rows": len(y_train),
                "lr": args.lr,
            }
        )
    )


if __name__ == "__main__":
    main()
