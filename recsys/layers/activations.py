"""Dice (DIN paper, eq. 9), PReLU, and the activation lookup the towers use.

Dice:  f(s) = p(s)·s + (1 − p(s))·α·s,   p(s) = sigmoid((s − E[s]) / sqrt(Var[s] + ε))

E[s] and Var[s] are the mini-batch's statistics per unit in training and running averages at
evaluation (a ``BatchNorm1d`` without affine parameters computes exactly that); α is learned per unit.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Dice(nn.Module):
    """Data-adaptive PReLU. Input ``[N, num_features]``.

    Example::

        dice = Dice(80)
        y = dice(torch.randn(32, 80))     # [32, 80]
    """

    def __init__(self, num_features: int, eps: float = 1e-8, momentum: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(num_features, eps=eps, momentum=momentum, affine=False)
        self.alpha = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] < 2:
            # one row has no variance; use the running statistics rather than fail
            p = torch.sigmoid(
                nn.functional.batch_norm(x, self.norm.running_mean, self.norm.running_var, eps=self.norm.eps)
            )
        else:
            p = torch.sigmoid(self.norm(x))
        # p·x + (1 − p)·α·x = x·(α + p·(1 − α)): one pass fewer over [N, H] in forward and backward
        return x * (self.alpha + p * (1 - self.alpha))


def make_activation(name: str, num_features: int) -> nn.Module:
    """``relu``, ``prelu`` (one slope per unit), ``dice``, ``gelu``, ``sigmoid``, ``tanh``."""
    if name == "dice":
        return Dice(num_features)
    if name == "prelu":
        return nn.PReLU(num_features)
    simple = {"relu": nn.ReLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
    if name not in simple:
        raise ValueError(f"activation must be one of {sorted([*simple, 'dice', 'prelu'])}, got {name!r}")
    return simple[name]()
