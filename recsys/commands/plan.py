"""``recsys plan``: a dry run of the sharding planner for a config, before renting a cluster.

    recsys plan --config configs/movielens/din.yaml --world-size 8 --device cuda
    recsys plan --config configs/criteo/dlrm.yaml --world-size 2 --sharding-types pooled=column_wise

Builds the model from the config (tables sized by the dataset's vocabulary, nothing trained),
plans its tables for ``--world-size`` ranks and prints the plan and per-rank memory estimates.
"""

from __future__ import annotations

import argparse
import sys

from recsys.commands.table import example
from recsys.embedding.sharding import describe_plan, embedding_tables, plan_model

OPTIMIZER_SLOTS = {"sgd": 0.0, "adagrad": 1.0, "rowwise_adagrad": 0.0, "adam": 2.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="recsys plan",
        description=__doc__,
        epilog=example("plan"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, action="append", help="LightningCLI config(s), as for recsys fit")
    parser.add_argument("--world-size", type=int, required=True, help="number of ranks (processes / GPUs)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="what the ranks compute on")
    parser.add_argument(
        "--sharding-types",
        nargs="*",
        default=[],
        metavar="TABLE=TYPE",
        help="constraints, e.g. t_user_id=column_wise or pooled=table_wise",
    )
    parser.add_argument("--compute-kernel", default="fused")
    parser.add_argument(
        "--cache-load-factor", type=float, help="CUDA: fraction of each table kept in HBM (UVM caching)"
    )
    parser.add_argument("--sparse-optimizer", default="rowwise_adagrad", choices=sorted(OPTIMIZER_SLOTS))
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="more config options, e.g. --data.path DIR")
    args = parser.parse_args(argv)
    if args.world_size < 1:
        parser.error("--world-size must be at least 1")
    try:
        sharding = dict(item.split("=", 1) for item in args.sharding_types)
    except ValueError:
        parser.error("--sharding-types takes TABLE=TYPE pairs")

    import logging

    from recsys.train.cli import run

    for noisy in ("lightning.pytorch", "torchrec.distributed.planner"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    configs = [item for config in args.config for item in ("--config", config)]
    # only the model is needed: a trainer that fits this machine, whatever the config asks for
    local = [
        "--trainer.logger",
        "false",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.num_nodes",
        "1",
        "--trainer.strategy",
        "auto",
    ]
    cli = run([*configs, *local, *[a for a in args.overrides if a != "--"]], subcommand=False)
    model = cli.model
    try:
        plan = plan_model(model, args.world_size, args.device, sharding, args.compute_kernel, args.cache_load_factor)
    except ValueError as err:
        print(f"recsys plan: error: {err}", file=sys.stderr)
        return 2
    tables = embedding_tables(model)
    print(f"# Sharding plan: {type(model).__name__} ({len(tables)} tables) on {args.world_size} × {args.device}\n")
    print(describe_plan(plan, model, args.world_size, OPTIMIZER_SLOTS[args.sparse_optimizer]))
    return 0
