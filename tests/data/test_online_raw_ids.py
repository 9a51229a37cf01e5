"""`vocabulary: none`: raw ids straight to a hashing table, with no vocabulary and no pass over them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from recsys.data.datamodule import CTRDataModule
from recsys.data.schema import SchemaError, parse_schema
from recsys.data.vocab import NULL_RAW_ID, Vocabulary, raw_ids
from recsys.embedding.spec import EmbeddingConfigError, EmbeddingSpec
from recsys.eval.report import predict_split
from recsys.export.exporter import export
from recsys.export.loader import load
from recsys.train.checkpoint import load_model
from tests.conftest import TINY_SCHEMA, write_dataset
from tests.export.helpers import fit, raw_rows

RAW_SCHEMA = TINY_SCHEMA.replace("{name: user, type: categorical}", "{name: user, type: categorical, vocabulary: none}")
RAW_SCHEMA = RAW_SCHEMA.replace(
    "{name: tags, type: categorical_list}", "{name: tags, type: categorical_list, vocabulary: none}"
)
RAW_TABLES = {
    "kind": "plain",
    "dim": 8,
    "features": {"user": {"kind": "hashed", "rows": 64}, "tags": {"kind": "hashed", "rows": 8}},
}


def test_raw_ids_are_the_integers_themselves_and_a_pinned_hash_otherwise() -> None:
    ints = raw_ids(pa.array([5, -3, None, 2**62], type=pa.int64()))
    assert ints.tolist() == [5, -3, NULL_RAW_ID, 2**62]
    assert raw_ids(pa.array([7, 9], type=pa.int32())).tolist() == [7, 9]
    # strings through pandas' SipHash with its fixed key; the values are pinned so that a release that
    # changed them (and every trained raw-id table with them) fails here
    assert raw_ids(pa.array(["paris", "t1", None])).tolist() == [7007961254432302975, -6868006352132252612, NULL_RAW_ID]
    # uint64 by its bits: the same id as the int64 a server receives for a value below 2**63
    assert raw_ids(pa.array([2**64 - 1, 5], type=pa.uint64())).tolist() == [-1, 5]
    # int64's maximum marks a free managed slot: it reads as the null id
    assert raw_ids(pa.array([2**63 - 1], type=pa.int64())).tolist() == [NULL_RAW_ID]
    assert (
        raw_ids(pa.array(["paris", "t1"]).dictionary_encode()).tolist() == raw_ids(pa.array(["paris", "t1"])).tolist()
    )


@pytest.mark.parametrize(
    ("feature", "message"),
    [
        ({"name": "a", "type": "categorical", "vocabulary": "None"}, "takes exactly `vocabulary: none`"),
        ({"name": "a", "type": "categorical", "vocabulary": None}, "takes exactly `vocabulary: none`"),
        ({"name": "a", "type": "categorical", "vocabulary": "none", "min_count": 2}, "'min_count' needs a vocabulary"),
        (
            {"name": "a", "type": "categorical", "vocabulary": "none", "num_buckets": 9},
            "'num_buckets' needs a vocabulary",
        ),
        ({"name": "a", "type": "numeric", "vocabulary": "none"}, "goes on a categorical or categorical_list"),
        ({"name": "h", "type": "sequence", "target": "b", "vocabulary": "none"}, "set it on 'b'"),
        ({"name": "t", "type": "text", "item": "b"}, "item text is joined to its item's vocabulary rows"),
    ],
)
def test_schema_refuses_vocabulary_none_where_it_cannot_hold(feature: dict, message: str) -> None:
    raw = {"label": "y", "features": [{"name": "b", "type": "categorical", "vocabulary": "none"}, feature]}
    with pytest.raises(SchemaError) as err:
        parse_schema(raw, source="ds/schema.yaml")
    assert "ds/schema.yaml" in str(err.value) and message in str(err.value)


def test_a_raw_feature_has_no_vocabulary_file_and_looks_up_its_own_ids(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "raw", schema=RAW_SCHEMA)
    vocab = Vocabulary.load_or_build(data)
    assert vocab.num_embeddings("user") == 0 and vocab.num_embeddings("tags") == 0
    assert not (data / "vocab" / "user.parquet").exists() and (data / "vocab" / "item.parquet").exists()
    assert "user" not in vocab.counts  # nothing counted: MBA treats every raw id as seen once
    users = pa.array([1003, 99999, None])  # 99999 never occurs in train: still its own id, not OOV
    assert vocab.lookup("user", users).tolist() == [1003, 99999, NULL_RAW_ID]
    batch = next(iter(CTRDataModule(str(data), batch_size=64).stream("val")))
    assert int(batch.sparse["user"].values().min()) >= 1000  # the raw user ids, not vocabulary rows
    # the schema's `vocabulary: none` is part of the content fingerprint: a model trained on the
    # vocabulary version of the same data is refused on this one
    plain = Vocabulary.load_or_build(write_dataset(tmp_path / "plain"))
    assert plain.fingerprints["user"] != vocab.fingerprints["user"]


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"dim": 8}, "embedding.kind: feature 'user' has `vocabulary: none`"),
        (
            {"dim": 8, "features": {"user": {"kind": "optembed"}, "tags": {"kind": "hashed", "rows": 4}}},
            "embedding.features.user.kind: feature 'user' has `vocabulary: none`",
        ),
        ({"kind": "hashed", "dim": 8, "budget": 0.5}, "embedding.features.user.rows: feature 'user'"),
        ({"kind": "unified", "dim": 8, "budget": 0.5}, "embedding.rows: feature 'user'"),
    ],
)
def test_kinds_that_need_a_vocabulary_or_a_budget_refuse_raw_features(block: dict, message: str) -> None:
    schema = parse_schema(__import__("yaml").safe_load(RAW_SCHEMA), source="ds/schema.yaml")
    with pytest.raises(EmbeddingConfigError) as err:
        EmbeddingSpec.parse(block, schema)
    assert message in str(err.value) and "ds/schema.yaml" in str(err.value)


def test_raw_features_train_export_and_serve_with_hashed_tables(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "raw", schema=RAW_SCHEMA)
    ckpt = fit(data, tmp_path / "runs", "raw", embedding=RAW_TABLES)
    model = load_model(ckpt)
    plans = model.embedding.plans
    assert (plans["user"].kind, plans["user"].hash_rows, plans["user"].vocab_rows) == ("hashed", 64, 0)
    reference = predict_split(model, CTRDataModule(str(data), eval_batch_size=256).stream("test"))
    scorer = load(export(ckpt, tmp_path / "export", "fp32", progress=False))
    rows = raw_rows(data, n=50)
    np.testing.assert_allclose(scorer.score(rows), reference["prob"][:50], atol=1e-5, rtol=0)
    # an id no one has seen is its own id, hashed into the table like any other: not refused
    unseen = [dict(rows[0], user=123456789)]
    assert np.isfinite(scorer.score(unseen)).all()
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["embedding"]["features"]["user"]["lookups"][0]["transform"]["kind"] == "hash"
    assert manifest["features"]["user"]["vocabulary"] == "none" and manifest["features"]["item"]["vocabulary"]
