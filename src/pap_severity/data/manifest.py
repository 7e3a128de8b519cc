"""The manifest: one row per cell with its labels, checksum, size and mask fractions.

Building it opens every image fully, so a truncated or fake file shows up here as
an `image_error`, to be reported by validation instead of crashing a later stage.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pap_severity.data.labels import is_abnormal, is_class_folder, severity_of
from pap_severity.data.masks import read_mask, region_fractions
from pap_severity.data.reader import CellFile, find_cells
from pap_severity.data.synth import SYNTH_MARKER

COLUMNS = (
    "path",
    "mask_path",
    "class_name",
    "severity",
    "abnormal",
    "width",
    "height",
    "mode",
    "sha256",
    "nucleus_fraction",
    "cytoplasm_fraction",
    "source",
    "image_error",
    "mask_error",
)


def data_source(root: str | Path) -> str:
    """'synthetic' when root is (inside) a set written by `data synth`, else 'herlev'."""
    root = Path(root).resolve()
    for folder in (root, *root.parents):
        if (folder / SYNTH_MARKER).is_file():
            return "synthetic"
    return "herlev"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _describe(exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image Pillow can read"
    if isinstance(exc, OSError) and "truncated" in str(exc).lower():
        return f"truncated image ({exc})"
    return f"{type(exc).__name__}: {exc}"


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image; raises a ValueError that says what is wrong."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(_describe(exc)) from None


def _row(cell: CellFile, source: str) -> dict:
    known = is_class_folder(cell.class_name)
    severity = severity_of(cell.class_name) if known else pd.NA
    row = {
        "path": cell.image.as_posix(),
        "mask_path": cell.mask.as_posix() if cell.mask else "",
        "class_name": cell.class_name,
        "severity": severity,
        "abnormal": is_abnormal(severity) if known else pd.NA,
        "width": pd.NA,
        "height": pd.NA,
        "mode": "",
        "sha256": _sha256(cell.image),
        "nucleus_fraction": np.nan,
        "cytoplasm_fraction": np.nan,
        "source": source,
        "image_error": "",
        "mask_error": "",
    }
    try:
        im = open_image(cell.image)
        row.update(width=im.width, height=im.height, mode=im.mode)
    except ValueError as exc:
        row["image_error"] = str(exc)
    if cell.mask is not None:
        try:
            open_image(cell.mask)
            nucleus, cytoplasm = region_fractions(read_mask(cell.mask))
            row.update(nucleus_fraction=nucleus, cytoplasm_fraction=cytoplasm)
        except ValueError as exc:
            row["mask_error"] = str(exc)
    return row


def build_manifest(root: str | Path, progress: bool = True) -> pd.DataFrame:
    """Scan root and describe every cell; raises DataError when root holds no images."""
    cells = find_cells(root)
    source = data_source(root)
    rows = [_row(c, source) for c in tqdm(cells, desc="manifest", unit="cell", disable=not progress)]
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    return df.astype(
        {"severity": "Int64", "abnormal": "boolean", "width": "Int64", "height": "Int64"}
    )


def write_manifest(df: pd.DataFrame, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    return out


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest CSV back with the dtypes build_manifest gives."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; write one with `pap-severity data manifest DIR --out {path}`")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: not a manifest, missing columns {missing}")
    for col in ("severity", "width", "height"):
        df[col] = pd.to_numeric(df[col].replace("", None)).astype("Int64")
    for col in ("nucleus_fraction", "cytoplasm_fraction"):
        df[col] = pd.to_numeric(df[col].replace("", None)).astype(float)
    df["abnormal"] = df["abnormal"].map({"True": True, "False": False}).astype("boolean")
    return df
