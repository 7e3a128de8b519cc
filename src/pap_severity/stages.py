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
ENSEMBLE = Path("models/ensemble")
ENSEMBLE_METRICS = Path("metrics/ensemble")
HEADLINE = Path("metrics/headline.json")
TRUST_FIGURES = Path("reports/trust")
REPORTS = Path("reports")


def settings(cfg: Config) -> dict:
    """The setting a result was produced with, stated in every metrics file and report."""
    from pap_severity.tuning.space import setting

    shown = {
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
    # Every setting tune.space searches, by its key in its section, so a tuned value is always stated.
    names = {key: key.rpartition(".")[2] for key in cfg.tune.space}
    return shown | {name: setting(cfg, key) for key, name in names.items() if name not in shown}


def tuned(cfg: Config, best_params: Path | None) -> Config:
    """cfg with the tuned settings of a best_params.json, when one is given."""
    if best_params is None:
        return cfg
    from pap_severity.tuning.space import apply_best_params, read_best_params

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
    from pap_severity.tuning.worker import tune as run_tune

    table, split_table, _ = _data(manifest, splits)
    return run_tune(cfg, pipeline, table, split_table, out, storage=storage or cfg.tune.storage or None,
                    study_name=study_name, n_trials=n_trials, timeout=timeout, progress=progress, track=track)


def train(cfg: Config, pipeline: str, *, manifest: Path = MANIFEST, splits: Path = SPLITS,
          models: Path = MODELS, best_params: Path | None = None, resume: bool = False, track: bool = True,
          progress: bool = True) -> pd.DataFrame:
    """Cross-validate one pipeline: a model per fold, predictions on its validation fold and the test part."""
    from pap_severity.tracking import CVRuns, Tracker
    from pap_severity.training import cross_validate

    cfg = tuned(cfg, best_params)
    table, split_table, source = _data(manifest, splits)
    runs = CVRuns(Tracker(cfg, source)) if track else None
    return cross_validate(cfg, pipeline, table, split_table, models, resume=resume, callbacks=runs,
                          progress=progress)


def evaluate(cfg: Config, pipeline: str, *, manifest: Path = MANIFEST, models: Path = MODELS,
             best_params: Path | None = None, metrics: Path = METRICS, figures: Path = FIGURES,
             track: bool = True) -> dict:
    """metrics/<pipeline>.json and the figures from the predictions of the train stage, logged to its MLflow run.

    best_params: the tuned settings the train stage used, so the metrics file states them.
    """
    from pap_severity import evaluation
    from pap_severity.evaluation import PREDICTIONS_FILE, pipeline_dir
    from pap_severity.tracking import RUNS_FILE, Tracker, read_runs

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


def compare(cfg: Config, *, metrics: Path = METRICS, out: Path = COMPARISON, figures: Path = FIGURES,
            served: Path = ENSEMBLE) -> dict:
    """Every pipeline of train.pipelines side by side, and each paired against compare.reference
    (reports/comparison.{md,json}, the AUC-per-fold figure, reports/figures/paired/). A pipeline
    without metrics is left out and named in the notes."""
    from pap_severity import comparison

    files = {name: metrics / f"{name}.json" for name in cfg.train.pipelines}
    present = {name: path for name, path in files.items() if path.is_file()}
    if not present:
        raise FileNotFoundError(f"no metrics in {metrics}; run `dvc repro evaluate` first")
    predictions = {name: comparison.served_test_predictions(served / f"{name}.predictions.csv") for name in present}
    result = comparison.compare(present, out.with_suffix(".md"), out.with_suffix(".json"),
                                figures / "auc_per_fold.png", reference=cfg.compare.reference,
                                served_predictions={k: v for k, v in predictions.items() if v is not None},
                                paired_dir=figures / "paired")
    result["notes"] = [f"{name}: no metrics ({path}); left out" for name, path in files.items()
                       if name not in present] + result["notes"]
    return result


def sweep(cfg: Config, values: tuple[float, ...], *, manifest: Path = MANIFEST, splits: Path = SPLITS,
          best_params: Path | None = None, models: Path = MODELS / "sweep", out: Path = Path("reports/sweep"),
          progress: bool = True):
    """The combined pipeline cross-validated once per lambda on the same splits (see sweep.py)."""
    from pap_severity.sweep import lambda_sweep

    cfg = tuned(cfg, best_params)
    table, split_table, source = _data(manifest, splits)
    return lambda_sweep(cfg, table, split_table, values, models=models, out=out, data_source=source,
                        progress=progress)


def ensemble(cfg: Config, pipeline: str, *, manifest: Path = MANIFEST, splits: Path = SPLITS,
             models: Path = MODELS, final: Path = FINAL, best_params: Path | None = None,
             out: Path = ENSEMBLE, metrics: Path = ENSEMBLE_METRICS, figures: Path = TRUST_FIGURES) -> dict:
    """The served model of a pipeline (fold ensemble or final model, with its temperature and
    referral threshold from the calibration part) and every candidate measured on the test part.

    Writes models/ensemble/<pipeline>.json (what registration and explanation load),
    models/ensemble/<pipeline>.predictions.csv, metrics/ensemble/<pipeline>.json and the
    reliability and risk-coverage figures (PNG, and CSV for `dvc plots`) under reports/trust/<pipeline>/."""
    import pandas as pd

    from pap_severity import trust
    from pap_severity.training import PREDICTIONS_FILE, fold_checkpoint, pipeline_dir, split_items

    cfg = tuned(cfg, best_params)
    table, split_table, source = _data(manifest, splits)
    parts = split_items(table, split_table)
    predictions_csv = pipeline_dir(models, pipeline) / PREDICTIONS_FILE
    if not predictions_csv.is_file():
        raise FileNotFoundError(f"{predictions_csv}: no predictions; run `pap-severity train --pipeline {pipeline}`")
    cv = parts["cv"]
    folds = sorted(int(k) for k in cv.loc[cv["repeat"] == 0, "fold"].unique())  # the first repeat's k models
    result = trust.evaluate_candidates(cfg, pipeline, [fold_checkpoint(models, pipeline, k) for k in folds],
                                       final / f"{pipeline}.pt", pd.read_csv(predictions_csv), parts["calib"],
                                       parts["test"])
    return trust.write_outputs(result, pipeline, source, settings(cfg), out / f"{pipeline}.json",
                               out / f"{pipeline}.predictions.csv", metrics / f"{pipeline}.json", figures)


def headline(cfg: Config, *, ensemble_metrics: Path = ENSEMBLE_METRICS, out: Path = HEADLINE) -> dict:
    """metrics/headline.json, the DVC metric: a few numbers of each pipeline's served model (headline.py)."""
    from pap_severity.headline import write_headline

    return write_headline(cfg.train.pipelines, ensemble_metrics, out)


def train_final(cfg: Config, pipeline: str, *, manifest: Path = MANIFEST, splits: Path = SPLITS,
                best_params: Path | None = None, out: Path = FINAL, metrics: Path = FINAL_METRICS,
                progress: bool = True) -> dict:
    """Train on every cv cell with the tuned settings, then measure the model once on the held-out test part.

    Writes models/final/<pipeline>.pt and metrics/final/<pipeline>.json (single-model test metrics).
    """
    from pap_severity.data.splits import held_out
    from pap_severity.evaluation import PROB_COLUMNS, compute_metrics
    from pap_severity.training import predict_items
    from pap_severity.training import train_final as fit_final

    cfg = tuned(cfg, best_params)
    table, split_table, source = _data(manifest, splits)
    bundle = fit_final(cfg, pipeline, table, split_table, out / f"{pipeline}.pt", progress=progress)
    test = held_out(split_table)  # one row per cell: with split.repeats > 1 the splits list it once per repeat
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
            served: Path = ENSEMBLE, out: Path = EXPLAIN, progress: bool = True) -> dict:
    """The IG report of the served model (models/ensemble/<pipeline>.json: the fold ensemble or the
    final model, as registered) on the held-out test part: report.html, attributions.csv,
    summary.json, and gallery.html, its misclassified cells."""
    from pap_severity.data.splits import held_out
    from pap_severity.explain import explain_report

    table, split_table, source = _data(manifest, splits)
    test = held_out(split_table)[["path"]].merge(table[["path", "mask_path", "class_name", "severity"]], on="path")
    return explain_report(served_bundle(served / f"{pipeline}.json"), test, cfg.explain, out / pipeline,
                          data_source=source, progress=progress)


def served_bundle(spec: Path | dict):
    """The served model of an ensemble spec (its file, or its content) as a ModelBundle (explain and
    registration take bundles)."""
    from pap_severity.checkpoints import ModelBundle
    from pap_severity.pipelines import served
    from pap_severity.trust import load_served

    model, pre, content = load_served(spec)
    arch = f"{content['arch']}" if len(content["members"]) == 1 else f"{len(content['members'])} x {content['arch']}"
    return ModelBundle(model=model, pipeline=served(model.pipeline), arch=arch, preprocess=pre,
                       meta={"served": content})


def register(cfg: Config, pipelines: tuple[str, ...] | None = None, *, manifest: Path = MANIFEST,
             served: Path = ENSEMBLE, metrics: Path = ENSEMBLE_METRICS, explain: Path = EXPLAIN,
             figures: Path = FIGURES, trust: Path = TRUST_FIGURES, out: Path = REGISTRY) -> list:
    """Register each pipeline's served model (models/ensemble/<pipeline>.json: the fold ensemble or
    the final model, with its TTA, temperature and referral rule; combined as registry.model_name)
    with the served row of its test metrics (metrics/ensemble/<pipeline>.json), which the promotion
    rule reads, its figures and its IG report."""
    import json

    from pap_severity.explain.files import EXPLAIN_FILES
    from pap_severity.registry import register as register_model

    _, _, source = _data(manifest)
    results = []
    for pipeline in pipelines or cfg.train.pipelines:
        spec, metrics_file = served / f"{pipeline}.json", metrics / f"{pipeline}.json"
        for path in (spec, metrics_file):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no served model of {pipeline}; run `dvc repro ensemble` "
                                        f"(or `pap-severity ensemble -p {pipeline}`)")
        content = json.loads(metrics_file.read_text())
        row = content["rows"][content["served"]]
        # The IG report of an explained pipeline is always asked for, so a missing one is named on the run.
        report = [explain / pipeline / name for name in EXPLAIN_FILES] if pipeline in cfg.explain.pipelines else []
        extra = [p for p in (trust / pipeline, figures / pipeline, metrics_file, spec, METRICS / f"{pipeline}.json")
                 if p.exists()]
        results.append(register_model(cfg, served_bundle(spec), row, artifacts=report + extra, data_source=source,
                                      pipeline=pipeline, params=settings(cfg)))
    # What this call did (`created`, `moved_alias`) is left out: the record only changes when the registry
    # does, so the bento is not rebuilt for nothing.
    record = [{k: v for k, v in vars(r).items() if k not in ("created", "moved_alias")} for r in results]
    write_json(record, out)
    return results


def report(cfg: Config, *, reports: Path = REPORTS, metrics: Path = METRICS, models: Path = MODELS,
           tuning: Path = TUNING) -> Path:
    """reports/index.html: the run on one page, each pipeline's settings, figures and MLflow runs, the registry."""
    from pap_severity.report import write_index
    from pap_severity.tracking import tracking_uri

    return write_index(reports, metrics, cfg.train.pipelines, models=models, tuning=tuning,
                       tracking_uri=tracking_uri(cfg), alias=cfg.registry.alias)
