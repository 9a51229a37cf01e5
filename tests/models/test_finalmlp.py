from pathlib import Path

from recsys.data.datamodule import CTRDataModule
from recsys.models.finalmlp import FinalMLP

SMALL = {"mlp1_hidden_units": [16], "mlp2_hidden_units": [8], "gate_hidden_units": [8]}


def test_gates_take_the_named_context_features(tiny_dataset: Path) -> None:
    import pytest

    dm = CTRDataModule(str(tiny_dataset), batch_size=32)
    model = FinalMLP(
        dm.dataset_info,
        embedding={"dim": 8},
        gate1_context=["user"],
        gate2_context=["item", "city"],
        fusion_heads=4,
        mlp1_hidden_units=[16],
        mlp2_hidden_units=[8],
        gate_hidden_units=[8],
    )
    assert model.gates[0].gate.layers[0].in_features == 8 and model.gates[1].gate.layers[0].in_features == 16
    assert model(next(iter(dm.stream("train")))).shape == (32,)
    with pytest.raises(ValueError, match="gate context 'nope' is not a pooled feature"):
        FinalMLP(dm.dataset_info, gate1_context=["nope"])
