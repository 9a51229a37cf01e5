"""Offline CTR evaluation of a checkpoint: ``recsys eval`` and ``scripts/evaluate.py``.

    recsys eval --ckpt runs/movielens/base/version_0/checkpoints/best.ckpt
    recsys eval --ckpt DIN.ckpt --baseline runs/.../eval_test/report.json --out reports/din

Writes ``report.json`` (``auc``, ``gauc``, ``logloss``, ``rows`` and more), ``report.md``,
``reliability.png`` and ``predictions.parquet`` into ``--out`` (default: ``eval_<split>``
beside the checkpoint's run directory).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from recsys.data.parquet import ParquetStream
from recsys.data.vocab import Vocabulary, check_same_content
from recsys.eval.metrics import (
    bootstrap_intervals,
    calibration_bins,
    ctr_metrics,
    expected_calibration_error,
    group_aucs,
    rela_impr,
)


def predict_split(model: torch.nn.Module, stream: ParquetStream, desc: str = "scoring") -> dict[str, np.ndarray]:
    """Scores every row of a split: ``{"prob", "label", "group"}`` arrays in file order."""
    probs, labels, groups = [], [], []
    model.eval()
    with torch.inference_mode(), tqdm(total=stream.num_rows, desc=desc, unit="row", unit_scale=True) as bar:
        for batch in stream:
            probs.append(torch.sigmoid(model(batch)).float().numpy())
            labels.append(batch.labels.numpy())
            groups.append(batch.groups.numpy())
            bar.update(len(batch))
    return {"prob": np.concatenate(probs), "label": np.concatenate(labels), "group": np.concatenate(groups)}


def evaluate(
    ckpt: str | Path,
    data: str | Path | None = None,
    split: str = "test",
    out: str | Path | None = None,
    baseline: str | Path | None = None,
    bootstrap: int = 1000,
    batch_size: int = 8192,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluates ``ckpt`` on ``split`` and writes the report files; returns the report dict."""
    from recsys.train.checkpoint import load_model  # lightning import kept out of `--help`

    ckpt = Path(ckpt)
    model = load_model(str(ckpt))
    data_dir = Path(data) if data else Path(model.info.path)
    vocab = Vocabulary.load_or_build(data_dir)
    check_same_content(model.info, vocab.info(), data_dir)
    stream = ParquetStream(data_dir, split, vocab, batch_size=batch_size)
    out_dir = Path(out) if out else ckpt.resolve().parent.parent / f"eval_{split.replace('/', '_')}"
    out_dir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    scored = predict_split(model, stream, desc=f"{split} {data_dir.name}")
    seconds = time.perf_counter() - start
    y, p, g = scored["label"], scored["prob"], scored["group"]
    metrics = ctr_metrics(y, p, g)
    intervals = bootstrap_intervals(y, p, g, num_samples=bootstrap, seed=seed) if bootstrap > 0 else {}
    bins = calibration_bins(y, p)
    report: dict[str, Any] = {
        **metrics,
        "rows": int(len(y)),
        "positive_rate": float(y.mean()),
        "mean_prediction": float(p.mean()),
        "ece": expected_calibration_error(y, p),
        "groups": int(len(np.unique(g))),
        "groups_with_both_classes": int(len(group_aucs(y, p, g)[0])),
        "ci95": {k: list(v) for k, v in intervals.items()},
        "bootstrap_samples": bootstrap,
        "split": split,
        "data": str(data_dir),
        "checkpoint": str(ckpt),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "scoring_rows_per_s": float(len(y) / seconds),
        "threads": torch.get_num_threads(),
    }
    if baseline:
        base = json.loads(Path(baseline).read_text())
        for key in ("auc", "gauc"):
            if key not in base:
                raise ValueError(f"{baseline}: baseline report has no {key!r}")
        report["baseline"] = {"report": str(baseline), "auc": base["auc"], "gauc": base["gauc"]}
        report["rela_impr_auc"] = rela_impr(metrics["auc"], base["auc"])
        report["rela_impr_gauc"] = rela_impr(metrics["gauc"], base["gauc"])

    pq.write_table(pa.table(scored), out_dir / "predictions.parquet")
    _reliability_plot(
        bins,
        out_dir / "reliability.png",
        title=f"{report['model_class'].rsplit('.', 1)[-1]} on {data_dir.name}/{split}",
    )
    (out_dir / "report.json").write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False))
    (out_dir / "report.md").write_text(_markdown(report, bins))
    report["out"] = str(out_dir)
    return report


def _json_safe(value: Any) -> Any:
    """NaN/inf (an AUC on a one-class split) → null: NaN is not JSON, and a reader must not take a
    number for a metric that is undefined."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _reliability_plot(bins: dict[str, np.ndarray], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=[3, 1], sharex=True)
    mask = bins["counts"] > 0
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    top.plot(bins["predicted"][mask], bins["observed"][mask], marker="o", label="model")
    top.set_ylabel("observed click rate")
    top.set_title(title)
    top.legend(loc="upper left")
    centers = (bins["edges"][:-1] + bins["edges"][1:]) / 2
    bottom.bar(centers, bins["counts"], width=bins["edges"][1] - bins["edges"][0], color="tab:blue", alpha=0.6)
    bottom.set_xlabel("predicted click probability")
    bottom.set_ylabel("rows")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt_ci(report: dict[str, Any], key: str) -> str:
    ci = report["ci95"].get(key)
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci and all(math.isfinite(c) for c in ci) else "—"


def _markdown(report: dict[str, Any], bins: dict[str, np.ndarray]) -> str:
    lines = [
        f"# CTR evaluation: {report['model_class']}",
        "",
        f"- checkpoint: `{report['checkpoint']}`",
        f"- data: `{report['data']}`, split `{report['split']}`: {report['rows']:,} rows, "
        f"{report['groups']:,} users ({report['groups_with_both_classes']:,} with both classes), "
        f"positive rate {report['positive_rate']:.3f}",
        "",
        f"| metric | value | 95% CI (bootstrap over users, {report['bootstrap_samples']} samples) |",
        "|---|---|---|",
    ]
    for key in ("auc", "gauc", "logloss"):
        value = f"{report[key]:.4f}" if math.isfinite(report[key]) else "undefined (one class)"
        lines.append(f"| {key.upper() if key != 'logloss' else 'logloss'} | {value} | {_fmt_ci(report, key)} |")
    lines.append(f"| ECE (10 bins) | {report['ece']:.4f} | |")
    if "baseline" in report:
        b = report["baseline"]
        lines += [
            "",
            f"Against baseline `{b['report']}` (AUC {b['auc']:.4f}, GAUC {b['gauc']:.4f}):",
            f"RelaImpr(AUC) = {report['rela_impr_auc']:+.2f}%, RelaImpr(GAUC) = {report['rela_impr_gauc']:+.2f}%",
        ]
    lines += [
        "",
        "## Calibration",
        "",
        "![reliability](reliability.png)",
        "",
        "| predicted bin | rows | mean predicted | observed |",
        "|---|---|---|---|",
    ]
    for i, n in enumerate(bins["counts"]):
        if n:
            lo, hi = bins["edges"][i], bins["edges"][i + 1]
            lines.append(f"| {lo:.1f}–{hi:.1f} | {n:,} | {bins['predicted'][i]:.3f} | {bins['observed'][i]:.3f} |")
    return "\n".join(lines) + "\n"
