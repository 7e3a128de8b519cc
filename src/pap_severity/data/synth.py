"""A synthetic Pap smear cell set in the Herlev on-disk layout.

It is the project's embedded default when the real data is absent, so every stage
can run (and be tested) without a download. Each cell is drawn as geometry first
(nucleus and cell masks as boolean arrays) and rendered second (stain optical
densities mixed by Beer-Lambert, then blur and sensor noise), so that the mask
written beside the image is exactly the geometry the image was drawn from.

Severity shows the way it does in real dysplasia: the nucleus-to-cytoplasm ratio,
nuclear darkness (hyperchromasia), coarseness of the chromatin texture and the
irregularity of the nuclear contour all grow with it, with overlapping per-class
distributions. Everything else (cytoplasm stain and texture, stain colour shifts,
neighbouring cells, inflammatory cells, blur, noise, orientation) is drawn from
one class-independent distribution, so a model has to look at the nucleus.

Every cell has its own random generator seeded from (seed, class, index): the
bytes written do not depend on the order of generation nor on anything but the
arguments.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from pap_severity.data.labels import CLASS_FOLDERS
from pap_severity.data.masks import BACKGROUND, CYTOPLASM, NUCLEUS, UNKNOWN, encode_mask
from pap_severity.progress import progress_bar

SYNTH_MARKER = "SYNTHETIC.txt"

MIN_SIZE = 24

# Share of real Herlev masks with a grey uncertain band around the cell (674 of 917).
_BORDER_BAND_PROBABILITY = 0.75
# Hematoxylin's optical density per unit stain (R, G, B): it absorbs red and green,
# which makes nuclei blue-purple.
_HEMATOXYLIN = np.array([0.65, 0.70, 0.29])
# Pap cytoplasm counterstains: cyanophilic (light green) and eosinophilic (pink).
# Each cell mixes them at random, independently of its class.
_CYANOPHILIC = np.array([0.75, 0.45, 0.35])
_EOSINOPHILIC = np.array([0.20, 0.70, 0.45])
# Optical density of the slide background (a pale grey-lavender, as in Herlev).
_BACKGROUND_OD = np.array([0.30, 0.36, 0.26])


@dataclass(frozen=True)
class NucleusLook:
    """How one class draws its nucleus; every value is the mean of a noisy draw.

    nc_ratio: nucleus area / cell area (mean, standard deviation).
    density: hematoxylin optical density, i.e. darkness (hyperchromasia).
    texture: relative amplitude of the chromatin texture (coarse clumps when high).
    irregularity: relative amplitude of the contour's harmonics.
    elongation: (low, high) aspect ratio of the cell; the nucleus follows at half the excess.
    """

    nc_ratio: tuple[float, float]
    density: float
    texture: float
    irregularity: float
    elongation: tuple[float, float] = (1.0, 1.3)


# N/C ratios follow those measured on the Herlev masks (superficial and intermediate
# cells have tiny nuclei, columnar cells large ones); the three normal classes share
# severity 0 but differ in look: pyknotic dark dots, vesicular round nuclei, and
# elongated cells with a basal nucleus.
_LOOKS: dict[str, NucleusLook] = {
    "normal_superficiel": NucleusLook((0.025, 0.010), 0.66, 0.05, 0.02),
    "normal_intermediate": NucleusLook((0.050, 0.020), 0.50, 0.10, 0.02),
    "normal_columnar": NucleusLook((0.30, 0.08), 0.50, 0.12, 0.03, elongation=(1.5, 2.1)),
    "light_dysplastic": NucleusLook((0.27, 0.09), 0.70, 0.18, 0.05),
    "moderate_dysplastic": NucleusLook((0.38, 0.10), 0.86, 0.25, 0.08),
    "severe_dysplastic": NucleusLook((0.49, 0.11), 1.04, 0.32, 0.11),
    "carcinoma_in_situ": NucleusLook((0.60, 0.11), 1.22, 0.40, 0.15),
}


@dataclass(frozen=True)
class Blob:
    """A rotated ellipse whose radius wobbles by a few cosine harmonics."""

    cx: float
    cy: float
    a: float
    b: float
    angle: float
    amplitudes: tuple[float, ...] = ()
    phases: tuple[float, ...] = ()


def make_synthetic(
    out_dir: str | Path, per_class: int, size: int, seed: int, progress: bool = True
) -> list[Path]:
    """Write per_class synthetic cells (image + mask) in each Herlev class folder.

    Returns the image paths, class by class. A previous synthetic set at out_dir is
    replaced; any other non-empty folder is refused rather than mixed with.
    """
    _check_arguments(per_class, size, seed)
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)
    # The marker goes first so that an interrupted run can still be replaced by the next.
    (out_dir / SYNTH_MARKER).write_text(_marker_text(per_class, size, seed))
    jobs = [(ci, name, index) for ci, name in enumerate(CLASS_FOLDERS) for index in range(per_class)]
    paths = []
    for ci, name, index in progress_bar(jobs, progress=progress, desc="synth cells", unit="cell"):
        rng = np.random.default_rng([seed, ci, index])
        image, codes = draw_cell(rng, _LOOKS[name], size)
        folder = out_dir / name
        folder.mkdir(exist_ok=True)
        stem = f"synth-{ci}-{index:04d}"
        image_path = folder / f"{stem}.BMP"
        Image.fromarray(image, mode="RGB").save(image_path, format="BMP")
        encode_mask(codes).save(folder / f"{stem}-d.bmp", format="BMP")
        paths.append(image_path)
    return paths


def _check_arguments(per_class: int, size: int, seed: int) -> None:
    for name, value, low in (("per_class", per_class, 1), ("size", size, MIN_SIZE), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")


def _prepare_out_dir(out_dir: Path) -> None:
    """Refuse to mix with foreign files; wipe a previous synthetic set."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder; choose another output folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / SYNTH_MARKER).is_file():
            raise ValueError(
                f"{out_dir} is not empty and holds no {SYNTH_MARKER}, so it is not a synthetic set; "
                "refusing to write synthetic cells into it (choose an empty or new folder)"
            )
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in {SYNTH_MARKER, *CLASS_FOLDERS})
        if foreign:
            raise ValueError(
                f"{out_dir} holds a synthetic set but also {', '.join(foreign)}; "
                "refusing to delete it (remove those entries or choose another folder)"
            )
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def _marker_text(per_class: int, size: int, seed: int) -> str:
    return (
        "This folder holds a SYNTHETIC Pap smear cell set written by "
        "pap_severity.data.synth.make_synthetic, not real data. It imitates the layout of the "
        "Herlev dataset: one folder per class, each cell an RGB image NAME.BMP and a palette "
        "mask NAME-d.bmp (nucleus blue, cytoplasm navy, background red, grey border band). "
        "Severity shows in the nucleus: its share of the cell, darkness, chromatin texture and "
        "contour irregularity grow from normal to carcinoma in situ. "
        f"Parameters: per_class={per_class}, size={size}, seed={seed}. "
        "Results on it say nothing about real cells.\n"
    )


def draw_cell(rng: np.random.Generator, look: NucleusLook, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One cell: an (size, size, 3) uint8 RGB image and its (size, size) region codes."""
    cell_blob, nucleus_blob = _cell_geometry(rng, look, size)
    band_width = max(1, round(size / 80)) if rng.random() < _BORDER_BAND_PROBABILITY else 0
    cell = blob_mask(cell_blob, size)
    interior = erode(cell, band_width)
    nucleus = blob_mask(nucleus_blob, size) & erode(interior, 1)
    if not nucleus.any():
        nucleus[_nearest_pixel(nucleus_blob, size)] = True
    codes = np.full((size, size), BACKGROUND, dtype=np.uint8)
    codes[cell] = UNKNOWN
    codes[interior] = CYTOPLASM
    codes[nucleus] = NUCLEUS
    hema, counter = _clutter_densities(rng, size, cell_blob)
    hema[cell] = 0.0
    counter[cell] = _cytoplasm_density(rng, size)[cell]
    hema[nucleus] = _nucleus_density(rng, look, size)[nucleus]
    image = _render(rng, hema, counter, size)
    return image, codes


def _cell_geometry(rng: np.random.Generator, look: NucleusLook, size: int) -> tuple[Blob, Blob]:
    """Cell and nucleus outlines; only the nucleus (and columnar elongation) depend on class."""
    aspect = rng.uniform(*look.elongation)
    area = rng.uniform(0.55, 0.72) * size * size
    b = math.sqrt(area / (math.pi * aspect))
    a = aspect * b
    cell_wobble = _harmonics(rng, 0.05)
    reach = 0.48 * size / (a * (1.0 + sum(cell_wobble[0])))
    if reach < 1.0:
        a, b = a * reach, b * reach
    angle = rng.uniform(0.0, 2.0 * math.pi)
    centre = size / 2.0 + rng.uniform(-0.015, 0.015, size=2) * size
    cell = Blob(centre[0], centre[1], a, b, angle, *cell_wobble)

    nc = float(np.clip(rng.normal(*look.nc_ratio), 0.01, 0.80))
    n_aspect = 1.0 + (aspect - 1.0) * 0.5 + rng.uniform(0.0, 0.25)
    n_area = nc * math.pi * a * b
    nb = max(math.sqrt(n_area / (math.pi * n_aspect)), 0.9)
    na = n_aspect * nb
    n_wobble = _harmonics(rng, look.irregularity * rng.lognormal(0.0, 0.3))
    # The nucleus sits off centre; in elongated cells towards one end, along the long axis.
    elongated = look.elongation[0] > 1.0
    room = max(a - na, 0.0) * 0.6 if elongated else max(b - max(na, nb), 0.0) * 0.5
    shift = rng.uniform(0.0, room) * rng.choice([-1.0, 1.0])
    direction = angle if elongated else rng.uniform(0.0, 2.0 * math.pi)
    n_angle = angle + rng.normal(0.0, 0.2)
    nucleus = Blob(
        cell.cx + shift * math.cos(direction),
        cell.cy + shift * math.sin(direction),
        na,
        nb,
        n_angle,
        *n_wobble,
    )
    return cell, nucleus


def _harmonics(rng: np.random.Generator, strength: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Amplitudes and phases of contour harmonics 2..6, decaying with order, summing to about strength."""
    orders = np.arange(2, 7)
    weights = rng.uniform(0.5, 1.5, size=orders.size) / orders
    amplitudes = strength * weights / weights.sum() * 2.0
    phases = rng.uniform(0.0, 2.0 * math.pi, size=orders.size)
    return tuple(amplitudes.tolist()), tuple(phases.tolist())


def blob_mask(blob: Blob, size: int) -> np.ndarray:
    """Pixels (centres at integer coordinates) inside the blob's wobbling outline."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    dx, dy = x - blob.cx, y - blob.cy
    cos, sin = math.cos(blob.angle), math.sin(blob.angle)
    u = (dx * cos + dy * sin) / blob.a
    v = (-dx * sin + dy * cos) / blob.b
    radius = np.hypot(u, v)
    theta = np.arctan2(v, u)
    outline = np.ones_like(radius)
    for order, (amplitude, phase) in enumerate(zip(blob.amplitudes, blob.phases), start=2):
        outline += amplitude * np.cos(order * theta + phase)
    return radius < np.maximum(outline, 0.5)


def erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """Shrink a boolean mask by `steps` pixels (4-neighbourhood); the frame edge counts as outside."""
    out = mask.copy()
    for _ in range(steps):
        shrunk = out.copy()
        shrunk[1:, :] &= out[:-1, :]
        shrunk[:-1, :] &= out[1:, :]
        shrunk[:, 1:] &= out[:, :-1]
        shrunk[:, :-1] &= out[:, 1:]
        shrunk[0, :] = shrunk[-1, :] = shrunk[:, 0] = shrunk[:, -1] = False
        out = shrunk
    return out


def _nearest_pixel(blob: Blob, size: int) -> tuple[int, int]:
    """The pixel at a blob's centre, so that even the tiniest nucleus has one."""
    return int(np.clip(round(blob.cy), 0, size - 1)), int(np.clip(round(blob.cx), 0, size - 1))


def smooth_noise(rng: np.random.Generator, size: int, grain: float) -> np.ndarray:
    """Zero-mean, unit-deviation random field whose blobs are about `grain` pixels wide."""
    cells = max(2, math.ceil(size / max(grain, 1.0)) + 1)
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC))
    return (field - field.mean()) / (field.std() + 1e-6)


def _nucleus_density(rng: np.random.Generator, look: NucleusLook, size: int) -> np.ndarray:
    """Hematoxylin density over the frame: darker and coarser chromatin with severity."""
    density = max(rng.normal(look.density, 0.12), 0.25)
    texture = look.texture * rng.lognormal(0.0, 0.25)
    scale = size / 64.0
    fine = smooth_noise(rng, size, 1.0 * scale)
    clumps = smooth_noise(rng, size, 3.0 * scale)
    field = 1.0 + texture * (0.5 * fine + 1.0 * clumps)
    return density * np.clip(field, 0.2, None)


def _cytoplasm_density(rng: np.random.Generator, size: int) -> np.ndarray:
    """Counterstain density: the same faint, cloudy look in every class."""
    density = rng.uniform(0.15, 0.40)
    cloud = smooth_noise(rng, size, 8.0 * size / 64.0)
    return density * np.clip(1.0 + 0.15 * cloud, 0.3, None)


def _clutter_densities(rng: np.random.Generator, size: int, cell: Blob) -> tuple[np.ndarray, np.ndarray]:
    """Stain densities of what surrounds the cell; all of it is background in the mask.

    Neighbouring cells are cut by the frame and inflammatory cells are small dark dots;
    both are drawn the same way in every class, so they carry no severity.
    """
    hema = np.zeros((size, size))
    counter = np.zeros((size, size))
    for _ in range(rng.integers(0, 4)):
        body, nucleus = _neighbour_masks(rng, size, cell)
        counter[body] += rng.uniform(0.15, 0.40)
        hema[nucleus & body] = rng.uniform(0.5, 1.1)
    for _ in range(rng.integers(0, 4)):
        radius = max(rng.uniform(0.025, 0.045) * size, 1.0)
        cx, cy = rng.uniform(0, size, size=2)
        leukocyte = Blob(cx, cy, radius, radius, 0.0, *_harmonics(rng, 0.2))
        hema[blob_mask(leukocyte, size)] = rng.uniform(0.9, 1.3)
    return hema, counter


def _neighbour_masks(rng: np.random.Generator, size: int, cell: Blob) -> tuple[np.ndarray, np.ndarray]:
    """Body and nucleus of a cell centred beyond the main one, so only part of it is in frame."""
    direction = rng.uniform(0.0, 2.0 * math.pi)
    distance = rng.uniform(0.60, 0.85) * size
    radius = rng.uniform(0.25, 0.45) * size
    aspect = rng.uniform(1.0, 1.6)
    cx = cell.cx + distance * math.cos(direction)
    cy = cell.cy + distance * math.sin(direction)
    body = Blob(cx, cy, radius * aspect, radius / aspect, rng.uniform(0, 2 * math.pi), *_harmonics(rng, 0.05))
    n_radius = radius * math.sqrt(rng.uniform(0.02, 0.5))
    offset = rng.uniform(0.0, 0.5) * (radius - n_radius)
    offset_angle = rng.uniform(0, 2 * math.pi)
    nucleus = Blob(
        cx + offset * math.cos(offset_angle),
        cy + offset * math.sin(offset_angle),
        n_radius,
        n_radius / rng.uniform(1.0, 1.4),
        rng.uniform(0, 2 * math.pi),
        *_harmonics(rng, rng.uniform(0.02, 0.15)),
    )
    return blob_mask(body, size), blob_mask(nucleus, size)


def _render(rng: np.random.Generator, hema: np.ndarray, counter: np.ndarray, size: int) -> np.ndarray:
    """Beer-Lambert mix of the stains with a per-image stain shift, then blur and sensor noise."""
    hematoxylin = _jitter_stain(rng, _HEMATOXYLIN, 0.06) * rng.lognormal(0.0, 0.12)
    mix = rng.uniform(0.0, 1.0)
    counterstain = _jitter_stain(rng, mix * _CYANOPHILIC + (1 - mix) * _EOSINOPHILIC, 0.12)
    counterstain = counterstain * rng.lognormal(0.0, 0.15)
    background = _BACKGROUND_OD * rng.lognormal(0.0, 0.25) + rng.normal(0.0, 0.03, size=3)
    density = background + hema[..., None] * hematoxylin + counter[..., None] * counterstain
    rgb = 255.0 * np.exp(-np.clip(density, 0.0, None)) * rng.uniform(0.92, 1.0)
    image = Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.2) * size / 64.0))
    noisy = np.asarray(image, dtype=np.float64) + rng.normal(0.0, rng.uniform(1.0, 4.0), size=(size, size, 3))
    return np.clip(noisy + 0.5, 0, 255).astype(np.uint8)


def _jitter_stain(rng: np.random.Generator, stain: np.ndarray, spread: float) -> np.ndarray:
    """A stain vector with its hue nudged, renormalised to the original length."""
    shifted = np.clip(stain + rng.normal(0.0, spread, size=3), 0.02, None)
    return shifted * (np.linalg.norm(stain) / np.linalg.norm(shifted))
