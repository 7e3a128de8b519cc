"""The DVC stages as library functions.

Each reads the files its stage depends on, calls the library, and writes the stage's
outs; `dvc.yaml` runs them through the CLI and tests call them directly. MLflow
mirrors what they write: it is never the only place a result lives.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pap_severity.config import Config
from pap_severity.files import write_json

MANIFEST = Path("data/manifest.csv")
SPLITS = Path("data/splits.csv")
MODELS = Path("models")
METRICS = Path("metrics")
FIGURES = Path("reports/figures")
COMPARISON = Path("reports/comparison")
TUNING = Path("tuning")
FINAL = Path("models/final")
FINAL_METRICS = Path("metrics/final")
EXPLAIN = Path("reports/explain")
REGISTRY = Path("reports/registry.json")


def settings(cfg: Config) -> dict:
    """The setting a result was produced with, stated in every metrics file and report."""
    return {
        "data_root": cfg.data.root,
        "arch": cfg.model.arch,
        "weights": cfg.model.weights,
        "image_size": cfg.model.image_size,
        "folds": cfg.split.folds,
        "epochs": cfg.train.epochs,
        "batch_size": cfg.train.batch_size,
        "optimizer": cfg.train.optimizer,
        "lr": cfg.train.lr,
        "weight_decay": cfg.train.weight_decay,
        "scheduler": cfg.train.scheduler,
        "balance": cfg.train.balance,
        "lambda": cfg.loss.lambda_,
        "sord_scale": cfg.loss.sord_scale,
        "seed": cfg.train.seed,
    }


def tuned(cfg: Config, best_params: Path | None) -> Config:
    """cfg with the tuned lr, weight decay and lambda of a best_params.json, when one is given."""
    if best_params is None:
        return cfg
    from pap_severity.tuning import apply_best_params, read_best_params

    return apply_best_params(cfg, read_best_params(best_params))


def _data(manifest: Path, splits: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame | None, str]:
    from pap_severity.data.manifest import read_manifest
    from pap_severity.data.splits import read_splits
    from pap_severity.tracking import data_source_of

    table = read_manifest(manifest)
    return table, read_splits(splits) if splits is not None else None, data_source_of(table)


def tune(cfg: Config, pipeline: str, *, manifest: Path = MANIFEST, splits: Path = SPLITS, out: Path = TUNING,
         storage: str | None = None, study_name: str | None = None, n_trials: int | None = None,
         timeout: float | None = None, track: bool = True, progress: bool = True) -> dict:
    """Run, resume or join the pipeline's Optuna study on the cv part; writes tuning/<pipeline>/best_params.json."""
    from pap_severity.tuning import tune as run_tune

    table, split_table, _ = _data(manifest, splits)
    return run_tune(cfg, pipeline, table, split_table, out, storage=storage or cfg.tune.storage or None,
                    study_name=study_name, n_trials=n_trials, timeout=timeout, progress=progress, track=track)


def train(cfg: Config, pipeline: str, *, manifest: Path = MANIFEST, splits: Path = SPLITS,
          models: Path = MODELS, best_params: Path | None = None, resume: bool = False, track: bool = True,
          progress: bool = True) -> pd.DataFrame:
    """Cross-validate one pipeline: a model per fold, predictions on its validation fold and the test part."""
    from pap_severity.tracking import Tracker
    from pap_severity.training import cross_validate

    cfg = tuned(cfg, best_params)
    table, split_table, source = _data(manifest, splits)
    tracker = Tracker(cfg, source) if track else None
    return cross_validate(cfg, pipeline, table, split_table, models, resume=resume, tracker=tracker,
                          progress=progress)


def evaluate(cfg: Config, pipeline: str, *, manifest: Path = MANIFEST, models: Path = MODELS,
             best_params: Path | None = None, metrics: Path = METRICS, figures: Path = FIGURES,
             track: bool = True) -> dict:
    """metrics/<pipeline>.json and the figures from the predictions of the train stage, logged to its MLflow run.

    best_params: the tuned settings the train stage used, so the metrics file states them.
    """
    from pap_severity import evaluation
    from pap_severity.tracking import RUNS_FILE, Tracker, read_runs
    from pap_severity.training import PREDICTIONS_FILE, pipeline_dir

    cfg = tuned(cfg, best_params)
    _, _, source = _data(manifest)
    predictions = pipeline_dir(models, pipeline) / PREDICTIONS_FILE
    if not predictions.is_file():
        raise FileNotFoundError(f"{predictions}: no predictions; run `pap-severity train --pipeline {pipeline}` first")
    result = evaluation.evaluate(predictions, pipeline, source, settings(cfg), metrics, figures)
    runs_file = pipeline_dir(models, pipeline) / RUNS_FILE
    if track and runs_file.is_file():
        tracker = Tracker(cfg, source)
        summary = {f"test_{name}_mean": result["metrics"][name]["mean"] for name in evaluation.HEADLINE}
        summary |= {f"test_{name}_std": result["metrics"][name]["std"] for name in evaluation.HEADLINE}
        with tracker.pipeline_run(pipeline, run_id=read_runs(runs_file)["parent_run_id"]):
            tracker.log_metrics({k: v for k, v in summary.items() if v is not None})
            tracker.log_artifact(result["metrics_path"], "metrics")
            for path in result["figures"].values():
                tracker.log_artifact(path, "figures")
    return result


def compare(cfg: Config, *, metrics: Path = METRICS, out: Path = COMPARISON, figures: Path = FIGURES) -> dict:
    """Every pipeline of train.pipelines side by side (markdown, JSON, and the AUC-per-fold figure)."""
    from pap_severity import evaluation

    files = {name: metrics / f"{name}.json" for name in cfg.train.pipelines}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no metrics for {', '.join(missing)}; run `dvc repro evaluate` first")
    return evaluation.compare(files, out.with_suffix(".md"), out.with_suffix(".json"), figures / "auc_per_fold.png")


def train_final(cfg: Config, pipeline: str, *, manifest: Path = MANIFEST, splits: Path = SPLITS,
                best_params: Path | None = None, out: Path = FINAL, metrics: Path = FINAL_METRICS,
                progress: bool = True) -> dict:
    """Train on every cv cell with the tuned settings, then measure the model once on the held-out test part.

    Writes models/final/<pipeline>.pt and metrics/final/<pipeline>.json (single-model test metrics).
    """
    from pap_severity.evaluation import PROB_COLUMNS, compute_metrics
    from pap_severity.training import predict_items
    from pap_severity.training import train_final as fit_final

    cfg = tuned(cfg, best_params)
    table, split_table, source = _data(manifest, splits)
    bundle = fit_final(cfg, pipeline, table, split_table, out / f"{pipeline}.pt", progress=progress)
    test = split_table[split_table["part"] == "test"]
    if test.empty:
        raise ValueError("the splits hold no test part to measure the final model on")
    pred = predict_items(bundle, test)
    result = compute_metrics(pred["severity"].to_numpy(dtype=int), pred[PROB_COLUMNS].to_numpy(),
                             pred["pred"].to_numpy(), pred["score"].to_numpy())
    content = {"pipeline": pipeline, "part": "test", "n_test_cells": len(test), "data_source": source,
               "settings": settings(cfg), "tuned": best_params is not None, **result}
    write_json(content, metrics / f"{pipeline}.json")
    return content


def explain(cfg: Config, pipeline: str, *, manifest: Path = MANIFEST, splits: Path = SPLITS,
            final: Path = FINAL, out: Path = EXPLAIN, progress: bool = True) -> dict:
    """The IG report of a final model on the held-out test part: report.html, attributions.csv, summary.json."""
    from pap_severity.checkpoints import load_bundle
    from pap_severity.explain import explain_report

    table, split_table, source = _data(manifest, splits)
    test = split_table.loc[split_table["part"] == "test", ["path"]].merge(
        table[["path", "mask_path", "class_name", "severity"]], on="path")
    bundle, _ = load_bundle(final / f"{pipeline}.pt")
    return explain_report(bundle, test, cfg.explain, out / pipeline, data_source=source, progress=progress)


def register(cfg: Config, pipelines: tuple[str, ...] | None = None, *, manifest: Path = MANIFEST,
             final: Path = FINAL, metrics: Path = FINAL_METRICS, explain: Path = EXPLAIN,
             figures: Path = FIGURES, out: Path = REGISTRY) -> list:
    """Register every final model (combined as registry.model_name) with its test metrics, figures and IG report."""
    import json

    from pap_severity.registry import EXPLAIN_FILES
    from pap_severity.registry import register as register_model

    _, _, source = _data(manifest)
    results = []
    for pipeline in pipelines or cfg.train.pipelines:
        metrics_file = metrics / f"{pipeline}.json"
        if not metrics_file.is_file():
            raise FileNotFoundError(f"{metrics_file}: no final metrics; run `pap-severity train-final -p {pipeline}`")
        # The IG report of an explained pipeline is always asked for, so a missing one is named on the run.
        report = [explain / pipeline / name for name in EXPLAIN_FILES] if pipeline in cfg.explain.pipelines else []
        extra = [p for p in (figures / pipeline, METRICS / f"{pipeline}.json", metrics_file) if p.exists()]
        results.append(register_model(cfg, final / f"{pipeline}.pt", json.loads(metrics_file.read_text()),
                                      artifacts=report + extra, data_source=source, pipeline=pipeline,
                                      params=settings(cfg)))
    # What this call did (`created`, `moved_alias`) is left out: the record only changes when the registry
    # does, so the bento is not rebuilt for nothing.
    record = [{k: v for k, v in vars(r).items() if k not in ("created", "moved_alias")} for r in results]
    write_json(record, out)
    return results
