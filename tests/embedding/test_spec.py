"""The embedding block: precedence, the fair budget rule, and one named error per bad input."""

from pathlib import Path

import pytest

from recsys.data.schema import parse_schema
from recsys.embedding.spec import EmbeddingConfigError, EmbeddingSpec, legacy_keys_message

SCHEMA = parse_schema(
    {
        "label": "y",
        "features": [
            {"name": "user", "type": "categorical"},
            {"name": "item", "type": "categorical", "embedding_dim": 8},
            {"name": "tag", "type": "categorical_list"},
            {"name": "small", "type": "categorical"},
            {"name": "hist", "type": "sequence", "target": "item"},
            {"name": "price", "type": "numeric"},
        ],
    },
    source="s.yaml",
)
ROWS = {"user": 1000, "item": 500, "tag": 30, "small": 4}


def plans(block: dict | None) -> dict:
    return EmbeddingSpec.parse(block, SCHEMA).plans(SCHEMA, ROWS)


def test_width_precedence_feature_entry_then_schema_then_default() -> None:
    p = plans({"dim": 16, "features": {"tag": {"dim": 4}}})
    assert {o: x.dim for o, x in p.items()} == {"user": 16, "item": 8, "tag": 4, "small": 16}
    assert all(x.kind == "plain" and x.rows == ROWS[o] and x.hash_rows is None for o, x in p.items())


def test_budget_rule_is_max_min_fair_and_small_tables_keep_every_row() -> None:
    # full: 1000·16 + 500·8 + 30·16 + 4·16 = 20,544 parameters; 25% → 5,136.
    # Hand computation of the cap c: small (4) and tag (30) fit whole (544 parameters),
    # then 16·c + 8·c ≤ 4,592 → c = 191 rows for user and item.
    p = plans({"kind": "hashed", "dim": 16, "budget": 0.25})
    assert {o: x.rows for o, x in p.items()} == {"user": 191, "item": 191, "tag": 30, "small": 4}
    assert p["user"].hash_rows == 191 and p["item"].hash_rows == 191
    assert p["tag"].hash_rows is None and p["small"].hash_rows is None  # kept whole: no hashing, no collisions
    total = sum(x.rows * x.dim for x in p.values())
    assert total <= 0.25 * 20_544 < total + 24  # one more row for both big tables would not fit


def test_explicit_rows_probes_and_mixed_kinds() -> None:
    p = plans(
        {
            "kind": "unified",
            "dim": 8,
            "rows": 300,
            "probes": 2,
            "features": {"small": {"kind": "plain", "dim": 4}, "user": {"probes": 3}},
        }
    )
    assert (p["user"].kind, p["user"].probes, p["user"].rows, p["user"].width) == ("unified", 3, 300, 24)
    assert (p["item"].dim, p["item"].width) == (8, 16)  # unified features read the shared width
    assert (p["small"].kind, p["small"].rows, p["small"].width) == ("plain", 4, 4)
    hashed = plans({"kind": "hashed", "rows": 100, "features": {"user": {"rows": 50}}})
    assert hashed["user"].rows == 50 and hashed["tag"].rows == 30  # 100 rows cover tag's 30: kept whole


def test_unified_budget_sizes_the_shared_tables() -> None:
    p = plans({"kind": "unified", "dim": 16, "budget": 0.5, "num_tables": 2})
    full = sum(ROWS.values()) * 16
    assert p["user"].rows == int(0.5 * full / (2 * 16))


@pytest.mark.parametrize(
    "block, message",
    [
        ({"kind": "nope"}, r"embedding.kind: unknown kind 'nope'"),
        ({"dim": 6}, r"embedding.dim: width 6 is not a multiple of 4"),
        ({"dim": 0}, r"embedding.dim: expected an integer ≥ 1, got 0"),
        ({"features": {"user": {"dim": 10}}}, r"features.user.dim: width 10 is not a multiple of 4"),
        ({"rows": 10}, r"embedding.rows: not taken by the kind\(s\) in use \['plain'\]"),
        ({"kind": "hashed"}, r"embedding.budget: kind 'hashed' of feature 'user' needs a size"),
        ({"kind": "hashed", "budget": 0.001}, r"embedding.budget: 0.001 leaves feature 'user' no rows"),
        ({"kind": "hashed", "budget": 1.5}, r"embedding.budget: expected a number in \(0, 1\]"),
        ({"kind": "hashed", "budget": 0.5, "rows": 10}, r"give one of them, not both"),
        ({"features": {"ghost": {}}}, r"features.ghost: no feature 'ghost' in s.yaml"),
        (
            {"features": {"hist": {"dim": 4}}},
            r"features.hist: a sequence reads its target's table; set it on features.item",
        ),
        ({"features": {"price": {}}}, r"features.price: 'price' is a numeric feature and has no table"),
        ({"features": {"user": {"probes": 2}}}, r"features.user.probes: not taken by kind 'plain'"),
        (
            {"kind": "unified", "rows": 9, "features": {"user": {"dim": 8}}},
            r"features.user.dim: not taken by kind 'unified'",
        ),
        ({"features": {"user": {"width": 8}}}, r"features.user.width: unknown key"),
        ({"alpha": 0.1}, r"embedding.alpha: not taken by the kind\(s\) in use"),
        ({"kind": "optembed", "stage": "final"}, r"embedding.stage: one of \['supernet', 'compact'\]"),
        ({"colour": "red"}, r"embedding.colour: unknown key"),
    ],
)
def test_each_bad_block_names_its_key(block: dict, message: str) -> None:
    with pytest.raises(EmbeddingConfigError, match=message):
        plans(block)


def test_command_line_strings_are_read_as_numbers() -> None:
    assert plans({"dim": "8"})["user"].dim == 8
    assert EmbeddingSpec.parse({"kind": "optembed", "prune_rows": "false"}, SCHEMA).prune_rows is False


def test_to_dict_round_trips_and_leaves_defaults_out() -> None:
    block = {"kind": "unified", "dim": 8, "budget": 0.5, "probes": 2, "features": {"small": {"kind": "plain"}}}
    spec = EmbeddingSpec.parse(block, SCHEMA)
    assert spec.to_dict() == block
    assert EmbeddingSpec.parse(spec.to_dict(), SCHEMA).plans(SCHEMA, ROWS) == spec.plans(SCHEMA, ROWS)


def test_old_keys_get_their_new_spelling(tmp_path: Path) -> None:
    message = legacy_keys_message(["unified", "dnn_hidden_units", "embedding_dim"])
    assert "model.init_args.unified is no longer a model argument; write embedding: {kind: unified" in message
    assert "model.init_args.embedding_dim is no longer a model argument; write embedding: {dim: N}" in message
    assert legacy_keys_message(["embedding", "mba_lambda"]) is None
