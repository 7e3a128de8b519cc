"""The ensemble stage on a tiny synthetic cross-validation: every candidate measured, the served one saved."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pap_severity import stages, trust
from pap_severity.config import Config
from pap_severity.evaluation import PROB_COLUMNS

ROW_KEYS = {"accuracy", "mean_auc", "mse", "binary_accuracy", "ece", "ece_calibrated", "nll", "brier", "aurc",
            "accuracy_at_coverage", "referral_rate", "accuracy_retained", "temperature"}


def tiny(**ensemble) -> Config:
    cfg = Config()
    return cfg.model_copy(update={
        "model": cfg.model.model_copy(update={"image_size": 32}),
        "train": cfg.train.model_copy(update={"epochs": 1, "batch_size": 16, "device": "cpu", "threads": 1}),
        "ensemble": cfg.ensemble.model_copy(update=ensemble),
    })


@pytest.fixture(scope="module")
def trained(synth_set, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("trust")
    cfg = tiny()
    paths = {"manifest": synth_set["manifest_csv"], "splits": synth_set["splits_csv"]}
    stages.train(cfg, "combined", **paths, models=root / "models", track=False, progress=False)
    stages.train_final(cfg, "combined", **paths, out=root / "final", metrics=root / "final_metrics", progress=False)
    return {"root": root, "paths": paths}


def run(cfg: Config, trained: dict, name: str) -> tuple[dict, dict]:
    root = trained["root"]
    out = stages.ensemble(cfg, "combined", **trained["paths"], models=root / "models", final=root / "final",
                          out=root / name, metrics=root / name / "metrics", figures=root / name / "figures")
    return out, json.loads((root / name / "combined.json").read_text())


@pytest.mark.slow
def test_every_candidate_is_measured_and_the_served_one_is_saved(trained):
    out, spec = run(tiny(), trained, "default")
    rows = out["metrics"]["rows"]
    assert set(rows) == set(trust.VARIANTS)
    for name, row in rows.items():
        assert ROW_KEYS <= set(row), name
    assert set(rows["single"]["accuracy"]) == {"mean", "std", "per_fold"}  # over the fold models
    assert out["metrics"]["served"] == spec["variant"] == "ensemble_tta"
    assert spec["tta"] == "dihedral8" and len(spec["members"]) == 2 and spec["temperature"] > 0
    assert spec["referral"]["measure"] == "entropy" and 0 <= rows["ensemble_tta"]["referral_rate"] <= 1
    for figure in out["figures"].values():
        assert figure.is_file()
    # What load_served rebuilds gives the stage's own test predictions of the served variant.
    model, pre, _ = trust.load_served(trained["root"] / "default" / "combined.json")
    split = pd.read_csv(trained["paths"]["splits"])
    test = split[split["part"] == "test"]
    again = trust.predict(model, pre, test)
    saved = pd.read_csv(trained["root"] / "default" / "combined.predictions.csv")
    saved = saved[(saved["variant"] == "ensemble_tta") & (saved["part"] == "test")]
    assert np.allclose(again[PROB_COLUMNS].to_numpy(), saved[PROB_COLUMNS].to_numpy(), atol=1e-5)
    assert np.allclose(again["score"], saved["score"], atol=1e-5)


@pytest.mark.slow
def test_the_final_model_can_be_the_served_one(trained):
    out, spec = run(tiny(members="final", tta="none"), trained, "final_served")
    assert spec["variant"] == "final" and len(spec["members"]) == 1 and spec["tta"] == "none"
    assert spec["referral"]["measure"] == "entropy"  # one member: no spread to rank by


@pytest.mark.slow
def test_a_changed_member_is_refused(trained, tmp_path):
    _, spec = run(tiny(), trained, "checked")
    spec["members"][0]["sha256"] = "0" * 64
    with pytest.raises(ValueError, match="changed since"):
        trust.load_served(spec)
    spec["members"][0]["path"] = str(tmp_path / "gone.pt")
    with pytest.raises(FileNotFoundError, match="dvc checkout"):
        trust.load_served(spec)


@pytest.mark.slow
def test_the_explain_stage_explains_the_served_ensembles_score(trained):
    run(tiny(), trained, "explained")
    cfg = tiny()
    cfg = cfg.model_copy(update={"explain": cfg.explain.model_copy(update={
        "n_steps": 4, "internal_batch_size": 8, "cells_per_class": 1, "sanity_check": False})})
    out = trained["root"] / "explain"
    stages.explain(cfg, "combined", **trained["paths"], served=trained["root"] / "explained", out=out,
                   progress=False)
    summary = json.loads((out / "combined" / "summary.json").read_text())
    assert f"2 x {cfg.model.arch}" in json.dumps(summary)
    rows = pd.read_csv(out / "combined" / "attributions.csv")
    model, pre, _ = trust.load_served(trained["root"] / "explained" / "combined.json")
    split = pd.read_csv(trained["paths"]["splits"])
    expected = trust.predict(model, pre, split[split["part"] == "test"])
    merged = rows.merge(expected, on="path", suffixes=("", "_served"))
    assert len(merged) == len(expected)
    assert np.allclose(merged["score"], merged["score_served"], atol=1e-4)  # the ensemble's own score
