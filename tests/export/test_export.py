import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.data.datamodule import CTRDataModule
from recsys.eval.metrics import auc
from recsys.eval.report import predict_split
from recsys.export.exporter import export
from recsys.export.loader import ExportError, RowError, load
from recsys.export.quantize import dequantize_rows, quantize_rows, row_bytes
from recsys.train.checkpoint import load_model
from tests.export.helpers import raw_rows


# -- row formats ---------------------------------------------------------------------------------
def test_int8_rows_match_a_plain_rowwise_reference() -> None:
    torch.manual_seed(0)
    weight = torch.randn(50, 16) * 0.3
    rows = quantize_rows(weight, "int8")
    assert rows.dtype == torch.uint8 and rows.shape == (50, 16 + 4)
    codes = rows[:, :16].float()
    scale = rows[:, 16:18].contiguous().view(torch.float16).float()
    bias = rows[:, 18:20].contiguous().view(torch.float16).float()
    # reference: scale = (max - min) / 255, bias = min, code = round((x - bias) / scale)
    lo, hi = weight.min(1, keepdim=True).values, weight.max(1, keepdim=True).values
    torch.testing.assert_close(bias, lo, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(scale, (hi - lo) / 255, atol=1e-5, rtol=1e-3)
    decoded = scale * codes + bias
    torch.testing.assert_close(dequantize_rows(rows, 16, "int8"), decoded, atol=1e-6, rtol=0)
    assert float((decoded - weight).abs().max()) <= float(scale.max()) * 0.5 + 2e-3


def test_int4_packs_two_codes_per_byte_low_nibble_first() -> None:
    weight = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 15.0]])
    rows = quantize_rows(weight, "int4")
    assert rows.shape == (1, 8 // 2 + 4)
    packed = rows[0, :4]
    low, high = packed & 0xF, packed >> 4
    codes = torch.stack([low, high], dim=1).flatten().float()
    scale = rows[0, 4:6].contiguous().view(torch.float16).float()
    bias = rows[0, 6:8].contiguous().view(torch.float16).float()
    torch.testing.assert_close(scale * codes + bias, weight[0], atol=1e-3, rtol=0)
    torch.testing.assert_close(dequantize_rows(rows, 8, "int4"), weight, atol=1e-3, rtol=0)


def test_float_rows_round_trip_and_row_sizes() -> None:
    weight = torch.randn(7, 12)
    assert torch.equal(dequantize_rows(quantize_rows(weight, "fp32"), 12, "fp32"), weight)
    torch.testing.assert_close(dequantize_rows(quantize_rows(weight, "fp16"), 12, "fp16"), weight.half().float())
    assert [row_bytes(16, d) for d in ("fp32", "fp16", "int8", "int4")] == [64, 32, 20, 12]
    with pytest.raises(ValueError, match="dtype"):
        row_bytes(16, "int3")


# -- export → load parity ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["base", "din", "unified", "optembed", "supernet", "text"])
def test_fp32_export_scores_equal_the_trained_model(trained: dict, tmp_path: Path, kind: str) -> None:
    out = export(trained[kind], tmp_path / kind, "fp32", progress=False)
    scorer = load(out)
    model = load_model(trained[kind])
    dm = CTRDataModule(str(trained["data"]), eval_batch_size=256)
    reference = predict_split(model, dm.stream("test"))
    exported = np.concatenate([scorer.score_batch(b) for b in dm.stream("test")])
    np.testing.assert_allclose(exported, reference["prob"], atol=1e-5, rtol=0)
    # raw values (as in the Parquet rows) give the same scores as the encoded batches
    raw = scorer.score(raw_rows(trained["data"], n=100))
    np.testing.assert_allclose(raw, reference["prob"][:100], atol=1e-5, rtol=0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    assert manifest["model"]["class"].rsplit(".", 1)[1] == ("DIN" if kind in ("din", "text") else "EmbeddingMLP")
    pooled_only = kind not in ("din", "text")
    assert (manifest["dense"]["program"] is not None) == pooled_only
    if pooled_only:  # the network after the lookups, as a torch.export program, is the model's head
        program = torch.export.load(out / manifest["dense"]["program"]["file"]).module()
        widths = scorer.model.embedding.output_dims()
        pooled = torch.randn(7, sum(widths[f] for f in scorer.model.pooled))
        numeric = torch.randn(7, 1)
        from recsys.embedding.layer import Embedded

        parts = dict(zip(scorer.model.pooled, pooled.split([widths[f] for f in scorer.model.pooled], 1), strict=True))
        torch.testing.assert_close(program(pooled, numeric), scorer.model.head(Embedded(pooled=parts), numeric))
    lookups = manifest["embedding"]["features"]["user"]["lookups"]
    if kind == "unified":
        assert [lk["transform"]["kind"] for lk in lookups] == ["hash", "hash"]
        assert lookups[0]["transform"]["salt"] != lookups[1]["transform"]["salt"]
    if kind == "optembed":
        assert lookups[0]["transform"] == {"kind": "remap", "tensor": "embedding.remaps.user"}
    if kind == "text":  # item text vectors are one more table, checksummed like the others
        table = next(t for t in manifest["tables"] if t["name"] == "text_item")
        assert table["features"] == ["item#text"] and table["file"] in manifest["files"]


@pytest.mark.parametrize("dtype", ["fp16", "int8", "int4"])
def test_quantized_tables_hold_only_their_bits_on_disk_and_in_memory(trained: dict, tmp_path: Path, dtype: str) -> None:
    out = export(trained["base"], tmp_path / dtype, dtype, progress=False)
    scorer = load(out)
    manifest = scorer.manifest
    expected = sum(t["rows"] * row_bytes(t["dim"], dtype) for t in manifest["tables"])
    # on disk: the rows plus each safetensors header; in the FBGEMM kernels: the rows (+ ≤ 64 bytes of padding
    # per table)
    on_disk = sum(manifest["files"][t["file"]]["bytes"] for t in manifest["tables"])
    assert expected <= on_disk <= expected + 200 * len(manifest["tables"])
    assert expected <= scorer.table_bytes_in_memory <= expected + 64 * len(manifest["tables"])
    # no float copy of any table anywhere in the loaded model
    table_shapes = {(t["rows"], t["dim"]) for t in manifest["tables"]}
    tensors = list(scorer.model.state_dict().values()) + list(scorer.model.buffers())
    assert not [tuple(t.shape) for t in tensors if t.is_floating_point() and tuple(t.shape) in table_shapes]
    dm = CTRDataModule(str(trained["data"]), eval_batch_size=600)
    batch = next(iter(dm.stream("test")))
    reference = torch.sigmoid(load_model(trained["base"])(batch)).detach().numpy()
    probs = scorer.score_batch(batch)
    labels = batch.labels.numpy()
    assert abs(auc(labels, probs) - auc(labels, reference)) < {"fp16": 1e-4, "int8": 2e-3, "int4": 2e-2}[dtype]
    assert np.abs(probs - reference).max() < {"fp16": 1e-3, "int8": 2e-2, "int4": 1e-1}[dtype]


def test_export_from_a_sharded_checkpoint_streams_one_table_at_a_time(
    trained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import sys

    from tests.export.helpers import CONFIGS

    logs = tmp_path / "runs"
    recsys = Path(sys.executable).parent / "recsys"
    subprocess.run(
        [
            str(recsys),
            "fit",
            "--config",
            str(CONFIGS / "base.yaml"),
            "--data.path",
            str(trained["data"]),
            "--trainer.max_epochs",
            "1",
            "--model.init_args.embedding",
            '{"dim": 8}',
            "--data.batch_size",
            "256",
            "--trainer.strategy",
            "torchrec",
            "--trainer.devices",
            "2",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger.init_args.save_dir",
            str(logs),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    ckpt = next(logs.rglob("last.ckpt"))
    assert ckpt.is_dir()
    import torch.distributed.checkpoint as dcp

    requests = []
    real_load = dcp.load

    def recording_load(state, **kwargs):  # noqa: ANN001, ANN003
        requests.append(list(state["state_dict"]))
        return real_load(state, **kwargs)

    monkeypatch.setattr(dcp, "load", recording_load)
    out = export(ckpt, tmp_path / "export", "int8", progress=False)
    table_keys = {t["key"] for t in json.loads((out / "manifest.json").read_text())["tables"]}
    assert max(len(set(r) & table_keys) for r in requests) == 1  # never two tables in one load
    assert set().union(*map(set, requests)) >= table_keys
    monkeypatch.setattr(dcp, "load", real_load)
    fp32 = load(export(ckpt, tmp_path / "fp32", "fp32", progress=False))
    model = load_model(ckpt)
    batch = next(iter(CTRDataModule(str(trained["data"])).stream("test")))
    np.testing.assert_allclose(fp32.score_batch(batch), torch.sigmoid(model(batch)).detach().numpy(), atol=1e-5, rtol=0)


# -- bad exports: a clear load error, never wrong scores -------------------------------------------
@pytest.fixture
def good_export(trained: dict, tmp_path: Path) -> Path:
    return export(trained["base"], tmp_path / "export", "int8", progress=False)


def test_missing_file_is_named(good_export: Path) -> None:
    table = next((good_export / "tables").iterdir())
    table.unlink()
    with pytest.raises(ExportError, match=f"{table.name}: missing"):
        load(good_export)


def test_truncated_file_is_named(good_export: Path) -> None:
    dense = good_export / "dense.safetensors"
    dense.write_bytes(dense.read_bytes()[:-10])
    with pytest.raises(ExportError, match="dense.safetensors: .* bytes, the manifest says [0-9]+ \\(truncated"):
        load(good_export)


def test_altered_byte_is_caught_by_the_checksum(good_export: Path) -> None:
    table = next((good_export / "tables").iterdir())
    data = bytearray(table.read_bytes())
    data[-5] ^= 0xFF
    table.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=f"{table.name}: SHA-256"):
        load(good_export)


def test_unknown_format_version_and_missing_manifest(good_export: Path, tmp_path: Path) -> None:
    manifest = json.loads((good_export / "manifest.json").read_text())
    manifest["format_version"] = 99
    (good_export / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="format version 99"):
        load(good_export)
    (good_export / "manifest.json").write_text("{not json")
    with pytest.raises(ExportError, match="corrupt manifest"):
        load(good_export)
    with pytest.raises(ExportError, match="not found"):
        load(tmp_path / "nowhere")


def test_export_refuses_an_existing_directory_and_leaves_nothing_half_written(trained: dict, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        export(trained["base"], tmp_path / "s", "fp32", data=tmp_path / "no-data", progress=False)
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".s.*"))
    out = export(trained["base"], tmp_path / "b", "fp32", progress=False)
    with pytest.raises(FileExistsError, match="--force"):
        export(trained["base"], out, "fp32", progress=False)
    export(trained["base"], out, "fp16", force=True, progress=False)
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "fp16"


def test_bad_rows_are_refused_with_the_feature_named(good_export: Path, trained: dict) -> None:
    scorer = load(good_export)
    row = raw_rows(trained["data"], n=1)[0]
    cases = [
        ({k: v for k, v in row.items() if k != "item"}, "missing feature 'item'", "item"),
        (row | {"price": "cheap"}, "'price' must be a number", "price"),
        (row | {"price": float("nan")}, "'price' must be a finite number", "price"),
        (row | {"item": [1, 2]}, "'item' .* must be one int id", "item"),
        (row | {"tags": "t1"}, "'tags' .* must be a list", "tags"),
        (row | {"hist_item": ["a"]}, "'hist_item' takes int ids", "hist_item"),
    ]
    for bad, message, field in cases:
        with pytest.raises(RowError, match=message) as err:
            scorer.score([row, bad])
        assert err.value.field == field and "row 1" in str(err.value)
    with pytest.raises(RowError, match="non-empty list"):
        scorer.score([])
    assert scorer.ignored_fields([row | {"colour": 3}]) == ["click", "colour", "title"]  # not read: ignored, listed
    # unseen ids and null categorical values score through the OOV row
    assert np.isfinite(scorer.score([row | {"item": 10**9, "city": None}])).all()


def test_export_cli(trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from recsys.cli import main

    assert main(["export", "--ckpt", str(trained["base"]), "--out", str(tmp_path / "e"), "--dtype", "int4"]) == 0
    assert "serve with: recsys serve" in capsys.readouterr().out
    assert main(["export", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "x")]) == 1
    assert "missing.ckpt: checkpoint not found" in capsys.readouterr().err


# -- a loader needs nothing but the export ---------------------------------------------------------
def _moved_away(data: Path):  # noqa: ANN202
    """A context in which the dataset directory does not exist (renamed, then put back)."""
    from contextlib import contextmanager

    @contextmanager
    def moved():
        hidden = data.with_name(data.name + ".away")
        data.rename(hidden)
        try:
            yield
        finally:
            hidden.rename(data)

    return moved()


def test_every_export_serves_with_the_dataset_directory_moved_away(trained: dict, tmp_path: Path) -> None:
    rows = raw_rows(trained["data"], n=50)
    for kind in ("base", "din", "unified", "optembed", "supernet", "text"):
        out = export(trained[kind], tmp_path / kind, "int8", progress=False)
        expected = load(out).score(rows)
        with _moved_away(trained["data"]):
            np.testing.assert_allclose(load(out).score(rows), expected, atol=1e-7, err_msg=kind)


def test_row_level_text_exports_its_encoder_and_serves_without_the_dataset(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from recsys.models.base import EmbeddingMLP
    from tests.conftest import write_text_dataset
    from tests.test_composition import save_checkpoint

    data = write_text_dataset(tmp_path / "words", rows={"train": 400, "val": 100, "test": 100})
    dm = CTRDataModule(str(data), eval_batch_size=100)
    torch.manual_seed(0)
    model = EmbeddingMLP(
        dm.dataset_info,
        embedding={"dim": 8},
        text={"pooling": "attention", "dim": 8},
        dnn_hidden_units=[8],
        resources=dm.resources,
    ).eval()
    batch = next(iter(dm.stream("test")))
    with torch.no_grad():
        expected = torch.sigmoid(model(batch)).numpy()
    out = export(save_checkpoint(model, tmp_path / "text.ckpt"), tmp_path / "export", "fp32", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["encoder"]["directory"] == "encoder" and "encoder/config.json" in manifest["files"]
    assert manifest["embedding"]["features"]["query"]["kind"] == "row_text"
    rows = pq.read_table(data / "test" / "part-0.parquet").to_pylist()
    with _moved_away(data):
        scorer = load(out)
        np.testing.assert_allclose(scorer.score(rows), expected, atol=1e-5)
        with pytest.raises(RowError, match="'query' \\(text\\) must be a string"):
            scorer.score([rows[0] | {"query": 3}])
    weights = next(f for f in manifest["files"] if f.startswith("encoder/") and f.endswith(".safetensors"))
    (out / weights).write_bytes(b"tampered")
    with pytest.raises(ExportError, match="bytes, the manifest says"):
        load(out)


# -- a received export runs no code and reads nothing outside its directory ------------------------
def _rewrite(out: Path, change) -> None:  # noqa: ANN001
    """Edits the manifest as an attacker would (checksums of the other files stay valid)."""
    manifest = json.loads((out / "manifest.json").read_text())
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_a_manifest_naming_other_code_or_paths_outside_is_refused(trained: dict, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    out = export(trained["base"], tmp_path / "e", "fp32", progress=False)
    cases = [
        (
            lambda m: m["model"].update({"class": "subprocess.Popen", "hparams": {"args": ["touch", str(marker)]}}),
            "'subprocess.Popen' is not a recsys model",
        ),
        (lambda m: m["model"].update({"class": "recsys.models.base.CTRModule"}), "not a recsys model"),
        (lambda m: m["model"]["hparams"].update({"args": ["touch", str(marker)]}), "hyperparameters do not fit"),
        (lambda m: m["files"].update({"../outside.txt": {"bytes": 1, "sha256": "0"}}), "not a relative path inside"),
        (lambda m: m["dense"].update({"file": "/etc/hostname"}), "no checksum in the manifest|not a relative path"),
    ]
    original = (out / "manifest.json").read_text()
    for change, message in cases:
        _rewrite(out, change)
        with pytest.raises(ExportError, match=message):
            load(out)
        (out / "manifest.json").write_text(original)
    assert not marker.exists()
    (tmp_path / "secret").write_text("x")
    table = next((out / "tables").iterdir())
    table.unlink()
    table.symlink_to(tmp_path / "secret")  # a file that leads out of the export
    with pytest.raises(ExportError, match="outside the directory"):
        load(out)


def test_force_replaces_only_an_export_and_the_directory_follows_the_umask(trained: dict, tmp_path: Path) -> None:
    import os
    import stat

    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="not a recsys export \\(no manifest.json\\); refusing"):
        export(trained["base"], unrelated, "fp32", force=True, progress=False)
    assert (unrelated / "thesis.tex").read_text() == "years of work"
    run_dir = trained["base"].parent.parent  # the checkpoint's own run directory
    with pytest.raises(FileExistsError, match="refusing"):
        export(trained["base"], run_dir, "fp32", force=True, progress=False)
    assert trained["base"].exists()
    old = os.umask(0o022)
    try:
        out = export(trained["base"], tmp_path / "e", "fp32", progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # readable by a serving user, as `mkdir` would make it
    export(trained["base"], out, "fp16", force=True, progress=False)  # a previous export: replaced
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "fp16"
    (out / "tables" / "copy.ckpt").write_bytes(trained["base"].read_bytes())
    with pytest.raises(FileExistsError, match="holds the checkpoint"):
        export(out / "tables" / "copy.ckpt", out, "fp32", force=True, progress=False)
