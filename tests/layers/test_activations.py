import torch

from recsys.embedding.regularization import inverse_counts, mba_penalty
from recsys.layers.activations import Dice


def test_dice_formula_with_batch_statistics_in_training() -> None:
    torch.manual_seed(0)
    dice = Dice(4).train()
    with torch.no_grad():
        dice.alpha.copy_(torch.tensor([0.0, 0.25, -0.5, 1.0]))
    x = torch.randn(64, 4) * 3 + 1
    mean, var = x.mean(0), x.var(0, unbiased=False)
    p = torch.sigmoid((x - mean) / torch.sqrt(var + 1e-8))
    expected = p * x + (1 - p) * dice.alpha * x
    assert torch.allclose(dice(x), expected, atol=1e-5)


def test_dice_uses_running_statistics_at_eval() -> None:
    torch.manual_seed(1)
    dice = Dice(3)
    for _ in range(200):  # running averages converge to the data's statistics
        dice(torch.randn(256, 3) * 2 + 5)
    dice.eval()
    x = torch.tensor([[5.0, 5.0, 5.0], [9.0, 1.0, 5.0]])
    p = torch.sigmoid((x - dice.norm.running_mean) / torch.sqrt(dice.norm.running_var + 1e-8))
    assert torch.allclose(dice(x), p * x + (1 - p) * dice.alpha * x)
    assert torch.allclose(dice.norm.running_mean, torch.full((3,), 5.0), atol=0.2)
    # at eval a row's output does not depend on the other rows of its batch
    assert torch.allclose(dice(x[:1]), dice(x)[:1])


def test_mba_gradient_equals_the_formula() -> None:
    weight = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], requires_grad=True)
    counts = torch.tensor([0, 4, 1, 10])
    ids = torch.tensor([1, 1, 2, 1])  # row 1 three times, row 2 once, rows 0 and 3 absent
    lam = 0.1
    penalty = mba_penalty(weight, ids, inverse_counts(counts), lam)
    assert penalty.item() == pytest_approx(lam * ((1 + 4) / 4 + (9 + 1) / 1))
    penalty.backward()
    expected = torch.zeros_like(weight)
    expected[1] = 2 * lam * weight[1].detach() / 4  # counted once per batch, however often it occurs
    expected[2] = 2 * lam * weight[2].detach() / 1
    assert torch.allclose(weight.grad, expected)


def pytest_approx(value: float):
    import pytest

    return pytest.approx(value)
