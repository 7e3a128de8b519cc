"""The explain stage's report: attribute every test cell, then write the tables, figures and pages.

`explain_report` writes under its folder: report.html (self-contained, from the Jinja2
template `explain_report.html.j2`), attributions.csv (one row per cell), class_means.csv,
sanity.csv, fig9.png, summary.json (the DVC metric) and gallery.html (the misclassified
cells, `explain.gallery`). The maths it reports lives in `attribution` and `sanity`;
this module only selects, aggregates and draws.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from pap_severity.checkpoints import ModelBundle
from pap_severity.config import ExplainConfig
from pap_severity.data.labels import NUM_SEVERITIES, SEVERITY_NAMES
from pap_severity.explain.attribution import (
    DELTA_FLOOR,
    FRACTION_KEYS,
    RANDOM_KEYS,
    IGResult,
    attribution_fractions,
    attribution_map,
    convergence_message,
    integrated_gradients,
    random_floor,
)
from pap_severity.explain.cells import Cell, load_cell, mask_rgb
from pap_severity.explain.files import ATTRIBUTIONS_FILE, GALLERY_FILE, REPORT_FILE, SUMMARY_FILE
from pap_severity.explain.gallery import write_gallery
from pap_severity.explain.heatmap import heatmap_mappable, heatmap_rgb, heatmap_scale
from pap_severity.explain.sanity import sanity_check
from pap_severity.files import json_ready, write_json, write_text
from pap_severity.progress import progress_bar
from pap_severity.templates import render

# Images used by the sanity check (spread over the classes).
SANITY_IMAGES = 8
# A mean Spearman of |Am| at or above this, at any cascade stage, is reported as a warning.
SANITY_WARN = 0.5

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
ABNORMAL = "abnormal (1-4)"
MAIN_METRICS = (
    "at_n", "at_c", "at_ratio", "abs_at_n", "abs_at_c", "abs_at_ratio",
    "at_n_norm", "at_c_norm", "abs_at_n_norm", "abs_at_c_norm",
    "rand_abs_at_n_norm", "rand_abs_at_c_norm",
)
DATA_SOURCE_TEXT = {
    "herlev": "Herlev Pap smear cells (real data)",
    "synthetic": "SYNTHETIC cells: these numbers say nothing about real cells",
}


# --------------------------------------------------------------------------------------
# Figures
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


def fig8(cells: Sequence[tuple[str, Cell, np.ndarray, str]], per_row: int) -> Figure:
    """Image, mask and |Am| heat map for each (row label, cell, am, caption), per_row cells a row.

    Each heat map is drawn at its own scale (the 99th percentile of its |Am|), so each has
    its own colour bar stating that scale.
    """
    n_rows = max(1, math.ceil(len(cells) / per_row))
    fig = Figure(figsize=(per_row * 3 * 1.4, n_rows * 1.45))
    axes = np.atleast_2d(fig.subplots(n_rows, per_row * 3, squeeze=False))
    for ax in axes.ravel():
        ax.axis("off")
    for i, (row_label, cell, am, caption) in enumerate(cells):
        r, c = divmod(i, per_row)
        panels = (cell.rgb, mask_rgb(cell.codes) if cell.codes is not None else np.zeros_like(cell.rgb),
                  heatmap_rgb(cell.rgb, am))
        for j, picture in enumerate(panels):
            ax = axes[r, c * 3 + j]
            ax.imshow(picture, interpolation="nearest")
            if j == 0:
                ax.set_title(caption, fontsize=6)
            if c == 0 and j == 0:
                ax.text(-0.15, 0.5, row_label, transform=ax.transAxes, rotation=90, va="center",
                        ha="right", fontsize=8)
        bar = fig.colorbar(heatmap_mappable(heatmap_scale(am)), ax=axes[r, c * 3 + 2], fraction=0.046, pad=0.03)
        bar.ax.tick_params(labelsize=4, length=1.5, pad=1)
    fig.tight_layout(pad=0.3)
    return fig


# --------------------------------------------------------------------------------------
# Tables and selections
# --------------------------------------------------------------------------------------


def class_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per-class means of the metrics (NaN-skipping) plus an `abnormal` row (severity >= 1)."""
    metric_columns = [c for c, _ in TABLE_COLUMNS if c != "n"]
    table = []
    for k in range(NUM_SEVERITIES):
        part = rows[rows["severity"] == k]
        table.append({"class": SEVERITY_NAMES[k], "n": len(part), **part[metric_columns].mean().to_dict()})
    abnormal = rows[rows["severity"] >= 1]
    table.append({"class": ABNORMAL, "n": len(abnormal), **abnormal[metric_columns].mean().to_dict()})
    return pd.DataFrame(table).set_index("class")


def select_panel_cells(rows: pd.DataFrame, per_class: int, seed: int) -> list[int]:
    """Up to per_class cells with a mask of each class (seeded), the examples of Fig 8."""
    rng = np.random.default_rng(seed)
    chosen = []
    for k in range(NUM_SEVERITIES):
        idx = rows.index[(rows["severity"] == k) & rows["has_mask"]].to_numpy()
        if len(idx):
            chosen.extend(sorted(rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist()))
    return chosen


def sanity_indices(rows: pd.DataFrame, seed: int) -> list[int]:
    """Up to SANITY_IMAGES cells, round-robin over the classes."""
    rng = np.random.default_rng(seed + 1)
    pools = [list(rng.permutation(rows.index[rows["severity"] == k].to_numpy())) for k in range(NUM_SEVERITIES)]
    chosen: list[int] = []
    while len(chosen) < min(SANITY_IMAGES, len(rows)) and any(pools):
        for pool in pools:
            if pool and len(chosen) < SANITY_IMAGES:
                chosen.append(int(pool.pop()))
    return sorted(chosen)


def summarize(bundle: ModelBundle, rows: pd.DataFrame, table: pd.DataFrame, result: IGResult,
              sanity: pd.DataFrame | None, cfg: ExplainConfig, data_source: str, conv_warnings: list[str]) -> dict:
    """summary.json: what was explained, how, the convergence, the per-class means and the sanity check."""
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
        "abnormal": {m: table.at[ABNORMAL, m] for m in MAIN_METRICS},
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


def sanity_verdict(sanity: pd.DataFrame | None) -> dict | None:
    """What the report says of the sanity table: its rows, the highest and the last mean Spearman of |Am|,
    and whether the highest reaches SANITY_WARN. None when the check did not run."""
    if sanity is None or sanity.empty:
        return None
    worst = float(sanity["spearman_abs"].max())
    return {"rows": sanity.to_dict("records"), "worst": worst, "final": float(sanity["spearman_abs"].iloc[-1]),
            "warns": worst >= SANITY_WARN}


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


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
    cell), summary.json (the DVC metric), class_means.csv, sanity.csv, fig9.png and
    gallery.html (the misclassified cells). Cells without a mask get NaN fractions.
    Returns the summary dict.
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
        for row in progress_bar(items.itertuples(), progress=progress, total=len(items), desc="load cells",
                                unit="cell")
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
    write_text(out_dir / ATTRIBUTIONS_FILE, rows.to_csv(index=False))
    rows["has_mask"] = [c.codes is not None for c in cells]

    table = class_table(rows)
    write_text(out_dir / "class_means.csv", table.to_csv())

    sanity = None
    if cfg.sanity_check:
        chosen = sanity_indices(rows, cfg.seed)
        sanity = sanity_check(bundle, images[chosen], cfg, trained_maps=maps[chosen], progress=progress)
        write_text(out_dir / "sanity.csv", sanity.to_csv(index=False))

    source_text = DATA_SOURCE_TEXT.get(data_source, data_source)
    fig9_png = _png(fig9(rows, title=f"{bundle.pipeline.name} — {source_text}"))
    _write_bytes(out_dir / "fig9.png", fig9_png)
    panel_cells = [
        (
            SEVERITY_NAMES[int(rows.at[i, "severity"])],
            cells[i],
            maps[i],
            f"pred {SEVERITY_NAMES[int(rows.at[i, 'predicted'])][:8]} s={rows.at[i, 'score']:.2f}",
        )
        for i in select_panel_cells(rows, cfg.cells_per_class, cfg.seed)
    ]
    fig8_png = _png(fig8(panel_cells, per_row=cfg.cells_per_class), dpi=130) if panel_cells else None

    summary = summarize(bundle, rows, table, result, sanity, cfg, data_source, convergence_warnings)
    write_json(summary, out_dir / SUMMARY_FILE)
    write_gallery(out_dir / GALLERY_FILE, rows, cells, maps, pipeline=bundle.pipeline.name, arch=bundle.arch,
                  data_source=data_source, source_text=source_text, target=result.target, baseline=result.baseline)
    write_text(out_dir / REPORT_FILE, render(
        "explain_report.html.j2",
        pipeline=bundle.pipeline.name,
        arch=bundle.arch,
        data_source=data_source,
        source_text=source_text,
        summary=json_ready(summary),
        cfg=cfg,
        delta_floor=DELTA_FLOOR,
        table_headers=["class", *(header for _, header in TABLE_COLUMNS)],
        table_rows=[(name, [values[c] for c, _ in TABLE_COLUMNS]) for name, values in table.iterrows()],
        fig9_png=fig9_png,
        fig8_png=fig8_png,
        sanity=sanity_verdict(sanity),
    ))
    return json_ready(summary)


def _write_bytes(path: Path, data: bytes) -> None:
    """Write next to the target (a name of this process), then rename over it: readers see the old file or the new."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    partial.write_bytes(data)
    partial.replace(path)

