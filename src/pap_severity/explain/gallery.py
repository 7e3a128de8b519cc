"""The misclassified cells of the explained model: each cell, its mask, its IG map, true against predicted.

The explain stage writes `gallery.html` next to report.html from the cells it has just
attributed (the final model on the held-out test part), so the page costs no extra IG.
It shows cell images, so it is generated and never committed (git-ignored; DVC caches
it as an out of the explain stage). It holds the model's confusion matrix over the same
cells, each off-diagonal count linking to its cells, then the cells grouped by (true,
predicted). Self-contained: the pictures are PNG data: URIs.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pap_severity.data.labels import NUM_SEVERITIES, SEVERITY_NAMES
from pap_severity.explain.cells import Cell, mask_rgb
from pap_severity.explain.heatmap import heatmap_png
from pap_severity.files import write_text
from pap_severity.templates import render

# Pictures are enlarged by a whole factor (nearest) until their side is at least this many pixels.
MIN_SIDE_PX = 128


def misclassified(rows: pd.DataFrame) -> list[int]:
    """Index labels of the rows whose `predicted` differs from `severity`, by (true, predicted, path)."""
    wrong = rows[rows["predicted"] != rows["severity"]]
    return wrong.sort_values(["severity", "predicted", "path"], kind="stable").index.tolist()


def confusion_counts(rows: pd.DataFrame) -> np.ndarray:
    """[true, predicted] counts over the severities."""
    counts = np.zeros((NUM_SEVERITIES, NUM_SEVERITIES), dtype=int)
    np.add.at(counts, (rows["severity"].to_numpy(dtype=int), rows["predicted"].to_numpy(dtype=int)), 1)
    return counts


def group_id(true: int, predicted: int) -> str:
    """The HTML anchor of the cells of one (true, predicted) pair."""
    return f"true-{true}-pred-{predicted}"


def _png(picture: np.ndarray, upscale: int) -> bytes:
    image = Image.fromarray(picture)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_gallery(
    path: str | Path,
    rows: pd.DataFrame,
    cells: Sequence[Cell],
    maps: np.ndarray,
    *,
    pipeline: str,
    arch: str,
    data_source: str,
    source_text: str,
    target: str,
    baseline: str,
) -> Path:
    """Write the gallery of the misclassified rows (path, severity, predicted, score) atomically.

    cells[i] and maps[i] belong to the row at position i of rows.
    """
    if not (len(rows) == len(cells) == len(maps)):
        raise ValueError(f"rows ({len(rows)}), cells ({len(cells)}) and maps ({len(maps)}) must match one to one")
    rows = rows.reset_index(drop=True)
    side = cells[0].rgb.shape[0] if cells else MIN_SIDE_PX
    upscale = max(1, math.ceil(MIN_SIDE_PX / side))
    groups: dict[tuple[int, int], list[dict]] = {}
    for i in misclassified(rows):
        cell, row = cells[i], rows.loc[i]
        true, predicted = int(row["severity"]), int(row["predicted"])
        groups.setdefault((true, predicted), []).append({
            "path": str(row["path"]),
            "true": SEVERITY_NAMES[true],
            "predicted": SEVERITY_NAMES[predicted],
            "score": float(row["score"]),
            "image_png": _png(cell.rgb, upscale),
            "mask_png": _png(mask_rgb(cell.codes), upscale) if cell.codes is not None else None,
            "ig_png": heatmap_png(cell.rgb, maps[i], upscale=upscale, colorbar=True),
        })
    counts = confusion_counts(rows)
    page = render(
        "explain_gallery.html.j2",
        pipeline=pipeline,
        arch=arch,
        data_source=data_source,
        source_text=source_text,
        target=target,
        baseline=baseline,
        n_cells=len(rows),
        n_wrong=sum(len(g) for g in groups.values()),
        names=SEVERITY_NAMES,
        counts=counts.tolist(),
        group_id=group_id,
        groups=[
            {"id": group_id(t, p), "true": SEVERITY_NAMES[t], "predicted": SEVERITY_NAMES[p], "cells": found}
            for (t, p), found in groups.items()
        ],
    )
    return write_text(path, page)
