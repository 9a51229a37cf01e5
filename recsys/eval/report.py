"""Offline CTR evaluation of a checkpoint: ``recsys eval`` and ``scripts/evaluate.py``.

    recsys eval --ckpt runs/movielens/base/version_0/checkpoints/best.ckpt
    recsys eval --ckpt DIN.ckpt --baseline runs/.../eval_test/report.json --out reports/din

Writes ``report.json`` (``auc``, ``gauc``, ``logloss``, ``rows`` and more), ``report.md``,
``reliability.png`` and ``predictions.parquet`` into ``--out`` (default: ``eval_<split>``
beside the checkpoint's run directory).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from recsys.data.arrow import SPLITS, DataError
from recsys.data.parquet import ParquetStream
from recsys.data.schema import SchemaError
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
    out_dir = Path(out) if out else ckpt.resolve().parent.parent / f"eval_{split}"
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
    _reliability_plot(bins, out_dir / "reliability.png", title=f"{report['model_class'].rsplit('.', 1)[-1]} on {data_dir.name}/{split}")
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
    lines += ["", "## Calibration", "", "![reliability](reliability.png)", "",
              "| predicted bin | rows | mean predicted | observed |", "|---|---|---|---|"]
    for i, n in enumerate(bins["counts"]):
        if n:
            lo, hi = bins["edges"][i], bins["edges"][i + 1]
            lines.append(f"| {lo:.1f}–{hi:.1f} | {n:,} | {bins['predicted'][i]:.3f} | {bins['observed'][i]:.3f} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys eval",
        description="Offline CTR evaluation of a checkpoint: AUC, GAUC, logloss, RelaImpr against a "
        "baseline report, 95%% bootstrap intervals and a reliability plot.",
    )
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint written by `recsys fit`")
    parser.add_argument("--data", help="dataset directory (default: the one the model was trained on)")
    parser.add_argument("--split", default="test", choices=SPLITS, help="split to score (default: test)")
    parser.add_argument("--out", help="output directory (default: <run dir>/eval_<split>)")
    parser.add_argument("--baseline", help="another report.json; adds RelaImpr against it")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs (0: none)")
    parser.add_argument("--batch-size", type=int, default=8192, help="rows per scoring batch")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = evaluate(args.ckpt, args.data, args.split, args.out, args.baseline, args.bootstrap, args.batch_size, args.seed)
    except (FileNotFoundError, DataError, SchemaError, ValueError) as err:
        print(f"recsys eval: error: {err}", file=sys.stderr)
        return 2
    ci = report["ci95"]
    summary = "  ".join(
        (f"{k}={report[k]:.4f}" if math.isfinite(report[k]) else f"{k}=undefined")
        + (f" [{ci[k][0]:.4f}, {ci[k][1]:.4f}]" if k in ci and all(map(math.isfinite, ci[k])) else "")
        for k in ("auc", "gauc", "logloss")
    )
    print(f"[recsys eval] {report['split']} ({report['rows']:,} rows): {summary}")
    if not math.isfinite(report["auc"]):
        print(f"[recsys eval] AUC is undefined: the {report['split']} split has one class only "
              f"(positive rate {report['positive_rate']:.3f}); report.json holds null", file=sys.stderr)
    if "rela_impr_auc" in report:
        print(f"[recsys eval] RelaImpr vs baseline: AUC {report['rela_impr_auc']:+.2f}%  GAUC {report['rela_impr_gauc']:+.2f}%")
    print(f"[recsys eval] report: {report['out']}/report.md  (report.json, reliability.png, predictions.parquet)")
    return 0 if all(math.isfinite(report[k]) for k in ("auc", "logloss")) else 1


def write_doc_section(path: str | Path, name: str, markdown: str) -> None:
    """Replaces (or appends) the ``<!-- name:start -->``…``<!-- name:end -->`` block of a doc.

    Each benchmark script owns one block of docs/benchmarks.md and rewrites only that.
    """
    path = Path(path)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
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
