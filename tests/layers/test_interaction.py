"""Interactions against plain references (pairwise loops, the papers' formulas), forward and backward."""

from __future__ import annotations

import pytest
import torch

from recsys.layers.interaction import (
    BilinearFusion,
    FeatureGating,
    FieldProjection,
    cross_network,
    dot_interaction,
    fm_interaction,
)


def _same_forward_and_backward(fn, reference, *inputs: torch.Tensor, params: list | None = None) -> None:  # noqa: ANN001
    """``fn`` and ``reference`` agree on outputs and on the gradients of the inputs and ``params``."""
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    twins = [x.clone().requires_grad_(True) for x in inputs]
    out, expected = fn(*leaves), reference(*twins)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    probe = torch.randn_like(out)
    grads = torch.autograd.grad((out * probe).sum(), leaves + (params or []))
    expected_grads = torch.autograd.grad((expected * probe).sum(), twins + (params or []))
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_fm_is_the_sum_over_pairs_of_fields() -> None:
    torch.manual_seed(0)
    vectors = torch.randn(4, 6, 8, dtype=torch.float64)

    def pairs(v: torch.Tensor) -> torch.Tensor:
        return torch.stack([sum(v[b, i] @ v[b, j] for i in range(6) for j in range(i + 1, 6)) for b in range(4)])

    _same_forward_and_backward(fm_interaction, pairs, vectors)


def test_dot_interaction_lists_every_pair_in_row_major_order() -> None:
    torch.manual_seed(0)
    vectors = torch.randn(3, 5, 4, dtype=torch.float64)

    def pairs(v: torch.Tensor) -> torch.Tensor:
        return torch.stack(
            [torch.stack([v[b, i] @ v[b, j] for i in range(5) for j in range(i + 1, 5)]) for b in range(3)]
        )

    _same_forward_and_backward(dot_interaction, pairs, vectors)
    assert dot_interaction(vectors).shape == (3, 10)


def test_cross_layers_follow_the_dcn_v2_formula() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 7, dtype=torch.float64)
    full = cross_network(7, 2).double()
    for bias in full.bias:
        torch.nn.init.normal_(bias)

    def reference(x0: torch.Tensor) -> torch.Tensor:  # x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l, row by row
        rows = []
        for b in range(x0.shape[0]):
            xl = x0[b]
            for w, bias in zip(full.kernels, full.bias, strict=True):
                xl = x0[b] * (w @ xl + bias[:, 0]) + xl
            rows.append(xl)
        return torch.stack(rows)

    _same_forward_and_backward(full, reference, x, params=list(full.parameters()))
    mix = cross_network(7, 2, low_rank=3, num_experts=2).double()

    def mixture(
        x0: torch.Tensor,
    ) -> torch.Tensor:  # DCN-Mix: Σ_i softmax(G(x_l))_i · x_0 ⊙ (U_i g(C_i g(V_i x_l)) + b) + x_l
        rows = []
        for b in range(x0.shape[0]):
            xl = x0[b]
            for layer in range(2):
                gates = torch.softmax(torch.stack([g.weight[0] @ xl for g in mix.gates]), 0)
                experts = [
                    x0[b]
                    * (
                        mix.U_kernels[layer][i]
                        @ torch.relu(mix.C_kernels[layer][i] @ torch.relu(mix.V_kernels[layer][i] @ xl))
                        + mix.bias[layer][:, 0]
                    )
                    for i in range(2)
                ]
                xl = sum(gates[i] * experts[i] for i in range(2)) + xl
            rows.append(xl)
        return torch.stack(rows)

    _same_forward_and_backward(mix, mixture, x, params=list(mix.parameters()))


def test_feature_gating_reweights_each_input_by_twice_a_sigmoid_of_the_context() -> None:
    torch.manual_seed(0)
    gate = FeatureGating(5, 3, [4]).double()
    x, context = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    first, second = gate.gate.layers[0], gate.gate.layers[2]

    def reference(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(c @ first.weight.T + first.bias)
        return x * 2 * torch.sigmoid(hidden @ second.weight.T + second.bias)

    _same_forward_and_backward(gate, reference, x, context, params=list(gate.parameters()))
    no_context = FeatureGating(5, 0, [4]).double()
    out = no_context(x)  # a learned vector: the same gate for every row
    torch.testing.assert_close(out[0] / x[0], out[1] / x[1])


@pytest.mark.parametrize("heads", [1, 2])
def test_bilinear_fusion_sums_the_heads_terms(heads: int) -> None:
    torch.manual_seed(0)
    fusion = BilinearFusion(4, 6, heads).double()
    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)

    def reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = []
        for r in range(3):
            value = fusion.linear_a.weight[0] @ a[r] + fusion.linear_a.bias[0] + fusion.linear_b.weight[0] @ b[r]
            for h in range(heads):
                ah, bh = a[r].view(heads, -1)[h], b[r].view(heads, -1)[h]
                value = value + ah @ fusion.bilinear[h] @ bh
            out.append(value)
        return torch.stack(out)

    _same_forward_and_backward(fusion, reference, a, b, params=list(fusion.parameters()))
    with pytest.raises(ValueError, match="must divide both stream widths"):
        BilinearFusion(4, 6, 4)


def test_field_projection_maps_only_fields_of_another_width() -> None:
    project = FieldProjection({"a": 4, "b": 8}, 4)
    fields = {"a": torch.randn(2, 4), "b": torch.randn(2, 8)}
    out = project(fields)
    assert out.shape == (2, 2, 4) and set(project.project) == {"b"}
    torch.testing.assert_close(out[:, 0], fields["a"])
    torch.testing.assert_close(out[:, 1], fields["b"] @ project.project["b"].weight.T)
