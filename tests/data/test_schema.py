from pathlib import Path

import pytest

from recsys.data.schema import FeatureType, SchemaError, load_schema, parse_schema


def test_parses_the_contract(tiny_dataset: Path) -> None:
    schema = load_schema(tiny_dataset)
    assert schema.label == "click" and schema.group == "user"
    assert [f.name for f in schema.sparse] == ["user", "item", "tags", "city"]
    assert [f.name for f in schema.sequences] == ["hist_item"]
    hist = schema["hist_item"]
    assert hist.type is FeatureType.SEQUENCE and hist.table == "item" and hist.max_len == 4
    assert schema["city"].num_buckets == 7
    assert [f.name for f in schema.numeric] == ["price"] and [f.name for f in schema.text] == ["title"]
    assert parse_schema(schema.to_dict(), schema.source) == schema  # round-trips to the schema it came from


def test_sequence_default_max_len() -> None:
    schema = parse_schema(
        {
            "label": "y",
            "features": [
                {"name": "item", "type": "categorical"},
                {"name": "hist", "type": "sequence", "target": "item"},
            ],
        }
    )
    assert schema["hist"].max_len == 50


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"features": [{"name": "a", "type": "categorical"}]}, "missing required key 'label'"),
        ({"label": "y", "features": [{"name": "a", "type": "dense"}]}, "feature 'a': unknown feature type 'dense'"),
        (
            {
                "label": "y",
                "features": [{"name": "a", "type": "numeric"}, {"name": "h", "type": "sequence", "target": "a"}],
            },
            "sequence target 'a' must be a declared categorical feature",
        ),
        ({"label": "y", "features": [{"name": "h", "type": "sequence", "target": "nope"}]}, "sequence target 'nope'"),
        ({"label": "y", "features": [{"name": "h", "type": "sequence"}]}, "feature 'h': a sequence needs 'target'"),
        ({"label": "y", "features": [{"name": "a", "type": "categorical", "bucket": 3}]}, "unknown key(s) ['bucket']"),
        (
            {"label": "y", "features": [{"name": "a", "type": "categorical", "num_buckets": 0}]},
            "'num_buckets' must be a positive integer",
        ),
        (
            {"label": "y", "features": [{"name": "a", "type": "categorical"}, {"name": "a", "type": "numeric"}]},
            "feature 'a': declared twice",
        ),
        ({"label": "a", "features": [{"name": "a", "type": "categorical"}]}, "label column 'a' is also declared"),
        ({"label": "y", "features": []}, "'features' must be a non-empty list"),
    ],
)
def test_errors_name_the_file_and_key(raw: dict, message: str) -> None:
    with pytest.raises(SchemaError) as err:
        parse_schema(raw, source="ds/schema.yaml")
    assert "ds/schema.yaml" in str(err.value) and message in str(err.value)


def test_missing_schema_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match=str(tmp_path / "schema.yaml")):
        load_schema(tmp_path)


def test_invalid_yaml_is_named(tmp_path: Path) -> None:
    (tmp_path / "schema.yaml").write_text("label: [unclosed\n")
    with pytest.raises(SchemaError, match="not valid YAML"):
        load_schema(tmp_path)
