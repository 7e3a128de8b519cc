"""What the served model is worth to a cytologist: the ensemble stage.

From the fold models of a pipeline's cross-validation (and its final model) it builds the
candidates a user may serve, fits each one's temperature and referral threshold on the
calibration part (cells no model trained or early-stopped on, never the test part), then
measures them once on the held-out test part:

- `single`: one fold model, no TTA (mean ± std over the fold models of every repeat, each
  calibrated alone);
- `ensemble`: the k fold models of the first repeat averaged, no TTA;
- `ensemble_tta`: the same in the 8 dihedral poses;
- `final`: the model trained on every cv cell, with the configured TTA.

The one `ensemble:` asks for (`members`, `tta`) is the served one: its temperature, referral
measure and threshold are written to `models/ensemble/<pipeline>.json`, which registration and
explanation read. Each row holds the metrics of `evaluation.compute_metrics` plus ece (before
the temperature), ece_calibrated, nll, brier, aurc, accuracy_at_coverage (0.8, 0.9),
referral_rate, accuracy_retained, sensitivity/specificity_retained (binary, on the cells not
referred) and temperature. Cells are ranked for AURC and referral by the configured
`referral.measure`; a single model has no member spread, so its rows rank by entropy.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader

from pap_severity import calibration, selective
from pap_severity.checkpoints import load_bundle
from pap_severity.config import Config
from pap_severity.data.dataset import CellDataset
from pap_severity.devices import ComputeClock
from pap_severity.ensemble import UNCERTAINTY, FoldEnsemble, decode, entropy, from_bundles, with_temperature
from pap_severity.evaluation import DATA_SOURCES, PROB_COLUMNS, compute_metrics, summarise
from pap_severity.files import write_json, write_text
from pap_severity.transforms import Preprocess

VARIANTS = ("single", "ensemble", "ensemble_tta", "final")
SPEC_VERSION = 1
PREDICTION_COLUMNS = ("variant", "part", "path", "severity", "pred", "score", *PROB_COLUMNS, *UNCERTAINTY, "refer")


def served_variant(cfg: Config) -> str:
    if cfg.ensemble.members == "final":
        return "final"
    return "ensemble_tta" if cfg.ensemble.tta == "dihedral8" else "ensemble"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@torch.no_grad()
def predict(model: FoldEnsemble, pre: Preprocess, items: pd.DataFrame, batch_size: int = 32) -> pd.DataFrame:
    """The decoded output of an ensemble for every cell of `items` (path, severity), in order."""
    dataset = CellDataset(items["path"].astype(str).tolist(), items["severity"].astype(int).tolist(), pre, None)
    clock, outputs = ComputeClock(torch.device("cpu"), "ensemble"), []
    for x, _ in DataLoader(dataset, batch_size=batch_size):
        with clock("forward"):
            outputs.append(model(x))
    clock.write()
    outputs = torch.cat(outputs)
    pred = decode(outputs, model.pipeline)
    table = pd.DataFrame({"path": dataset.paths, "severity": dataset.severities.numpy(),
                          "pred": pred.label.numpy(), "score": pred.score.numpy()})
    for k, column in enumerate(PROB_COLUMNS):
        table[column] = pred.probs[:, k].numpy()
    for name in UNCERTAINTY:
        table[name] = pred.uncertainty[name].numpy()
    return table


def _recalibrate(table: pd.DataFrame, temperature: float, label_from_score: bool) -> pd.DataFrame:
    """A prediction table with its probabilities (and entropy, and the class unless it is read
    from the score) after the temperature."""
    out = table.copy()
    probs = calibration.scale(table[PROB_COLUMNS].to_numpy(), temperature)
    out[PROB_COLUMNS] = probs
    out["entropy"] = entropy(torch.as_tensor(probs)).numpy()
    if not label_from_score:
        out["pred"] = probs.argmax(axis=1)
    return out


@dataclass
class Candidate:
    """One servable model's calibration-part and test-part predictions (before the temperature)."""

    name: str
    calib: pd.DataFrame
    test: pd.DataFrame
    label_from_score: bool
    measure: str


def _row(cand: Candidate, max_rate: float) -> tuple[dict, float, float, pd.DataFrame]:
    """Fit the temperature and threshold on the calibration part; measure on the test part."""
    y_cal = cand.calib["severity"].to_numpy(dtype=int)
    temperature = calibration.fit_temperature(y_cal, cand.calib[PROB_COLUMNS].to_numpy())
    calib = _recalibrate(cand.calib, temperature, cand.label_from_score)
    test = _recalibrate(cand.test, temperature, cand.label_from_score)
    threshold = selective.referral_threshold(calib[cand.measure].to_numpy(), max_rate)
    y = test["severity"].to_numpy(dtype=int)
    probs_before = cand.test[PROB_COLUMNS].to_numpy()
    probs = test[PROB_COLUMNS].to_numpy()
    pred = test["pred"].to_numpy(dtype=int)
    metrics = compute_metrics(y, probs, pred, test["score"].to_numpy())
    correct = (pred == y).astype(float)
    uncertainty = test[cand.measure].to_numpy()
    referred = selective.refer(uncertainty, threshold)
    test = test.assign(refer=referred)
    kept = ~referred
    kept_metrics = compute_metrics(y[kept], probs[kept], pred[kept], test["score"].to_numpy()[kept]) if kept.any() \
        else {"accuracy": float("nan"), "sensitivity": float("nan"), "specificity": float("nan")}
    metrics.update(calibration.summary(y, probs_before, probs))
    metrics.update({
        "aurc": selective.aurc(correct, uncertainty),
        "accuracy_at_coverage": {str(c): selective.accuracy_at_coverage(correct, uncertainty, c)
                                 for c in selective.COVERAGES},
        "referral_rate": float(referred.mean()),
        "accuracy_retained": kept_metrics["accuracy"],
        "sensitivity_retained": kept_metrics["sensitivity"],
        "specificity_retained": kept_metrics["specificity"],
        "temperature": temperature,
        "referral_threshold": threshold,
        "referral_measure": cand.measure,
    })
    return metrics, temperature, threshold, test.assign(variant=cand.name, part="test")


def _single_rows(predictions: pd.DataFrame, label_from_score: bool, max_rate: float) -> tuple[dict, list]:
    """The `single` row: every fold model calibrated and measured alone, then mean ± std."""
    per_fold = []
    keys = ["repeat", "fold"] if "repeat" in predictions.columns else ["fold"]
    for _, rows in predictions.groupby(keys, sort=True):
        tables = {part: rows[rows["part"] == part].reset_index(drop=True) for part in ("calib", "test")}
        for table in tables.values():
            table["entropy"] = entropy(torch.as_tensor(table[PROB_COLUMNS].to_numpy())).numpy()
        metrics, *_ = _row(Candidate("single", tables["calib"], tables["test"], label_from_score, "entropy"),
                           max_rate)
        per_fold.append(metrics)
    scalar = [{k: v for k, v in m.items() if not isinstance(v, (str, dict))} for m in per_fold]
    summary = summarise(scalar)
    for c in selective.COVERAGES:
        summary.setdefault("accuracy_at_coverage", {})[str(c)] = summarise(
            [{"v": m["accuracy_at_coverage"][str(c)]} for m in per_fold])["v"]
    summary["referral_measure"] = "entropy"
    return summary, per_fold


def evaluate_candidates(cfg: Config, pipeline: str, fold_checkpoints: list[Path], final_checkpoint: Path,
                        predictions: pd.DataFrame, calib_items: pd.DataFrame, test_items: pd.DataFrame,
                        progress: bool = False) -> dict:
    """Rows for every variant, the served model's spec, and the test predictions behind them."""
    if calib_items.empty:
        raise ValueError("the splits hold no calibration part; set split.calibration_fraction > 0 and rerun "
                         "`pap-severity data split`")
    if test_items.empty:
        raise ValueError("the splits hold no test part to measure the served model on")
    rows_single = predictions[predictions["pipeline"] == pipeline]
    if not {"calib", "test"} <= set(rows_single["part"]):
        raise ValueError(f"models/{pipeline}/predictions.csv holds no calibration-part predictions; "
                         f"rerun `pap-severity train --pipeline {pipeline}`")
    fold_bundles = [load_bundle(path)[0] for path in fold_checkpoints]
    label_from_score = fold_bundles[0].pipeline.label_from_score
    measure = cfg.referral.measure
    served = served_variant(cfg)
    rows: dict[str, dict] = {}
    rows["single"], _ = _single_rows(rows_single, label_from_score, cfg.referral.max_rate)
    tables, fitted = [], {}
    candidates = [("ensemble", fold_bundles, "none"), ("ensemble_tta", fold_bundles, "dihedral8"),
                  ("final", [load_bundle(final_checkpoint)[0]], cfg.ensemble.tta)]
    for name, bundles, tta in candidates:
        model, pre = from_bundles(bundles, tta=tta)
        cand_measure = measure if len(bundles) > 1 else "entropy"
        cand = Candidate(name, predict(model, pre, calib_items), predict(model, pre, test_items),
                         label_from_score, cand_measure)
        metrics, temperature, threshold, test = _row(cand, cfg.referral.max_rate)
        rows[name] = metrics
        fitted[name] = (temperature, threshold, cand_measure, tta, cand.calib.assign(variant=name, part="calib"))
        tables.append(test)
    temperature, threshold, served_measure, tta, calib_table = fitted[served]
    members = [final_checkpoint] if served == "final" else list(fold_checkpoints)
    spec = {
        "version": SPEC_VERSION,
        "pipeline": pipeline,
        "variant": served,
        "members": [{"path": Path(p).as_posix(), "sha256": sha256(Path(p))} for p in members],
        "tta": tta,
        "temperature": temperature,
        "referral": {"measure": served_measure, "threshold": threshold, "max_rate": cfg.referral.max_rate},
        "image_size": fold_bundles[0].preprocess.image_size,
        "arch": fold_bundles[0].arch,
    }
    tables.append(_recalibrate(calib_table, temperature, label_from_score))
    return {"rows": rows, "spec": spec, "predictions": pd.concat(tables, ignore_index=True)}


def load_served(spec: dict | str | Path) -> tuple[FoldEnsemble, Preprocess, dict]:
    """The served model of an ensemble spec (models/ensemble/<pipeline>.json), ready to run on CPU.

    Refuses a member whose file changed since the spec was written (its sha256 differs)."""
    import json

    if not isinstance(spec, dict):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no served-model spec; run `pap-severity ensemble --pipeline ...` "
                                    "(dvc stage ensemble)")
        spec = json.loads(path.read_text())
    bundles = []
    for member in spec["members"]:
        path = Path(member["path"])
        if not path.is_file():
            raise FileNotFoundError(f"{path}: a member of the served model is missing; restore it with "
                                    f"`dvc checkout {path}` or rerun `dvc repro`")
        if sha256(path) != member["sha256"]:
            raise ValueError(f"{path} changed since the served model was fitted; rerun `dvc repro`")
        bundles.append(load_bundle(path)[0])
    model, pre = from_bundles(bundles, tta=spec["tta"])
    return with_temperature(model, spec["temperature"]).eval(), pre, spec


def write_outputs(result: dict, pipeline: str, data_source: str, settings: dict, spec_path: Path,
                  predictions_path: Path, metrics_path: Path, figures_dir: Path) -> dict:
    """models/ensemble/<pipeline>.json, its predictions, metrics/ensemble/<pipeline>.json and the
    reliability and risk-coverage figures (PNG + CSV for `dvc plots`)."""
    if data_source not in DATA_SOURCES:
        raise ValueError(f"unknown data source {data_source!r}")
    write_json(result["spec"], spec_path)
    predictions = result["predictions"].loc[:, list(PREDICTION_COLUMNS)]
    write_text(predictions_path, predictions.to_csv(index=False))
    test = predictions[predictions["part"] == "test"]
    metrics = {
        "pipeline": pipeline,
        "data_source": data_source,
        "served": result["spec"]["variant"],
        "n_test_cells": int(test["path"].nunique()),
        "n_calibration_cells": int(predictions.loc[predictions["part"] == "calib", "path"].nunique()),
        "settings": settings,
        "rows": result["rows"],
    }
    write_json(metrics, metrics_path)
    where = f"{pipeline}, test part, {DATA_SOURCES[data_source]}"
    curves, reliability_rows, risk_rows, risk_curves = {}, [], [], {}
    for variant, rows in test.groupby("variant", sort=False):
        y = rows["severity"].to_numpy(dtype=int)
        confidence, accuracy, counts = calibration.reliability(y, rows[PROB_COLUMNS].to_numpy())
        curves[variant] = (confidence, accuracy, counts)
        reliability_rows += [{"pipeline": pipeline, "variant": variant, "confidence": c, "accuracy": a,
                              "cells": int(n)} for c, a, n in zip(confidence, accuracy, counts)]
        measure = result["rows"][variant]["referral_measure"]
        coverage, risk = selective.risk_coverage((rows["pred"] == rows["severity"]).to_numpy(),
                                                 rows[measure].to_numpy())
        risk_curves[variant] = (coverage, risk)
        risk_rows += [{"pipeline": pipeline, "variant": variant, "coverage": c, "risk": r}
                      for c, r in zip(coverage, risk)]
    out = Path(figures_dir) / pipeline
    figures = {
        "reliability": calibration.plot_reliability(curves, f"Reliability after temperature, {where}",
                                                    out / "reliability.png"),
        "risk_coverage": selective.plot_risk_coverage(risk_curves, f"Risk-coverage, {where}",
                                                      out / "risk_coverage.png",
                                                      referral_rate=result["spec"]["referral"]["max_rate"]),
    }
    write_text(out / "reliability.csv", pd.DataFrame(reliability_rows).to_csv(index=False))
    write_text(out / "risk_coverage.csv", pd.DataFrame(risk_rows).to_csv(index=False))
    return {"metrics": metrics, "figures": figures}
