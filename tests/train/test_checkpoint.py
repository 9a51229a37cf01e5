"""Reading a checkpoint never runs code from it: a pickle that would run a command is refused, in every
layout (a .ckpt file, a DCP directory's lightning.pt, its .metadata, a shard path leading out)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from recsys.commands.eval import main as eval_main
from recsys.data.datamodule import CTRDataModule
from recsys.models.base import EmbeddingMLP
from recsys.train.checkpoint import CheckpointError, load_model, read_checkpoint
from tests.test_composition import save_checkpoint


class RunsACommand:
    """What an attacker pickles: unpickling it calls ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def checkpoint(tiny_dataset: Path, tmp_path: Path) -> Path:
    dm = CTRDataModule(str(tiny_dataset))
    return save_checkpoint(EmbeddingMLP(dm.dataset_info, embedding={"dim": 8}), tmp_path / "good.ckpt")


def test_a_plain_checkpoint_with_a_code_object_is_refused(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    marker = tmp_path / "ran"
    payload = torch.load(checkpoint, weights_only=True) | {"extra": RunsACommand(marker)}
    evil = tmp_path / "evil.ckpt"
    torch.save(payload, evil)
    with pytest.raises(CheckpointError, match="evil.ckpt: refused — it holds Python objects"):
        load_model(evil)
    assert eval_main(["--ckpt", str(evil), "--out", str(tmp_path / "report")]) == 2  # `recsys eval`
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()
    assert isinstance(load_model(checkpoint), EmbeddingMLP)  # a real one loads


def test_a_sharded_checkpoint_is_read_through_allow_lists(checkpoint: Path, tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    model = load_model(checkpoint)
    directory = tmp_path / "sharded"
    dcp.save({"state_dict": model.state_dict()}, checkpoint_id=str(directory))
    torch.save(read_checkpoint(checkpoint) | {"state_dict": None}, directory / "lightning.pt")
    batch = next(iter(CTRDataModule(model.info.path).stream("val")))
    torch.testing.assert_close(load_model(directory)(batch), model(batch))

    marker = tmp_path / "ran"
    metadata = (directory / ".metadata").read_bytes()
    (directory / ".metadata").write_bytes(pickle.dumps(RunsACommand(marker)))
    with pytest.raises(CheckpointError, match="the DCP index names posix.system"):
        load_model(directory)
    assert not marker.exists()

    index = pickle.loads(metadata)  # noqa: S301 (our own file, written above)
    for info in index.storage_data.values():
        info.relative_path = "../outside.distcp"
    (directory / ".metadata").write_bytes(pickle.dumps(index))
    with pytest.raises(CheckpointError, match="shard file '../outside.distcp' is not inside"):
        load_model(directory)

    torch.save({"recsys": {}, "hyper_parameters": RunsACommand(marker)}, directory / "lightning.pt")
    with pytest.raises(CheckpointError, match="lightning.pt: refused"):
        read_checkpoint(directory)
    assert not marker.exists()


def test_a_checkpoint_naming_another_class_or_arguments_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    payload = torch.load(checkpoint, weights_only=True)
    for name, message in (
        ("subprocess.Popen", "'subprocess.Popen' is not a recsys model"),
        ("recsys.models.base.torch", "is not a recsys model"),
    ):
        torch.save(payload | {"recsys": payload["recsys"] | {"model_class": name}}, tmp_path / "x.ckpt")
        with pytest.raises(CheckpointError, match=message):
            load_model(tmp_path / "x.ckpt")
    torch.save(payload | {"hyper_parameters": payload["hyper_parameters"] | {"args": ["ls"]}}, tmp_path / "y.ckpt")
    with pytest.raises(CheckpointError, match="hyperparameters do not fit EmbeddingMLP"):
        load_model(tmp_path / "y.ckpt")
    (tmp_path / "z.ckpt").write_bytes(checkpoint.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="z.ckpt: cannot be read"):
        load_model(tmp_path / "z.ckpt")
