"""The manifest: one row per cell with its labels, checksum, size and mask fractions.

Building it opens every image fully, so a truncated or fake file, a symlink loop or a
dangling link shows up here as an `image_error` (or `mask_error`) on its row, to be
reported by validation instead of crashing this or a later stage; every other cell
is still described.

`mask_width`/`mask_height` are the mask's own size. A mask whose size differs from its
image's does not belong to it pixel for pixel, so its nucleus and cytoplasm fractions
are left empty (NaN) and validation names the cell ("every mask has its image's size").
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from pap_severity.data.labels import is_abnormal, is_class_folder, severity_of
from pap_severity.data.masks import read_mask, region_fractions
from pap_severity.data.reader import CellFile, find_cells, open_image, read_bytes
from pap_severity.data.synth import SYNTH_MARKER
from pap_severity.files import write_csv
from pap_severity.progress import progress_bar

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
    "mask_width",
    "mask_height",
    "nucleus_fraction",
    "cytoplasm_fraction",
    "source",
    "image_error",
    "mask_error",
)
_INTEGERS = ("severity", "width", "height", "mask_width", "mask_height")


def data_source(root: str | Path) -> str:
    """'synthetic' when root is (inside) a set written by `data synth`, else 'herlev'."""
    root = Path(root).resolve()
    for folder in (root, *root.parents):
        if (folder / SYNTH_MARKER).is_file():
            return "synthetic"
    return "herlev"


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
        "sha256": "",
        "mask_width": pd.NA,
        "mask_height": pd.NA,
        "nucleus_fraction": np.nan,
        "cytoplasm_fraction": np.nan,
        "source": source,
        "image_error": "",
        "mask_error": "",
    }
    try:
        row["sha256"] = hashlib.sha256(read_bytes(cell.image)).hexdigest()
        im = open_image(cell.image)
        row.update(width=im.width, height=im.height, mode=im.mode)
    except ValueError as exc:
        row["image_error"] = str(exc)
    if cell.mask is not None:
        try:
            codes = read_mask(cell.mask)
        except ValueError as exc:
            row["mask_error"] = str(exc)
        else:
            row.update(mask_width=codes.shape[1], mask_height=codes.shape[0])
            # An image of unknown size cannot contradict its mask; validation names the image.
            if row["image_error"] or (row["width"], row["height"]) == (codes.shape[1], codes.shape[0]):
                nucleus, cytoplasm = region_fractions(codes)
                row.update(nucleus_fraction=nucleus, cytoplasm_fraction=cytoplasm)
    return row


def build_manifest(root: str | Path, progress: bool = True) -> pd.DataFrame:
    """Scan root and describe every cell; raises DataError when root holds no images."""
    cells = find_cells(root)
    source = data_source(root)
    rows = [_row(c, source) for c in progress_bar(cells, progress=progress, desc="manifest", unit="cell")]
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    return df.astype({"abnormal": "boolean", **{col: "Int64" for col in _INTEGERS}})


def write_manifest(df: pd.DataFrame, out: str | Path) -> Path:
    return write_csv(df, out)


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest CSV back with the dtypes build_manifest gives."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; write one with `pap-severity data manifest DIR --out {path}`")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"{path}: not a manifest of this version, missing columns {missing}; "
            f"rebuild it with `pap-severity data manifest DIR --out {path}`"
        )
    for col in _INTEGERS:
        df[col] = pd.to_numeric(df[col].replace("", None)).astype("Int64")
    for col in ("nucleus_fraction", "cytoplasm_fraction"):
        df[col] = pd.to_numeric(df[col].replace("", None)).astype(float)
    df["abnormal"] = df["abnormal"].map({"True": True, "False": False}).astype("boolean")
    return df
