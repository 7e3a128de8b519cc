"""Attribution maps drawn over the cell, with the colour scale they were drawn with.

A map is scaled by the 99th percentile of its |Am| (`heatmap_scale`), so one extreme pixel
does not wash out the rest; the colour's opacity grows with |Am|, so unimportant pixels
show the cell. |Am| uses inferno from 0 to the scale, signed Am RdBu_r from -scale
(blue) to +scale (red). `heatmap_mappable` is that colour scale for a matplotlib colour
bar, so a bar always states the numbers the colours stand for.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

ABS_CMAP = "inferno"
SIGNED_CMAP = "RdBu_r"
# The overlay's opacity at full scale.
ALPHA = 0.7
# Dots per inch of the colour-bar PNG: with figsize in pixels / DPI, one image pixel is one PNG pixel.
COLORBAR_DPI = 100
# Width of the colour bar and its labels, in pixels of the colour-bar PNG.
COLORBAR_PX = 90


def heatmap_scale(am: np.ndarray) -> float:
    """The value drawn at full colour: the 99th percentile of |Am| (its max, or 1, when that is 0)."""
    magnitude = np.abs(np.nan_to_num(np.asarray(am, dtype=np.float64)))
    if magnitude.size == 0:
        return 1.0
    return float(np.percentile(magnitude, 99)) or float(magnitude.max()) or 1.0


def heatmap_mappable(scale: float, signed: bool = False) -> ScalarMappable:
    """The colour scale of a heat map drawn with `scale`, for `Figure.colorbar`."""
    norm = Normalize(-scale, scale) if signed else Normalize(0.0, scale)
    return ScalarMappable(norm=norm, cmap=colormaps[SIGNED_CMAP if signed else ABS_CMAP])


def heatmap_rgb(
    image: np.ndarray | Image.Image, am: np.ndarray, signed: bool = False, alpha: float = ALPHA
) -> np.ndarray:
    """The attribution map over the image as an [H, W, 3] uint8 array.

    |Am| (inferno) or signed Am (blue negative, red positive) scaled by `heatmap_scale`;
    the colour's opacity grows with |Am|, so unimportant pixels show the cell.
    """
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    am = np.asarray(am, dtype=np.float64)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[:2] != am.shape:
        raise ValueError(f"image {rgb.shape} and attribution map {am.shape} must be [H, W, 3] and [H, W]")
    am = np.nan_to_num(am)
    scale = heatmap_scale(am)
    magnitude = np.clip(np.abs(am) / scale, 0.0, 1.0)
    if signed:
        colour = colormaps[SIGNED_CMAP](0.5 + 0.5 * np.clip(am / scale, -1.0, 1.0))[..., :3]
    else:
        colour = colormaps[ABS_CMAP](magnitude)[..., :3]
    weight = (alpha * np.sqrt(magnitude))[..., None]
    out = (1.0 - weight) * rgb.astype(np.float64) / 255.0 + weight * colour
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def heatmap_png(
    image: np.ndarray | Image.Image,
    am: np.ndarray,
    signed: bool = False,
    upscale: int = 1,
    colorbar: bool = False,
) -> bytes:
    """PNG bytes of `heatmap_rgb`, optionally enlarged `upscale` times (nearest) for small cells.

    colorbar=True adds the colour scale at the right (the overlay keeps its pixels, one
    PNG pixel each after upscaling): what |Am| (or signed Am) each colour stands for, in
    the attribution's units. Without it the PNG is the overlay alone, exactly
    `upscale` times the image's size.
    """
    if upscale < 1:
        raise ValueError(f"upscale must be >= 1, got {upscale}")
    overlay = Image.fromarray(heatmap_rgb(image, am, signed=signed))
    if upscale > 1:
        overlay = overlay.resize((overlay.width * upscale, overlay.height * upscale), Image.Resampling.NEAREST)
    if colorbar:
        return _with_colorbar(np.asarray(overlay), heatmap_scale(am), signed)
    buf = io.BytesIO()
    overlay.save(buf, format="PNG")
    return buf.getvalue()


def _with_colorbar(overlay: np.ndarray, scale: float, signed: bool) -> bytes:
    """The overlay at its own pixel size, with a labelled colour bar to its right."""
    h, w = overlay.shape[:2]
    height = max(h, 120)  # room for the bar's ticks beside a small cell
    width = w + COLORBAR_PX
    fig = Figure(figsize=(width / COLORBAR_DPI, height / COLORBAR_DPI), dpi=COLORBAR_DPI)
    ax = fig.add_axes((0, 1 - h / height, w / width, h / height))
    ax.imshow(overlay, interpolation="nearest")
    ax.axis("off")
    cax = fig.add_axes(((w + 8) / width, 0.08, 12 / width, 0.84))
    bar = fig.colorbar(heatmap_mappable(scale, signed), cax=cax)
    bar.ax.tick_params(labelsize=7)
    bar.set_label("Am (signed)" if signed else "|Am|", fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=COLORBAR_DPI)
    return buf.getvalue()
