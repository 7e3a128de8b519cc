"""MLflow tracking on a real SQLite store in a temp dir: runs, tags, metric history, pt2 models."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from pap_severity import tracking, training
from pap_severity.checkpoints import load_bundle
from pap_severity.config import Config, SplitConfig
from pap_severity.data.manifest import build_manifest
from pap_severity.data.splits import make_splits
from pap_severity.data.synth import make_synthetic
from pap_severity.transforms import Preprocess


def tiny_config(tmp_path: Path, **train) -> Config:
    cfg = Config()
    return cfg.model_copy(update={
        "model": cfg.model.model_copy(update={"arch": "resnet18", "weights": "none", "image_size": 32}),
        "train": cfg.train.model_copy(update={"epochs": 2, "batch_size": 16, "device": "cpu", "threads": 1, **train}),
        "mlflow": cfg.mlflow.model_copy(update={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                                                "experiment": "pap-test"}),
    })


@pytest.fixture(autouse=True)
def no_ambient_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()


def test_flattened_params_and_hash():
    cfg = Config()
    params = tracking.flatten_params(cfg, "combined")
    assert params["pipeline"] == "combined"
    assert params["model.arch"] == "resnet18" and params["loss.lambda"] == "1.0"
    assert params["train.lr"] == "0.001" and params["augment.hflip"] == "True"
    assert {k.split(".")[0] for k in params if "." in k} == {"model", "train", "loss", "augment"}
    assert all(isinstance(v, str) for v in params.values())
    h = tracking.params_hash(cfg)
    assert len(h) == 12 and h == tracking.params_hash(Config())
    other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 0.01})})
    assert tracking.params_hash(other) != h


def test_data_source_of_the_manifest():
    assert tracking.data_source_of(pd.DataFrame({"source": ["herlev"] * 3})) == "herlev"
    assert tracking.data_source_of(pd.DataFrame({"source": ["herlev", "synthetic"]})) == "synthetic"
    with pytest.raises(ValueError, match="source"):
        tracking.data_source_of(pd.DataFrame({"path": ["a"]}))
    with pytest.raises(ValueError, match="data_source"):
        tracking.Tracker(Config(), "imagenet")


def test_env_var_overrides_the_configured_store(monkeypatch, tmp_path):
    cfg = tiny_config(tmp_path)
    assert tracking.tracking_uri(cfg) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")
    assert tracking.tracking_uri(cfg) == f"sqlite:///{tmp_path}/other.db"


def test_git_commit_is_a_hash_or_unknown():
    commit = tracking.git_commit()
    assert commit == "unknown" or (len(commit) == 40 and int(commit, 16) >= 0)


def test_fold_run_needs_a_pipeline_run(tmp_path):
    tracker = tracking.Tracker(tiny_config(tmp_path), "synthetic")
    with pytest.raises(RuntimeError, match="pipeline_run"):
        with tracker.fold_run(0):
            pass


@pytest.mark.slow
def test_cross_validation_is_tracked_in_a_real_store(tmp_path):
    make_synthetic(tmp_path / "synth", per_class=6, size=32, seed=0, progress=False)
    manifest = build_manifest(tmp_path / "synth", progress=False)
    splits = make_splits(manifest, SplitConfig(folds=2, test_fraction=0.2, seed=0))
    cfg = tiny_config(tmp_path)
    tracker = tracking.Tracker(cfg, tracking.data_source_of(manifest))
    out = tmp_path / "models"
    training.cross_validate(cfg, "combined", manifest, splits, out, callbacks=tracking.CVRuns(tracker),
                            progress=False)

    runs = tracking.read_runs(out / "combined" / tracking.RUNS_FILE)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("pap-test")
    assert runs["experiment_id"] == experiment.experiment_id and runs["pipeline"] == "combined"
    # Artifacts next to the store, not in the working directory.
    assert experiment.artifact_location == (tmp_path / "mlruns").as_uri()

    parent = client.get_run(runs["parent_run_id"])
    assert parent.info.run_name == "combined" and parent.info.status == "FINISHED"
    expected_tags = {"data_source": "synthetic", "pipeline": "combined", "params_hash": tracking.params_hash(cfg),
                     "git_commit": tracking.git_commit()}
    assert expected_tags.items() <= parent.data.tags.items()
    assert parent.data.params["model.arch"] == "resnet18" and parent.data.params["pipeline"] == "combined"
    assert "test_accuracy_mean" in parent.data.metrics and "val_accuracy_mean" in parent.data.metrics

    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["fold-0", "fold-1"]
    assert sorted(r.info.run_id for r in children) == sorted(f["run_id"] for f in runs["folds"].values())
    for child in children:
        k = child.data.tags["fold"]
        assert expected_tags.items() <= child.data.tags.items()
        assert child.data.params["fold"] == k
        for key in ("train_loss", "val_accuracy", "val_loss", "lr"):
            history = client.get_metric_history(child.info.run_id, key)
            assert sorted(m.step for m in history) == [1, 2], key
        assert {"best_epoch", "best_val_accuracy", "test_accuracy", "test_mean_auc"} <= child.data.metrics.keys()

    # The logged model (pt2) gives the in-process model's outputs, on any batch size.
    bundle, _ = load_bundle(training.fold_checkpoint(out, "combined", 0))
    uri = runs["folds"]["0"]["model_uri"]
    loaded = mlflow.pytorch.load_model(uri)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), bundle.model.eval()(x).numpy(), atol=1e-5, rtol=0)
    info = mlflow.models.get_model_info(uri)
    assert info.metadata["pipeline"] == "combined"
    assert Preprocess.from_json(json.dumps(info.metadata["preprocess"])) == bundle.preprocess
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 3, 32, 32]
    model_dir = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "download")))
    assert Preprocess.load(model_dir / "extra_files" / "preprocess.json") == bundle.preprocess
    assert (model_dir / "data" / "model.pt2").is_file()  # torch.export, not pickle

    # Resuming reopens the same runs instead of making new ones, and logs no second model.
    training.cross_validate(cfg, "combined", manifest, splits, out, callbacks=tracking.CVRuns(tracker),
                            progress=False, resume=True)
    again = tracking.read_runs(out / "combined" / tracking.RUNS_FILE)
    assert again == runs
    assert len(client.search_runs([experiment.experiment_id])) == 3
    assert len(mlflow.search_logged_models(experiment_ids=[experiment.experiment_id],
                                           output_format="list")) == 2


@pytest.mark.slow
def test_folds_trained_without_tracking_get_their_history_when_tracked(tmp_path):
    make_synthetic(tmp_path / "synth", per_class=6, size=32, seed=0, progress=False)
    manifest = build_manifest(tmp_path / "synth", progress=False)
    splits = make_splits(manifest, SplitConfig(folds=2, test_fraction=0.2, seed=0))
    cfg = tiny_config(tmp_path, epochs=1)
    out = tmp_path / "models"
    training.cross_validate(cfg, "regression", manifest, splits, out, progress=False)
    tracker = tracking.Tracker(cfg, "synthetic")
    training.cross_validate(cfg, "regression", manifest, splits, out, callbacks=tracking.CVRuns(tracker),
                            progress=False, resume=True)
    runs = tracking.read_runs(out / "regression" / tracking.RUNS_FILE)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for fold in runs["folds"].values():
        assert [m.step for m in client.get_metric_history(fold["run_id"], "train_loss")] == [1]
        assert fold["model_uri"].startswith("models:/")
