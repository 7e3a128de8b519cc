"""A cell as the model sees it: the image through the model's preprocessing and its mask aligned to it.

The mask goes through the same geometry as the image (`transforms.square_resize`: centred
on a square canvas, then resized), with NEAREST resampling so region codes stay codes, so
attribution pixels and mask pixels line up one to one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from pap_severity.data.manifest import open_image
from pap_severity.data.masks import BACKGROUND, encode_mask, read_mask
from pap_severity.transforms import Preprocess, eval_transform, square_resize


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


def mask_rgb(codes: np.ndarray) -> np.ndarray:
    """A mask's region codes as an [H, W, 3] picture in Herlev's colours (blue nucleus, navy cytoplasm, red background)."""
    return np.asarray(encode_mask(codes).convert("RGB"))
