"""``CTRModule``: the LightningModule every CTR model extends.

A model subclass takes ``features`` (the dataset info that ``CTRDataModule`` provides; LightningCLI
links it) and passes its other keyword arguments on (``**kwargs``): the ``embedding`` and ``text``
blocks, ``mba_lambda``, the optimizer and the ``resources``. It builds its embedding layer with
``self.embedding_layer(jagged=...)`` and implements ``head(embedded, dense) -> logits [B]``; the
forward is the layer followed by the head. This class owns the rest: binary cross-entropy plus the
layer's regularization (mini-batch aware L2, OptEmbed's threshold term), optimizer groups, exact
epoch-level AUC/GAUC/logloss on val and test, and predictions.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info

from recsys.data.batch import Batch
from recsys.data.vocab import DatasetInfo
from recsys.embedding.layer import Embedded, EmbeddingLayer
from recsys.eval.metrics import ctr_metrics

# epoch metrics come from every rank's predictions gathered (exact, equal on all ranks), and the
# training rate is rank 0's own (recsys.train.callbacks.Throughput): neither wants syncing
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('((val|test)/|train/samples_per_s')")


class NonFiniteError(RuntimeError):
    """Training met a NaN/inf loss or gradient (``nonfinite_policy = "stop"``)."""


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


class CTRModule(L.LightningModule):
    """Base of all models (see the module docstring).

    Args:
        features: dataset info (linked from the data module by the CLI).
        embedding: the table kinds and sizes (``recsys.embedding.spec``); default one plain table per
            feature, 16 wide.
        text: text columns as features (``recsys.text.features.TextSpec``); default none.
        mba_lambda: mini-batch aware L2 on the embedding rows a training batch reads (0: off).
        optimizer: optimizer factory over the parameter groups.
        resources: what the layer builds from beyond these arguments (train counts, texts, an
            OptEmbed search result; ``recsys.data.resources``); not a hyperparameter.
    """

    def __init__(
        self,
        features: DatasetInfo | dict,
        embedding: dict | None = None,
        text: dict | None = None,
        mba_lambda: float = 0.0,
        optimizer: OptimizerCallable = default_optimizer,
        resources: Any = None,
    ) -> None:
        super().__init__()
        # collects the subclass's __init__ arguments too; they are the model's config
        self.save_hyperparameters(ignore=["optimizer", "resources"])
        self.info = DatasetInfo.from_any(features)
        self.schema = self.info.parsed_schema
        self.optimizer_factory = optimizer
        self.resources = resources
        self._outputs: dict[str, list[dict[str, np.ndarray]]] = {}
        self._shares: dict[str, int] = {}  # stage → ranks its evaluation batches were split among
        self._warned_undefined: set[str] = set()
        self._told_shares: set[str] = set()

    def embedding_layer(self, features: list[str] | None = None, jagged: list[str] | tuple = ()) -> EmbeddingLayer:
        """The model's embedding layer over ``features`` (default all id features), keeping ``jagged``
        ones row by row. What it resolved from the resources (searched OptEmbed widths, the text
        encoder's width) goes back into the hyperparameters, so a checkpoint rebuilds it alone."""
        hp = self.hparams
        layer = EmbeddingLayer(
            self.info,
            hp.get("embedding"),
            hp.get("text"),
            features,
            jagged,
            float(hp.get("mba_lambda", 0.0)),
            self.resources,
        )
        hp["embedding"] = layer.spec.to_dict()
        if layer.text_spec is not None:
            hp["text"] = layer.text_spec.to_dict()
        return layer

    def training_only_state(self) -> tuple[str, ...]:
        """State-dict key prefixes only training reads (mini-batch aware L2's counts): left out of exports."""
        layer = getattr(self, "embedding", None)
        own = layer.training_only_state() if isinstance(layer, EmbeddingLayer) else ("inverse_counts.",)
        return tuple(f"embedding.{prefix}" for prefix in own)

    # -- to implement ----------------------------------------------------------------------
    def head(self, embedded: Embedded, dense: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Click logits ``[B]`` from the layer's output and the numeric features ``[B, n_dense]``."""
        raise NotImplementedError

    def forward(self, batch: Batch) -> torch.Tensor:
        """Click logits ``[B]``."""
        return self.head(self.embedding(batch), batch.dense)

    def training_loss(self, batch: Batch) -> torch.Tensor | None:
        """The data term of the training loss (None: nothing to learn from this batch)."""
        return F.binary_cross_entropy_with_logits(self(batch), batch.labels)

    # -- training --------------------------------------------------------------------------
    def optimizer_groups(self) -> list[dict[str, Any]]:
        """Parameter groups of the optimizer: the layer's own groups (OptEmbed thresholds), then the rest."""
        own = self.embedding.parameter_groups() if isinstance(getattr(self, "embedding", None), EmbeddingLayer) else []
        taken = {id(p) for group in own for p in group["params"]}
        # tables sharded by the torchrec strategy carry their own fused optimizer
        rest = [p for p in self.parameters() if not hasattr(p, "_in_backward_optimizers") and id(p) not in taken]
        return [{"params": rest}, *own]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.optimizer_groups())

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        loss = self.training_loss(batch)
        if loss is None:
            return None
        reg = self.embedding.regularization()
        total = loss + reg
        if not self._all_finite([total], "loss", batch, batch_idx):
            return None  # skipped: no backward, no optimizer step, tables untouched
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        if isinstance(reg, torch.Tensor):
            self.log("train/reg", reg, batch_size=len(batch))
        return total

    def on_fit_start(self) -> None:
        layer = getattr(self, "embedding", None)
        if isinstance(layer, EmbeddingLayer) and layer.managed and self.trainer.world_size > 1 and not layer.sharded:
            raise ValueError(  # (the CLI refuses it earlier when the config says so; "auto" devices may not)
                f"model.init_args.embedding: managed tables {sorted(layer.managed)} on "
                f"{self.trainer.world_size} processes need --trainer.strategy torchrec"
            )

    def on_train_epoch_end(self) -> None:
        for name, value in self.embedding.epoch_metrics().items():
            self.log(name, value)

    # -- non-finite guard ---------------------------------------------------------------------
    #: "stop": save a checkpoint and raise NonFiniteError; "skip": drop the batch and go on.
    #: ``recsys fit --nonfinite skip`` sets it.
    nonfinite_policy: str = "stop"

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        # forward + backward first, then look at the gradients before anything is updated. Fused
        # (sharded) tables update inside backward: the embedding layer's gradient guard already zeroed
        # their gradients if any lookup's gradient was not finite, on every rank alike
        if optimizer_closure is not None and optimizer_closure() is None:
            return  # the loss guard skipped this batch
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        layer = getattr(self, "embedding", None)
        guarded = bool(getattr(layer, "nonfinite_gradient", False))
        if guarded or not self._all_finite(grads, "gradient", getattr(self, "_current_batch", None), batch_idx):
            if guarded:  # already decided on every rank; apply the policy
                self._nonfinite("embedding gradient", getattr(self, "_current_batch", None), batch_idx)
            optimizer.zero_grad()
            return
        if isinstance(layer, EmbeddingLayer) and layer.reset_rows:
            layer.reset_optimizer_rows(optimizer)  # rows handed to new ids by a managed table
        optimizer.step()

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        self._current_batch = batch

    def _all_finite(self, tensors: list[torch.Tensor], what: str, batch: Batch | None, batch_idx: int) -> bool:
        # one fused pass: the norm of a tensor holding a NaN or inf (or overflowing) is not finite
        tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
        norms = torch._foreach_norm([t.detach().float().reshape(-1) for t in tensors]) if tensors else []
        finite = bool(torch.isfinite(torch.stack(norms)).all()) if norms else True
        bad = torch.tensor(0 if finite else 1, dtype=torch.int32, device=self.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)  # every rank decides alike
        if not bool(bad):
            return True
        self._nonfinite(what, batch, batch_idx)
        return False

    def _nonfinite(self, what: str, batch: Batch | None, batch_idx: int) -> None:
        """The policy for a non-finite step (every rank calls it alike): skip it, or save and stop."""
        trainer = self.trainer
        rows = (
            "" if batch is None or batch.positions is None else f", rows at positions {batch.positions[:4].tolist()}..."
        )
        where = (
            f"non-finite {what} at global step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}, batch {batch_idx}{rows})"
        )
        if self.nonfinite_policy == "skip":
            self._skipped_batches = getattr(self, "_skipped_batches", 0) + 1
            self.log("train/skipped_batches", float(self._skipped_batches), batch_size=1)
            warnings.warn(f"{where}: batch skipped (--nonfinite skip)", stacklevel=2)
            return
        directory = Path(
            trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else trainer.default_root_dir
        )
        path = directory / f"nonfinite-step{trainer.global_step}.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # all state; collective under the torchrec strategy
        raise NonFiniteError(
            f"{where}; the weights before this step are in {path}. Nothing was updated with it. "
            f"Rerun with --nonfinite skip to drop such batches instead"
        )

    def on_train_epoch_start(self) -> None:
        # a streaming dataset has no sampler for Lightning to re-seed; tell it the epoch
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)

    # -- evaluation ------------------------------------------------------------------------
    def _shared_step(self, batch: Batch, stage: str, logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``logits``: the batch's, when the caller computed them (from an embedding it reuses)."""
        real = len(batch) - batch.padded  # a rank's share of an evaluation batch may end in padding
        logits = (self(batch) if logits is None else logits)[:real]
        out = {
            "prob": torch.sigmoid(logits).detach().float().cpu(),
            "label": batch.labels[:real].cpu(),
            "group": batch.groups[:real].cpu(),
        }
        if batch.shares > 1:
            self._shares[stage] = batch.shares
        if stage != "predict" and real > 0:
            # kept as compact numpy copies: holding the batch's own tensors for a whole split pinned
            # ~250 bytes of freed batch memory per row (measured on a 1M-row val split), so memory
            # grew with the split instead of staying flat. The loss per row goes with them: it is
            # logged once per epoch from every rank's rows (no per-step collective a rank could miss)
            kept = {k: v.numpy().copy() for k, v in out.items()}
            row_loss = F.binary_cross_entropy_with_logits(logits, batch.labels[:real], reduction="none")
            kept["loss"] = row_loss.detach().float().cpu().numpy()
            self._outputs.setdefault(stage, []).append(kept)
        return out

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        return self._shared_step(batch, "predict")

    def _epoch_metrics(self, stage: str) -> None:
        outputs, shares = self._outputs.pop(stage, []), self._shares.pop(stage, 1)
        if not outputs and shares == 1:
            return
        empty = {k: np.empty(0, np.int64 if k == "group" else np.float32) for k in ("prob", "label", "group", "loss")}
        # a rank whose shares were padding only still joins the gather (the others wait for it)
        cat = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]} if outputs else empty
        if shares > 1:  # each rank scored its share of every batch: gather them all, for exact metrics
            parts: list[Any] = [None] * shares
            torch.distributed.all_gather_object(parts, cat)
            cat = {k: np.concatenate([p[k] for p in parts]) for k in cat}
            if stage not in self._told_shares and not self.trainer.sanity_checking:  # once: how it was split
                self._told_shares.add(stage)
                counts = " + ".join(f"{len(p['prob']):,}" for p in parts)
                rank_zero_info(f"[recsys] {stage}: {len(cat['prob']):,} rows scored by {shares} ranks ({counts})")
        metrics = ctr_metrics(cat["label"], cat["prob"], cat["group"])
        undefined = sorted(name for name, value in metrics.items() if not np.isfinite(value))
        if undefined and stage not in self._warned_undefined:
            self._warned_undefined.add(stage)
            classes = sorted(set(np.unique(cat["label"]).tolist()))
            warnings.warn(
                f"the {stage} split has label(s) {classes} only: {', '.join(undefined)} undefined, logged as "
                f"NaN (a checkpoint monitoring it is never the best)",
                stacklevel=2,
            )
        for name, value in metrics.items():  # NaN stays NaN: a 0.0 would read as a (terrible) real AUC
            self.log(f"{stage}/{name}", float(value), prog_bar=name != "logloss")
        self.log(f"{stage}/loss", float(cat["loss"].mean()) if len(cat["loss"]) else float("nan"))

    def _share_running_statistics(self) -> None:
        """Before ranks score shares of a split: rank 0's batch-norm running statistics (Dice's too) on
        every rank. Each rank trained on its own rows, so without this the shares would be scored by
        slightly different models, none of them the one rank 0 checkpoints."""
        if self._trainer is None or self.trainer.world_size == 1 or not torch.distributed.is_initialized():
            return
        for module in self.modules():
            if isinstance(module, torch.nn.modules.batchnorm._NormBase) and module.track_running_stats:
                for buffer in (module.running_mean, module.running_var, module.num_batches_tracked):
                    if buffer is not None:
                        torch.distributed.broadcast(buffer, src=0)

    def on_validation_epoch_start(self) -> None:
        self._share_running_statistics()

    def on_test_epoch_start(self) -> None:
        self._share_running_statistics()

    def on_validation_epoch_end(self) -> None:
        self._epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_metrics("test")

    # -- checkpoints -----------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # `recsys test|predict|fit --ckpt_path`: this model was built from today's data; its weights
        # were trained on the checkpoint's. Refuse when their content differs (naming what)
        trained = (checkpoint.get("hyper_parameters") or {}).get("features")
        if trained is not None:
            from recsys.data.vocab import check_same_content

            check_same_content(trained, self.info, self.info.path)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cls = type(self)
        checkpoint["recsys"] = {"model_class": f"{cls.__module__}.{cls.__qualname__}", "features": self.info.to_dict()}
