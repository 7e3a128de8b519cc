"""MLflow tracking on a real SQLite store in a temp dir: runs, tags, metric names, datasets, models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_ARCH
from conftest import tiny_config as shared_tiny_config
from mlflow import MlflowClient

from pap_severity import tracking, training
from pap_severity.checkpoints import load_bundle
from pap_severity.config import Config
from pap_severity.transforms import Preprocess


def tiny_config(tmp_path: Path, **train) -> Config:
    """conftest's tiny training settings, 2 epochs unless told, with a SQLite store in tmp_path."""
    return shared_tiny_config(tmp_path, **{"epochs": 2, **train})


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
    assert params["model.arch"] == "resnet18_w16" and params["loss.lambda"] == "1.0"
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


def test_metric_names_are_grouped_by_part_headline_first():
    assert tracking.metric_name("val_accuracy") == "val/accuracy"
    assert tracking.metric_name("test_mse_mean") == "test/mse"
    assert tracking.metric_name("test_mse_std") == "test/mse_std"
    assert tracking.metric_name("train_loss") == "train/loss" and tracking.metric_name("lr") == "train/lr"
    assert tracking.metric_name("best_epoch") == "best_epoch"
    grouped = list(tracking._grouped({"test_qwk": 1, "test_binary_f1": 2, "test_mse": 3, "test_accuracy": 4}))
    assert grouped == ["test/accuracy", "test/mse", "test/qwk", "test/binary_f1"]


@pytest.mark.slow
def test_cross_validation_is_tracked_in_a_real_store(tmp_path, synth_set, mlflow_db):
    manifest, splits = synth_set["manifest"], synth_set["splits"]
    cfg = tiny_config(tmp_path)
    tracker = tracking.Tracker(cfg, tracking.data_source_of(manifest))
    out = tmp_path / "models"
    training.cross_validate(cfg, "combined", manifest, splits, out, callbacks=tracking.CVRuns(tracker),
                            progress=False)

    runs = tracking.read_runs(out / "combined" / tracking.RUNS_FILE)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("pap-test")
    assert runs["experiment_id"] == experiment.experiment_id and runs["pipeline"] == "combined"
    # The UI opens on training runs, not on the GenAI traces page.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # Artifacts next to the store, not in the working directory.
    assert experiment.artifact_location == (tmp_path / "mlruns").as_uri()

    parent = client.get_run(runs["parent_run_id"])
    assert parent.info.run_name == "combined" and parent.info.status == "FINISHED"
    expected_tags = {"data_source": "synthetic", "pipeline": "combined", "params_hash": tracking.params_hash(cfg),
                     "git_commit": tracking.git_commit()}
    assert expected_tags.items() <= parent.data.tags.items()
    assert "synthetic cells (not Herlev data)" in parent.data.tags["mlflow.note.content"]
    assert parent.data.params["model.arch"] == TINY_ARCH and parent.data.params["pipeline"] == "combined"
    assert {"test/accuracy", "test/mse", "calib/accuracy", "val/best_accuracy"} <= parent.data.metrics.keys()
    assert not any("_" in key.partition("/")[0] for key in parent.data.metrics)  # no ungrouped test_*, val_*
    # The manifest is the runs' input dataset, with its digest and source.
    (data_input,) = parent.inputs.dataset_inputs
    assert data_input.dataset.name == "manifest" and data_input.dataset.digest == tracking.manifest_digest(manifest)
    assert json.loads(data_input.dataset.source)["uri"] == cfg.data.root

    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["fold-0", "fold-1"]
    assert sorted(r.info.run_id for r in children) == sorted(f["run_id"] for f in runs["folds"].values())
    for child in children:
        k = child.data.tags["fold"]
        assert expected_tags.items() <= child.data.tags.items()
        assert child.data.params["fold"] == k
        assert [i.dataset.digest for i in child.inputs.dataset_inputs] == [tracking.manifest_digest(manifest)]
        for key in ("train/loss", "train/lr", "val/accuracy", "val/loss"):
            history = client.get_metric_history(child.info.run_id, key)
            assert sorted(m.step for m in history) == [1, 2], key
        assert {"best_epoch", "val/best_accuracy", "test/accuracy", "test/mean_auc"} <= child.data.metrics.keys()

        # The fold model is stored once, by DVC: the run names the file and its digest, holds no weights.
        checkpoint = training.fold_checkpoint(out, "combined", int(k))
        record = runs["folds"][k]["model"]
        assert record["name"] == f"combined-fold{k}" and record["md5"] == tracking.file_md5(checkpoint)
        assert record["path"] == tracking.project_path(checkpoint) and record["bytes"] == checkpoint.stat().st_size
        assert mlflow.artifacts.load_dict(f"runs:/{child.info.run_id}/{tracking.MODEL_FILE}") == record
        model = client.get_logged_model(record["model_id"])
        assert model.name == f"combined-fold{k}" and model.source_run_id == child.info.run_id
        assert model.tags["md5"] == record["md5"] and model.tags["dvc_path"] == record["path"]
        stored = [p for p in Path(model.artifact_location.removeprefix("file://")).rglob("*") if p.is_file()]
        assert sum(p.stat().st_size for p in stored) < 10_000  # no copy of the 45 MB of weights
        # The test metrics are linked to that model and to the manifest dataset.
        linked = {m.key: m for m in model.metrics}
        assert linked["test/accuracy"].value == child.data.metrics["test/accuracy"]
        assert linked["test/accuracy"].dataset_digest == tracking.manifest_digest(manifest)

    # Resuming reopens the same runs instead of making new ones, and names no second model.
    training.cross_validate(cfg, "combined", manifest, splits, out, callbacks=tracking.CVRuns(tracker),
                            progress=False, resume=True)
    again = tracking.read_runs(out / "combined" / tracking.RUNS_FILE)
    assert again == runs
    assert len(client.search_runs([experiment.experiment_id])) == 3
    models = mlflow.search_logged_models(experiment_ids=[experiment.experiment_id], output_format="list")
    assert sorted(m.name for m in models) == ["combined-fold0", "combined-fold1"]

    # A recorded run the store no longer holds: one line naming it and how to bring it back.
    client.delete_run(runs["parent_run_id"])
    with pytest.raises(LookupError, match=f"{runs['parent_run_id']}.*deleted.*mlflow runs restore"):
        training.cross_validate(cfg, "combined", manifest, splits, out, callbacks=tracking.CVRuns(tracker),
                                progress=False, resume=True)


@pytest.mark.slow
def test_a_logged_model_is_a_named_pt2_model_with_the_bundles_outputs(tmp_path, synth_set, mlflow_db):
    """What registry.py registers: Tracker.log_model, pt2 (torch.export) with signature and preprocessing."""
    cfg = tiny_config(tmp_path, epochs=1)
    parts = training.split_items(synth_set["manifest"], synth_set["splits"])
    training.train_final(cfg, "combined", synth_set["manifest"], synth_set["splits"], tmp_path / "final.pt",
                         progress=False)
    bundle, _ = load_bundle(tmp_path / "final.pt")
    tracker = tracking.Tracker(cfg, "synthetic")
    with tracker.pipeline_run("combined"):
        uri = tracker.log_model(bundle)
    assert len(parts["test"]) > 0
    loaded = mlflow.pytorch.load_model(uri)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), bundle.model.eval()(x).numpy(), atol=1e-5, rtol=0)
    info = mlflow.models.get_model_info(uri)
    (model,) = mlflow.search_logged_models(experiment_ids=[tracker.experiment_id], output_format="list")
    assert model.name == "combined-final" and uri == f"models:/{model.model_id}"
    assert info.metadata["pipeline"] == "combined"
    assert Preprocess.from_json(json.dumps(info.metadata["preprocess"])) == bundle.preprocess
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 3, 32, 32]
    model_dir = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "download")))
    assert Preprocess.load(model_dir / "extra_files" / "preprocess.json") == bundle.preprocess
    assert (model_dir / "data" / "model.pt2").is_file()  # torch.export, not pickle


@pytest.mark.slow
def test_folds_trained_without_tracking_get_their_history_when_tracked(tmp_path, synth_set, tiny_pipeline,
                                                                      mlflow_db):
    manifest, splits = synth_set["manifest"], synth_set["splits"]
    out = tmp_path / "models"
    shutil.copytree(tiny_pipeline["models"], out)  # cross-validated without tracking
    cfg = tiny_config(tmp_path, epochs=1)
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "combined").glob("fold*.pt")}
    tracker = tracking.Tracker(cfg, "synthetic")
    training.cross_validate(cfg, "combined", manifest, splits, out, callbacks=tracking.CVRuns(tracker),
                            progress=False, resume=True)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "combined").glob("fold*.pt")} == stamps  # not retrained
    runs = tracking.read_runs(out / "combined" / tracking.RUNS_FILE)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for k, fold in runs["folds"].items():
        assert [m.step for m in client.get_metric_history(fold["run_id"], "train/loss")] == [1]
        assert fold["model"]["name"] == f"combined-fold{k}" and fold["metrics_logged"]


@pytest.mark.parametrize(("module", "absent"), [
    ("pap_severity.cli", ("torch", "mlflow", "optuna", "bentoml", "great_expectations", "matplotlib")),
    ("pap_severity.tracking", ("torch", "mlflow")),  # the stages that only log metrics load no torch
    # the data stages, --pipeline checked as every command checks it
    ("pap_severity.cli; pap_severity.cli._check_pipelines(['combined']); import pap_severity.data.splits, "
     "pap_severity.data.manifest, pap_severity.data.synth", ("torch", "mlflow")),
    # the stages that read predictions and metrics: evaluate, compare, headline, report
    ("pap_severity.stages, pap_severity.evaluation, pap_severity.comparison, pap_severity.headline, "
     "pap_severity.report", ("torch", "mlflow")),
    # the report and the headline draw nothing and compute no metric
    ("pap_severity.stages, pap_severity.report, pap_severity.headline; "
     "pap_severity.report._pipeline_figures(__import__('pathlib').Path('.'), __import__('pathlib').Path('.'), "
     "['combined'], ''); pap_severity.report._explain(__import__('pathlib').Path('.'))",
     ("torch", "mlflow", "sklearn", "matplotlib", "captum")),
])
def test_imports_load_only_what_they_use(module, absent):
    """`pap-severity --help`, and every stage, start without the libraries they do not call."""
    import subprocess
    import sys

    code = f"import sys, {module}; print(' '.join(m for m in {absent!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == []
