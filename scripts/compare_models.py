"""Trains configs over several seeds on one dataset, scores the test split, writes a comparison table.

    python scripts/compare_models.py --configs configs/movielens/base.yaml --seeds 1 2 3
    python scripts/compare_models.py --configs configs/movielens/{base,din,dlrm}.yaml \
        --kinds plain hashed unified optembed --section model_kinds          # every model × table kind

Model selection uses val only (best val AUC checkpoint); test is read once per run. The table
(AUC, GAUC, logloss as mean ± std over seeds; RelaImpr and a paired bootstrap p-value on GAUC
against the first config) goes to docs/benchmarks.md and runs/compare/results.json. With
``--kinds``, every config runs with every table kind (``configs/embedding/<kind>.yaml``; ``optembed``
is the whole ``recsys optembed run`` pipeline, its compact model scored) and the table gives test
AUC / GAUC, embedding parameters and the training samples/s the run logged.

A finished run (same config files, seed and extra options: ``result.json`` under ``--out``) is
reused, so the configs can be split over several invocations (e.g. one per core) and one last
invocation over all of them writes the table. ``--speed-from`` takes samples/s from a quiet pass:

    python scripts/compare_models.py --configs configs/movielens/{base,din}.yaml --seeds 1 \
        --out runs/compare_speed --doc /tmp/speed.md -- --trainer.max_epochs 2
    python scripts/compare_models.py --configs configs/movielens/{base,din}.yaml \
        --speed-from runs/compare_speed/results.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from benchdoc import machine, write_doc_section

from recsys.eval.metrics import paired_bootstrap_pvalue, rela_impr
from recsys.eval.report import evaluate
from recsys.train.cli import run

KIND_OVERLAYS = {
    "plain": [],
    "hashed": ["configs/embedding/hashed.yaml"],
    "unified": ["configs/embedding/unified.yaml"],
    "optembed": ["configs/embedding/optembed_supernet.yaml"],
}


def logged_rate(run_dir: Path) -> float:
    """Mean of the ``train/samples_per_s`` the run logged (one per epoch)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    values = (
        [e.value for e in events.Scalars("train/samples_per_s")]
        if "train/samples_per_s" in events.Tags()["scalars"]
        else []
    )
    return float(np.mean(values)) if values else float("nan")


def parameter_counts(ckpt: str | Path) -> tuple[int, int]:
    """(embedding-table parameters, all other parameters) of the model in ``ckpt``."""
    from recsys.train.checkpoint import load_model
    from recsys.train.strategy import table_parameters

    model = load_model(ckpt)
    tables = sum(p.numel() for p in table_parameters(model))
    return tables, sum(p.numel() for p in model.parameters()) - tables


def run_fingerprint(configs: list[str], seed: int, extra: list[str]) -> str:
    """Hash of the config files' text, the seed and the extra options: a finished run is reused only if equal."""
    digest = hashlib.sha256(json.dumps([seed, extra]).encode())
    for config in configs:
        digest.update(Path(config).read_bytes())
    return digest.hexdigest()[:16]


def train_and_score(config: str, seed: int, out: Path, extra: list[str], kind: str | None = None) -> dict:
    """Trains ``config`` (with the ``kind`` overlay) at ``seed``, scores its best-val checkpoint on test.

    A finished run with the same fingerprint under ``out`` is reused (so configs can be split over
    several invocations and rendered by one); any other leftover is deleted first.
    """
    name = Path(config).stem + (f"/{kind}" if kind else "")
    run_dir = out / name / f"seed{seed}"
    fingerprint = run_fingerprint([config, *KIND_OVERLAYS[kind or "plain"]], seed, extra)
    done = run_dir / "result.json"
    if done.exists() and json.loads(done.read_text()).get("fingerprint") == fingerprint:
        result = json.loads(done.read_text())
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # a stale best.ckpt must not be scored
        ckpt = train(config, seed, out, name, extra, kind)
        report = evaluate(ckpt, split="test", bootstrap=0)
        embedding, dense = parameter_counts(ckpt)
        result = {
            "seed": seed,
            **{k: report[k] for k in ("auc", "gauc", "logloss", "rows", "data", "out")},
            "samples_per_s": logged_rate(Path(ckpt).parent.parent),
            "embedding_params": embedding,
            "dense_params": dense,
            "fingerprint": fingerprint,
        }
        run_dir.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(result, indent=2))
    predictions = pq.read_table(Path(result["out"]) / "predictions.parquet").to_pandas()
    return {
        **result,
        "prob": predictions["prob"].to_numpy(),
        "label": predictions["label"].to_numpy(),
        "group": predictions["group"].to_numpy(),
    }


def train(config: str, seed: int, out: Path, name: str, extra: list[str], kind: str | None) -> str:
    """Path of the best-val-AUC checkpoint of one training run (the OptEmbed pipeline's compact model)."""
    if kind == "optembed":
        from recsys.train.optembed import search_arguments
        from recsys.train.optembed_run import pipeline

        search = search_arguments(seed)
        return pipeline(
            [config, *KIND_OVERLAYS[kind]], out / name / f"seed{seed}", search, ["--seed_everything", str(seed), *extra]
        )["checkpoint"]
    overlays = [a for o in KIND_OVERLAYS[kind or "plain"] for a in ("--config", o)]
    cli = run(
        [
            "fit",
            "--config",
            config,
            *overlays,
            "--seed_everything",
            str(seed),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger.init_args.save_dir",
            str(out),
            "--trainer.logger.init_args.name",
            name,
            "--trainer.logger.init_args.version",
            f"seed{seed}",
            *extra,
        ]
    )
    return cli.trainer.checkpoint_callback.best_model_path


def kinds_table(args: argparse.Namespace, extra: list[str], started: float) -> str:
    if args.render:  # the table again from an earlier invocation's results (e.g. with a quiet speed pass)
        summary = json.loads((args.out / "kinds.json").read_text())
        data = summary.pop("_data", "ml100k-ctr")
    else:
        results = {
            (c, k): [train_and_score(c, s, args.out, extra, k) for s in args.seeds]
            for c in args.configs
            for k in args.kinds
        }
        summary = {}
        for (config, kind), runs in results.items():
            stats = {
                k: (float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs])))
                for k in ("auc", "gauc", "logloss", "samples_per_s", "embedding_params")
            }
            summary[f"{config} × {kind}"] = {
                "per_seed": [
                    {k: r[k] for k in ("seed", "auc", "gauc", "logloss", "samples_per_s", "embedding_params")}
                    for r in runs
                ],
                **stats,
            }
        data = Path(next(iter(results.values()))[0]["data"]).name
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kinds.json").write_text(json.dumps(summary | {"_data": data}, indent=2))
    speed = json.loads(Path(args.speed_from).read_text()) if args.speed_from else {}
    rows = []
    for cell, stats in summary.items():
        config, kind = cell.split(" × ")
        rate = speed[cell]["samples_per_s"][0] if cell in speed else stats["samples_per_s"][0]
        rows.append(
            f"| `{Path(config).stem}` | {kind} | {stats['auc'][0]:.4f} ± {stats['auc'][1]:.4f} | "
            f"{stats['gauc'][0]:.4f} ± {stats['gauc'][1]:.4f} | {stats['embedding_params'][0]:,.0f} | "
            f"{rate:,.0f} |"
        )
    seeds = " ".join(map(str, args.seeds))
    timing = (
        f"Samples/s: a separate quiet pass (`{args.speed_from}`: seed 1, the same configs, training epochs' mean "
        f"as logged, data loading included)."
        if args.speed_from
        else "Samples/s: the training epochs' mean as each run logged it (data loading included)."
    )
    return "\n".join(
        [
            f"## Every model × table kind on `{data}` (`scripts/compare_models.py --kinds`)",
            "",
            "Command: `python scripts/compare_models.py --configs "
            f"{' '.join(args.configs)} --kinds {' '.join(args.kinds)} "
            f"--seeds {seeds} --section {args.section}" + (f" -- {' '.join(extra)}" if extra else "") + "`  ",
            f"Machine: {machine()}, {args.threads} torch threads; "
            f"seeds {seeds}; best-val-AUC checkpoint of each run, test "
            f"read once per run; {time.strftime('%Y-%m-%d')}. Kinds are the overlays "
            "in `configs/embedding/` (hashed and unified at 40% of the full tables' parameters; `optembed` = `recsys "
            "optembed run`: supernet, widths search on val at budget "
            "0.5, compact retrain — its parameters and samples/s "
            f"are the compact model's). {timing}",
            "",
            "| model | kind | test AUC | test GAUC | embedding parameters | training samples/s |",
            "|---|---|---|---|---:|---:|",
            *rows,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["configs/movielens/base.yaml"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--doc", default="docs/benchmarks.md")
    parser.add_argument("--section", default="compare_models", help="block of the doc to (re)write")
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=list(KIND_OVERLAYS),
        help="run every config with each table kind (a model × kind table)",
    )
    parser.add_argument("--render", action="store_true", help="--kinds: rewrite the table from --out/kinds.json")
    parser.add_argument(
        "--speed-from", help="--kinds: take samples/s from another invocation's kinds.json (a quiet pass)"
    )
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="more LightningCLI options after --")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    extra = [a for a in args.extra if a != "--"]
    started = time.time()
    if args.kinds:
        md = kinds_table(args, extra, started)
        write_doc_section(Path(args.doc), args.section, md)
        print(md)
        return
    results = {c: [train_and_score(c, s, args.out, extra) for s in args.seeds] for c in args.configs}

    base = args.configs[0]
    base_auc = np.mean([r["auc"] for r in results[base]])
    base_gauc = np.mean([r["gauc"] for r in results[base]])
    speed = json.loads(Path(args.speed_from).read_text()) if args.speed_from else {}
    grouped = len(np.unique(results[base][0]["group"])) > 1  # GAUC needs the schema's group column
    rows, summary = [], {}
    for config, runs in results.items():
        stats = {
            k: (float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs])))
            for k in ("auc", "gauc", "logloss", "samples_per_s")
        }
        rate = speed[config]["samples_per_s"][0] if config in speed else stats["samples_per_s"][0]
        cells = [
            f"`{Path(config).stem}`",
            *(
                f"{stats[k][0]:.4f} ± {stats[k][1]:.4f}" if k != "gauc" or grouped else "—"
                for k in ("auc", "gauc", "logloss")
            ),
        ]
        if config == base:
            cells += ["—", "—"]
        elif grouped:
            seed_mean = [np.mean([r["prob"] for r in rs], axis=0) for rs in (runs, results[base])]  # per row
            p = paired_bootstrap_pvalue(runs[0]["label"], *seed_mean, runs[0]["group"], num_samples=2000)
            cells += [
                f"{rela_impr(stats['auc'][0], base_auc):+.2f}% / {rela_impr(stats['gauc'][0], base_gauc):+.2f}%",
                f"{p:.4f}",
            ]
            stats["gauc_p_value_vs_base"] = p
        else:
            cells += [f"{rela_impr(stats['auc'][0], base_auc):+.2f}% / —", "—"]
        cells += [f"{runs[0]['embedding_params']:,}", f"{runs[0]['dense_params']:,}", f"{rate:,.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
        summary[config] = {
            "per_seed": [{k: r[k] for k in ("seed", "auc", "gauc", "logloss", "samples_per_s")} for r in runs],
            "embedding_params": runs[0]["embedding_params"],
            "dense_params": runs[0]["dense_params"],
            **stats,
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(summary | {"_threads": args.threads}, indent=2))
    seeds = " ".join(map(str, args.seeds))
    timing = (
        f"samples/s from a separate quiet pass (`{args.speed_from}`: seed 1, one run at a time, "
        f"{speed.get('_threads', '?')} torch threads)"
        if args.speed_from
        else "samples/s as each run logged it"
    )
    md = "\n".join(
        [
            f"## Test metrics on `{Path(results[base][0]['data']).name}` (`scripts/compare_models.py`)",
            "",
            "Command: `python scripts/compare_models.py --configs "
            f"{' '.join(args.configs)} --seeds {seeds} --section {args.section}"
            + (f" -- {' '.join(extra)}" if extra else "")
            + "`  ",
            f"Machine: {machine()}, {args.threads} torch threads; seeds {seeds}; "
            f"{results[base][0]['rows']:,} test rows; best-val-AUC checkpoint of each run, test read once per run; "
            f"{time.strftime('%Y-%m-%d')}. Metrics: mean ± std over "
            "seeds; RelaImpr against the first config; p: paired "
            "bootstrap over users (2,000 resamples) of GAUC on the per-row mean of the seeds' predictions, one-sided "
            "(row better than the first "
            f"config){'' if grouped else ' — this dataset has no group column, so no GAUC'}; "
            f"{timing} (training epochs' mean, data loading included).",
            "",
            "| config | test AUC | test GAUC | test logloss | RelaImpr AUC / GAUC vs first | p (GAUC > first) "
            "| embedding params | dense params | training samples/s |",
            "|---|---|---|---|---|---|---:|---:|---:|",
            *rows,
        ]
    )
    write_doc_section(Path(args.doc), args.section, md)
    print(md)


if __name__ == "__main__":
    main()
