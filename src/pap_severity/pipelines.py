"""The pipeline table: name -> head, loss, and how to read class and score from the output.

Adding a pipeline is one row. Every model output is `[logits..., score]`, so the
score is always the last column. How the class is read:
- classifiers (classification, combined, sord, corn): class = argmax of the class
  probabilities; score = expected score sum_i (i+1) p_i.
- regression: class = nearest integer of the score clipped to 1..5, minus one;
  its "probabilities" (used only to rank cells for AUC) are a Gaussian kernel of
  width 0.5 around the score, not calibrated probabilities.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from pap_severity import losses
from pap_severity.config import LAMBDA_PIPELINES, LossConfig, check_pipeline
from pap_severity.losses import NUM_CLASSES
from pap_severity.models import ClassifierHead, CornHead, RegressionHead, corn_probabilities

REGRESSION_KERNEL_WIDTH = 0.5


@dataclass(frozen=True)
class Prediction:
    probs: Tensor  # [N, 5]
    label: Tensor  # [N] severity 0..4
    score: Tensor  # [N] score 1..5


LossFn = Callable[[Tensor, Tensor, LossConfig, Tensor | None], Tensor]


@dataclass(frozen=True)
class Pipeline:
    name: str
    head: type[nn.Module]
    loss: LossFn  # (outputs, target, loss config, sample weight) -> scalar
    probs: Callable[[Tensor], Tensor]  # outputs -> [N, 5]
    label_from_score: bool = False  # regression reads its class from the score
    log_probs: bool = False  # the first outputs are class log-probabilities (a fold ensemble's), not the head's

    @property
    def uses_lambda(self) -> bool:
        """The loss has the weight loss.lambda, which tuning explores (config.LAMBDA_PIPELINES)."""
        return self.name in LAMBDA_PIPELINES

    def decode(self, outputs: Tensor) -> Prediction:
        outputs = outputs.detach().float()
        probs = self.probs(outputs)
        score = outputs[:, -1]
        if self.label_from_score:
            label = score_to_label(score)
        else:
            label = probs.argmax(dim=1)
        return Prediction(probs=probs, label=label, score=score)


def score_to_label(score: Tensor) -> Tensor:
    """Nearest severity of a score: round(clip(score, 1, 5)) - 1."""
    return torch.round(score.clamp(1, NUM_CLASSES)).long() - 1


def _softmax_probs(outputs: Tensor) -> Tensor:
    return torch.softmax(outputs[:, :NUM_CLASSES], dim=1)


def _kernel_probs(outputs: Tensor) -> Tensor:
    levels = torch.arange(1, NUM_CLASSES + 1, dtype=outputs.dtype, device=outputs.device)
    return torch.softmax(-((outputs[:, -1:] - levels) ** 2) / (2 * REGRESSION_KERNEL_WIDTH**2), dim=1)


def _corn_probs(outputs: Tensor) -> Tensor:
    return corn_probabilities(outputs[:, : NUM_CLASSES - 1])


PIPELINES: dict[str, Pipeline] = {
    p.name: p
    for p in (
        Pipeline(
            "classification",
            ClassifierHead,
            lambda out, y, cfg, w: losses.cross_entropy(out[:, :NUM_CLASSES], y, w, cfg.label_smoothing),
            _softmax_probs,
        ),
        Pipeline(
            "regression",
            RegressionHead,
            lambda out, y, cfg, w: losses.score_mse(out[:, -1], y, w),
            _kernel_probs,
            label_from_score=True,
        ),
        Pipeline(
            "combined",
            ClassifierHead,
            lambda out, y, cfg, w: losses.combined(out[:, :NUM_CLASSES], y, cfg.lambda_, w, cfg.label_smoothing),
            _softmax_probs,
        ),
        Pipeline(
            "corn",
            CornHead,
            lambda out, y, cfg, w: losses.corn(out[:, : NUM_CLASSES - 1], y, w),
            _corn_probs,
        ),
        Pipeline(
            "sord",
            ClassifierHead,
            lambda out, y, cfg, w: losses.sord(out[:, :NUM_CLASSES], y, cfg.sord_scale, w),
            _softmax_probs,
        ),
    )
}


def served(pipeline: Pipeline) -> Pipeline:
    """How to read a fold ensemble of this pipeline (ensemble.COLUMNS): whatever the members' head,
    its first five columns are class log-probabilities and its last the score."""
    return dataclasses.replace(pipeline, probs=_softmax_probs, log_probs=True)


def get_pipeline(name: str) -> Pipeline:
    return PIPELINES[check_pipeline(name)]
