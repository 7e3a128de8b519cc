"""How does the regression constraint's weight matter? The lambda sweep.

`pap-severity sweep` cross-validates the combined pipeline once per lambda, on the same (repeat,
fold) splits and seed, with every other setting from params.yaml (and, if given, the tuned
settings of the combined pipeline). lambda = 0 is plain cross-entropy: it trains exactly the
classification pipeline (a test checks that the predictions are equal). Each lambda's models go
to `models/sweep/lambda-<value>/` (a rerun reuses finished folds), and the results to
`reports/sweep/lambda.{json,csv,md,png}`: accuracy, score MSE and mean AUC on the validation
folds, mean ± std over the splits, against lambda.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pap_severity.config import Config
from pap_severity.evaluation import DATA_SOURCES, fold_metrics
from pap_severity.files import write_csv, write_json, write_text
from pap_severity.training import cross_validate

LAMBDAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
SWEPT = ("accuracy", "mse", "mean_auc")
LABELS = {"accuracy": "accuracy", "mse": "score MSE (lower is better)", "mean_auc": "mean AUC"}


def with_lambda(cfg: Config, value: float) -> Config:
    return cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"lambda_": float(value)})})


def lambda_sweep(cfg: Config, manifest: pd.DataFrame, splits: pd.DataFrame, values=LAMBDAS, *,
                 models: Path = Path("models/sweep"), out: Path = Path("reports/sweep"), data_source: str,
                 progress: bool = True) -> pd.DataFrame:
    """One row per (lambda, repeat, fold) with the validation-fold metrics; writes the reports."""
    if not values:
        raise ValueError("no lambda values to sweep")
    if any(v < 0 for v in values):
        raise ValueError(f"lambda must be >= 0, got {list(values)}")
    rows = []
    for value in values:
        predictions = cross_validate(with_lambda(cfg, value), "combined", manifest, splits,
                                     Path(models) / f"lambda-{value:g}", resume=True, progress=progress)
        val = predictions[predictions["part"] == "val"]
        splits_order = sorted(set(zip(val["repeat"], val["fold"])))
        for (repeat, fold), m in zip(splits_order, fold_metrics(val)):
            rows.append({"lambda": value, "repeat": repeat, "fold": fold, **{k: m[k] for k in SWEPT}})
    table = pd.DataFrame(rows)
    out = Path(out)
    summary = table.groupby("lambda")[list(SWEPT)].agg(["mean", "std"])
    write_csv(table, out / "lambda.csv")
    write_json({"pipeline": "combined", "part": "validation folds", "data_source": data_source,
                "n_splits": int(table.groupby("lambda").size().iloc[0]),
                "lambda": {f"{v:g}": {m: {"mean": summary.loc[v, (m, "mean")], "std": summary.loc[v, (m, "std")]}
                                      for m in SWEPT} for v in summary.index}}, out / "lambda.json")
    write_text(out / "lambda.md", sweep_markdown(summary, data_source, len(table) // len(summary)))
    plot_sweep(table, out / "lambda.png", data_source)
    return table


def sweep_markdown(summary: pd.DataFrame, data_source: str, n: int) -> str:
    lines = [f"# Lambda sweep of the combined pipeline ({DATA_SOURCES.get(data_source, data_source)})", "",
             f"Validation folds, mean ± std over {n} (repeat, fold) splits; lambda 0 is plain cross-entropy.", "",
             "| lambda | " + " | ".join(LABELS[m] for m in SWEPT) + " |", "|---" * (len(SWEPT) + 1) + "|"]
    for value in summary.index:
        cells = [f"{summary.loc[value, (m, 'mean')]:.3f} ± {summary.loc[value, (m, 'std')]:.3f}" for m in SWEPT]
        lines.append(f"| {value:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(table: pd.DataFrame, path: Path, data_source: str) -> Path:
    """Each metric against lambda: every split as a dot, the mean ± std as a line with a band."""
    fig = Figure(figsize=(12, 4), layout="constrained")
    axes = fig.subplots(1, len(SWEPT))
    values = sorted(table["lambda"].unique())
    positions = np.arange(len(values))  # lambda's steps are uneven: equal spacing, labelled
    for ax, metric in zip(axes, SWEPT):
        groups = [table.loc[table["lambda"] == v, metric].to_numpy(dtype=float) for v in values]
        mean = np.array([np.nanmean(g) for g in groups])
        std = np.array([np.nanstd(g, ddof=1) if len(g) > 1 else 0.0 for g in groups])
        for x, g in zip(positions, groups):
            ax.scatter(np.full(len(g), x), g, s=10, alpha=0.4, color="C0")
        ax.plot(positions, mean, marker="o", color="C1", label="mean over splits")
        ax.fill_between(positions, mean - std, mean + std, color="C1", alpha=0.2, label="± std")
        ax.set_xticks(positions, [f"{v:g}" for v in values])
        ax.set_xlabel("lambda (weight of the score term; 0 = classification)")
        ax.set_ylabel(LABELS[metric])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    n = len(table) // len(values)
    fig.suptitle(f"Combined pipeline against lambda, validation folds, {n} splits, "
                 f"{DATA_SOURCES.get(data_source, data_source)}", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
