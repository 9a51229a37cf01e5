"""``recsys fit|validate|test|predict``: LightningCLI over any recsys model and dataset directory.

recsys fit --config configs/movielens/base.yaml --trainer.max_epochs 3 --seed_everything 7
recsys fit --config configs/movielens/base.yaml --data.path OTHER_DATASET_DIR
recsys test --config configs/movielens/base.yaml --ckpt_path runs/.../best.ckpt
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from recsys.data.datamodule import CTRDataModule
from recsys.embedding.spec import EmbeddingConfigError, legacy_keys_message
from recsys.embedding.tables import tables_on
from recsys.library_notes import silence_library_notes
from recsys.text.features import TextConfigError
from recsys.train.callbacks import PredictionWriter, RunSummary, Throughput
from recsys.train.module import CTRModule
from recsys.train.ranks import is_first_process
from recsys.train.runs import RunError, RunLock, check_run, resume_from, run_version
from recsys.train.strategy import TorchrecStrategy  # noqa: F401  (registers --trainer.strategy torchrec)

silence_library_notes()  # here too: scripts run fits in-process, without the `recsys` command


class RecsysCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # the model's tables and inputs come from the dataset (schema + vocabulary sizes)
        parser.link_arguments("data.dataset_info", "model.init_args.features", apply_on="instantiate")
        parser.link_arguments("data.resources", "model.init_args.resources", apply_on="instantiate")
        parser.add_argument(
            "--nonfinite",
            choices=["stop", "skip"],
            default="stop",
            help="a NaN/inf loss or gradient: stop (save a checkpoint, then fail naming the step and "
            "batch) or skip the batch",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        raw = args if args is not None else sys.argv[1:]
        message = legacy_keys_message(_model_keys(raw))
        if message:
            parser.error(message)
        configs = (
            [raw[i + 1] for i, a in enumerate(raw) if a in ("--config", "-c") and i + 1 < len(raw)]
            if isinstance(raw, list)
            else []
        )
        self._run_name = Path(configs[0]).stem if configs else "run"
        super().parse_arguments(parser, args)

    def _set_seed(self) -> None:
        self._random_seed = self._get(self.config, "seed_everything") is True  # Lightning draws one
        super()._set_seed()

    def before_instantiate_classes(self) -> None:
        # a resumable run (ckpt_path: last) lives in a directory named by its config: another config is
        # another run, never a silent resumption of this one (recsys.train.runs)
        self._resumable = None
        if self.subcommand != "fit" or self.config.fit.get("ckpt_path") != "last":
            return
        if getattr(self, "_random_seed", False):
            self.parser.error(
                "a resumable run (ckpt_path: last) needs a fixed seed: set seed_everything to a number "
                "(a restart must replay the same shuffle, and the run directory is named by its config)"
            )
        resolved = yaml.safe_load(self.parser.dump(self.config, skip_check=True, skip_none=False)).get("fit", {})
        logger = self.config.fit.trainer.get("logger")
        init_args = logger.get("init_args") if hasattr(logger, "get") else None
        if init_args is None:
            self.parser.error(
                "a resumable run (ckpt_path: last) needs a logger with a run directory "
                "(trainer.logger: TensorBoardLogger), where its checkpoints are found again"
            )
        if init_args.get("version") is None:
            init_args.version = run_version(resolved, self._run_name)
        self._resumable = resolved

    def before_fit(self) -> None:
        self.model.nonfinite_policy = self.config[self.subcommand]["nonfinite"]
        if getattr(self, "_resumable", None) is not None and is_first_process():
            run_dir = Path(self.trainer.log_dir)
            try:
                check_run(run_dir, self._resumable)
                self._lock = RunLock(run_dir)
            except RunError as err:
                self.parser.error(str(err))
        if getattr(self, "_resumable", None) is not None:
            callback = self.trainer.checkpoint_callback
            directory = (
                Path(callback.dirpath)
                if callback is not None and callback.dirpath
                else Path(self.trainer.log_dir) / "checkpoints"
            )
            try:
                self.config_init["fit"]["ckpt_path"] = resume_from(directory)
            except RunError as err:
                self.parser.error(str(err))

    def after_fit(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:  # (a process that dies releases it too)
            lock.release()

    def instantiate_classes(self) -> None:
        # TorchrecStrategy(init_tables_on_meta=true): the model's tables are built on the meta device
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        strategy = config.get("trainer", {}).get("strategy")
        init_args = strategy.get("init_args", {}) if hasattr(strategy, "get") else {}
        if _many_processes(config) and not _names_torchrec(strategy) and _uses_managed(config):
            self.parser.error(
                "model.init_args.embedding: kind 'managed' on several processes needs --trainer.strategy "
                "torchrec (its tables sharded, every rank admitting and evicting the same ids); under plain "
                "data parallelism each rank would keep its own slots"
            )
        try:
            with tables_on("meta") if init_args.get("init_tables_on_meta") else nullcontext():
                super().instantiate_classes()
        except Exception as err:  # a bad embedding or text block: one message, no traceback
            cause = _config_error(err)
            if cause is None:
                raise
            self.parser.error(str(cause))


def _names_torchrec(strategy: Any) -> bool:
    """``--trainer.strategy torchrec`` or a class_path naming recsys' TorchrecStrategy."""
    name = strategy.get("class_path", "") if hasattr(strategy, "get") else strategy
    return isinstance(name, str) and (name == "torchrec" or name.endswith("TorchrecStrategy"))


def _many_processes(config: Any) -> bool:
    """Whether the trainer block asks for more than one process (devices or nodes above 1, or all devices)."""
    trainer = config.get("trainer") if hasattr(config, "get") else None
    if not hasattr(trainer, "get"):
        return False
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    if isinstance(devices, list | tuple):
        return len(devices) > 1
    count = str(devices).strip()
    return count == "-1" or (count.isdigit() and int(count) > 1) or (str(nodes).isdigit() and int(str(nodes)) > 1)


def _uses_managed(config: Any) -> bool:
    """Whether the model's embedding block gives any feature the ``managed`` kind."""
    model = config.get("model") if hasattr(config, "get") else None
    init_args = model.get("init_args") if hasattr(model, "get") else None
    block = init_args.get("embedding") if hasattr(init_args, "get") else None
    if not hasattr(block, "get"):
        return False
    entries = block.get("features") or {}
    kinds = [block.get("kind")] + [e.get("kind") for e in entries.values() if hasattr(e, "get")]
    return "managed" in kinds


def _config_error(err: BaseException | None) -> BaseException | None:
    """The embedding/text block error behind ``err`` (jsonargparse wraps what a constructor raises)."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, EmbeddingConfigError | TextConfigError):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def _model_keys(args: list[str] | dict) -> list[str]:
    """The ``model.init_args`` keys that ``--config`` files and ``--model.init_args.KEY`` options set."""
    if isinstance(args, dict):
        return list((args.get("model") or {}).get("init_args") or {})
    keys: list[str] = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args) and Path(args[i + 1]).is_file():
            try:
                config = yaml.safe_load(Path(args[i + 1]).read_text()) or {}
            except yaml.YAMLError:
                continue  # LightningCLI reports it
            for section in (config, *(v for v in config.values() if isinstance(v, dict) and "model" in v)):
                model = section.get("model") if isinstance(section, dict) else None
                if isinstance(model, dict):
                    keys += list(model.get("init_args") or {})
        for prefix in ("--model.init_args.", "--model."):
            if arg.startswith(prefix):
                keys.append(arg[len(prefix) :].split("=", 1)[0].split(".", 1)[0])
    return keys


class SaveConfigWithLogs(SaveConfigCallback):
    """Saves the resolved ``config.yaml`` next to the run's logs, and nowhere when the run has no logger
    (Lightning would write it into the working directory, e.g. a repository root)."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if trainer.logger is not None:
            super().setup(trainer, pl_module, stage)


def run(args: list[str] | None = None, subcommand: bool = True) -> RecsysCLI:
    """Runs ``args`` (``[subcommand, options...]``); with ``subcommand=False`` it only builds
    the model, data module and trainer from ``args`` (options only) and returns the CLI."""
    return RecsysCLI(
        CTRModule,
        CTRDataModule,
        subclass_mode_model=True,
        trainer_defaults={"callbacks": [PredictionWriter(), RunSummary(), Throughput()]},
        save_config_callback=SaveConfigWithLogs,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
        run=subcommand,
    )


class _ParseOnly(RecsysCLI):
    def after_fit(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:  # (a process that dies releases it too)
            lock.release()

    def instantiate_classes(self) -> None:
        pass  # the resolved config is all that is wanted


def resolved_config(args: list[str]) -> dict:
    """The config ``recsys fit ARGS`` would run (every ``--config`` and option applied), as a plain
    dict without the logger (run directories) and ``ckpt_path``: what a run's identity depends on."""
    cli = _ParseOnly(
        CTRModule,
        CTRDataModule,
        subclass_mode_model=True,
        args=args,
        run=False,
        auto_configure_optimizers=False,
        save_config_callback=None,
    )
    config = yaml.safe_load(cli.parser.dump(cli.config, skip_check=True, skip_none=False))
    config.get("trainer", {}).pop("logger", None)
    config.pop("ckpt_path", None)
    return config
