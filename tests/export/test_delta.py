"""Delta exports: full + deltas equals the full export of the last checkpoint, byte for byte, and a
delta that does not belong to the chain is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from recsys.export.exporter import export
from recsys.export.loader import ExportError, load
from tests.export.helpers import raw_rows


def retrained(ckpt: Path, out: Path, rows: dict[str, list[int]], step: float) -> Path:
    """A copy of ``ckpt`` as if training went on: some rows of some tables and one dense weight moved."""
    checkpoint = torch.load(ckpt, weights_only=False)
    state = checkpoint["state_dict"]
    for table, changed in rows.items():
        key = next(k for k in state if k.endswith(f".{table}.weight"))
        state[key][changed] += step
    dense = next(k for k in state if k.startswith("dnn.") and k.endswith("weight"))
    state[dense] += step / 10
    torch.save(checkpoint, out)
    return out


def stored(export_dir: Path) -> dict[str, torch.Tensor]:
    manifest = json.loads((export_dir / "manifest.json").read_text())
    return {t["key"]: load_file(export_dir / t["file"])["rows"] for t in manifest["tables"]}


@pytest.fixture(scope="module")
def chain(trained: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """exports/day1 (full, int8), day2 and day3 (deltas), and the full exports of day2's and day3's
    checkpoints for reference."""
    root = tmp_path_factory.mktemp("delta")
    exports, refs = root / "exports", root / "refs"
    exports.mkdir()
    refs.mkdir()
    day2 = retrained(trained["base"], root / "day2.ckpt", {"t_user": [1, 2, 3], "t_item": [5]}, 0.25)
    day3 = retrained(day2, root / "day3.ckpt", {"t_user": [3, 7]}, -0.5)
    out = {"data": trained["data"], "day2_ckpt": day2, "day3_ckpt": day3, "root": root}
    out["day1"] = export(trained["base"], exports / "day1", "int8", progress=False)
    out["day2"] = export(day2, exports / "day2", "int8", progress=False, since=out["day1"])
    out["day3"] = export(day3, exports / "day3", "int8", progress=False, since=out["day2"])
    out["full2"] = export(day2, refs / "full2", "int8", progress=False)
    out["full3"] = export(day3, refs / "full3", "int8", progress=False)
    return out


def test_full_plus_deltas_is_the_full_export_of_the_last_checkpoint_byte_for_byte(chain: dict) -> None:
    from recsys.export.delta import applied_rows
    from recsys.export.loader import stored_rows, verify

    base, full3 = stored(chain["day1"]), stored(chain["full3"])
    manifest = verify(chain["day1"])
    deltas = [(chain["day2"], verify(chain["day2"])), (chain["day3"], verify(chain["day3"]))]
    for entry in manifest["tables"]:
        rebuilt = applied_rows(stored_rows(chain["day1"], entry), entry, deltas)
        assert torch.equal(rebuilt, full3[entry["key"]]), entry["key"]
    # each delta holds exactly the rows whose bytes changed (a plain comparison of the two full exports)
    full2 = stored(chain["full2"])
    for day, before, after in (("day2", base, full2), ("day3", full2, full3)):
        m = json.loads((chain[day] / "manifest.json").read_text())
        assert (m["kind"], m["previous"]) == ("delta", "day1" if day == "day2" else "day2")
        for entry in m["tables"]:
            expected = [
                i
                for i in range(len(after[entry["key"]]))
                if not torch.equal(after[entry["key"]][i], before[entry["key"]][i])
            ]
            assert entry["changed_rows"] == len(expected)
            assert load_file(chain[day] / entry["file"])["index"].tolist() == expected
    assert json.loads((chain["day2"] / "manifest.json").read_text())["sequence"] == 1
    assert not (chain["day2"] / "vocab").exists()  # the chain's full export holds it
    changed = {
        t["name"]: t["changed_rows"] for t in json.loads((chain["day2"] / "manifest.json").read_text())["tables"]
    }
    assert changed["t_user"] == 3 and changed["t_item"] == 1 and sum(changed.values()) == 4  # what moved


def test_a_scorer_over_the_chain_scores_as_the_full_export(chain: dict) -> None:
    rows = raw_rows(chain["data"], n=64)
    np.testing.assert_array_equal(
        load(chain["day1"], [chain["day2"], chain["day3"]]).score(rows), load(chain["full3"]).score(rows)
    )
    assert load(chain["day1"], [chain["day2"]]).metadata()["sequence"] == 1


def _copy(source: Path, name: str, root: Path) -> Path:
    target = root / "exports" / name
    shutil.copytree(source, target)
    return target


def test_deltas_that_do_not_belong_to_the_chain_are_refused(chain: dict, trained: dict, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"sequence 2, expected 1"):
        load(chain["day1"], [chain["day3"]])  # a gap
    with pytest.raises(ExportError, match=r"sequence 1, expected 2"):
        load(chain["day1"], [chain["day2"], chain["day2"]])
    with pytest.raises(ExportError, match=r"a delta export; serve its chain"):
        load(chain["day2"])
    # a delta on another base: day2 re-exported on a different full export of the same model
    other = tmp_path / "other"
    other.mkdir()
    export(trained["base"], other / "day1", "int8", progress=False)
    (other / "day1" / "manifest.json").write_text(
        (other / "day1" / "manifest.json").read_text().replace('"int8"', '"int8" ', 1)
    )
    with pytest.raises(ExportError, match=r"its base is not .*day1 .*a delta of another or an older export"):
        load(other / "day1", [chain["day2"]])
    # another model: the exporter refuses to write the delta, naming what differs
    with pytest.raises(ValueError, match=r"another model: .*hyperparameters differ .*\['embedding'"):
        export(trained["unified"], chain["root"] / "exports" / "bad", "int8", progress=False, since=chain["day1"])
    with pytest.raises(ValueError, match=r"must sit beside --since"):
        export(chain["day2_ckpt"], tmp_path / "elsewhere", "int8", progress=False, since=chain["day1"])
    # a truncated delta table: the checksum names the file
    broken = tmp_path / "exports"
    broken.mkdir()
    for name in ("day1", "day2"):
        shutil.copytree(chain[name], broken / name)
    table = next((broken / "day2" / "tables").iterdir())
    table.write_bytes(table.read_bytes()[:-10])
    with pytest.raises(ExportError, match=rf"{table.name}: .* bytes, the manifest says"):
        load(broken / "day1", [broken / "day2"])
