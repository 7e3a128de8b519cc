"""Decoding Herlev `-d.bmp` segmentation masks into region codes.

Each pixel goes to the nearest of the colours seen in Herlev masks. Only the
nucleus, cytoplasm and background colours keep their meaning; the grey border
band, black edge pixels and anything far from every colour become UNKNOWN, which
counts as neither nucleus nor cytoplasm.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pap_severity.data.reader import open_image

BACKGROUND, CYTOPLASM, NUCLEUS, UNKNOWN = 0, 1, 2, 255

NUCLEUS_RGB = (0, 0, 255)
CYTOPLASM_RGB = (0, 0, 128)
BACKGROUND_RGB = (255, 0, 0)
BORDER_RGB = (128, 128, 128)
EDGE_RGB = (0, 0, 0)

_PALETTE = np.array([NUCLEUS_RGB, CYTOPLASM_RGB, BACKGROUND_RGB, BORDER_RGB, EDGE_RGB], dtype=np.int32)
_CODES = np.array([NUCLEUS, CYTOPLASM, BACKGROUND, UNKNOWN, UNKNOWN], dtype=np.uint8)
# A pixel farther than this (Euclidean RGB) from every palette colour is UNKNOWN.
_MAX_DISTANCE = 64.0


def decode_mask(rgb: np.ndarray) -> np.ndarray:
    """Map an (H, W, 3) RGB mask to an (H, W) uint8 array of region codes."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"a mask must be an (H, W, 3) RGB array, got shape {rgb.shape}")
    diff = rgb.astype(np.int32)[:, :, None, :] - _PALETTE[None, None, :, :]
    dist2 = (diff * diff).sum(axis=-1)
    nearest = dist2.argmin(axis=-1)
    codes = _CODES[nearest]
    too_far = dist2.min(axis=-1) > _MAX_DISTANCE**2
    codes[too_far] = UNKNOWN
    return codes


def read_mask(path: str | Path) -> np.ndarray:
    """Read a `-d.bmp` mask (palette or RGB) and decode it; ValueError (saying why) if it cannot be read."""
    return decode_mask(np.asarray(open_image(path).convert("RGB")))


def encode_mask(codes: np.ndarray) -> Image.Image:
    """The inverse of decode_mask: a palette image in Herlev's colours (UNKNOWN as grey)."""
    codes = np.asarray(codes, dtype=np.uint8)
    index = np.full(codes.shape, 3, dtype=np.uint8)
    index[codes == NUCLEUS] = 0
    index[codes == CYTOPLASM] = 1
    index[codes == BACKGROUND] = 2
    im = Image.fromarray(index, mode="P")
    im.putpalette([c for rgb in _PALETTE[:4].tolist() for c in rgb] + [0] * (256 - 4) * 3)
    return im


def region_fractions(codes: np.ndarray) -> tuple[float, float]:
    """Share of all pixels that are nucleus and cytoplasm."""
    total = codes.size
    if total == 0:
        raise ValueError("an empty mask has no region fractions")
    return float((codes == NUCLEUS).sum() / total), float((codes == CYTOPLASM).sum() / total)
