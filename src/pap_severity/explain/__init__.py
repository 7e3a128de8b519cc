"""Explaining a model: Integrated Gradients, the nucleus / cytoplasm fractions of its maps, and the report.

- `cells`: a cell image and its mask in the model's geometry (`Cell`, `load_cell`, `prepare_image`).
- `attribution`: the maths: IG over any bundle whose model returns one tensor
  `[logits..., score]`, baselines, targets, the convergence delta, attribution maps, the
  At_N / At_C fractions and the random floor. Pure, no files.
- `sanity`: the cascading-randomisation sanity check.
- `heatmap`: maps drawn over the cell, with the colour scale they were drawn with.
- `report`, `gallery`: the explain stage's files (report.html, attributions.csv,
  class_means.csv, sanity.csv, fig9.png, summary.json, gallery.html), pages from Jinja2
  templates (`pap_severity.templates`).

The names below are the public API (the BentoML service and the stages import them from here).
"""

from pap_severity.explain.attribution import (
    ABS_METRICS,
    BASELINES,
    DELTA_FLOOR,
    FRACTION_KEYS,
    RANDOM_KEYS,
    REGION_METRICS,
    SIGNED_METRICS,
    TARGETS,
    ConvergenceWarning,
    IGResult,
    attribute,
    attribution_fractions,
    attribution_map,
    convergence_message,
    images_per_call,
    integrated_gradients,
    make_baseline,
    random_attribution,
    random_floor,
)
from pap_severity.explain.cells import Cell, load_cell, mask_rgb, prepare_image, square_resize_mask
from pap_severity.explain.gallery import GALLERY_FILE, misclassified, write_gallery
from pap_severity.explain.heatmap import heatmap_mappable, heatmap_png, heatmap_rgb, heatmap_scale
from pap_severity.explain.report import (
    CSV_COLUMNS,
    DATA_SOURCE_TEXT,
    REPORT_FILE,
    TABLE_COLUMNS,
    class_table,
    explain_report,
    fig8,
    fig9,
)
from pap_severity.explain.sanity import cascade_stages, randomise_cascade, sanity_check

__all__ = [
    "ABS_METRICS",
    "BASELINES",
    "CSV_COLUMNS",
    "Cell",
    "ConvergenceWarning",
    "DATA_SOURCE_TEXT",
    "DELTA_FLOOR",
    "FRACTION_KEYS",
    "GALLERY_FILE",
    "IGResult",
    "RANDOM_KEYS",
    "REGION_METRICS",
    "REPORT_FILE",
    "SIGNED_METRICS",
    "TABLE_COLUMNS",
    "TARGETS",
    "attribute",
    "attribution_fractions",
    "attribution_map",
    "cascade_stages",
    "class_table",
    "convergence_message",
    "explain_report",
    "fig8",
    "fig9",
    "heatmap_mappable",
    "heatmap_png",
    "heatmap_rgb",
    "heatmap_scale",
    "images_per_call",
    "integrated_gradients",
    "load_cell",
    "make_baseline",
    "mask_rgb",
    "misclassified",
    "prepare_image",
    "random_attribution",
    "random_floor",
    "randomise_cascade",
    "sanity_check",
    "square_resize_mask",
    "write_gallery",
]
