"""Integrated Gradients over a model bundle, and the nucleus / cytoplasm fractions of its maps.

The model is any `ModelBundle`-like object (`.model`, `.pipeline`, `.preprocess`) whose
model maps normalised inputs [N, 3, S, S] to ONE tensor `[logits..., score]` (a single
network, or a fold ensemble with the same output layout). Everything here is pure maths
on tensors and arrays: no files, no figures.

What is attributed (the IG *target*, `explain.target`):
- `score` (default, the paper's): the last output column, the severity score. For the
  classifiers it is the expected score sum_i (i+1) p_i (a fixed layer of the model), for
  the regressor its single output.
- `predicted`: the logit of the predicted class (classification, combined, sord). CORN
  has no per-class logit, so it uses log P(predicted class). The regressor has only the
  score: it falls back to `score` with a warning, and the report says so.

Baselines (`explain.baseline`), all in the model's normalised input space:
- `white`: a white image through the model's own Preprocess (`transforms.white_input`),
  the paper's default; NOT 1.0 after normalisation.
- `black`: a black image, normalised the same way.
- `blur`: a strongly Gaussian-blurred copy of each input (sigma = image_size / 8). Blurring
  is linear per channel, so blurring the normalised tensor equals normalising the blurred image.
- `noise`: one uniform-noise RGB image (seeded by `explain.seed`, same for every input, so
  an image's map does not depend on its batch), normalised.

Convergence (completeness) delta, per image: delta = sum(attributions) - (F(x) - F(baseline)),
exactly Captum's `compute_convergence_delta`. It is judged RELATIVE to the change it
explains: relative_delta = |delta| / max(|F(x) - F(baseline)|, DELTA_FLOOR). Images above
`explain.delta_threshold` raise a `ConvergenceWarning` suggesting more `n_steps`.

Attribution map per pixel: Am = sum over channels of the attributions (signed), and |Am|.

Fractions (`attribution_fractions`), the paper's definitions on signed Am and the same on |Am|:
    At_N = sum(Am over nucleus) / sum(Am over all pixels);  At_C likewise over cytoplasm;
    ratio = At_N / At_C = sum(Am over nucleus) / sum(Am over cytoplasm);
    area-normalised At_N = At_N / (nucleus pixels / all pixels), > 1 = more than its size.
Undefined values are NaN, never inf and never an exception: a region without pixels has
NaN fractions, a map whose total is exactly 0 has NaN At_N and At_C, a ratio whose
cytoplasm sum is 0 is NaN. A map and mask of different shapes, or a non-finite map, is a
ValueError. Aggregates are NaN-skipping means. Signed fractions are unstable when positive
and negative attributions nearly cancel (the total is small); `net_fraction` =
|sum Am| / sum |Am| says how much they cancel (1 = none).

The random floor applies the same maths to a seeded random permutation of the image's own
Am over its pixels: same values (and total), no spatial relation to the cell, so its
area-normalised fractions are ~1 in expectation.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import IntegratedGradients
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from pap_severity.checkpoints import ModelBundle
from pap_severity.config import ExplainConfig
from pap_severity.data.masks import CYTOPLASM, NUCLEUS
from pap_severity.devices import ComputeClock
from pap_severity.losses import NUM_CLASSES
from pap_severity.models import corn_probabilities
from pap_severity.progress import progress_bar
from pap_severity.transforms import Preprocess, white_input

BASELINES = ("white", "black", "blur", "noise")
TARGETS = ("score", "predicted")
# Denominator floor of the relative delta (output units), so F(x) ~ F(baseline) cannot blow it up.
DELTA_FLOOR = 1e-3
# Images per plain forward pass (F at inputs and baselines).
FORWARD_BATCH = 64
# Blur baseline: sigma as a fraction of the image side.
BLUR_SIGMA_FRACTION = 1 / 8

REGION_METRICS = ("at_n", "at_c", "at_ratio", "at_n_norm", "at_c_norm")
SIGNED_METRICS = REGION_METRICS
ABS_METRICS = tuple(f"abs_{m}" for m in REGION_METRICS)
FRACTION_KEYS = ("nucleus_share", "cytoplasm_share", *SIGNED_METRICS, *ABS_METRICS, "net_fraction")
RANDOM_KEYS = tuple(f"rand_{m}" for m in (*SIGNED_METRICS, *ABS_METRICS))


class ConvergenceWarning(UserWarning):
    """IG's completeness delta is large relative to F(x) - F(baseline): more steps are needed."""


# --------------------------------------------------------------------------------------
# Baselines and targets
# --------------------------------------------------------------------------------------


def _normalised(rgb01: Tensor, pre: Preprocess) -> Tensor:
    mean = torch.tensor(pre.mean, dtype=rgb01.dtype).view(3, 1, 1)
    std = torch.tensor(pre.std, dtype=rgb01.dtype).view(3, 1, 1)
    return (rgb01 - mean) / std


def make_baseline(name: str, images: Tensor, pre: Preprocess, seed: int = 0) -> Tensor:
    """The IG baseline for each image of `images` [N, 3, S, S] (normalised), same shape and device."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
    n, _, h, w = images.shape
    if name == "white":
        if (h, w) != (pre.image_size, pre.image_size):
            raise ValueError(f"images are {h}x{w} but the model's preprocessing makes {pre.image_size} px")
        base = white_input(pre)
    elif name == "black":
        base = _normalised(torch.zeros(3, h, w), pre)
    elif name == "noise":
        gen = torch.Generator().manual_seed(int(seed))
        base = _normalised(torch.rand(3, h, w, generator=gen), pre)
    elif name == "blur":
        sigma = max(BLUR_SIGMA_FRACTION * max(h, w), 0.5)
        k = 2 * math.ceil(3 * sigma) + 1
        k = min(k, 2 * min(h, w) - 1)  # reflect padding needs pad < side
        k = k if k % 2 == 1 else k - 1
        return TF.gaussian_blur(images.detach(), kernel_size=[k, k], sigma=[sigma, sigma])
    else:
        raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    return base.to(images.device, images.dtype).expand(n, -1, -1, -1).contiguous()


def _corn_log_probs(outputs: Tensor) -> Tensor:
    return torch.log(corn_probabilities(outputs[:, : NUM_CLASSES - 1]).clamp_min(1e-12))


class _CornLogProbs(nn.Module):
    """log P(class) of a CORN model: the per-class quantity CORN has instead of logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return _corn_log_probs(self.model(x))


def _target_values(mode: str, outputs: Tensor) -> Tensor:
    """The forward function's output, computed from the model's outputs."""
    return _corn_log_probs(outputs) if mode == "corn" else outputs


def _batched_forward(model: nn.Module, x: Tensor) -> Tensor:
    """model(x) in batches of FORWARD_BATCH, float32 on the CPU."""
    return torch.cat([model(x[i : i + FORWARD_BATCH]).float().cpu() for i in range(0, len(x), FORWARD_BATCH)])


def _resolve_target(bundle: ModelBundle, target: str) -> tuple[str, nn.Module, str]:
    """(mode, forward function, description) of the IG target; mode is 'score', 'logit' or 'corn'."""
    if target not in TARGETS:
        raise ValueError(f"unknown IG target {target!r}; choose from {', '.join(TARGETS)}")
    if target == "predicted" and bundle.pipeline.label_from_score:
        warnings.warn(
            f"explain.target=predicted: the {bundle.pipeline.name} model has no class logits, only the "
            "score; attributing the score instead",
            UserWarning,
            stacklevel=3,
        )
        target = "score"
    if target == "score":
        return "score", bundle.model, "score (last output column)"
    if bundle.pipeline.log_probs:
        return "logit", bundle.model, "log-probability of the predicted class"
    if bundle.pipeline.name == "corn":
        return "corn", _CornLogProbs(bundle.model), "log P(predicted class) (CORN has no class logits)"
    return "logit", bundle.model, "logit of the predicted class"


def _target_columns(bundle: ModelBundle, mode: str, outputs: Tensor) -> Tensor:
    """Per-image column of the forward function's output that IG attributes."""
    if mode == "score":
        return torch.full((outputs.shape[0],), outputs.shape[1] - 1, dtype=torch.long)
    return bundle.pipeline.decode(outputs).label.cpu()


@contextmanager
def _inputs_only_gradients(model: nn.Module):
    """No parameter gradients while attributing (only d output / d input is needed); restores flags."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)


# --------------------------------------------------------------------------------------
# Integrated Gradients
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IGResult:
    """Everything one IG run gives, per image (CPU tensors)."""

    attributions: Tensor  # [N, 3, S, S]
    delta: Tensor  # [N] sum(attr) - (F(x) - F(baseline))
    relative_delta: Tensor  # [N] |delta| / max(|F(x) - F(baseline)|, DELTA_FLOOR)
    target_value: Tensor  # [N] F(x)
    baseline_value: Tensor  # [N] F(baseline)
    outputs: Tensor  # [N, C] the model's outputs on the inputs
    target: str  # what F is, in words
    baseline: str


def images_per_call(cfg: ExplainConfig) -> int:
    """Images attributed together: as many as fit internal_batch_size interpolation points."""
    return max(1, cfg.internal_batch_size // cfg.n_steps)


def integrated_gradients(
    bundle: ModelBundle,
    images: Tensor,
    cfg: ExplainConfig,
    baseline: str | None = None,
    target: str | None = None,
    progress: bool = False,
) -> IGResult:
    """IG attributions of `images` [N, 3, S, S] (normalised model inputs) with per-image deltas.

    Images go through Captum `images_per_call(cfg)` at a time, so each forward/backward
    pass holds about `internal_batch_size` interpolated inputs. Warns (ConvergenceWarning)
    when some relative delta exceeds `cfg.delta_threshold`.
    """
    baseline = baseline or cfg.baseline
    target = target or cfg.target
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [N, 3, H, W] batch, got {tuple(images.shape)}")
    model = bundle.model
    device = next(model.parameters()).device
    x_all = images.detach().to(device, torch.float32)
    b_all = make_baseline(baseline, x_all, bundle.preprocess, cfg.seed)
    per_call = images_per_call(cfg)
    mode, forward, target_text = _resolve_target(bundle, target)
    attrs = []
    clock = ComputeClock(device, "attribution")
    with _inputs_only_gradients(model):
        with torch.no_grad(), clock("forward"):  # F at the inputs and baselines, in batches of FORWARD_BATCH
            outputs = _batched_forward(model, x_all)
            base_outputs = _batched_forward(model, b_all)
        columns = _target_columns(bundle, mode, outputs)
        rows = torch.arange(len(columns))
        fx = _target_values(mode, outputs)[rows, columns]
        fb = _target_values(mode, base_outputs)[rows, columns]
        ig = IntegratedGradients(forward)
        starts = range(0, x_all.shape[0], per_call)
        for start in progress_bar(starts, progress=progress, desc=f"IG ({baseline})", unit="call"):
            x = x_all[start : start + per_call]
            with clock("attribution"):  # IG's forward and backward passes
                attr = ig.attribute(
                    x,
                    baselines=b_all[start : start + per_call],
                    target=columns[start : start + per_call].to(device),
                    n_steps=cfg.n_steps,
                    method=cfg.method,
                    internal_batch_size=max(cfg.internal_batch_size, x.shape[0]),
                )
            attrs.append(attr.detach().float().cpu())
    clock.write()
    attributions = torch.cat(attrs)
    delta = attributions.sum(dim=(1, 2, 3)) - (fx - fb)
    relative = delta.abs() / (fx - fb).abs().clamp_min(DELTA_FLOOR)
    message = convergence_message(relative, cfg)
    if message:
        warnings.warn(message, ConvergenceWarning, stacklevel=2)
    return IGResult(
        attributions=attributions,
        delta=delta,
        relative_delta=relative,
        target_value=fx,
        baseline_value=fb,
        outputs=outputs,
        target=target_text,
        baseline=baseline,
    )


def convergence_message(relative_delta: Tensor, cfg: ExplainConfig) -> str | None:
    """The ConvergenceWarning text when some relative delta exceeds cfg.delta_threshold, else None."""
    over = int((relative_delta > cfg.delta_threshold).sum())
    if not over:
        return None
    return (
        f"{over} of {len(relative_delta)} images have a convergence delta above {cfg.delta_threshold:g} of "
        f"|F(x) - F(baseline)| (max {float(relative_delta.max()):.3g}); the attributions do not add up to the "
        f"output change: raise explain.n_steps (now {cfg.n_steps})"
        + ("" if cfg.method == "gausslegendre" else " or use method gausslegendre")
    )


def attribute(
    bundle: ModelBundle,
    images: Tensor,
    cfg: ExplainConfig,
    baseline: str | None = None,
    target: str | None = None,
) -> tuple[Tensor, Tensor]:
    """IG attributions [N, 3, S, S] and convergence deltas [N] (see `integrated_gradients`)."""
    result = integrated_gradients(bundle, images, cfg, baseline=baseline, target=target)
    return result.attributions, result.delta


def attribution_map(attributions: Tensor | np.ndarray) -> np.ndarray:
    """Am: attributions summed over channels, [N, 3, H, W] -> [N, H, W] (or [3, H, W] -> [H, W])."""
    a = attributions.detach().cpu().numpy() if isinstance(attributions, Tensor) else np.asarray(attributions)
    if a.ndim not in (3, 4):
        raise ValueError(f"attributions must be [3, H, W] or [N, 3, H, W], got shape {a.shape}")
    return a.sum(axis=-3).astype(np.float64)


# --------------------------------------------------------------------------------------
# The maths of At_N / At_C
# --------------------------------------------------------------------------------------


def _div(num: float, den: float) -> float:
    """num / den, NaN when den is 0 or either is NaN (never inf)."""
    if den == 0 or math.isnan(num) or math.isnan(den):
        return math.nan
    return float(num / den)


def attribution_fractions(am: np.ndarray, codes: np.ndarray) -> dict[str, float]:
    """At_N, At_C, their ratio and area-normalised versions, on signed Am and on |Am|.

    am: [H, W] attribution map; codes: [H, W] region codes (`data.masks`). Keys:
    nucleus_share, cytoplasm_share (region pixels / all pixels); at_n, at_c, at_ratio,
    at_n_norm, at_c_norm (signed); the same prefixed abs_ (on |Am|); net_fraction.
    Undefined values are NaN (see the module docstring); shape mismatch or non-finite
    values raise ValueError.
    """
    am = np.asarray(am, dtype=np.float64)
    codes = np.asarray(codes)
    if am.ndim != 2 or am.shape != codes.shape:
        raise ValueError(f"attribution map {am.shape} and mask {codes.shape} must be the same 2-D shape")
    if am.size == 0:
        raise ValueError("an empty attribution map has no fractions")
    if not np.isfinite(am).all():
        raise ValueError("the attribution map holds NaN or inf values")
    nucleus, cytoplasm = codes == NUCLEUS, codes == CYTOPLASM
    share_n, share_c = float(nucleus.mean()), float(cytoplasm.mean())
    out: dict[str, float] = {"nucleus_share": share_n, "cytoplasm_share": share_c}
    for prefix, values in (("", am), ("abs_", np.abs(am))):
        total = float(values.sum())
        sum_n = float(values[nucleus].sum()) if nucleus.any() else math.nan
        sum_c = float(values[cytoplasm].sum()) if cytoplasm.any() else math.nan
        at_n, at_c = _div(sum_n, total), _div(sum_c, total)
        out[f"{prefix}at_n"] = at_n
        out[f"{prefix}at_c"] = at_c
        out[f"{prefix}at_ratio"] = _div(sum_n, sum_c)
        out[f"{prefix}at_n_norm"] = _div(at_n, share_n)
        out[f"{prefix}at_c_norm"] = _div(at_c, share_c)
    out["net_fraction"] = _div(abs(float(am.sum())), float(np.abs(am).sum()))
    return out


def random_attribution(am: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The floor's map: the same values as `am`, randomly permuted over the pixels."""
    am = np.asarray(am)
    return rng.permutation(am.ravel()).reshape(am.shape)


def random_floor(am: np.ndarray, codes: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
    """`attribution_fractions` of a random permutation of am, keys prefixed `rand_` (shares left out)."""
    fractions = attribution_fractions(random_attribution(am, rng), codes)
    return {f"rand_{k}": fractions[k] for k in (*SIGNED_METRICS, *ABS_METRICS)}
