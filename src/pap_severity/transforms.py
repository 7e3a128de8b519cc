"""The one preprocessing path, shared by training, evaluation, explanation and serving.

An image becomes RGB, is padded to a square with a neutral colour (the median of its
border pixels, i.e. the slide background), resized to `image_size`, and normalised.
Augmentation acts after normalisation, so rotations fill with 0: the mean colour.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

from pap_severity.config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class Preprocess:
    """Everything needed to turn a cell image into the model's input; saved with each model."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Preprocess:
        d = json.loads(text)
        return cls(image_size=int(d["image_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]))

    def save(self, path: str | Path) -> Path:
        Path(path).write_text(self.to_json())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Preprocess:
        return cls.from_json(Path(path).read_text())


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB: 16-bit and float greys are rescaled, alpha lies on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        image = Image.fromarray(a.astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def border_colour(image: Image.Image) -> tuple[int, int, int]:
    """Median colour of the outermost pixels: the background the cell sits on."""
    a = np.asarray(image)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return tuple(int(v) for v in np.median(border, axis=0))


def pad_to_square(image: Image.Image) -> Image.Image:
    """Centre the image on a square canvas of its border colour: keeps the aspect ratio."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), border_colour(image))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def square_resize(image: Image.Image, size: int) -> Image.Image:
    """The deterministic part of preprocessing: RGB, pad to a square, resize."""
    return pad_to_square(to_rgb(image)).resize((size, size), Image.Resampling.BILINEAR)


def _to_float() -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]


def _normalise(pre: Preprocess) -> v2.Compose:
    return v2.Compose([*_to_float(), v2.Normalize(pre.mean, pre.std)])


# Ruifrok & Johnston's stain vectors (haematoxylin, eosin, DAB) as rows, as in scikit-image's
# rgb2hed; OD / -ln(1e-6) puts concentrations on scikit-image's scale (white 0, black 1).
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
_OD_SCALE = -float(np.log(1e-6))


def rgb_to_hed(rgb: Tensor) -> Tensor:
    """[3, H, W] RGB in [0, 1] -> stain concentrations [3, H, W] (scikit-image's rgb2hed, unclipped)."""
    od = -torch.log(rgb.clamp_min(1e-6)) / _OD_SCALE
    return torch.einsum("chw,cs->shw", od, HED_FROM_RGB.to(rgb.dtype))


def hed_to_rgb(hed: Tensor) -> Tensor:
    """The inverse of rgb_to_hed, clipped to [0, 1]."""
    od = torch.einsum("shw,sc->chw", hed, RGB_FROM_HED.to(hed.dtype)) * _OD_SCALE
    return torch.exp(-od).clamp(0.0, 1.0)


class HedJitter(v2.Transform):
    """Stain augmentation (Tellez et al. 2018): each stain concentration c becomes
    c * U(1-h, 1+h) + U(-h, h), one draw per stain and image, on an RGB float image."""

    def __init__(self, strength: float) -> None:
        super().__init__()
        self.strength = strength

    def transform(self, inpt, params):
        if not isinstance(inpt, torch.Tensor) or inpt.ndim != 3 or not inpt.is_floating_point():
            return inpt
        h = self.strength
        scale = 1 + (torch.rand(3, 1, 1) * 2 - 1) * h
        shift = (torch.rand(3, 1, 1) * 2 - 1) * h
        return hed_to_rgb(rgb_to_hed(inpt) * scale + shift)


class SquareResize:
    """square_resize as a transform step: a class, not a lambda, so that a transform pickles and
    data loader workers can be spawned (macOS, Windows) rather than forked."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        return square_resize(image, self.size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def eval_transform(pre: Preprocess) -> v2.Compose:
    """PIL image (any mode, any size) -> normalised [3, S, S] tensor."""
    return v2.Compose([SquareResize(pre.image_size), _normalise(pre)])


def augment_transform(pre: Preprocess, aug: AugmentConfig) -> v2.Compose:
    """Training view of an image already through square_resize: jitter, normalise, then geometry."""
    steps: list = []
    if aug.color_jitter > 0:
        j = aug.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(j / 4, 0.5)))
    steps += _to_float()
    if aug.hed > 0:
        steps.append(HedJitter(aug.hed))
    steps.append(v2.Normalize(pre.mean, pre.std))
    if aug.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if aug.vflip:
        steps.append(v2.RandomVerticalFlip())
    if aug.rot90:
        steps.append(v2.RandomChoice([v2.RandomRotation((a, a)) for a in (0, 90, 180, 270)]))
    if aug.affine_degrees or aug.affine_translate or aug.affine_scale:
        steps.append(
            v2.RandomAffine(
                degrees=aug.affine_degrees,
                translate=(aug.affine_translate, aug.affine_translate),
                scale=(1 - aug.affine_scale, 1 + aug.affine_scale),
                fill=0.0,
            )
        )
    return v2.Compose(steps)


def channel_stats(images: list[Image.Image]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std over RGB images scaled to [0, 1]: the dataset statistics."""
    if not images:
        raise ValueError("no images to compute channel statistics from")
    pixels = np.concatenate([np.asarray(im, dtype=np.float64).reshape(-1, 3) / 255.0 for im in images])
    std = np.maximum(pixels.std(axis=0), 1e-3)
    return tuple(float(v) for v in pixels.mean(axis=0)), tuple(float(v) for v in std)


def white_input(pre: Preprocess) -> Tensor:
    """A white image in the model's normalised input space: the paper's IG baseline."""
    white = Image.new("RGB", (pre.image_size, pre.image_size), WHITE)
    return _normalise(pre)(white)
