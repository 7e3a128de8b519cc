"""Metrics, figures and the pipeline comparison.

Every number comes from scikit-learn where it has the metric. A metric that a fold
cannot define (a class absent from a tiny fold, one class only) is NaN, never a crash
and never a warning; NaN becomes `null` in the JSON files.

Inputs are what every pipeline decodes to (see `pipelines.py`): the true severity
0..4, class probabilities [N, 5], the predicted severity 0..4 and the predicted score
on the paper's 1..5 scale (score = severity + 1).

The predictions table written by cross-validation has one row per
(pipeline, fold, part, cell): `pipeline, fold, part (val|test), path, severity, pred,
score, p0..p4`. Each fold's model predicts its own validation fold and the shared
held-out test part, so a test metric has one value per fold model, and the validation
folds together cover every non-test cell once (out-of-fold).

Figures are drawn on bare `matplotlib.figure.Figure` objects (Agg rendering, no pyplot
state), so they are safe in tests, servers and parallel workers.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pap_severity.data.labels import NUM_SEVERITIES, SEVERITY_NAMES
from pap_severity.files import json_ready, write_csv, write_json

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# scikit-learn and matplotlib load where they are used (about 2 s): the report, the registry and
# the server read this module's names without computing a metric or drawing a figure.

PREDICTIONS_FILE = "predictions.csv"  # in pipeline_dir: cross_validate writes it, evaluate reads it


def pipeline_dir(out_dir: str | Path, pipeline: str) -> Path:
    """Where cross_validate writes a pipeline's fold models, predictions and run ids."""
    return Path(out_dir) / pipeline


CLASSES = list(range(NUM_SEVERITIES))
PROB_COLUMNS = [f"p{k}" for k in CLASSES]
PREDICTION_COLUMNS = ("pipeline", "repeat", "fold", "part", "path", "severity", "pred", "score", *PROB_COLUMNS)
PARTS = {"test": "test part", "val": "validation folds"}
DATA_SOURCES = {"herlev": "Herlev", "synthetic": "synthetic data"}

# The metrics of metrics/<pipeline>.json, each with mean, std and per_fold.
METRICS = (
    "accuracy",
    "balanced_accuracy",
    "mean_auc",
    "auc_per_class",
    "mse",
    "mae",
    "macro_mae",
    "qwk",
    "binary_accuracy",
    "binary_f1",
    "sensitivity",
    "specificity",
)
# The columns of the comparison table (auc_per_class has its own figure).
HEADLINE = tuple(m for m in METRICS if m != "auc_per_class")
# The metrics early stopping and tuning may watch: the scalar ones of compute_metrics.
STOPPING_METRICS = frozenset(HEADLINE)
# Metrics where lower is better; every other metric is better higher.
LOWER_IS_BETTER = frozenset({"mse", "mae", "macro_mae"})
HEADLINE_LABELS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced acc.",
    "mean_auc": "mean AUC",
    "mse": "score MSE",
    "mae": "score MAE",
    "macro_mae": "macro MAE",
    "qwk": "QWK",
    "binary_accuracy": "binary acc.",
    "binary_f1": "binary F1",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
}

def direction_of(metric: str) -> str:
    """"minimize" for the error metrics, "maximize" for the rest (Optuna's words)."""
    return "minimize" if metric in LOWER_IS_BETTER else "maximize"


def is_better(metric: str, value: float | None, best: float | None) -> bool:
    """Whether `value` improves on `best` for `metric`; NaN never improves."""
    if value is None or not math.isfinite(value):
        return False
    if best is None or not math.isfinite(best):
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def compute_metrics(y_true, probs, label, score) -> dict:
    """All metrics of one set of predictions (one fold, one part).

    - `accuracy`, `balanced_accuracy`: 5-class; balanced accuracy is the mean recall over
      the classes present in `y_true`.
    - `auc_per_class`: one-vs-rest ROC AUC of `probs[:, k]` for each class k (NaN when
      class k is absent or is the only class); `mean_auc` is their mean over defined ones.
    - `mse`, `mae`: predicted score against the true score `y_true + 1`.
    - `macro_mae`: the same absolute score error averaged within each true class first,
      then over the classes present (the macro-averaged MAE of ordinal regression,
      Baccianella et al. 2009), so that a large class cannot hide a poor small one.
    - `qwk`: Cohen's kappa with quadratic weights between true and predicted severity.
    - binary normal (0) vs abnormal (1..4), read from the 5-class prediction `label > 0`:
      `binary_accuracy`, `binary_f1` (abnormal positive), `sensitivity` (recall of
      abnormal), `specificity` (recall of normal).
    - `confusion_matrix`: 5x5 counts, rows true, columns predicted, labels 0..4.
    - `n_cells`.
    """
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                                 mean_absolute_error, mean_squared_error, recall_score)

    y_true, probs, label, score = _check_inputs(y_true, probs, label, score)
    true_score = y_true + 1.0
    y_bin, pred_bin = (y_true > 0).astype(int), (label > 0).astype(int)
    auc = [_auc_one_vs_rest(y_true == k, probs[:, k]) for k in CLASSES]
    scores_ok = bool(np.isfinite(score).all())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a class absent from y_true or y_pred
        balanced = balanced_accuracy_score(y_true, label)
    return {
        "accuracy": float(accuracy_score(y_true, label)),
        "balanced_accuracy": float(balanced),
        "auc_per_class": auc,
        "mean_auc": _nanmean(auc),
        "mse": float(mean_squared_error(true_score, score)) if scores_ok else float("nan"),
        "mae": float(mean_absolute_error(true_score, score)) if scores_ok else float("nan"),
        "macro_mae": _macro_mae(y_true, score) if scores_ok else float("nan"),
        "qwk": _qwk(y_true, label),
        "binary_accuracy": float(accuracy_score(y_bin, pred_bin)),
        "binary_f1": float(f1_score(y_bin, pred_bin, pos_label=1, zero_division=np.nan)),
        "sensitivity": float(recall_score(y_bin, pred_bin, pos_label=1, zero_division=np.nan)),
        "specificity": float(recall_score(y_bin, pred_bin, pos_label=0, zero_division=np.nan)),
        "confusion_matrix": confusion_matrix(y_true, label, labels=CLASSES).tolist(),
        "n_cells": int(len(y_true)),
    }


def _check_inputs(y_true, probs, label, score):
    y_true = np.asarray(y_true).astype(int).ravel()
    label = np.asarray(label).astype(int).ravel()
    score = np.asarray(score, dtype=float).ravel()
    probs = np.asarray(probs, dtype=float)
    n = len(y_true)
    if n == 0:
        raise ValueError("no predictions to evaluate")
    if probs.shape != (n, NUM_SEVERITIES) or label.shape != (n,) or score.shape != (n,):
        raise ValueError(
            f"expected y_true [N], probs [N, {NUM_SEVERITIES}], label [N], score [N]; got "
            f"{y_true.shape}, {probs.shape}, {label.shape}, {score.shape}"
        )
    for name, values in (("y_true", y_true), ("label", label)):
        if values.min() < 0 or values.max() >= NUM_SEVERITIES:
            raise ValueError(f"{name} must hold severities 0..{NUM_SEVERITIES - 1}")
    return y_true, probs, label, score


def _auc_one_vs_rest(positive: np.ndarray, ranking: np.ndarray) -> float:
    """ROC AUC of one class against the rest; NaN when it is undefined."""
    from sklearn.metrics import roc_auc_score

    if positive.all() or not positive.any() or not np.isfinite(ranking).all():
        return float("nan")
    return float(roc_auc_score(positive, ranking))


def _macro_mae(y_true: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import mean_absolute_error

    per_class = [
        mean_absolute_error(y_true[y_true == k] + 1.0, score[y_true == k])
        for k in CLASSES
        if (y_true == k).any()
    ]
    return float(np.mean(per_class))


def _qwk(y_true: np.ndarray, label: np.ndarray) -> float:
    """Quadratic weighted kappa; NaN when undefined (e.g. one class on both sides)."""
    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import cohen_kappa_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        return float(
            cohen_kappa_score(y_true, label, labels=CLASSES, weights="quadratic", replace_undefined_by=np.nan)
        )


def _nanmean(values) -> float:
    """Mean of the finite values; NaN (without a warning) when there are none."""
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def summarise(per_fold: list[dict]) -> dict:
    """Each metric over folds -> {"mean", "std", "per_fold"}; the confusion matrix summed.

    The mean skips folds where a metric is undefined (NaN); the std is the sample standard
    deviation (ddof=1) of the defined values, NaN with fewer than two. List-valued metrics
    (auc_per_class) are summarised element by element.
    """
    if not per_fold:
        raise ValueError("no folds to summarise")
    summary: dict = {}
    for key in per_fold[0]:
        values = [fold[key] for fold in per_fold]
        if key == "confusion_matrix":
            summary[key] = np.sum(np.asarray(values, dtype=int), axis=0).tolist()
            continue
        array = np.asarray(values, dtype=float)
        if array.ndim == 1:
            summary[key] = {"mean": _nanmean(array), "std": _nanstd(array), "per_fold": array.tolist()}
        else:
            summary[key] = {
                "mean": [_nanmean(column) for column in array.T],
                "std": [_nanstd(column) for column in array.T],
                "per_fold": array.tolist(),
            }
    return summary


def _nanstd(values) -> float:
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    return float(finite.std(ddof=1)) if finite.size > 1 else float("nan")


def fold_metrics(rows: pd.DataFrame) -> list[dict]:
    """compute_metrics of each fold model's rows, in (repeat, fold) order."""
    keys = ["repeat", "fold"] if "repeat" in rows.columns else ["fold"]
    return [
        compute_metrics(group["severity"], group[PROB_COLUMNS], group["pred"], group["score"])
        for _, group in rows.groupby(keys, sort=True)
    ]


def evaluate_predictions(predictions: pd.DataFrame, pipeline: str, data_source: str, settings: dict) -> dict:
    """The content of metrics/<pipeline>.json: test-part metrics at the top, validation below.

    The top-level metrics and `confusion_matrix` come from the held-out test part, one value
    per fold model (so the summed confusion matrix counts each test cell once per fold
    model). `validation` holds the same from each model's own validation fold (its summed
    confusion matrix counts every non-test cell once). NaN is written as null.
    """
    _check_data_source(data_source)
    rows = _pipeline_rows(predictions, pipeline)
    parts = {part: rows[rows["part"] == part] for part in PARTS}
    for part, part_rows in parts.items():
        if part_rows.empty:
            raise ValueError(f"pipeline {pipeline!r} has no predictions for part {part!r}")
    test, validation = (summarise(fold_metrics(parts[part])) for part in ("test", "val"))
    return json_ready(
        {
            **{metric: test[metric] for metric in METRICS},
            "confusion_matrix": test["confusion_matrix"],
            "validation": {
                **{metric: validation[metric] for metric in METRICS},
                "confusion_matrix": validation["confusion_matrix"],
            },
            "pipeline": pipeline,
            "data_source": data_source,
            "n_folds": int(rows["fold"].nunique()),
            "n_repeats": int(rows["repeat"].nunique()),
            # the (repeat, fold) of each per_fold value, in order: what pairs two pipelines' values
            "splits": [f"{r}/{k}" for r, k in sorted(set(zip(rows["repeat"].astype(int), rows["fold"].astype(int))))],
            "n_fold_models": int(rows[["repeat", "fold"]].drop_duplicates().shape[0]),
            "n_test_cells": int(parts["test"]["path"].nunique()),
            "n_validation_cells": int(parts["val"]["path"].nunique()),
            "settings": settings,
        }
    )


def _check_data_source(data_source: str) -> None:
    if data_source not in DATA_SOURCES:
        raise ValueError(f"data_source must be one of {', '.join(DATA_SOURCES)}, got {data_source!r}")


def _pipeline_rows(predictions: pd.DataFrame, pipeline: str) -> pd.DataFrame:
    if "repeat" not in predictions.columns:  # written before repeated cross-validation: one repeat
        predictions = predictions.assign(repeat=0)
    missing = [column for column in PREDICTION_COLUMNS if column not in predictions.columns]
    if missing:
        raise ValueError(f"predictions table lacks columns: {', '.join(missing)}")
    rows = predictions[predictions["pipeline"] == pipeline]
    if rows.empty:
        found = ", ".join(map(str, predictions["pipeline"].unique()))
        raise ValueError(f"no predictions for pipeline {pipeline!r} (found: {found or 'none'})")
    return rows


# Figures -------------------------------------------------------------------------------


def _class_label(k: int) -> str:
    """'3 moderate': the class by its severity score 1..5 (as the paper and the report count) and
    name; sorts in severity order, also in DVC's vega plots."""
    return f"{k + 1} {SEVERITY_NAMES[k]}"


def plot_confusion_matrix(cm, title: str, path: Path) -> Path:
    """Counts in each cell, coloured by the row-normalised share (recall per true class)."""
    from matplotlib.figure import Figure

    cm = np.asarray(cm, dtype=float)
    totals = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(cm):
        colour = "white" if share[i, j] > 0.5 else "black"
        label = f"{int(count)}\n{100 * share[i, j]:.0f}%"
        ax.text(j, i, label, ha="center", va="center", color=colour, fontsize=9)
    names = list(SEVERITY_NAMES)
    ax.set_xticks(CLASSES, names, rotation=30, ha="right")
    ax.set_yticks(CLASSES, names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="share of the true class (row)")
    return _save(fig, path)


def plot_score_distribution(predictions: pd.DataFrame, title: str, path: Path) -> Path:
    """Predicted score of each true class (box + cells); a dashed line marks the true score."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    rng = np.random.default_rng(0)
    for k in CLASSES:
        scores = predictions.loc[predictions["severity"] == k, "score"].to_numpy(dtype=float)
        scores = scores[np.isfinite(scores)]
        ax.hlines(k + 1, k - 0.4, k + 0.4, colors="tab:red", linestyles="dashed", linewidth=1)
        if scores.size == 0:
            ax.text(k, 3, "no cells", ha="center", color="grey")
            continue
        ax.boxplot(scores, positions=[k], widths=0.5, showfliers=False, medianprops={"color": "black"})
        jitter = rng.uniform(-0.15, 0.15, scores.size)
        ax.scatter(k + jitter, scores, s=6, alpha=0.35, color="tab:blue")
    ax.set_xticks(CLASSES, [f"{name}\n(true score {k + 1})" for k, name in enumerate(SEVERITY_NAMES)], fontsize=8)
    ax.set_xlim(-0.6, NUM_SEVERITIES - 0.4)
    ax.set_ylim(0.5, NUM_SEVERITIES + 0.5)
    ax.set_xlabel("true class")
    ax.set_ylabel("predicted score (1..5)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


# Stage functions -----------------------------------------------------------------------


def evaluate(
    predictions_csv: Path, pipeline: str, data_source: str, settings: dict, metrics_dir: Path, figures_dir: Path
) -> dict:
    """Write metrics/<pipeline>.json and, per part, the figures and the data behind them.

    Under `figures_dir/<pipeline>/`, for part in (test, val): `confusion_<part>.png` and
    `scores_<part>.png`, with `confusion_<part>.csv` (pipeline, fold, path, actual, predicted) and
    `scores_<part>.csv` (pipeline, fold, path, severity, actual, true_score, score) for `dvc plots`.
    Returns {"metrics": content, "metrics_path", "figures": {name: path}, "plots": {name: path}}.
    """
    predictions = pd.read_csv(predictions_csv)
    metrics = evaluate_predictions(predictions, pipeline, data_source, settings)
    metrics_path = Path(metrics_dir) / f"{pipeline}.json"
    write_json(metrics, metrics_path)
    out = Path(figures_dir) / pipeline
    out.mkdir(parents=True, exist_ok=True)
    rows = _pipeline_rows(predictions, pipeline)
    figures, plots = {}, {}
    for part, part_name in PARTS.items():
        part_rows = rows[rows["part"] == part]
        summary = metrics if part == "test" else metrics["validation"]
        subtitle = f"{pipeline}, {part_name}, {DATA_SOURCES[data_source]}"
        counted = (
            f"each of {metrics['n_test_cells']} cells counted once per fold model ({metrics['n_fold_models']})"
            if part == "test"
            else f"out-of-fold, {metrics['n_validation_cells']} cells over {metrics['n_folds']} folds"
            + (f" x {metrics['n_repeats']} repeats" if metrics["n_repeats"] > 1 else "")
        )
        figures[f"confusion_{part}"] = plot_confusion_matrix(
            summary["confusion_matrix"], f"Confusion matrix: {subtitle}\n{counted}", out / f"confusion_{part}.png"
        )
        figures[f"scores_{part}"] = plot_score_distribution(
            part_rows, f"Predicted score per true class: {subtitle}\n{counted}", out / f"scores_{part}.png"
        )
        plots[f"confusion_{part}"] = write_csv(confusion_rows(part_rows), out / f"confusion_{part}.csv")
        plots[f"scores_{part}"] = write_csv(score_rows(part_rows), out / f"scores_{part}.csv")
    return {"metrics": metrics, "metrics_path": metrics_path, "figures": figures, "plots": plots}


def confusion_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per prediction, `actual` and `predicted` as class labels: dvc.yaml's confusion plots."""
    return pd.DataFrame(
        {
            "pipeline": rows["pipeline"].to_numpy(),
            "fold": rows["fold"].to_numpy(),
            "path": rows["path"].to_numpy(),
            "actual": [_class_label(int(k)) for k in rows["severity"]],
            "predicted": [_class_label(int(k)) for k in rows["pred"]],
        }
    )


def score_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per prediction with the true class and the predicted score: dvc.yaml's score plot."""
    return pd.DataFrame(
        {
            "pipeline": rows["pipeline"].to_numpy(),
            "fold": rows["fold"].to_numpy(),
            "path": rows["path"].to_numpy(),
            "severity": rows["severity"].astype(int).to_numpy(),
            "actual": [_class_label(int(k)) for k in rows["severity"]],
            "true_score": rows["severity"].astype(int).to_numpy() + 1,
            "score": rows["score"].astype(float).to_numpy(),
        }
    )


