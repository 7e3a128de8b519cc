"""The fold ensemble as one module: k members, dihedral test-time augmentation, a temperature.

What a cytologist is served is the average of the k fold models of a pipeline, each shown the
cell in its 8 dihedral poses (cells have no orientation), with the averaged class probabilities
sharpened or softened by one temperature fitted on that very average (on cells no member trained
on; a temperature fitted on single members does not transfer to their average, which is already
softer). It returns ONE tensor, so MLflow's pt2 format, Captum and the server take it like any
model; its layout (`COLUMNS`) keeps the score last:

    [log p_1..log p_5 (calibrated), entropy, score_std, mutual_info, disagreement, score]

- probabilities: mean over members and poses of each member's class probabilities (its
  pipeline's `probs`), then softmax(log p / T);
- score: mean over members and poses of each member's score (the temperature does not touch it);
- entropy: of the calibrated probabilities, in nats (0 sure .. ln 5 uniform);
- score_std: sample standard deviation over members of their (pose-averaged) scores;
- mutual_info: H(mean p) - mean H(p_j) over members, uncalibrated (BALD's disagreement);
- disagreement: share of members whose class differs from the ensemble's.
With one member the last three are undefined: NaN, never 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pap_severity.losses import NUM_CLASSES
from pap_severity.pipelines import Pipeline, get_pipeline, score_to_label
from pap_severity.transforms import Preprocess

COLUMNS = (*(f"log_p{k}" for k in range(NUM_CLASSES)), "entropy", "score_std", "mutual_info", "disagreement",
           "score")
UNCERTAINTY = ("entropy", "score_std", "mutual_info", "disagreement")
TTA_MODES = ("dihedral8", "none")
_EPS = 1e-12


def dihedral_views(x: Tensor) -> Tensor:
    """[N, C, H, W] -> [8N, C, H, W]: the 4 rotations by 90 degrees of x, then of x mirrored.

    View v of cell i is row v * N + i, so `views.view(8, N, ...)` regroups them."""
    mirrored = torch.flip(x, dims=(-1,))
    return torch.cat([torch.rot90(image, k, dims=(-2, -1)) for image in (x, mirrored) for k in range(4)])


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy in nats along the last axis (0 log 0 = 0)."""
    return -(probs * torch.log(probs.clamp_min(_EPS))).sum(-1)


class FoldEnsemble(nn.Module):
    """k members of one pipeline, averaged over members and (optionally) dihedral poses."""

    def __init__(self, members: Sequence[nn.Module], pipeline: str, *, tta: str = "dihedral8",
                 temperature: float = 1.0) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member model")
        if tta not in TTA_MODES:
            raise ValueError(f"ensemble.tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"the temperature must be a positive number, got {temperature}")
        self.members = nn.ModuleList(members)
        self.pipeline_name = get_pipeline(pipeline).name
        self.tta = tta
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    @property
    def pipeline(self) -> Pipeline:
        return get_pipeline(self.pipeline_name)

    def member_outputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Each member's pose-averaged class probabilities [k, N, 5] and scores [k, N]."""
        n = x.shape[0]
        views = dihedral_views(x) if self.tta == "dihedral8" else x
        poses = views.shape[0] // n
        probs, scores = [], []
        for member in self.members:  # one batch of k x 8 views' worth per member: N * 8 cells
            out = member(views).float()
            probs.append(self.pipeline.probs(out).reshape(poses, n, NUM_CLASSES).mean(0))
            scores.append(out[:, -1].reshape(poses, n).mean(0))
        return torch.stack(probs), torch.stack(scores)

    def forward(self, x: Tensor) -> Tensor:
        member_probs, member_scores = self.member_outputs(x)
        k = member_probs.shape[0]
        mean = member_probs.mean(0)
        log_p = torch.log_softmax(torch.log(mean.clamp_min(_EPS)) / self.temperature, dim=-1)
        calibrated = log_p.exp()
        score = member_scores.mean(0)
        label = score_to_label(score) if self.pipeline.label_from_score else calibrated.argmax(-1)
        if k > 1:
            score_std = member_scores.std(0)
            mutual_info = entropy(mean) - entropy(member_probs).mean(0)
            member_labels = (score_to_label(member_scores) if self.pipeline.label_from_score
                             else member_probs.argmax(-1))
            disagreement = (member_labels != label[None]).float().mean(0)
        else:
            score_std = mutual_info = disagreement = torch.full_like(score, float("nan"))
        return torch.cat([log_p, entropy(calibrated)[:, None], score_std[:, None], mutual_info[:, None],
                          disagreement[:, None], score[:, None]], dim=1)


class Normalized(nn.Module):
    """A member with its own input normalisation inside: members trained on different channel
    statistics (each fold's training cells) then share one input, RGB scaled to [0, 1]."""

    def __init__(self, model: nn.Module, pre: Preprocess) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x - self.mean) / self.std)


def raw_input(image_size: int) -> Preprocess:
    """The ensemble's input: the cell squared and resized, RGB scaled to [0, 1], not normalised."""
    return Preprocess(image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def from_bundles(bundles: Sequence, *, tta: str = "dihedral8", temperature: float = 1.0
                 ) -> tuple[FoldEnsemble, Preprocess]:
    """The ensemble of trained bundles (checkpoints.ModelBundle) of one pipeline and image size,
    and the preprocessing of its input."""
    if not bundles:
        raise ValueError("an ensemble needs at least one member model")
    pipelines = {b.pipeline.name for b in bundles}
    sizes = {b.preprocess.image_size for b in bundles}
    if len(pipelines) != 1 or len(sizes) != 1:
        raise ValueError(f"ensemble members must share a pipeline and an image size, got {pipelines} and {sizes}")
    members = [Normalized(b.model, b.preprocess).eval() for b in bundles]
    model = FoldEnsemble(members, pipelines.pop(), tta=tta, temperature=temperature).eval()
    return model, raw_input(sizes.pop())


@dataclass(frozen=True)
class EnsemblePrediction:
    probs: Tensor  # [N, 5] calibrated
    label: Tensor  # [N] severity 0..4
    score: Tensor  # [N] score 1..5
    uncertainty: dict[str, Tensor]  # entropy, score_std, mutual_info, disagreement: [N] each


def decode(outputs: Tensor, pipeline: str | Pipeline) -> EnsemblePrediction:
    """Read a FoldEnsemble's output tensor; the class follows the members' pipeline
    (the regressor's class is its rounded score)."""
    pipeline = get_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
    outputs = outputs.detach().float()
    if outputs.shape[-1] != len(COLUMNS):
        raise ValueError(f"expected a fold ensemble's {len(COLUMNS)} output columns, got {outputs.shape[-1]}")
    probs = outputs[:, :NUM_CLASSES].exp()
    score = outputs[:, -1]
    label = score_to_label(score) if pipeline.label_from_score else probs.argmax(-1)
    uncertainty = {name: outputs[:, COLUMNS.index(name)] for name in UNCERTAINTY}
    return EnsemblePrediction(probs=probs, label=label, score=score, uncertainty=uncertainty)


def with_temperature(model: FoldEnsemble, temperature: float) -> FoldEnsemble:
    """The same members and poses with another temperature (members shared, not copied)."""
    return FoldEnsemble(list(model.members), model.pipeline_name, tta=model.tta, temperature=temperature)
