"""Losses against hand-computed values and gradients."""

import math

import pytest
import torch
from coral_pytorch.losses import corn_loss

from pap_severity import losses


def test_expected_score_of_uniform_and_one_hot():
    assert losses.expected_score(torch.full((1, 5), 0.2)).item() == pytest.approx(3.0)
    assert losses.expected_score(torch.eye(5)).tolist() == [1, 2, 3, 4, 5]


def test_cross_entropy_by_hand():
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0, 10.0]]))
    assert losses.cross_entropy(logits, torch.tensor([4])).item() == pytest.approx(math.log(2))
    assert losses.cross_entropy(torch.zeros(1, 5), torch.tensor([0])).item() == pytest.approx(math.log(5))


def test_weighted_cross_entropy_matches_torch_weight_argument():
    torch.manual_seed(0)
    logits, y = torch.randn(7, 5), torch.tensor([0, 1, 2, 3, 4, 0, 0])
    w = torch.tensor([0.5, 1.0, 2.0, 1.5, 3.0])
    expected = torch.nn.functional.cross_entropy(logits, y, weight=w)
    assert losses.cross_entropy(logits, y, w[y]).item() == pytest.approx(expected.item(), rel=1e-6)


def test_score_mse_value_and_gradient():
    score = torch.tensor([2.5, 5.0], requires_grad=True)
    loss = losses.score_mse(score, torch.tensor([1, 4]))  # true scores 2 and 5
    assert loss.item() == pytest.approx((0.25 + 0) / 2)
    loss.backward()
    assert score.grad.tolist() == pytest.approx([0.5, 0.0])  # 2 * 0.5 / 2


def test_combined_value_by_hand():
    # uniform p: CE = ln 5, expected score 3, true score 1 -> (1 - 3)^2 = 4
    loss = losses.combined(torch.zeros(1, 5), torch.tensor([0]), lam=0.5)
    assert loss.item() == pytest.approx(math.log(5) + 0.5 * 4)


def test_combined_gradient_by_hand():
    # dCE/dz = p - onehot = [-0.8, .2, .2, .2, .2]
    # dS/dz_j = p_j (j + 1 - S) = [-.4, -.2, 0, .2, .4]; d(1 - S)^2/dz = 2 (S - 1) dS/dz = 4 dS/dz
    z = torch.zeros(1, 5, requires_grad=True)
    losses.combined(z, torch.tensor([0]), lam=1.0).backward()
    assert z.grad[0].tolist() == pytest.approx([-2.4, -0.6, 0.2, 1.0, 1.8], abs=1e-6)


def test_combined_with_zero_lambda_is_cross_entropy():
    torch.manual_seed(1)
    logits, y = torch.randn(6, 5), torch.randint(0, 5, (6,))
    assert losses.combined(logits, y, lam=0.0).item() == pytest.approx(losses.cross_entropy(logits, y).item())


def test_sord_targets_and_loss_by_hand():
    q = losses.sord_targets(torch.tensor([2]), scale=1.0)[0]
    z = 1 + 2 * math.exp(-1) + 2 * math.exp(-4)
    assert q.tolist() == pytest.approx([math.exp(-4) / z, math.exp(-1) / z, 1 / z, math.exp(-1) / z, math.exp(-4) / z])
    # uniform prediction: -sum q log 0.2 = ln 5 whatever q is
    assert losses.sord(torch.zeros(1, 5), torch.tensor([2])).item() == pytest.approx(math.log(5))


def test_corn_by_hand_and_against_coral_pytorch():
    # y = 0: only task 0 sees the cell, label 0 -> BCE(0, 0) = ln 2
    assert losses.corn(torch.zeros(1, 4), torch.tensor([0])).item() == pytest.approx(math.log(2))
    torch.manual_seed(2)
    logits, y = torch.randn(9, 4), torch.tensor([0, 1, 2, 3, 4, 4, 2, 1, 0])
    assert losses.corn(logits, y).item() == pytest.approx(corn_loss(logits, y, num_classes=5).item(), rel=1e-6)
    assert losses.corn(logits, y, torch.full((9,), 3.0)).item() == pytest.approx(losses.corn(logits, y).item())


def test_sample_weights_take_a_weighted_mean():
    score = torch.tensor([2.0, 4.0])
    y = torch.tensor([0, 0])  # errors 1 and 9
    assert losses.score_mse(score, y, torch.tensor([3.0, 1.0])).item() == pytest.approx((3 * 1 + 9) / 4)


def test_balanced_class_weights():
    w = losses.balanced_class_weights(torch.tensor([0, 0, 0, 1]), num_classes=3)
    assert w.tolist() == pytest.approx([4 / (2 * 3), 4 / (2 * 1), 0.0])


def test_label_smoothing_by_hand():
    # uniform logits: CE = ln 5 whatever the smoothing; one-hot-ish logits by hand
    assert losses.cross_entropy(torch.zeros(1, 5), torch.tensor([0]), label_smoothing=0.3).item() == pytest.approx(
        math.log(5))
    logits = torch.log(torch.tensor([[0.6, 0.1, 0.1, 0.1, 0.1]]))
    eps = 0.25  # target: 0.8 on class 0, 0.05 elsewhere
    expected = -(0.8 * math.log(0.6) + 4 * 0.05 * math.log(0.1))
    assert losses.cross_entropy(logits, torch.tensor([0]), label_smoothing=eps).item() == pytest.approx(expected)
    # the combined loss smooths its CE term only
    score = sum((i + 1) * p for i, p in enumerate([0.6, 0.1, 0.1, 0.1, 0.1]))
    assert losses.combined(logits, torch.tensor([0]), lam=1.0, label_smoothing=eps).item() == pytest.approx(
        expected + (score - 1) ** 2)
