"""``recsys export``: a trained model → a self-describing directory for serving.

    recsys export --ckpt runs/.../checkpoints/best.ckpt --out exports/base-int8 --dtype int8

Layout (specified in docs/export_format.md)::

    manifest.json          format + version, model class and config, features and their id
                           transforms, every table (rows, dim, dtype, row bytes, file), the dense
                           tensors, and the SHA-256 and size of every other file
    tables/<key>.safetensors   one file per embedding table: uint8 rows in the dtype's row format
    dense.safetensors      every other tensor of the model (MLPs, attention, remaps, ...)
    dense.pt2              EmbeddingMLP: the network after the lookups as a torch.export program
    vocab/                 the dataset's vocabularies and numeric statistics (raw value → row)
    training_config.yaml   the run's resolved LightningCLI config, when it sits next to the run

Tables are read and written one at a time: from a sharded (DCP) checkpoint each table is loaded
alone, so no process ever holds all tables; from a ``.ckpt`` file the state is memory-mapped.
The directory appears atomically (written under a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from tqdm.auto import tqdm

from recsys.export.quantize import check_dtype, quantize_rows, row_bytes

FORMAT = "recsys-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def jsonable(value: Any) -> Any:
    """Hyperparameters → JSON (dataclass specs become dicts)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} into the manifest")


def table_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(module path, torchrec ``EmbeddingBagCollection`` / ``EmbeddingCollection``) of a model."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))]


def table_entries(model: torch.nn.Module) -> list[dict[str, Any]]:
    """One manifest entry per embedding table (without file fields)."""
    entries = []
    for path, module in table_modules(model):
        pooled = isinstance(module, EmbeddingBagCollection)
        configs = module.embedding_bag_configs() if pooled else module.embedding_configs()
        for config in configs:
            attribute = "embedding_bags" if pooled else "embeddings"
            entries.append({
                "key": f"{path}.{attribute}.{config.name}.weight",
                "module": path,
                "kind": "pooled" if pooled else "unpooled",
                "name": config.name,
                "rows": int(config.num_embeddings),
                "dim": int(config.embedding_dim),
                "pooling": config.pooling.name.lower() if pooled else "none",
                "features": list(config.feature_names),
            })
    return entries


def feature_entries(model: torch.nn.Module, vocab_meta: dict) -> dict[str, dict[str, Any]]:
    """How a raw value of each schema feature becomes a table row (the data-layer transform)."""
    schema = model.schema
    out = {}
    for spec in schema.features:
        entry: dict[str, Any] = {"type": spec.type.value}
        if spec.name in {f.name for f in schema.sparse} | {f.name for f in schema.sequences}:
            table = spec.table
            entry["table_feature"] = table
            if table in vocab_meta.get("buckets", {}):
                entry["hash_buckets"] = int(vocab_meta["buckets"][table])
            else:
                entry["vocabulary"] = f"vocab/{table}.parquet"
            entry["id_kind"] = vocab_meta["column_types"].get(spec.name)
            if spec.max_len:
                entry["max_len"] = spec.max_len
        elif spec.name in vocab_meta.get("numeric", {}):
            mean, std = vocab_meta["numeric"][spec.name]
            entry.update(mean=float(mean), std=float(std))
        out[spec.name] = entry
    return out


def transform_entries(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Model-level id transforms between the vocabulary row and the table row."""
    from recsys.embedding.hashing import feature_salt
    from recsys.embedding.optembed import CompactEmbeddingBag, OptEmbedBag
    from recsys.embedding.unified import UnifiedEmbeddingBag, UnifiedEmbeddingCollection, probe_name

    out = []
    for path, module in model.named_modules():
        if isinstance(module, OptEmbedBag):
            raise ValueError("this is an OptEmbed supernet; export the compact model retrained from its search "
                             "(optembed.stage=compact, docs/optembed.md)")
        if isinstance(module, (UnifiedEmbeddingBag, UnifiedEmbeddingCollection)):
            spec = module.spec
            out.append({
                "kind": "unified_hash", "module": path, "hash": "splitmix64",
                "features": {
                    f: [{"probe_feature": probe_name(f, i), "salt": int(feature_salt(o, i)),
                         "rows": spec.rows_of(o), "table": spec.table_of(o, i)} for i in range(spec.probes_of(o))]
                    for f, o in module.owners.items()
                },
            })
        if isinstance(module, CompactEmbeddingBag):
            out.append({
                "kind": "optembed_remap", "module": path, "zero_row": 0,
                "remaps": {f: f"{path}.remaps.{o}" for f, o in module.owners.items()},
                "dims": dict(module.dims), "kept_rows": dict(module.kept_rows),
            })
    return out


class _StateSource:
    """Tensors of a checkpoint, one at a time: a memory-mapped ``.ckpt`` or a DCP directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sharded = path.is_dir()
        meta_file = path / "lightning.pt" if self.sharded else path
        if not meta_file.exists():
            raise FileNotFoundError(f"{meta_file}: checkpoint not found")
        self.checkpoint = torch.load(meta_file, map_location="cpu", weights_only=False, mmap=not self.sharded)
        if "recsys" not in self.checkpoint:
            raise ValueError(f"{path}: not a recsys checkpoint (no 'recsys' entry)")

    def load(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The checkpoint's values of ``like``'s keys (shapes and dtypes from ``like``)."""
        if not self.sharded:
            state = self.checkpoint["state_dict"]
            missing = [k for k in like if k not in state]
            if missing:
                raise KeyError(f"{self.path}: checkpoint lacks {missing[:5]}")
            return {k: state[k] for k in like}
        import torch.distributed.checkpoint as dcp

        request = {"state_dict": {k: torch.empty(v.shape, dtype=v.dtype) for k, v in like.items()}}
        dcp.load(request, checkpoint_id=str(self.path))  # reads only these keys' shards
        return request["state_dict"]


def build_model(model_class: str, hparams: dict[str, Any]) -> torch.nn.Module:
    """The model with its embedding tables on the meta device (nothing allocated for them)."""
    import importlib

    from recsys.embedding.tables import tables_on

    module_name, _, class_name = model_class.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    with tables_on("meta"):
        return cls(**{k: v for k, v in hparams.items() if not k.startswith("_")})


def export(ckpt: str | Path, out: str | Path, dtype: str = "fp32", data: str | Path | None = None,
           force: bool = False, progress: bool = True) -> Path:
    """Writes the export directory ``out``; returns it."""
    check_dtype(dtype)
    ckpt, out = Path(ckpt), Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    source = _StateSource(ckpt)
    meta = source.checkpoint["recsys"]
    hparams = {k: v for k, v in source.checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    model = build_model(meta["model_class"], hparams)
    tables = table_entries(model)
    transforms = transform_entries(model)
    data_dir = Path(data) if data else Path(model.info.path)
    vocab_meta_file = data_dir / "vocab" / "meta.json"
    if not vocab_meta_file.exists():
        raise FileNotFoundError(f"{vocab_meta_file}: the dataset's vocabulary is needed to map raw values; pass --data DIR")
    vocab_meta = json.loads(vocab_meta_file.read_text())
    if vocab_meta.get("fingerprint") != model.info.fingerprint:
        raise ValueError(f"{data_dir}: vocabulary fingerprint {vocab_meta.get('fingerprint')!r} is not the one the model "
                         f"was trained with ({model.info.fingerprint!r})")

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (work / "tables").mkdir()
        for entry in tqdm(tables, desc=f"tables → {dtype}", unit="table", disable=not progress):
            like = {entry["key"]: torch.empty(entry["rows"], entry["dim"])}
            weight = source.load(like)[entry["key"]]
            rows = quantize_rows(weight, dtype)
            del weight
            entry.update(dtype=dtype, row_bytes=row_bytes(entry["dim"], dtype), file=f"tables/{entry['key']}.safetensors")
            save_file({"rows": rows}, work / entry["file"])
        table_keys = {e["key"] for e in tables}
        dense_like = {k: v for k, v in model.state_dict().items() if k not in table_keys}
        dense = {k: v.detach().clone().contiguous() for k, v in source.load(dense_like).items()}
        save_file(dense, work / "dense.safetensors")
        program = None
        if hasattr(model, "dense_program"):  # the network after the lookups as a torch.export program
            model.load_state_dict(dense, strict=False)
            torch.export.save(model.eval().dense_program(), work / "dense.pt2")
            program = {"file": "dense.pt2", "inputs": ["pooled [B, sum of pooled widths, in table order]",
                                                       "numeric [B, standardized numeric features]"], "output": "logits [B]"}
        shutil.copytree(data_dir / "vocab", work / "vocab")
        config = ckpt.resolve().parent.parent / "config.yaml"
        if config.exists():
            shutil.copy(config, work / "training_config.yaml")
        files = sorted(p for p in work.rglob("*") if p.is_file())
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dtype": dtype,
            "model": {"class": meta["model_class"], "hparams": hparams},
            "label": model.schema.label,
            "features": feature_entries(model, vocab_meta),
            "transforms": transforms,
            "tables": tables,
            "dense": {"file": "dense.safetensors", "tensors": {k: list(v.shape) for k, v in dense.items()},
                      "program": program},
            "source_checkpoint": str(ckpt),
            "files": {str(p.relative_to(work)): {"sha256": sha256(p), "bytes": p.stat().st_size} for p in files},
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2, default=jsonable))
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint: a .ckpt file or a sharded checkpoint directory")
    parser.add_argument("--out", required=True, help="export directory to create")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "int8", "int4"],
                        help="table storage: floats, or FBGEMM row-wise quantized int8/int4 (default fp32)")
    parser.add_argument("--data", help="dataset directory holding vocab/ (default: the one the model was trained on)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = export(args.ckpt, args.out, args.dtype, data=args.data, force=args.force)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as err:
        print(f"recsys export: {err}", file=sys.stderr)
        return 1
    manifest = json.loads((out / MANIFEST).read_text())
    table_bytes = sum(manifest["files"][e["file"]]["bytes"] for e in manifest["tables"])
    print(f"wrote {out}: {len(manifest['tables'])} table(s), {table_bytes:,} table bytes ({args.dtype}), "
          f"{len(manifest['files'])} files; serve with: recsys serve {out}")
    return 0
