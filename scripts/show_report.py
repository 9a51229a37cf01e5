"""Prints a run's test metrics and where its report, checkpoint and TensorBoard logs are."""

import json
import sys
from pathlib import Path

run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/movielens/base/make_run")
report_file = run / "eval_test" / "report.json"
if not report_file.exists():
    sys.exit(f"{report_file}: no report yet; run `make run`")
report = json.loads(report_file.read_text())
ci = report.get("ci95", {})
print(f"\n== {report['model_class']} on {report['data']} ({report['split']}, {report['rows']:,} rows) ==")
for key in ("auc", "gauc", "logloss"):
    interval = f"  95% CI [{ci[key][0]:.4f}, {ci[key][1]:.4f}]" if key in ci else ""
    print(f"  {key:8s} {report[key]:.4f}{interval}")
print(f"report:      {report_file.parent}/report.md (+ reliability.png, predictions.parquet)")
print(f"checkpoint:  {report['checkpoint']}")
print(f"TensorBoard: tensorboard --logdir {run}")
