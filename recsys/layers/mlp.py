"""Multi-layer perceptron, the dense tower of every model."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from recsys.layers.activations import make_activation


class MLP(nn.Module):
    """``[B, in_features] -> [B, hidden_units[-1]]`` (or ``[B, out_features]`` when given).

    Each hidden layer: Linear -> (BatchNorm) -> activation -> (Dropout).

    Example::

        mlp = MLP(64, [200, 80], out_features=1)
        logits = mlp(torch.randn(32, 64)).squeeze(-1)    # [32]
    """

    def __init__(
        self,
        in_features: int,
        hidden_units: Sequence[int],
        out_features: int | None = None,
        activation: str = "relu",  # relu, prelu, dice, gelu, sigmoid, tanh
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        make_activation(activation, 1)  # fail early on an unknown name
        layers: list[nn.Module] = []
        width = in_features
        for units in hidden_units:
            layers.append(nn.Linear(width, units))
            if batch_norm:
                layers.append(nn.BatchNorm1d(units))
            layers.append(make_activation(activation, units))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = units
        if out_features is not None:
            layers.append(nn.Linear(width, out_features))
            width = out_features
        self.layers = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
