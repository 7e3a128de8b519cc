"""The pipelines side by side, and whether one beats the reference: the compare stage.

`compare` reads every pipeline's `metrics/<pipeline>.json` (per-fold values on the validation
folds and on the test part) and, when present, the served models' test predictions
(`models/ensemble/<pipeline>.predictions.csv`). It writes `reports/comparison.{md,json}`, the
AUC-per-class figure of all pipelines, and for every pipeline against `compare.reference`:

- `paired.<pipeline>.<metric>`: the paired difference over the (repeat, fold) splits, on each
  model's own validation fold (out-of-fold: different cells in each fold, every cv cell once per
  repeat), see `paired.paired_difference` for the interval and the test;
- `paired_test.<pipeline>`: the served models compared cell by cell on the test part, a paired
  bootstrap of the accuracy difference;
- the paper's Fig. 7 for the pair: AUC per class over the folds, reference and challenger side by
  side (`reports/figures/paired/<pipeline>_vs_<reference>.png`).
A reference that was not trained, or splits that differ between two pipelines, is said in one
line and the rest is still written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pap_severity.data.labels import NUM_SEVERITIES, SEVERITY_NAMES
from pap_severity.evaluation import (
    CLASSES,
    DATA_SOURCES,
    HEADLINE,
    HEADLINE_LABELS,
    _class_label,
    _save,
)
from pap_severity.files import json_ready, write_csv, write_json, write_text
from pap_severity.paired import bootstrap_accuracy, paired_difference

# Pirovano et al., "Regression Constraint for an Explainable Cervical Cancer Classifier",
# on real Herlev. Only the figures the paper reports; shown for reference, never as ours.
PAPER_FIGURES: dict[str, dict[str, float]] = {
    "classification": {"accuracy": 0.701},
    "regression": {"accuracy": 0.606},
    "combined": {"accuracy": 0.745, "mean_auc": 0.94, "mse": 0.51, "binary_accuracy": 0.94, "binary_f1": 0.96},
}



def plot_auc_per_fold(metrics_by_pipeline: dict[str, dict], path: Path) -> Path:
    """Test-part one-vs-rest AUC per class for every pipeline side by side (the paper's Fig 7).

    Small dots are the fold models, the marker and bar are the mean ± std over folds
    (the bar clipped at 1). A class with no test cells has no AUC and stays empty.
    """
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.subplots()
    n = len(metrics_by_pipeline)
    width = 0.8 / max(n, 1)
    for i, (name, metrics) in enumerate(metrics_by_pipeline.items()):
        auc = metrics["auc_per_class"]
        per_fold = np.asarray(auc["per_fold"], dtype=float).reshape(-1, NUM_SEVERITIES)
        x = np.arange(NUM_SEVERITIES) - 0.4 + width * (i + 0.5)
        colour = f"C{i}"
        for fold in per_fold:
            ax.scatter(x, fold, s=10, alpha=0.4, color=colour)
        mean = np.asarray(auc["mean"], dtype=float)
        std = np.nan_to_num(np.asarray(auc["std"], dtype=float))
        upper = np.clip(mean + std, None, 1.0) - mean  # an AUC never exceeds 1
        ax.errorbar(x, mean, yerr=[std, upper], fmt="o", color=colour, capsize=3, label=name)
    ax.set_xticks(CLASSES, list(SEVERITY_NAMES))
    ax.set_xlim(-0.5, NUM_SEVERITIES - 0.5)
    ax.set_xlabel("class (one vs rest)")
    ax.set_ylabel("AUC")
    ax.set_ylim(top=1.02)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="pipeline", fontsize=8)
    sources = sorted({str(m.get("data_source")) for m in metrics_by_pipeline.values()})
    sources = [DATA_SOURCES.get(source, source) for source in sources]
    ax.set_title(f"AUC per class across fold models, test part, {' + '.join(sources)}", fontsize=10)
    return _save(fig, path)




def auc_rows(metrics_by_pipeline: dict[str, dict]) -> pd.DataFrame:
    """Test-part AUC per (pipeline, class, fold), one row each: the data behind Fig 7 for `dvc plots`."""
    rows = []
    for name, metrics in metrics_by_pipeline.items():
        per_fold = np.asarray(metrics["auc_per_class"]["per_fold"], dtype=float).reshape(-1, NUM_SEVERITIES)
        rows += [{"pipeline": name, "class": _class_label(k), "fold": fold, "auc": per_fold[fold, k]}
                 for k in CLASSES for fold in range(len(per_fold))]
    return pd.DataFrame(rows, columns=["pipeline", "class", "fold", "auc"])




def compare(metrics_files: dict[str, Path] | list[Path], out_md: Path, out_json: Path, fig_path: Path, *,
            reference: str = "classification", served_predictions: dict[str, pd.DataFrame] | None = None,
            paired_dir: Path | None = None) -> dict:
    """Every pipeline side by side (markdown, JSON, the AUC-per-fold figure and its CSV) and each
    one paired against `reference` (see the module docstring). `metrics_files` maps pipeline ->
    metrics/<pipeline>.json, or lists the files (each named by its `pipeline` key). Returns the JSON
    content."""
    metrics = _load_metrics(metrics_files)
    if not metrics:
        raise ValueError("no metrics files to compare")
    paired = paired_against(metrics, reference, served_predictions)
    comparison = json_ready(
        {
            "part": "test",
            "data_source": {name: m.get("data_source") for name, m in metrics.items()},
            "n_folds": {name: m.get("n_folds") for name, m in metrics.items()},
            "n_repeats": {name: m.get("n_repeats") for name, m in metrics.items()},
            "n_test_cells": {name: m.get("n_test_cells") for name, m in metrics.items()},
            "settings": {name: m.get("settings") for name, m in metrics.items()},
            "test": {name: _mean_std(m) for name, m in metrics.items()},
            "validation": {name: _mean_std(m.get("validation", {})) for name, m in metrics.items()},
            **paired,
            "paper": PAPER_FIGURES,
        }
    )
    write_json(comparison, Path(out_json))
    write_text(out_md, comparison_markdown(metrics) + "\n".join(paired_markdown(paired)))
    plot_auc_per_fold(metrics, fig_path)
    write_csv(auc_rows(metrics), Path(fig_path).with_suffix(".csv"))
    if paired_dir is not None:
        for name, rows in paired["paired"].items():
            plot_paired_auc(reference, name, metrics, rows, Path(paired_dir) / f"{name}_vs_{reference}.png")
    return comparison


def _load_metrics(metrics_files: dict[str, Path] | list[Path]) -> dict[str, dict]:
    if isinstance(metrics_files, dict):
        return {name: json.loads(Path(path).read_text()) for name, path in metrics_files.items()}
    loaded = {}
    for path in metrics_files:
        content = json.loads(Path(path).read_text())
        loaded[content.get("pipeline") or Path(path).stem] = content
    return loaded


def _mean_std(metrics: dict) -> dict:
    return {m: {"mean": metrics[m]["mean"], "std": metrics[m]["std"]} for m in HEADLINE if m in metrics}


def comparison_markdown(metrics: dict[str, dict]) -> str:
    """The comparison as markdown: provenance lines, test and validation tables, the paper's."""
    sources = {m.get("data_source") for m in metrics.values()}
    lines = ["# Pipeline comparison", ""]
    if len(sources) == 1:
        source = sources.pop()
        lines.append(f"Data source: **{DATA_SOURCES.get(source, source)}**.")
        if source == "synthetic":
            lines.append("These cells are generated, not Herlev: the numbers test the code, not the paper.")
    else:
        listed = ", ".join(f"{name}: {m.get('data_source')}" for name, m in metrics.items())
        lines.append(f"Data source: **mixed** ({listed}); do not compare these rows.")
    lines.append("")
    lines += _settings_lines(metrics)
    lines += [
        "",
        "## Held-out test part",
        "",
        "Mean ± std over the fold models, each predicting the same held-out test cells.",
        "",
    ]
    lines += _table(metrics, extra=("n_folds", "n_test_cells"))
    lines += [
        "",
        "## Validation folds",
        "",
        "Mean ± std over folds, each model on its own validation fold.",
        "",
    ]
    lines += _table({name: m.get("validation", {}) for name, m in metrics.items()})
    lines += [
        "",
        "## The paper's figures, for reference",
        "",
        "Reported by Pirovano et al. on real Herlev with their settings; not produced by this code.",
        "",
    ]
    header = ["pipeline (paper)", *(HEADLINE_LABELS[m] for m in HEADLINE)]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, figures in PAPER_FIGURES.items():
        cells = [f"{figures[m]:.3f}" if m in figures else "—" for m in HEADLINE]
        lines.append(f"| paper: {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _settings_lines(metrics: dict[str, dict]) -> list[str]:
    rendered = {name: _render_settings(m.get("settings") or {}) for name, m in metrics.items()}
    if len(set(rendered.values())) == 1:
        return [f"Settings: {next(iter(rendered.values()))}."]
    return ["Settings:", "", *(f"- {name}: {text}" for name, text in rendered.items())]


def _render_settings(settings: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in settings.items()) or "not recorded"


def _table(metrics: dict[str, dict], extra: tuple[str, ...] = ()) -> list[str]:
    header = ["pipeline", *(HEADLINE_LABELS[m] for m in HEADLINE), *extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in metrics.items():
        cells = [_format_mean_std(m.get(metric)) for metric in HEADLINE]
        cells += [str(m.get(key, "—")) for key in extra]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _format_mean_std(summary: dict | None) -> str:
    if not summary or summary.get("mean") is None:
        return "n/a"
    if summary.get("std") is None:
        return f"{summary['mean']:.3f}"
    return f"{summary['mean']:.3f} ± {summary['std']:.3f}"


# Paired against the reference ------------------------------------------------------------------

PAIRED_METRICS = ("accuracy", "balanced_accuracy", "mean_auc", *(f"auc_{n.replace(' ', '_')}" for n in SEVERITY_NAMES),
                  "mse", "qwk", "binary_accuracy")


def per_split(metrics: dict, part: str = "validation") -> dict[str, list[float]]:
    """Each paired metric's value per (repeat, fold) split, on the models' validation folds or the test part."""
    source = metrics.get("validation", {}) if part == "validation" else metrics
    values = {m: list(source[m]["per_fold"]) for m in PAIRED_METRICS if m in source}
    per_class = np.asarray(source["auc_per_class"]["per_fold"], dtype=float).reshape(-1, NUM_SEVERITIES)
    for k, name in enumerate(SEVERITY_NAMES):
        values[f"auc_{name.replace(' ', '_')}"] = per_class[:, k].tolist()
    return values


def paired_against(metrics: dict[str, dict], reference: str,
                   served_predictions: dict[str, pd.DataFrame] | None = None) -> dict:
    """`paired`, `paired_test` and the `notes` on what could not be paired (see the module docstring)."""
    out: dict = {"reference": reference, "part": "validation folds", "paired": {}, "paired_test": {}, "notes": []}
    if reference not in metrics:
        out["notes"].append(f"the reference pipeline {reference!r} has no metrics (not trained): no paired "
                            f"comparison; train it or set compare.reference to one of {', '.join(metrics)}")
        return out
    ref = metrics[reference]
    ref_values = per_split(ref)
    folds = ref.get("n_folds") or 2
    out["interval"] = (f"Student's t, 95%, with the Nadeau-Bengio correction for {folds}-fold cross-validation "
                       f"(n_val/n_train = 1/{folds - 1})")
    out["significance_test"] = "two-sided Wilcoxon signed-rank (SciPy); null under 5 pairs"
    for name, m in metrics.items():
        if name == reference:
            continue
        if m.get("splits") != ref.get("splits"):
            out["notes"].append(f"{name}: trained on other (repeat, fold) splits than {reference} "
                                f"({m.get('splits')} against {ref.get('splits')}); not paired")
            continue
        values = per_split(m)
        out["paired"][name] = {metric: paired_difference(values[metric], ref_values[metric], 1 / (folds - 1))
                               for metric in PAIRED_METRICS if metric in values and metric in ref_values}
        short = [r for r in out["paired"][name].values() if r["p_value"] is None and r.get("reason")]
        if short:
            out["notes"].append(f"{name}: {short[0]['reason']}")
    served = served_predictions or {}
    if reference in served:
        for name, table in served.items():
            if name == reference:
                continue
            a, b = _aligned(table, served[reference])
            if a is None:
                out["notes"].append(f"{name}: its served model's test cells differ from {reference}'s; no bootstrap")
                continue
            out["paired_test"][name] = {"accuracy": bootstrap_accuracy(a, b)}
    return out


def _aligned(challenger: pd.DataFrame, reference: pd.DataFrame) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per-cell correctness of two served models on the same test cells, in one order."""
    a = challenger.set_index("path")
    b = reference.set_index("path")
    if set(a.index) != set(b.index):
        return None, None
    b = b.loc[a.index]
    return (a["pred"] == a["severity"]).to_numpy(), (b["pred"] == b["severity"]).to_numpy()


def served_test_predictions(path: Path) -> pd.DataFrame | None:
    """The served variant's test rows of a models/ensemble/<pipeline>.predictions.csv, if it exists."""
    path = Path(path)
    if not path.is_file():
        return None
    spec = json.loads(path.with_name(path.name.replace(".predictions.csv", ".json")).read_text())
    table = pd.read_csv(path)
    return table[(table["variant"] == spec["variant"]) & (table["part"] == "test")].reset_index(drop=True)


def paired_markdown(result: dict) -> list[str]:
    reference = result["reference"]
    lines = ["", f"## Paired against {reference}", ""]
    if result.get("interval"):
        lines += [f"Challenger minus {reference}, per (repeat, fold) split on each model's own validation fold. "
                  f"Interval: {result['interval']}. p: {result['significance_test']}. Lower is better for MSE.", ""]
    for name, rows in result["paired"].items():
        lines += [f"### {name} - {reference}", "", "| metric | mean difference | 95% interval | p | n |",
                  "|---|---|---|---|---|"]
        for metric, r in rows.items():
            interval = "—" if r["ci95"] is None else f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]"
            p = "—" if r["p_value"] is None else f"{r['p_value']:.3g}"
            label = HEADLINE_LABELS.get(metric, metric.replace("_", " "))
            mean = "—" if r["mean_diff"] is None else f"{r['mean_diff']:+.3f}"
            lines.append(f"| {label} | {mean} | {interval} | {p} | {r['n']} |")
        lines.append("")
    if result["paired_test"]:
        lines += ["### Served models on the held-out test part", "",
                  "Accuracy difference, paired bootstrap over the test cells (10 000 resamples, percentile "
                  "interval).", "", "| pipeline | accuracy difference | 95% interval | p | cells |",
                  "|---|---|---|---|---|"]
        for name, r in result["paired_test"].items():
            r = r["accuracy"]
            lines.append(f"| {name} - {reference} | {r['mean_diff']:+.3f} | [{r['ci95'][0]:+.3f}, "
                         f"{r['ci95'][1]:+.3f}] | {r['p_value']:.3g} | {r['n']} |")
        lines.append("")
    if result["notes"]:
        lines += ["Notes:", "", *(f"- {note}" for note in result["notes"]), ""]
    return lines


def plot_paired_auc(reference: str, challenger: str, metrics: dict[str, dict], paired: dict, path: Path) -> Path:
    """The paper's Fig. 7 for one pair: AUC per class over the validation folds, side by side,
    each split's two values joined, with the mean difference and p per class."""
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.subplots()
    values = {name: np.asarray(metrics[name]["validation"]["auc_per_class"]["per_fold"], dtype=float)
              .reshape(-1, NUM_SEVERITIES) for name in (reference, challenger)}
    for k in CLASSES:
        for i, name in enumerate((reference, challenger)):
            x = k + (-0.18 if i == 0 else 0.18)
            column = values[name][:, k]
            ax.boxplot(column[np.isfinite(column)], positions=[x], widths=0.3, showfliers=False,
                       medianprops={"color": f"C{i}"})
            ax.scatter(np.full(column.shape, x), column, s=10, color=f"C{i}", alpha=0.6,
                       label=name if k == 0 else None)
        for a, b in zip(values[reference][:, k], values[challenger][:, k]):
            ax.plot([k - 0.18, k + 0.18], [a, b], color="grey", alpha=0.25, linewidth=0.8)
        r = paired.get(f"auc_{SEVERITY_NAMES[k].replace(' ', '_')}")
        if r and r["mean_diff"] is not None:
            p = "p n/a" if r["p_value"] is None else f"p={r['p_value']:.2g}"
            ax.text(k, 1.01, f"{r['mean_diff']:+.3f}\n{p}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(CLASSES, list(SEVERITY_NAMES))
    ax.set_xlim(-0.5, NUM_SEVERITIES - 0.5)
    ax.set_ylim(top=1.12)
    ax.set_xlabel("class (one vs rest)")
    ax.set_ylabel("AUC on the validation fold")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    n = len(values[reference])
    source = DATA_SOURCES.get(metrics[reference].get("data_source"), "?")
    ax.set_title(f"AUC per class, {challenger} against {reference}, {n} (repeat, fold) splits, {source} "
                 f"(above: mean difference, Wilcoxon p)", fontsize=9)
    return _save(fig, path)
