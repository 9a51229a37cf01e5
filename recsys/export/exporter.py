"""``recsys export``: a trained model → a self-describing directory for serving.

    recsys export --ckpt runs/.../checkpoints/best.ckpt --out exports/base-int8 --dtype int8

Layout (specified in docs/export_format.md, format version 2)::

    manifest.json          format + version, model class and config, features and their vocabularies,
                           the embedding layer (per feature: lookups, id transforms, masks, text),
                           every table (rows, dim, dtype, row bytes, file), the dense tensors, and the
                           SHA-256 and size of every other file
    tables/<key>.safetensors   one file per embedding table: uint8 rows in the dtype's row format;
                           item text vectors are one more table (fp16/int8/int4 apply)
    dense.safetensors      every other tensor of the model (MLPs, attention, remaps, thresholds, ...)
    dense.pt2              models whose features are all pooled: the network after the lookups as a
                           torch.export program
    encoder/               models with row-level text: the text encoder's weights and tokenizer
    vocab/                 the dataset's vocabularies and numeric statistics (raw value → row)
    training_config.yaml   the run's resolved LightningCLI config, when it sits next to the run

Tables are read and written one at a time: from a sharded (DCP) checkpoint each table is loaded
alone, so no process ever holds all tables; from a ``.ckpt`` file the state is memory-mapped.
The directory appears atomically (written under a temporary name, then renamed).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from tqdm.auto import tqdm

from recsys.export.quantize import check_dtype, quantize_rows, row_bytes
from recsys.train.checkpoint import load_sharded, read_checkpoint

FORMAT = "recsys-export"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
ENCODER_DIR = "encoder"


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
    return [
        (path, m) for path, m in model.named_modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))
    ]


def table_entries(model: torch.nn.Module) -> list[dict[str, Any]]:
    """One manifest entry per embedding table (without file fields)."""
    entries = []
    for path, module in table_modules(model):
        pooled = isinstance(module, EmbeddingBagCollection)
        configs = module.embedding_bag_configs() if pooled else module.embedding_configs()
        for config in configs:
            attribute = "embedding_bags" if pooled else "embeddings"
            entries.append(
                {
                    "key": f"{path}.{attribute}.{config.name}.weight",
                    "module": path,
                    "kind": "pooled" if pooled else "unpooled",
                    "name": config.name,
                    "rows": int(config.num_embeddings),
                    "dim": int(config.embedding_dim),
                    "pooling": config.pooling.name.lower() if pooled else "none",
                    "features": list(config.feature_names),
                }
            )
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
            if schema[table].raw:
                entry["vocabulary"] = "none"  # raw ids: int64 as is, str/uint64 hashed (docs/export_format.md)
            elif table in vocab_meta.get("buckets", {}):
                entry["hash_buckets"] = int(vocab_meta["buckets"][table])
            else:
                entry["vocabulary"] = f"vocab/{table}.parquet"
            entry["id_kind"] = vocab_meta["column_types"].get(spec.name)
            if spec.max_len:
                entry["max_len"] = spec.max_len
        elif spec.name in vocab_meta.get("numeric", {}):
            mean, std = vocab_meta["numeric"][spec.name]
            entry.update(mean=float(mean), std=float(std))
        elif spec.type.value == "text":
            entry["item"] = spec.item  # item text: a table; None: row-level text the encoder reads
        out[spec.name] = entry
    return out


class _StateSource:
    """Tensors of a checkpoint, one at a time: a memory-mapped ``.ckpt`` or a DCP directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sharded = path.is_dir()
        self.checkpoint = read_checkpoint(path, mmap=not self.sharded)

    def load(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The checkpoint's values of ``like``'s keys (shapes and dtypes from ``like``)."""
        if not self.sharded:
            state = self.checkpoint["state_dict"]
            missing = [k for k in like if k not in state]
            if missing:
                raise KeyError(f"{self.path}: checkpoint lacks {missing[:5]}")
            return {k: state[k] for k in like}
        request = {"state_dict": {k: torch.empty(v.shape, dtype=v.dtype) for k, v in like.items()}}
        load_sharded(request, self.path)  # reads only these keys' shards
        return request["state_dict"]


def build_model(model_class: str, hparams: dict[str, Any], resources: Any = None, where: str = "") -> torch.nn.Module:
    """A recsys model (only ``CTRModule`` subclasses under ``recsys.models``) with its embedding tables on
    the meta device (nothing allocated for them)."""
    from recsys.embedding.tables import tables_on
    from recsys.train.checkpoint import model_class as find_class
    from recsys.train.checkpoint import model_hparams

    cls = find_class(model_class)
    arguments = model_hparams(cls, hparams, where)
    with tables_on("meta"):
        return cls(**arguments, resources=resources)


class _PooledHead(torch.nn.Module):
    """``(pooled [B, Σ W_f], numeric [B, n]) → logits [B]``: a model's head after the lookups, for
    models whose embedding outputs are all pooled."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        head = copy.copy(model)  # shares every weight; the embedding tables are left out of the program
        head._modules = {k: v for k, v in model._modules.items() if k != "embedding"}
        self.head = head
        self.order = list(model.embedding.pooled_features)
        dims = model.embedding.output_dims()
        self.widths = [dims[f] for f in self.order]

    def forward(self, pooled: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        from recsys.embedding.layer import Embedded

        parts = pooled.split(self.widths, dim=1)
        return type(self.head).head(self.head, Embedded(pooled=dict(zip(self.order, parts, strict=True))), numeric)


def dense_program(model: torch.nn.Module) -> torch.export.ExportedProgram | None:
    """The network after the lookups as a ``torch.export`` program with a dynamic batch, or None when
    the model keeps features jagged (DIN: variable-length attention) or reads row-level text."""
    layer = model.embedding
    if layer.jagged_features or len(layer.row_text):
        return None
    head = _PooledHead(model).eval()
    width, numeric = sum(head.widths), len(model.schema.numeric)
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(
        head, (torch.zeros(2, width), torch.zeros(2, numeric)), dynamic_shapes=({0: batch}, {0: batch})
    )


def _copy_encoder(model: torch.nn.Module, work: Path) -> dict | None:
    """Row-level text runs the encoder at serving time: its files go into the export."""
    layer = model.embedding
    if not len(layer.row_text):
        return None
    from recsys.text.encoder import default_model_path

    spec = layer.text_spec
    source = Path(spec.model_path) if spec.model_path else default_model_path()
    target = work / ENCODER_DIR
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    return {"directory": ENCODER_DIR, "source": str(source), "max_length": spec.max_length}


def export(
    ckpt: str | Path,
    out: str | Path,
    dtype: str = "fp32",
    data: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    since: str | Path | None = None,
) -> Path:
    """Writes the export directory ``out``; returns it. ``since``: the previous export of a chain
    (``recsys.export.delta``): ``out`` is then a delta holding only the rows that changed since it."""
    from recsys.export.loader import ExportResources

    check_dtype(dtype)
    ckpt, out = Path(ckpt), Path(out)
    _check_replaceable(out, ckpt, force)
    source = _StateSource(ckpt)
    meta = source.checkpoint["recsys"]
    hparams = {k: v for k, v in source.checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    trained = build_model(meta["model_class"], hparams, where=str(ckpt))  # the training form (text heads)
    served = build_model(meta["model_class"], hparams, ExportResources(), str(ckpt))  # the serving form
    tables = table_entries(served)
    data_dir = Path(data) if data else Path(served.info.path)
    vocab_meta_file = data_dir / "vocab" / "meta.json"
    if not vocab_meta_file.exists():
        raise FileNotFoundError(
            f"{vocab_meta_file}: the dataset's vocabulary is needed to map raw values; pass --data DIR"
        )
    vocab_meta = json.loads(vocab_meta_file.read_text())
    from recsys.data.vocab import Vocabulary, check_same_content

    check_same_content(served.info, Vocabulary.load_saved(data_dir, served.schema).info(), data_dir)
    text_tables = _item_text_tables(trained, source)
    zero_rows = {f"t_{o}" for o in served.embedding.compact}
    chain = _chain(Path(since), out, meta["model_class"], hparams, tables, dtype) if since else None

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    work.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; a serving user must be able to read it, as with any tool
    try:
        (work / "tables").mkdir()
        for entry in tqdm(tables, desc=f"tables → {dtype}", unit="table", disable=not progress):
            if entry["key"] in text_tables:
                weight = text_tables[entry["key"]]
                entry["source"] = "item text vectors (the trained text head over the encoder's states)"
            else:
                weight = source.load({entry["key"]: torch.empty(entry["rows"], entry["dim"])})[entry["key"]]
            if entry["name"] in zero_rows:  # compact OptEmbed: row 0 (pruned ids) is stored as zeros, as specified
                weight = weight.clone()
                weight[0] = 0
            rows = quantize_rows(weight, dtype)
            del weight
            entry.update(
                dtype=dtype, row_bytes=row_bytes(entry["dim"], dtype), file=f"tables/{entry['key']}.safetensors"
            )
            if chain is None:
                save_file({"rows": rows}, work / entry["file"])
                continue
            from recsys.export.delta import applied_rows, changed_rows
            from recsys.export.loader import stored_rows

            base = applied_rows(stored_rows(chain["full"], entry), entry, chain["deltas"])
            index = changed_rows(rows, base)
            entry["changed_rows"] = len(index)
            save_file({"index": index, "rows": rows[index].contiguous()}, work / entry["file"])
        table_keys = {e["key"] for e in tables}
        dense_like = {
            k: v
            for k, v in served.state_dict().items()
            if k not in table_keys and not k.startswith(served.training_only_state())
        }
        dense = {k: v.detach().clone().contiguous() for k, v in source.load(dense_like).items()}
        save_file(dense, work / "dense.safetensors")
        served.load_state_dict(dense, strict=False)
        program = dense_program(served.eval())
        if program is not None:
            torch.export.save(program, work / "dense.pt2")
            program = {
                "file": "dense.pt2",
                "inputs": [
                    "pooled [B, Σ widths of embedding.order.pooled]",
                    "numeric [B, standardized numeric features]",
                ],
                "output": "logits [B]",
            }
        encoder = _copy_encoder(served, work) if chain is None else None  # a delta reads its chain's
        if chain is None:
            shutil.copytree(data_dir / "vocab", work / "vocab")
        config = ckpt.resolve().parent.parent / "config.yaml"
        if config.exists():
            shutil.copy(config, work / "training_config.yaml")
        files = sorted(p for p in work.rglob("*") if p.is_file())
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": "full" if chain is None else "delta",
            "sequence": 0 if chain is None else chain["sequence"],
            **({} if chain is None else {"base_manifest_sha256": chain["base"], "previous": chain["previous"]}),
            "dtype": dtype,
            "model": {"class": meta["model_class"], "hparams": hparams},
            "label": served.schema.label,
            "features": feature_entries(served, vocab_meta),
            "embedding": served.embedding.describe(),
            "tables": tables,
            "dense": {
                "file": "dense.safetensors",
                "tensors": {k: list(v.shape) for k, v in dense.items()},
                "program": program,
            },
            "encoder": encoder,
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


def _chain(since: Path, out: Path, model_class: str, hparams: dict, tables: list[dict], dtype: str) -> dict:
    """The chain a delta ``out`` extends: its full export, deltas, base SHA-256 and sequence; refused
    for another model or dtype, or when ``out`` would not sit beside ``since`` (``previous`` is a name)."""
    from recsys.export.delta import chain_of, check_chain, same_model
    from recsys.export.loader import verify

    if out.resolve().parent != since.resolve().parent:
        raise ValueError(
            f"--out {out} must sit beside --since {since} (a delta names its previous export by directory name)"
        )
    full, deltas = chain_of(since)
    full_manifest = verify(full)
    verified = [(d, verify(d)) for d in deltas]
    check_chain(full, full_manifest, verified)
    candidate = {"model": {"class": model_class, "hparams": json.loads(json.dumps(hparams, default=jsonable))}}
    candidate["tables"] = [{**t, "dtype": dtype} for t in tables]
    reason = same_model(full_manifest, candidate)
    if reason:
        raise ValueError(f"--since {since}: this checkpoint is another model: {reason}")
    last = verified[-1][1] if verified else full_manifest
    return {
        "full": full,
        "deltas": verified,
        "base": sha256(since / MANIFEST),
        "sequence": int(last.get("sequence", 0)) + 1,
        "previous": since.name,
    }


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_replaceable(out: Path, ckpt: Path, force: bool) -> None:
    """``--force`` replaces a previous export, and nothing else: not a directory without a manifest
    (an unrelated folder, a run directory), never one holding the checkpoint being exported."""
    if not out.exists():
        return
    if not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    if not out.is_dir() or not (out / MANIFEST).is_file():
        raise FileExistsError(
            f"{out} exists and is not a recsys export (no {MANIFEST}); refusing to replace it — choose another --out"
        )
    if ckpt.resolve().is_relative_to(out.resolve()):
        raise FileExistsError(f"{out} holds the checkpoint being exported ({ckpt}); refusing to replace it")


def _item_text_tables(trained: torch.nn.Module, source: _StateSource) -> dict[str, torch.Tensor]:
    """Serving-form table key → ``[rows, dim]`` item text vectors computed by the trained text head."""
    out = {}
    for owner, module in trained.embedding.item_text.items():
        prefix = f"embedding.item_text.{owner}."
        module.load_state_dict(
            {
                k[len(prefix) :]: v
                for k, v in source.load({f"{prefix}{k}": v for k, v in module.state_dict().items()}).items()
            }
        )
        out[f"embedding.item_text.{owner}.table.embeddings.text_{owner}.weight"] = module.eval().all_vectors()
    return out
