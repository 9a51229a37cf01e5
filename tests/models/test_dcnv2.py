from pathlib import Path

from recsys.data.datamodule import CTRDataModule
from recsys.models.dcnv2 import DCNv2

SMALL = {"cross_layers": 2, "dnn_hidden_units": [16]}


def test_stacked_and_low_rank_mixture_variants(tiny_dataset: Path) -> None:
    import pytest

    dm = CTRDataModule(str(tiny_dataset), batch_size=32)
    batch = next(iter(dm.stream("train")))
    stacked = DCNv2(
        dm.dataset_info, embedding={"dim": 8}, structure="stacked", cross_low_rank=4, cross_experts=2, **SMALL
    )
    assert stacked(batch).shape == (32,) and stacked.out.in_features == 16  # the DNN's output only
    parallel = DCNv2(dm.dataset_info, embedding={"dim": 8}, **SMALL)
    assert parallel.out.in_features == 16 + 5 * 8 + 1  # DNN ⊕ cross output (all inputs)
    with pytest.raises(ValueError, match="structure must be one of"):
        DCNv2(dm.dataset_info, structure="sideways")
