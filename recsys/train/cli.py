"""``recsys fit|validate|test|predict``: LightningCLI over any recsys model and dataset directory.

    recsys fit --config configs/movielens/base.yaml --trainer.max_epochs 3 --seed_everything 7
    recsys fit --config configs/movielens/base.yaml --data.path OTHER_DATASET_DIR
    recsys test --config configs/movielens/base.yaml --ckpt_path runs/.../best.ckpt
"""

from __future__ import annotations

from contextlib import nullcontext

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from recsys.data.datamodule import CTRDataModule
from recsys.embedding.tables import tables_on
from recsys.train.callbacks import PredictionWriter, RunSummary, Throughput
from recsys.train.module import CTRModule
from recsys.train.strategy import TorchrecStrategy  # noqa: F401  (registers --trainer.strategy torchrec)


class RecsysCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # the model's tables and inputs come from the dataset (schema + vocabulary sizes)
        parser.link_arguments("data.dataset_info", "model.init_args.features", apply_on="instantiate")
        parser.add_argument("--nonfinite", choices=["stop", "skip"], default="stop",
                            help="a NaN/inf loss or gradient: stop (save a checkpoint, then fail naming the step and "
                                 "batch) or skip the batch")

    def before_fit(self) -> None:
        self.model.nonfinite_policy = self.config[self.subcommand]["nonfinite"]

    def instantiate_classes(self) -> None:
        # TorchrecStrategy(init_tables_on_meta=true): the model's tables are built on the meta device
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        strategy = config.get("trainer", {}).get("strategy")
        init_args = strategy.get("init_args", {}) if hasattr(strategy, "get") else {}
        with tables_on("meta") if init_args.get("init_tables_on_meta") else nullcontext():
            super().instantiate_classes()


def run(args: list[str] | None = None, subcommand: bool = True) -> RecsysCLI:
    """Runs ``args`` (``[subcommand, options...]``); with ``subcommand=False`` it only builds
    the model, data module and trainer from ``args`` (options only) and returns the CLI."""
    return RecsysCLI(
        CTRModule,
        CTRDataModule,
        subclass_mode_model=True,
        trainer_defaults={"callbacks": [PredictionWriter(), RunSummary(), Throughput()]},
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
        run=subcommand,
    )
