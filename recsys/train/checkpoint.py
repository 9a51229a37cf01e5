"""Checkpoints: the one place that knows their layout and reads them without running their code.

Two layouts, both written by ``recsys fit``:

- a Lightning ``.ckpt`` file (single process, or a plain checkpoint copied anywhere);
- a directory written by the torchrec strategy with ``torch.distributed.checkpoint`` (DCP): one
  ``__<rank>_0.distcp`` file of tensor shards per rank, ``.metadata`` (DCP's index) and
  ``lightning.pt`` (the rest of Lightning's checkpoint: loops, callbacks, hyperparameters).

A checkpoint is data someone may hand you, and a pickle can run code, so nothing here unpickles
freely: ``.ckpt`` and ``lightning.pt`` load with ``torch.load(weights_only=True)`` (tensors and plain
values only); DCP's ``.metadata`` goes through an unpickler that accepts only DCP's own index
classes and every shard file it names must lie inside the directory; DCP byte items load with
``weights_only=True``. Anything else is refused with ``CheckpointError`` saying why.

Example::

    meta = read_checkpoint("runs/.../best.ckpt")           # the checkpoint dict (no code run)
    model = load_model("runs/.../best.ckpt")                # the model, unsharded, in eval mode
"""

from __future__ import annotations

import importlib
import io
import pickle
import pkgutil
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata

META_FILE = "lightning.pt"

# what DCP's .metadata may name: its index dataclasses and the few torch values they hold
_DCP_GLOBALS = (
    {
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {("torch", str(t).rpartition(".")[2]) for t in vars(torch).values() if isinstance(t, torch.dtype)}
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
    }
)


class CheckpointError(ValueError):
    """A checkpoint recsys will not read (missing, truncated, or holding more than tensors and values)."""


def is_sharded(path: str | Path) -> bool:
    """True for the torchrec strategy's DCP directory layout."""
    return Path(path).is_dir()


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """The Lightning checkpoint dict (``lightning.pt`` of a sharded checkpoint), tensors and plain values only."""
    path = Path(path)
    file = path / META_FILE if is_sharded(path) else path
    if not file.exists():
        raise FileNotFoundError(f"{file}: checkpoint not found")
    try:
        checkpoint = torch.load(file, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{file}: refused — it holds Python objects, not only tensors and plain values, and "
            f"loading them could run code ({str(err).splitlines()[0]})"
        ) from None
    except Exception as err:  # torch raises RuntimeError, EOFError, struct.error... for a damaged file
        first = str(err).split(". ")[0].strip() or type(err).__name__
        raise CheckpointError(f"{file}: cannot be read (truncated or not a checkpoint: {first})") from None
    if not isinstance(checkpoint, dict) or "recsys" not in checkpoint:
        raise CheckpointError(f"{file}: not a recsys checkpoint (no 'recsys' entry)")
    return checkpoint


class _DCPUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _DCP_GLOBALS:
            raise CheckpointError(f"refused: the DCP index names {module}.{name}, which recsys does not load")
        return super().find_class(module, name)


class SafeReader(FileSystemReader):
    """DCP's file reader with an allow-listed ``.metadata`` and every shard file kept inside the directory."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            metadata = _DCPUnpickler(io.BytesIO(path.read_bytes())).load()
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from None
        except (pickle.UnpicklingError, EOFError, OSError) as err:
            raise CheckpointError(f"{path}: cannot be read ({err})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not a DCP index")
        root = Path(self.path).resolve()
        for info in (metadata.storage_data or {}).values():
            name = str(getattr(info, "relative_path", ""))
            if (
                not name
                or Path(name).is_absolute()
                or ".." in Path(name).parts
                or not (root / name).resolve().is_relative_to(root)
            ):
                raise CheckpointError(f"{path}: refused — shard file {name!r} is not inside {self.path}")
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's load planner with byte items (non-tensor values) loaded as tensors and plain values only."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"refused: a DCP item holds Python objects ({str(err).splitlines()[0]})") from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def load_sharded(state: dict[str, Any], path: str | Path) -> None:
    """Fills ``state`` (shapes as the model's) from a DCP directory, at any world size, safely."""
    import torch.distributed.checkpoint as dcp

    SafeReader(str(path)).read_metadata()  # a refused index stops here with its own message
    dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafePlanner())


# -- models from checkpoints ---------------------------------------------------------------------
def model_class(name: str) -> type:
    """The model class a checkpoint or manifest names, if it is a ``CTRModule`` defined under
    ``recsys.models`` (found by name among that package's modules); anything else is refused, so a
    received file never makes recsys import or call other code."""
    import recsys.models
    from recsys.train.module import CTRModule

    module_name, _, class_name = str(name).rpartition(".")
    modules = {f"recsys.models.{m.name}" for m in pkgutil.iter_modules(recsys.models.__path__)}
    if module_name not in modules:
        raise CheckpointError(f"model class {name!r} is not a recsys model (models live in {sorted(modules)})")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, CTRModule) and cls.__module__ == module_name):
        raise CheckpointError(f"model class {name!r} is not a recsys model (a CTRModule defined in {module_name})")
    return cls


def model_hparams(cls: type, hparams: dict[str, Any], where: str) -> dict[str, Any]:
    """A checkpoint's or manifest's hyperparameters as ``cls``'s constructor arguments: old-style keys
    stop with their new spelling, and arguments the class does not take are refused."""
    import inspect

    from recsys.embedding.spec import legacy_keys_message

    message = legacy_keys_message(list(hparams), where=f"{where}: hyperparameter")
    if message:
        raise CheckpointError(f"{message}; written before the embedding block: retrain with this recsys")
    from recsys.train.module import CTRModule

    arguments = {k: v for k, v in hparams.items() if not k.startswith("_")}
    try:
        signature = inspect.signature(cls.__init__)
        bound = signature.bind(None, **arguments)
        forwarded = [p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
        if forwarded:  # a model passes **kwargs on to CTRModule: they must fit it
            inspect.signature(CTRModule.__init__).bind_partial(None, **bound.arguments.get(forwarded[0], {}))
    except TypeError as err:
        raise CheckpointError(f"{where}: hyperparameters do not fit {cls.__name__} ({err})") from None
    return arguments


def load_model(ckpt_path: str | Path, map_location: str | torch.device = "cpu", resources: Any = None) -> Any:
    """Any recsys model, unsharded and in eval mode, from either layout at any world size.
    ``resources`` are only needed by models that run a text encoder on row-level text."""
    path = Path(ckpt_path)
    checkpoint = read_checkpoint(path, map_location)
    cls = model_class(checkpoint["recsys"]["model_class"])
    model = cls(**model_hparams(cls, checkpoint["hyper_parameters"], str(path)), resources=resources)
    if is_sharded(path):
        state = {"state_dict": model.state_dict()}
        load_sharded(state, path)  # reassembles every table from its shards
        model.load_state_dict(state["state_dict"])
    else:
        model.load_state_dict(checkpoint["state_dict"])
    return model.eval()
