"""Pure loss functions, one per pipeline, on severity targets 0..4 (score = severity + 1).

Each takes an optional per-sample weight (for class balancing); the loss is then
the weighted mean sum(w_i * l_i) / sum(w_i), which for cross-entropy equals
PyTorch's `weight=` argument.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NUM_CLASSES = 5


def _weighted_mean(per_sample: Tensor, sample_weight: Tensor | None) -> Tensor:
    if sample_weight is None:
        return per_sample.mean()
    return (per_sample * sample_weight).sum() / sample_weight.sum()


def expected_score(probs: Tensor) -> Tensor:
    """sum_i (i+1) p_i: the score 1..5 a probability vector implies."""
    levels = torch.arange(1, probs.shape[-1] + 1, dtype=probs.dtype, device=probs.device)
    return probs @ levels


def cross_entropy(logits: Tensor, target: Tensor, sample_weight: Tensor | None = None,
                  label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy against the one-hot target, smoothed towards uniform by `label_smoothing`."""
    per_sample = F.cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing)
    return _weighted_mean(per_sample, sample_weight)


def score_mse(score: Tensor, target: Tensor, sample_weight: Tensor | None = None) -> Tensor:
    """Squared error between a predicted score and the true score (target + 1)."""
    return _weighted_mean((score - (target + 1).to(score.dtype)) ** 2, sample_weight)


def combined(logits: Tensor, target: Tensor, lam: float = 1.0, sample_weight: Tensor | None = None,
             label_smoothing: float = 0.0) -> Tensor:
    """The paper's regression constraint: CE(p, y) + lambda * (y_score - sum_i (i+1) p_i)^2.

    `label_smoothing` smooths the CE term only; the score term keeps the true score."""
    score = expected_score(F.softmax(logits, dim=-1))
    ce = F.cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing)
    per_sample = ce + lam * (score - (target + 1).to(score.dtype)) ** 2
    return _weighted_mean(per_sample, sample_weight)


def sord_targets(target: Tensor, num_classes: int = NUM_CLASSES, scale: float = 1.0) -> Tensor:
    """SORD soft labels (Diaz & Marathe 2019): q_k proportional to exp(-scale * (k - y)^2)."""
    k = torch.arange(num_classes, device=target.device, dtype=torch.float32)
    return F.softmax(-scale * (k[None, :] - target[:, None].float()) ** 2, dim=-1)


def sord(logits: Tensor, target: Tensor, scale: float = 1.0, sample_weight: Tensor | None = None) -> Tensor:
    """Cross-entropy against SORD soft labels."""
    q = sord_targets(target, logits.shape[-1], scale).to(logits.dtype)
    return _weighted_mean(-(q * F.log_softmax(logits, dim=-1)).sum(-1), sample_weight)


def corn(logits: Tensor, target: Tensor, sample_weight: Tensor | None = None) -> Tensor:
    """CORN (Shi, Cao & Raschka 2021): task k predicts P(y > k | y > k-1) on the cells with y > k-1.

    Unweighted it equals `coral_pytorch.losses.corn_loss` (tested); the per-sample form
    lets class weights apply too.
    """
    tasks = torch.arange(logits.shape[-1], device=logits.device)
    eligible = (target[:, None] > tasks[None, :] - 1).to(logits.dtype)
    label = (target[:, None] > tasks[None, :]).to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, label, reduction="none") * eligible
    w = torch.ones_like(target, dtype=logits.dtype) if sample_weight is None else sample_weight.to(logits.dtype)
    return (bce.sum(-1) * w).sum() / (eligible.sum(-1) * w).sum()


def balanced_class_weights(targets: Tensor, num_classes: int = NUM_CLASSES) -> Tensor:
    """n / (K * n_c) per class, as scikit-learn's `class_weight='balanced'`; absent classes get 0."""
    counts = torch.bincount(targets, minlength=num_classes).float()
    weights = torch.zeros(num_classes)
    present = counts > 0
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights
