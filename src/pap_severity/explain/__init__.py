"""Explaining a model: Integrated Gradients, the nucleus / cytoplasm fractions of its maps, and the report.

- `files`: the names of the files the explain stage writes.
- `cells`: a cell image and its mask in the model's geometry (`Cell`, `load_cell`, `prepare_image`).
- `attribution`: the maths: IG over any bundle whose model returns one tensor
  `[logits..., score]`, baselines, targets, the convergence delta, attribution maps, the
  At_N / At_C fractions and the random floor. Pure, no files.
- `sanity`: the cascading-randomisation sanity check.
- `heatmap`: maps drawn over the cell, with the colour scale they were drawn with.
- `report`, `gallery`: the explain stage's files (report.html, attributions.csv,
  class_means.csv, sanity.csv, fig9.png, summary.json, gallery.html), pages from Jinja2
  templates (`pap_severity.templates`).

The names below are the public API (the BentoML service and the stages import them from here). They
load with their module on first use, so that reading a file name (`files`) loads no torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "ABS_METRICS": "attribution",
    "ATTRIBUTIONS_FILE": "files",
    "BASELINES": "attribution",
    "CSV_COLUMNS": "report",
    "Cell": "cells",
    "ConvergenceWarning": "attribution",
    "DATA_SOURCE_TEXT": "report",
    "DELTA_FLOOR": "attribution",
    "EXPLAIN_FILES": "files",
    "FRACTION_KEYS": "attribution",
    "GALLERY_FILE": "files",
    "IGResult": "attribution",
    "RANDOM_KEYS": "attribution",
    "REGION_METRICS": "attribution",
    "REPORT_FILE": "files",
    "SIGNED_METRICS": "attribution",
    "SUMMARY_FILE": "files",
    "TABLE_COLUMNS": "report",
    "TARGETS": "attribution",
    "attribute": "attribution",
    "attribution_fractions": "attribution",
    "attribution_map": "attribution",
    "cascade_stages": "sanity",
    "class_table": "report",
    "convergence_message": "attribution",
    "explain_report": "report",
    "fig8": "report",
    "fig9": "report",
    "heatmap_mappable": "heatmap",
    "heatmap_png": "heatmap",
    "heatmap_rgb": "heatmap",
    "heatmap_scale": "heatmap",
    "images_per_call": "attribution",
    "integrated_gradients": "attribution",
    "load_cell": "cells",
    "make_baseline": "attribution",
    "mask_rgb": "cells",
    "misclassified": "gallery",
    "prepare_image": "cells",
    "random_attribution": "attribution",
    "random_floor": "attribution",
    "randomise_cascade": "sanity",
    "sanity_check": "sanity",
    "square_resize_mask": "cells",
    "write_gallery": "gallery",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
