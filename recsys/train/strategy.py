"""``TorchrecStrategy``: Lightning training with torchrec ``DistributedModelParallel``.

    recsys fit --config configs/movielens/din.yaml --trainer.strategy torchrec --trainer.devices 2

What it does, in Lightning's ``setup``:

1. registers the sparse optimizer on every embedding table (``apply_optimizer_in_backward``):
   DMP turns it into FBGEMM's fused update inside the table-batched backward kernel;
2. plans the tables (``recsys.embedding.sharding``) collectively over the process group;
3. wraps the whole LightningModule in ``DistributedModelParallel`` — tables sharded, the dense
   rest data-parallel (DDP inside DMP) — and copies the initial weights into the shards, so
   any world size starts from the same model;
4. leaves the Lightning optimizer (``configure_optimizers``) with the dense parameters only.

Checkpoints are written with ``torch.distributed.checkpoint`` into a directory (one file per rank
plus ``lightning.pt`` with the rest of Lightning's checkpoint). They load back at any world size,
and ``recsys.train.module.load_model`` reads them into an unsharded model.

Every rank reads every val/test batch and scores its equal share of the rows (the DMP forward is
collective, so all ranks must run the same batches; ``CTRModule`` gathers the predictions);
training data is split between ranks with equal batch counts.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from recsys.embedding.sharding import copy_full_weights, embedding_tables, plan_model, sharders
from recsys.train.checkpoint import META_FILE, load_sharded, read_checkpoint

log = logging.getLogger(__name__)


def sparse_optimizer_class(name: str, device_type: str) -> type[torch.optim.Optimizer]:
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    classes = {
        "sgd": torch.optim.SGD,
        "adagrad": torch.optim.Adagrad,
        "rowwise_adagrad": RowWiseAdagrad,
        "adam": torch.optim.Adam,
    }
    if name not in classes:
        raise ValueError(f"sparse_optimizer must be one of {sorted(classes)}, got {name!r}")
    if name == "adam" and device_type == "cpu":
        raise ValueError(
            "sparse_optimizer 'adam' needs CUDA: FBGEMM's CPU kernels fuse sgd, adagrad and rowwise_adagrad"
        )
    return classes[name]


def table_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The weights of every torchrec embedding table in ``module``."""
    from torchrec import EmbeddingBagCollection, EmbeddingCollection

    params = []
    for sub in module.modules():
        if isinstance(sub, EmbeddingBagCollection | EmbeddingCollection):
            params += list(sub.parameters())
    return params


def is_sparse(parameter: nn.Parameter) -> bool:
    """True for table weights updated by a fused optimizer inside the backward pass."""
    return hasattr(parameter, "_in_backward_optimizers")


def _restore_extra_states(module: nn.Module, state: dict[str, Any]) -> None:
    """Hands modules their non-tensor state (``get_extra_state``: managed tables' pending ids and interval
    history) from a loaded state dict; tensors were copied in place, these are not."""
    for name, child in module.named_modules():
        key = f"{name}._extra_state" if name else "_extra_state"
        if key in state and type(child).get_extra_state is not nn.Module.get_extra_state:
            child.set_extra_state(state[key])


def shard_model(
    model: nn.Module,
    world_size: int,
    device: torch.device,
    sharding_types: dict[str, str] | None = None,
    compute_kernel: str = "fused",
    cache_load_factor: float | None = None,
    sparse_optimizer: str = "rowwise_adagrad",
    sparse_lr: float = 0.05,
    sparse_optimizer_kwargs: dict[str, Any] | None = None,
    copy_initial_weights: bool = True,
) -> DistributedModelParallel:
    """Fuses the sparse optimizer into the tables, plans them over the default process group,
    and wraps ``model`` in ``DistributedModelParallel`` (see the module docstring)."""
    if not embedding_tables(model):
        raise ValueError("the torchrec strategy needs a model with torchrec embedding tables")
    device_type = "cuda" if device.type == "cuda" else "cpu"
    on_meta = any(p.is_meta for p in table_parameters(model))
    if on_meta and copy_initial_weights:
        log.info("tables were built on the meta device: each rank initialises its own shards")
    copy = copy_initial_weights and not on_meta
    full_state = (
        {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)} if copy else {}
    )  # (a managed table's extra state is not a tensor: it stays where it is)
    optimizer = sparse_optimizer_class(sparse_optimizer, device_type)
    apply_optimizer_in_backward(
        optimizer, table_parameters(model), {"lr": sparse_lr, **(sparse_optimizer_kwargs or {})}
    )
    plan = plan_model(
        model,
        world_size,
        device_type,
        sharding_types,
        compute_kernel,
        cache_load_factor,
        process_group=dist.GroupMember.WORLD,
    )
    with warnings.catch_warnings():  # torchrec's own DDP wrapper passes an argument torch 2.13 deprecates
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders())
    if full_state:
        copy_full_weights(dmp.state_dict(), full_state)
    return dmp


class TorchrecStrategy(DDPStrategy):
    """Data-parallel dense layers + model-parallel embedding tables (torchrec DMP).

    Args:
        sharding_types: ``{table: type}`` or ``{"pooled"|"sequence": type}``; default: the planner
            chooses among the types the device supports (docs/architecture.md).
        compute_kernel: ``fused`` (FBGEMM TBE with the optimizer fused in), ``dense``; on CUDA also
            ``fused_uvm_caching`` / ``fused_uvm``.
        cache_load_factor: CUDA only: keep this fraction of each table in HBM, the rest in UVM.
        sparse_optimizer: ``rowwise_adagrad``, ``adagrad``, ``sgd``; ``adam`` on CUDA.
        sparse_lr: learning rate of the sparse optimizer.
        sparse_optimizer_kwargs: more arguments for it (``eps``, ``weight_decay``, ...).
        copy_initial_weights: start the shards from the unsharded model's weights (same start at
            any world size).
        init_tables_on_meta: build the model's tables on the ``meta`` device (no memory), so only
            each rank's shards are ever allocated; needed for tables bigger than one host. The
            shards are then initialised by torchrec, independently per plan.
    """

    strategy_name = "torchrec"

    def __init__(
        self,
        sharding_types: dict[str, str] | None = None,
        compute_kernel: str = "fused",
        cache_load_factor: float | None = None,
        sparse_optimizer: str = "rowwise_adagrad",
        sparse_lr: float = 0.05,
        sparse_optimizer_kwargs: dict[str, Any] | None = None,
        copy_initial_weights: bool = True,
        init_tables_on_meta: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.sharding_types = sharding_types
        self.compute_kernel = compute_kernel
        self.cache_load_factor = cache_load_factor
        self.sparse_optimizer = sparse_optimizer
        self.sparse_lr = sparse_lr
        self.sparse_optimizer_kwargs = dict(sparse_optimizer_kwargs or {})
        self.copy_initial_weights = copy_initial_weights
        self.init_tables_on_meta = init_tables_on_meta
        self.plan = None

    @property
    def device_type(self) -> str:
        return "cuda" if self.root_device.type == "cuda" else "cpu"

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the sharded model must exist before a sharded checkpoint can load into it

    def model_to_device(self) -> None:
        pass  # DMP places the shards; it moves the dense part itself

    def setup(self, trainer: Any) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model = self._setup_model(self.model)
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def _setup_model(self, model: nn.Module) -> DistributedModelParallel:
        dmp = shard_model(
            model,
            self.world_size,
            self.root_device,
            self.sharding_types,
            self.compute_kernel,
            self.cache_load_factor,
            self.sparse_optimizer,
            self.sparse_lr,
            self.sparse_optimizer_kwargs,
            self.copy_initial_weights,
        )
        self.plan = dmp.plan
        return dmp

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        # written whole into a temporary directory, then swapped in: a run killed while saving
        # leaves the previous checkpoint intact
        path = Path(filepath)
        staging, old = path.parent / f".{path.name}.tmp", path.parent / f".{path.name}.old"
        if self.is_global_zero:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier("recsys-ckpt-prepare")
        state = {
            "state_dict": checkpoint.pop("state_dict"),
            "sparse_optimizer": self.model.fused_optimizer.state_dict(),
        }
        dcp.save(state, checkpoint_id=str(staging))
        if self.is_global_zero:
            checkpoint["recsys_checkpoint_format"] = "torch.distributed.checkpoint"
            torch.save(checkpoint, staging / META_FILE)
        self.barrier("recsys-ckpt-written")
        if self.is_global_zero:
            if path.is_file():
                path.unlink()
            elif path.exists():
                path.rename(old)
            staging.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier("recsys-ckpt-done")

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            shutil.rmtree(filepath, ignore_errors=True)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(checkpoint_path)
        if path.is_file():
            # an unsharded checkpoint (single-process run): its weights are copied into the shards;
            # its optimizer state belongs to another parameter layout, so it serves validate/test/predict;
            # resume a sharded fit from a checkpoint the strategy wrote
            checkpoint = read_checkpoint(path)
            copy_full_weights(self.lightning_module.state_dict(), checkpoint["state_dict"])
            _restore_extra_states(self.lightning_module, checkpoint["state_dict"])
            checkpoint["state_dict"] = None
            return checkpoint
        checkpoint = read_checkpoint(path)
        state = {
            "state_dict": self.lightning_module.state_dict(),
            "sparse_optimizer": self.model.fused_optimizer.state_dict(),
        }
        load_sharded(state, path)
        self.model.fused_optimizer.load_state_dict(state["sparse_optimizer"])
        _restore_extra_states(self.lightning_module, state["state_dict"])  # (DCP fills tensors in place only)
        checkpoint["state_dict"] = None  # loaded in place above
        return checkpoint

    def load_model_state_dict(self, checkpoint: dict[str, Any], strict: bool = True) -> None:
        if checkpoint.get("state_dict") is not None:
            super().load_model_state_dict(checkpoint, strict=strict)

    def teardown(self) -> None:
        # Strategy.teardown would move the LightningModule to CPU; its shards live where DMP put them
        self.model = self.lightning_module
        if self.accelerator is not None:
            self.accelerator.teardown()
        self.checkpoint_io.teardown()


StrategyRegistry.register(
    "torchrec",
    TorchrecStrategy,
    description="torchrec DistributedModelParallel: sharded embedding tables with FBGEMM fused optimizers",
)
