"""Integrated Gradients over a model bundle, nucleus/cytoplasm attribution fractions, sanity check, report.

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

Sanity check (Adebayo et al. 2018, cascading randomisation): the model's layers are
re-initialised from the top down (head, layer4, layer3, layer2, layer1, stem), each step
on top of the previous ones (PyTorch's default initialisation; BatchNorm gets fresh running
statistics and random affine parameters; the fixed expected-score layer stays); after each step attributions are recomputed and compared with
the trained model's by the Spearman rank correlation of |Am|, averaged over a few images.
Low correlations mean the maps depend on what the model learned; high ones mean they mostly
reflect the input itself. The report states the values as they are.
"""

from __future__ import annotations

import base64
import copy
import html
import io
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from captum.attr import IntegratedGradients
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image
from scipy.stats import spearmanr
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from pap_severity.checkpoints import ModelBundle
from pap_severity.config import ExplainConfig
from pap_severity.data.labels import NUM_SEVERITIES, SEVERITY_NAMES
from pap_severity.data.manifest import open_image
from pap_severity.data.masks import BACKGROUND, CYTOPLASM, NUCLEUS, encode_mask, read_mask
from pap_severity.files import json_ready, write_json
from pap_severity.losses import NUM_CLASSES
from pap_severity.models import ExpectedScore, SeverityNet, corn_probabilities
from pap_severity.transforms import Preprocess, eval_transform, square_resize, white_input

BASELINES = ("white", "black", "blur", "noise")
TARGETS = ("score", "predicted")
# Denominator floor of the relative delta (output units), so F(x) ~ F(baseline) cannot blow it up.
DELTA_FLOOR = 1e-3
# Images used by the sanity check (spread over the classes).
SANITY_IMAGES = 8
# Images per plain forward pass (F at inputs and baselines).
FORWARD_BATCH = 64
# Blur baseline: sigma as a fraction of the image side.
BLUR_SIGMA_FRACTION = 1 / 8

REGION_METRICS = ("at_n", "at_c", "at_ratio", "at_n_norm", "at_c_norm")
SIGNED_METRICS = REGION_METRICS
ABS_METRICS = tuple(f"abs_{m}" for m in REGION_METRICS)
FRACTION_KEYS = ("nucleus_share", "cytoplasm_share", *SIGNED_METRICS, *ABS_METRICS, "net_fraction")
RANDOM_KEYS = tuple(f"rand_{m}" for m in (*SIGNED_METRICS, *ABS_METRICS))
CSV_COLUMNS = (
    "path",
    "class_name",
    "severity",
    "predicted",
    "score",
    "target_value",
    "baseline_value",
    "delta",
    "relative_delta",
    *FRACTION_KEYS,
    *RANDOM_KEYS,
)
# Columns of the per-class table: (column, header).
TABLE_COLUMNS = (
    ("n", "cells"),
    ("at_n", "At_N"),
    ("at_c", "At_C"),
    ("at_ratio", "At_N/At_C"),
    ("abs_at_n", "|At_N|"),
    ("abs_at_c", "|At_C|"),
    ("abs_at_ratio", "|At_N|/|At_C|"),
    ("at_n_norm", "At_N/area"),
    ("at_c_norm", "At_C/area"),
    ("abs_at_n_norm", "|At_N|/area"),
    ("abs_at_c_norm", "|At_C|/area"),
    ("nucleus_share", "nucleus area"),
    ("cytoplasm_share", "cytoplasm area"),
    ("rand_abs_at_n", "random |At_N|"),
    ("rand_abs_at_c", "random |At_C|"),
    ("rand_abs_at_n_norm", "random |At_N|/area"),
    ("rand_abs_at_c_norm", "random |At_C|/area"),
    ("net_fraction", "net/abs"),
)
DATA_SOURCE_TEXT = {
    "herlev": "Herlev Pap smear cells (real data)",
    "synthetic": "SYNTHETIC cells: these numbers say nothing about real cells",
}


class ConvergenceWarning(UserWarning):
    """IG's completeness delta is large relative to F(x) - F(baseline): more steps are needed."""


# --------------------------------------------------------------------------------------
# Images and masks in the model's geometry
# --------------------------------------------------------------------------------------


def square_resize_mask(codes: np.ndarray, size: int) -> np.ndarray:
    """Region codes through the geometry of `transforms.square_resize`.

    Centred on a square canvas exactly as `pad_to_square` places the image (the padding
    is BACKGROUND), then resized to size x size with NEAREST, so codes stay codes.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.size == 0:
        raise ValueError(f"a mask must be a non-empty (H, W) array of region codes, got shape {codes.shape}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    codes = codes.astype(np.uint8)
    h, w = codes.shape
    side = max(h, w)
    if h != w:
        canvas = np.full((side, side), BACKGROUND, dtype=np.uint8)
        top, left = (side - h) // 2, (side - w) // 2
        canvas[top : top + h, left : left + w] = codes
        codes = canvas
    if side == size:
        return codes.copy()
    return np.asarray(Image.fromarray(codes, mode="L").resize((size, size), Image.Resampling.NEAREST)).copy()


@dataclass(frozen=True)
class Cell:
    """One cell as the model sees it: input tensor, the square RGB image, the aligned mask."""

    input: Tensor  # [3, S, S] normalised
    rgb: np.ndarray  # [S, S, 3] uint8, after square_resize
    codes: np.ndarray | None  # [S, S] region codes, or None without a mask


def prepare_image(image: Image.Image, pre: Preprocess, mask_codes: np.ndarray | None = None) -> Cell:
    """A PIL image (and its mask's region codes, same size) in the model's geometry."""
    if mask_codes is not None:
        mask_codes = np.asarray(mask_codes)
        if mask_codes.shape != (image.height, image.width):
            raise ValueError(
                f"mask of shape {mask_codes.shape} does not match the image ({image.height}, {image.width})"
            )
    square = square_resize(image, pre.image_size)
    x = eval_transform(pre)(square)
    codes = square_resize_mask(mask_codes, pre.image_size) if mask_codes is not None else None
    return Cell(input=x, rgb=np.asarray(square, dtype=np.uint8).copy(), codes=codes)


def load_cell(path: str | Path, mask_path: str | Path | None, pre: Preprocess) -> Cell:
    """Read a cell image and (if given) its `-d.bmp` mask into the model's geometry."""
    image = open_image(path)
    codes = read_mask(mask_path) if mask_path else None
    try:
        return prepare_image(image, pre, codes)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


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
    with _inputs_only_gradients(model):
        with torch.no_grad():  # F at the inputs and baselines, in batches of FORWARD_BATCH
            outputs = _batched_forward(model, x_all)
            base_outputs = _batched_forward(model, b_all)
        columns = _target_columns(bundle, mode, outputs)
        rows = torch.arange(len(columns))
        fx = _target_values(mode, outputs)[rows, columns]
        fb = _target_values(mode, base_outputs)[rows, columns]
        ig = IntegratedGradients(forward)
        starts = range(0, x_all.shape[0], per_call)
        for start in tqdm(starts, desc=f"IG ({baseline})", unit="call", disable=not progress):
            x = x_all[start : start + per_call]
            attr = ig.attribute(
                x,
                baselines=b_all[start : start + per_call],
                target=columns[start : start + per_call].to(device),
                n_steps=cfg.n_steps,
                method=cfg.method,
                internal_batch_size=max(cfg.internal_batch_size, x.shape[0]),
            )
            attrs.append(attr.detach().float().cpu())
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


# --------------------------------------------------------------------------------------
# Heat maps
# --------------------------------------------------------------------------------------


def heatmap_rgb(
    image: np.ndarray | Image.Image, am: np.ndarray, signed: bool = False, alpha: float = 0.7
) -> np.ndarray:
    """The attribution map over the image as an [H, W, 3] uint8 array.

    |Am| (inferno) or signed Am (blue negative, red positive) scaled by the 99th
    percentile of |Am|; the colour's opacity grows with |Am|, so unimportant pixels show
    the cell.
    """
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    am = np.asarray(am, dtype=np.float64)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[:2] != am.shape:
        raise ValueError(f"image {rgb.shape} and attribution map {am.shape} must be [H, W, 3] and [H, W]")
    am = np.nan_to_num(am)
    scale = float(np.percentile(np.abs(am), 99)) or float(np.abs(am).max()) or 1.0
    magnitude = np.clip(np.abs(am) / scale, 0.0, 1.0)
    if signed:
        colour = colormaps["RdBu_r"](0.5 + 0.5 * np.clip(am / scale, -1.0, 1.0))[..., :3]
    else:
        colour = colormaps["inferno"](magnitude)[..., :3]
    weight = (alpha * np.sqrt(magnitude))[..., None]
    out = (1.0 - weight) * rgb.astype(np.float64) / 255.0 + weight * colour
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def heatmap_png(
    image: np.ndarray | Image.Image, am: np.ndarray, signed: bool = False, upscale: int = 1
) -> bytes:
    """PNG bytes of `heatmap_rgb`, optionally enlarged `upscale` times (nearest) for small cells."""
    overlay = Image.fromarray(heatmap_rgb(image, am, signed=signed))
    if upscale > 1:
        overlay = overlay.resize((overlay.width * upscale, overlay.height * upscale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    overlay.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------
# Sanity check: cascading randomisation
# --------------------------------------------------------------------------------------


def cascade_stages(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """The model's blocks from the top (output) down, as the cascade randomises them."""
    backbone = getattr(model, "backbone", None)
    if isinstance(model, SeverityNet) and all(hasattr(backbone, a) for a in ("layer4", "conv1", "bn1")):
        return [
            ("head", [model.head]),
            ("layer4", [backbone.layer4]),
            ("layer3", [backbone.layer3]),
            ("layer2", [backbone.layer2]),
            ("layer1", [backbone.layer1]),
            ("stem", [backbone.conv1, backbone.bn1]),
        ]
    children = [(name, [child]) for name, child in model.named_children()]
    return list(reversed(children))


def _reinitialise(module: nn.Module) -> None:
    """Re-initialise every layer inside module the way PyTorch initialises it; BatchNorm layers get
    fresh running statistics and random affine parameters (N(1, 0.5) and N(0, 0.5)) instead of the
    identity. The fixed expected-score layer is part of the architecture and stays."""
    fixed = {id(s) for m in module.modules() if isinstance(m, ExpectedScore) for s in m.modules()}
    for m in module.modules():
        if id(m) in fixed or not hasattr(m, "reset_parameters"):
            continue
        m.reset_parameters()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            with torch.no_grad():
                m.weight.normal_(1.0, 0.5)
                m.bias.normal_(0.0, 0.5)


def randomise_cascade(model: nn.Module, seed: int = 0) -> Iterator[tuple[str, nn.Module]]:
    """Yield (stage, model) with the stages re-initialised cumulatively from the top down.

    Works on a deep copy (the given model is untouched). The SAME copy is yielded each time,
    one more stage randomised: use it before advancing the iterator.
    """
    randomised = copy.deepcopy(model)
    randomised.eval()
    device = next(randomised.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    for k, (name, modules) in enumerate(cascade_stages(randomised)):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed * 1000 + k)
            for module in modules:
                _reinitialise(module)
        yield name, randomised


def sanity_check(
    bundle: ModelBundle,
    images: Tensor,
    cfg: ExplainConfig,
    trained_maps: np.ndarray | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Spearman rank correlation of |Am| between the trained and each cascade-randomised model.

    Returns one row per stage: stage, spearman_abs (mean over images), spearman_abs_std,
    spearman_signed (mean), n_images.
    """
    if trained_maps is None:
        trained_maps = attribution_map(attribute(bundle, images, cfg)[0])
    rows = []
    stages = randomise_cascade(bundle.model, seed=cfg.seed)
    for stage, model in tqdm(stages, desc="sanity check", unit="stage", disable=not progress,
                             total=len(cascade_stages(bundle.model))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            maps = attribution_map(attribute(replace(bundle, model=model), images, cfg)[0])
        rho_abs, rho_signed = [], []
        for trained, rand in zip(trained_maps, maps):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a constant map gives NaN, said as NaN
                rho_abs.append(spearmanr(np.abs(trained).ravel(), np.abs(rand).ravel()).statistic)
                rho_signed.append(spearmanr(trained.ravel(), rand.ravel()).statistic)
        rows.append(
            {
                "stage": stage,
                "spearman_abs": float(np.nanmean(rho_abs)) if not np.isnan(rho_abs).all() else math.nan,
                "spearman_abs_std": float(np.nanstd(rho_abs)) if not np.isnan(rho_abs).all() else math.nan,
                "spearman_signed": float(np.nanmean(rho_signed)) if not np.isnan(rho_signed).all() else math.nan,
                "n_images": len(maps),
            }
        )
    return pd.DataFrame(rows, columns=["stage", "spearman_abs", "spearman_abs_std", "spearman_signed", "n_images"])


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------


def _png(fig: Figure, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def fig9(rows: pd.DataFrame, title: str = "") -> Figure:
    """Per-class box plots of At_N, At_C and At_N/At_C: signed (the paper's Fig 9) and on |Am|."""
    fig = Figure(figsize=(13, 7.5))
    axes = fig.subplots(2, 3)
    classes = list(range(NUM_SEVERITIES))
    names = [SEVERITY_NAMES[k].replace("_", " ") for k in classes]
    panels = [
        ("at_n", "At_N (signed)"),
        ("at_c", "At_C (signed)"),
        ("at_ratio", "At_N / At_C (signed)"),
        ("abs_at_n", "At_N on |Am|"),
        ("abs_at_c", "At_C on |Am|"),
        ("abs_at_ratio", "At_N / At_C on |Am|"),
    ]
    for ax, (column, label) in zip(axes.ravel(), panels):
        data = [rows.loc[rows["severity"] == k, column].dropna().to_numpy() for k in classes]
        if column == "abs_at_ratio":
            data = [d[d > 0] for d in data]  # log axis; a ratio of 0 (no |Am| on the nucleus) is not drawn
        ax.boxplot(data, tick_labels=names, showmeans=True, flierprops={"markersize": 2})
        if column.endswith("ratio"):
            if column == "abs_at_ratio":
                ax.set_yscale("log")
            else:
                ax.set_yscale("symlog", linthresh=1.0)
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        elif column.startswith("abs"):
            share = "nucleus_share" if column.endswith("_n") else "cytoplasm_share"
            shares = [rows.loc[rows["severity"] == k, share].mean() for k in classes]
            ax.plot(range(1, len(classes) + 1), shares, "x", color="tab:green", label="region area share")
            ax.legend(fontsize=7, loc="best")
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelsize=8, rotation=20)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.text(0.5, 0.005, "boxes: quartiles, line: median, triangle: mean; ratios on symlog (signed) or log (|Am|) axes",
             ha="center", fontsize=8, color="grey")
    return fig


def _mask_rgb(codes: np.ndarray) -> np.ndarray:
    return np.asarray(encode_mask(codes).convert("RGB"))


def fig8(cells: Sequence[tuple[str, Cell, np.ndarray, str]], per_row: int) -> Figure:
    """Image, mask and |Am| heat map for each (row label, cell, am, caption), per_row cells a row."""
    n_rows = max(1, math.ceil(len(cells) / per_row))
    fig = Figure(figsize=(per_row * 3 * 1.25, n_rows * 1.45))
    axes = np.atleast_2d(fig.subplots(n_rows, per_row * 3, squeeze=False))
    for ax in axes.ravel():
        ax.axis("off")
    for i, (row_label, cell, am, caption) in enumerate(cells):
        r, c = divmod(i, per_row)
        panels = (cell.rgb, _mask_rgb(cell.codes) if cell.codes is not None else np.zeros_like(cell.rgb),
                  heatmap_rgb(cell.rgb, am))
        for j, picture in enumerate(panels):
            ax = axes[r, c * 3 + j]
            ax.imshow(picture, interpolation="nearest")
            if j == 0:
                ax.set_title(caption, fontsize=6)
            if c == 0 and j == 0:
                ax.text(-0.15, 0.5, row_label, transform=ax.transAxes, rotation=90, va="center",
                        ha="right", fontsize=8)
    fig.tight_layout(pad=0.3)
    return fig


def class_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per-class means of the metrics (NaN-skipping) plus an `abnormal` row (severity >= 1)."""
    metric_columns = [c for c, _ in TABLE_COLUMNS if c != "n"]
    table = []
    for k in range(NUM_SEVERITIES):
        part = rows[rows["severity"] == k]
        table.append({"class": SEVERITY_NAMES[k], "n": len(part), **part[metric_columns].mean().to_dict()})
    abnormal = rows[rows["severity"] >= 1]
    table.append({"class": "abnormal (1-4)", "n": len(abnormal), **abnormal[metric_columns].mean().to_dict()})
    return pd.DataFrame(table).set_index("class")


def _html_table(table: pd.DataFrame) -> str:
    headers = dict(TABLE_COLUMNS)
    shown = table.rename(columns=headers)
    return shown.to_html(float_format=lambda v: f"{v:.3f}", na_rep="NaN", border=0, classes="t")


def _img(png: bytes, alt: str, width: str = "100%") -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" style="max-width:{width}" src="data:image/png;base64,{data}">'


_CSS = """
body{font-family:sans-serif;margin:1.5em;max-width:1400px}
table.t{border-collapse:collapse;font-size:12px}
table.t td,table.t th{border:1px solid #ccc;padding:3px 6px;text-align:right}
.banner{padding:.6em 1em;font-weight:bold;border-radius:4px}
.herlev{background:#e6f2ff}.synthetic{background:#fff3cd}
.warn{color:#a00;font-weight:bold}
code{background:#f4f4f4;padding:0 3px}
"""


def _sanity_text(sanity: pd.DataFrame | None) -> str:
    if sanity is None or sanity.empty:
        return "<p>Sanity check not run (explain.sanity_check: false).</p>"
    final = float(sanity["spearman_abs"].iloc[-1])
    worst = float(sanity["spearman_abs"].max())
    verdict = (
        f"<p class='warn'>The maps stay correlated with those of a randomised model (max mean Spearman "
        f"of |Am| {worst:.2f}): part of what they show is the input itself, not what the model learned. "
        "Read At_N / At_C with that in mind.</p>"
        if worst >= 0.5
        else f"<p>Correlations are low (max {worst:.2f}, fully randomised {final:.2f}): the maps depend on "
        "the learned weights.</p>"
    )
    table = sanity.to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="NaN", border=0, classes="t")
    return (
        "<p>Cascading randomisation (Adebayo et al. 2018): layers re-initialised from the top down, each row "
        "on top of the rows above; Spearman rank correlation of |Am| (and of signed Am) with the trained "
        f"model's maps, mean over images.</p>{table}{verdict}"
    )


def _select_panel_cells(rows: pd.DataFrame, per_class: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    chosen = []
    for k in range(NUM_SEVERITIES):
        idx = rows.index[(rows["severity"] == k) & rows["has_mask"]].to_numpy()
        if len(idx):
            chosen.extend(sorted(rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist()))
    return chosen


def explain_report(
    bundle: ModelBundle,
    items: pd.DataFrame,
    cfg: ExplainConfig,
    out_dir: str | Path,
    data_source: str,
    progress: bool = True,
) -> dict:
    """Attribute every cell of items (path, mask_path, severity, class_name) and write the report.

    Writes under out_dir: report.html (self-contained), attributions.csv (one row per
    cell), summary.json (the DVC metric), class_means.csv, sanity.csv, fig9.png. Cells
    without a mask get NaN fractions. Returns the summary dict.
    """
    missing = {"path", "mask_path", "severity"} - set(items.columns)
    if missing:
        raise ValueError(f"items lack the column(s) {sorted(missing)}")
    if items.empty:
        raise ValueError("no cells to explain")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pre = bundle.preprocess
    items = items.reset_index(drop=True)
    cells = [
        load_cell(row.path, row.mask_path if isinstance(row.mask_path, str) and row.mask_path else None, pre)
        for row in tqdm(items.itertuples(), total=len(items), desc="load cells", unit="cell", disable=not progress)
    ]
    images = torch.stack([c.input for c in cells])
    result = integrated_gradients(bundle, images, cfg, progress=progress)
    message = convergence_message(result.relative_delta, cfg)
    convergence_warnings = [message] if message else []
    maps = attribution_map(result.attributions)
    pred = bundle.pipeline.decode(result.outputs)
    rng = np.random.default_rng(cfg.seed)
    records = []
    for i, (row, cell) in enumerate(zip(items.itertuples(), cells)):
        record = {
            "path": row.path,
            "class_name": getattr(row, "class_name", ""),
            "severity": int(row.severity),
            "predicted": int(pred.label[i]),
            "score": float(pred.score[i]),
            "target_value": float(result.target_value[i]),
            "baseline_value": float(result.baseline_value[i]),
            "delta": float(result.delta[i]),
            "relative_delta": float(result.relative_delta[i]),
        }
        if cell.codes is not None:
            record.update(attribution_fractions(maps[i], cell.codes))
            record.update(random_floor(maps[i], cell.codes, rng))
        records.append(record)
    rows = pd.DataFrame(records, columns=list(CSV_COLUMNS))
    rows.to_csv(out_dir / "attributions.csv", index=False)
    rows["has_mask"] = [c.codes is not None for c in cells]

    table = class_table(rows)
    table.to_csv(out_dir / "class_means.csv")

    sanity = None
    if cfg.sanity_check:
        sanity_idx = _sanity_indices(rows, cfg.seed)
        sanity = sanity_check(bundle, images[sanity_idx], cfg, trained_maps=maps[sanity_idx], progress=progress)
        sanity.to_csv(out_dir / "sanity.csv", index=False)

    fig9_png = _png(fig9(rows, title=f"{bundle.pipeline.name} — {DATA_SOURCE_TEXT.get(data_source, data_source)}"))
    (out_dir / "fig9.png").write_bytes(fig9_png)
    panel_idx = _select_panel_cells(rows, cfg.cells_per_class, cfg.seed)
    panel_cells = [
        (
            SEVERITY_NAMES[int(rows.at[i, "severity"])],
            cells[i],
            maps[i],
            f"pred {SEVERITY_NAMES[int(rows.at[i, 'predicted'])][:8]} s={rows.at[i, 'score']:.2f}",
        )
        for i in panel_idx
    ]
    fig8_png = _png(fig8(panel_cells, per_row=cfg.cells_per_class), dpi=130) if panel_cells else b""

    summary = _summary(bundle, rows, table, result, sanity, cfg, data_source, convergence_warnings)
    write_json(summary, out_dir / "summary.json")
    (out_dir / "report.html").write_text(
        _report_html(bundle, summary, table, fig9_png, fig8_png, sanity, cfg, data_source, convergence_warnings)
    )
    return json_ready(summary)


def _sanity_indices(rows: pd.DataFrame, seed: int) -> list[int]:
    """Up to SANITY_IMAGES cells, round-robin over the classes."""
    rng = np.random.default_rng(seed + 1)
    pools = [list(rng.permutation(rows.index[rows["severity"] == k].to_numpy())) for k in range(NUM_SEVERITIES)]
    chosen: list[int] = []
    while len(chosen) < min(SANITY_IMAGES, len(rows)) and any(pools):
        for pool in pools:
            if pool and len(chosen) < SANITY_IMAGES:
                chosen.append(int(pool.pop()))
    return sorted(chosen)


MAIN_METRICS = (
    "at_n", "at_c", "at_ratio", "abs_at_n", "abs_at_c", "abs_at_ratio",
    "at_n_norm", "at_c_norm", "abs_at_n_norm", "abs_at_c_norm",
    "rand_abs_at_n_norm", "rand_abs_at_c_norm",
)


def _summary(bundle, rows, table, result: IGResult, sanity, cfg: ExplainConfig, data_source, conv_warnings) -> dict:
    rel = result.relative_delta.numpy()
    absd = result.delta.abs().numpy()
    per_class = {
        name: {"n": int(table.at[name, "n"]), **{m: table.at[name, m] for m in MAIN_METRICS}}
        for name in SEVERITY_NAMES
    }
    for name in SEVERITY_NAMES:
        part = rows[rows["severity"] == SEVERITY_NAMES.index(name)]
        per_class[name]["median_at_ratio"] = part["at_ratio"].median()
        per_class[name]["median_abs_at_ratio"] = part["abs_at_ratio"].median()
    abnormal_name = "abnormal (1-4)"
    return {
        "data_source": data_source,
        "pipeline": bundle.pipeline.name,
        "arch": bundle.arch,
        "n_cells": len(rows),
        "cells_without_mask": int((~rows["has_mask"]).sum()),
        "accuracy": float((rows["predicted"] == rows["severity"]).mean()),
        "settings": {
            **cfg.model_dump(mode="json"),
            "target_used": result.target,
            "image_size": bundle.preprocess.image_size,
            "delta_definition": "relative: |sum(attr) - (F(x) - F(baseline))| / max(|F(x) - F(baseline)|, "
            f"{DELTA_FLOOR:g})",
        },
        "delta": {
            "mean_abs": float(absd.mean()),
            "max_abs": float(absd.max()),
            "mean_relative": float(rel.mean()),
            "median_relative": float(np.median(rel)),
            "max_relative": float(rel.max()),
            "threshold": cfg.delta_threshold,
            "over_threshold": int((rel > cfg.delta_threshold).sum()),
            "warnings": conv_warnings,
        },
        "per_class": per_class,
        "abnormal": {m: table.at[abnormal_name, m] for m in MAIN_METRICS},
        "sanity_check": None
        if sanity is None
        else {
            "stages": sanity["stage"].tolist(),
            "spearman_abs": sanity["spearman_abs"].tolist(),
            "spearman_signed": sanity["spearman_signed"].tolist(),
            "max_spearman_abs": float(sanity["spearman_abs"].max()),
            "n_images": int(sanity["n_images"].iloc[0]) if len(sanity) else 0,
        },
    }


def _report_html(bundle, summary, table, fig9_png, fig8_png, sanity, cfg, data_source, conv_warnings) -> str:
    source_text = html.escape(DATA_SOURCE_TEXT.get(data_source, data_source))
    settings = summary["settings"]
    settings_rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in settings.items()
    )
    d = summary["delta"]
    delta_html = (
        f"<p>Completeness: delta = sum(attributions) - (F(x) - F(baseline)) per image, judged relative to "
        f"|F(x) - F(baseline)| (floor {DELTA_FLOOR:g}). Mean |delta| {d['mean_abs']:.4g}, max {d['max_abs']:.4g}; "
        f"relative: median {d['median_relative']:.3g}, mean {d['mean_relative']:.3g}, max {d['max_relative']:.3g}; "
        f"{d['over_threshold']} of {summary['n_cells']} images above the threshold {cfg.delta_threshold:g}.</p>"
    )
    if conv_warnings:
        delta_html += "".join(f"<p class='warn'>{html.escape(w)}</p>" for w in conv_warnings)
    fig8_html = _img(fig8_png, "Fig 8: cells, masks, attribution maps") if fig8_png else "<p>No cells with masks.</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Explain: {html.escape(bundle.pipeline.name)}</title>
<style>{_CSS}</style></head><body>
<div class="banner {html.escape(data_source)}">Data source: {source_text}</div>
<h1>Integrated Gradients: {html.escape(bundle.pipeline.name)} ({html.escape(bundle.arch)})</h1>
<p>{summary['n_cells']} cells; accuracy of the model on them {summary['accuracy']:.3f}.
Target: {html.escape(settings['target_used'])}; baseline: {html.escape(cfg.baseline)};
{cfg.n_steps} steps ({html.escape(cfg.method)}).</p>
<h2>Settings</h2><table class="t">{settings_rows}</table>
<h2>Convergence</h2>{delta_html}
<h2>Per-class means</h2>
<p>At_N = sum(Am over nucleus) / sum(Am), At_C likewise over cytoplasm (signed, the paper's); |.| the same on |Am|;
/area = divided by the region's share of the pixels (1 = as much as its size); random = the same maths on a random
permutation of each map (the floor); net/abs = |sum Am| / sum |Am| (small: signed fractions unstable). Means skip
NaN (undefined) values.</p>
{_html_table(table)}
<h2>Distributions per class (Fig 9)</h2>{_img(fig9_png, "Fig 9: At_N, At_C, ratio per class")}
<h2>Examples (Fig 8): image, mask (blue nucleus, navy cytoplasm, red background), |Am| over the image</h2>
{fig8_html}
<h2>Sanity check</h2>{_sanity_text(sanity)}
</body></html>
"""
