"""Fault injection for the reliability tests (importable by `recsys fit` subprocesses via PYTHONPATH)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import torch


class KillAt(L.Callback):
    """SIGKILLs the whole training job (its process group) after global step ``step``, as a
    preemption would: no cleanup, no final checkpoint. Only in a run that did not resume, so the
    same command run again goes through."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.step and trainer.global_rank == 0 and trainer.ckpt_path is None:
            os.killpg(os.getpgid(0), signal.SIGKILL)


class NaNGradient(torch.autograd.Function):
    """Identity forward; a NaN gradient backward (a poisoned embedding gradient with a finite loss)."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return grad * float("nan")


def poison_embedding_gradient(layer: torch.nn.Module):  # noqa: ANN201
    """From the next forward on, the layer's first pooled output gets a NaN gradient (returns the hook handle)."""

    def hook(module, inputs, out):  # noqa: ANN001, ANN202
        first = next(iter(out.pooled))
        out.pooled[first] = NaNGradient.apply(out.pooled[first])
        return out

    return layer.register_forward_hook(hook)


class PoisonAt(L.Callback):
    """Makes step ``step`` non-finite: a NaN input (``what="loss"``), an inf gradient of a dense weight
    (``"gradient"``) or a NaN gradient reaching the embedding lookups with a finite loss
    (``"embedding"``). With ``report``, writes whether that step left every weight unchanged."""

    def __init__(self, step: int, what: str = "loss", report: str | None = None) -> None:
        self.step, self.what, self.report = step, what, report
        self.before, self.hook = None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.step:
            self.before = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            if self.what == "loss":
                batch.dense[0, 0] = float("nan")
            if self.what == "embedding":
                self.hook = poison_embedding_gradient(pl_module.embedding)

    def on_after_backward(self, trainer, pl_module) -> None:  # noqa: ANN001
        if trainer.global_step == self.step and self.what == "gradient":
            next(p for p in pl_module.dnn.parameters() if p.grad is not None).grad[0] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        if self.before is not None and self.report:
            now = pl_module.state_dict()
            unchanged = all(torch.equal(now[k], v) for k, v in self.before.items())
            Path(self.report).write_text("unchanged" if unchanged else "changed")
            self.before = None


class SaveFinal(L.Callback):
    """Saves the weights at the end of training to ``path`` (to compare runs)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        trainer.save_checkpoint(self.path, weights_only=False)


class SaveManagedState(L.Callback):
    """Writes, when training starts (after any resume), each managed table's pending ids and interval
    phase to ``path`` as JSON: what a resumed run actually holds."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        import json

        from recsys.embedding.managed import _unpack

        out = {}
        for owner, module in pl_module.embedding.managed.items():
            state = module.get_extra_state()
            out[owner] = {
                "pending": sorted(_unpack(state["pending_ids"]).tolist()),
                "last_eviction_iter": state["last_eviction_iter"],
                "history": len(_unpack(state["history"]["ids"])),
            }
        Path(self.path).write_text(json.dumps(out))
