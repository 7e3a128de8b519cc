"""The MLflow Model Registry on a real SQLite store: promotion rule, idempotence, CPU loading.

One tiny final model is really trained (resnet18 at 32 px, one epoch); its variants differ
by a small change of the head's weights (another content hash, another model).
"""

from __future__ import annotations

import copy

import mlflow
import numpy as np
import pytest
import torch

from pap_severity.checkpoints import load_bundle, save_bundle
from pap_severity.config import Config, SplitConfig
from pap_severity.data.dataset import CellDataset
from pap_severity.data.manifest import build_manifest
from pap_severity.data.splits import make_splits
from pap_severity.data.synth import make_synthetic
from pap_severity.models import build_model
from pap_severity.pipelines import get_pipeline
from pap_severity.registry import (
    content_hash,
    explain_artifacts,
    load_champion,
    model_name_for,
    promotion_decision,
    reference_io,
    register,
)
from pap_severity.training import predict_items, train_final


def config(tmp_path, **registry) -> Config:
    return Config.model_validate({
        "model": {"image_size": 32},
        "train": {"batch_size": 16, "device": "cpu", "channels_last": False, "amp": False, "epochs": 1},
        "registry": {"margin": 0.05, **registry},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "registry-test"},
    })


@pytest.fixture(autouse=True)
def store(tmp_path, monkeypatch):
    """A fresh MLflow store per test, and the test folder as the project root (artifact paths)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def final(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("final")
    make_synthetic(root / "synth", per_class=4, size=32, seed=0, progress=False)
    manifest = build_manifest(root / "synth", progress=False)
    splits = make_splits(manifest, SplitConfig(folds=2, test_fraction=0.25, seed=0))
    cfg = config(root)
    bundle = train_final(cfg, "combined", manifest, splits, root / "combined.pt", progress=False)
    test = splits[splits["part"] == "test"].reset_index(drop=True)
    cells = CellDataset(test["path"].tolist(), test["severity"].astype(int).tolist(), bundle.preprocess, None)
    example = torch.stack([cells[i][0] for i in range(3)]).numpy()
    return {"path": root / "combined.pt", "bundle": bundle, "test": test, "example": example}


def variant(bundle, k: int):
    """Another model: the bundle with its last layer nudged."""
    other = copy.deepcopy(bundle)
    last = [p for p in other.model.parameters()][-1]
    with torch.no_grad():
        last.add_(1e-3 * k)
    return other


def test_promotion_decision_rule():
    assert promotion_decision("accuracy", 0.7, None, 0.0, None) == (True, "no champion yet")
    assert promotion_decision("accuracy", 0.71, 0.70, 0.0, "1")[0]
    assert promotion_decision("accuracy", 0.70, 0.70, 0.0, "1")[0]  # not worse
    promoted, reason = promotion_decision("accuracy", 0.60, 0.70, 0.05, "1")
    assert not promoted and "margin" in reason and "0.1000" in reason
    assert promotion_decision("accuracy", 0.66, 0.70, 0.05, "1")[0]  # within the margin
    # Lower is better for the errors.
    assert promotion_decision("mse", 0.9, 1.0, 0.0, "1")[0]
    assert not promotion_decision("mse", 1.2, 1.0, 0.1, "1")[0]
    assert promotion_decision("mae", 1.05, 1.0, 0.1, "1")[0]
    # NaN never beats a finite champion; a champion without a metric is replaced.
    assert not promotion_decision("accuracy", float("nan"), 0.5, 0.0, "1")[0]
    assert promotion_decision("accuracy", 0.4, float("nan"), 0.0, "1")[0]


@pytest.mark.slow
def test_alias_moves_only_under_the_promotion_rule(final, tmp_path):
    cfg = config(tmp_path)  # accuracy, margin 0.05, alias champion
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri, registry_uri=cfg.mlflow.tracking_uri)
    name = cfg.registry.model_name
    report = tmp_path / "reports" / "explain" / "combined"
    report.mkdir(parents=True)
    (report / "report.html").write_text("<html>IG</html>")
    (report / "summary.json").write_text("{}")
    figure = tmp_path / "reports" / "figures" / "confusion.png"
    figure.parent.mkdir(parents=True)
    figure.write_bytes(b"\x89PNG")

    def reg(k: int, accuracy: float, **kw):
        return register(cfg, variant(final["bundle"], k), {"accuracy": accuracy, "mse": 1.0 - accuracy},
                        data_source="synthetic", input_example=final["example"], **kw)

    first = reg(1, 0.60, artifacts=[*explain_artifacts("combined"), figure])
    assert (first.name, first.version, first.promoted) == (name, "1", True)
    assert first.reason == "no champion yet"
    assert first.missing_artifacts == ["reports/explain/combined/attributions.csv"]

    better = reg(2, 0.70)
    assert better.promoted and better.champion_version == "2"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"

    worse = reg(3, 0.60)  # worse by 0.10 > margin 0.05
    assert not worse.promoted and worse.version == "3"
    assert "worse by 0.1000 > margin 0.05" in worse.reason
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    tags = client.get_model_version(name, "3").tags
    assert tags["promotion"] == "not promoted" and tags["promotion_reason"] == worse.reason

    within = reg(4, 0.67)  # worse by 0.03, within the margin
    assert within.promoted and "within margin" in within.reason
    assert str(client.get_model_version_by_alias(name, "champion").version) == "4"
    assert sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'")) == [1, 2, 3, 4]

    # Version tags: data source, headline metrics, commit, hash; the run: metrics, params, artifacts.
    v1 = client.get_model_version(name, "1")
    assert v1.tags["data_source"] == "synthetic" and v1.tags["pipeline"] == "combined"
    assert float(v1.tags["test_accuracy"]) == pytest.approx(0.60) and "git_commit" in v1.tags
    assert v1.tags["content_hash"] == first.content_hash
    assert "attributions.csv" in v1.tags["missing_artifacts"]
    run = client.get_run(first.run_id)
    assert run.data.metrics["test_accuracy"] == pytest.approx(0.60)
    assert run.data.params["pipeline"] == "combined" and run.data.params["registry.margin"] == "0.05"
    logged = {a.path for a in client.list_artifacts(first.run_id, "reports/explain/combined")}
    assert logged == {"reports/explain/combined/report.html", "reports/explain/combined/summary.json"}
    assert [a.path for a in client.list_artifacts(first.run_id, "reports/figures")] == ["reports/figures/confusion.png"]


@pytest.mark.slow
def test_register_is_idempotent_and_the_champion_loads_on_cpu(final, tmp_path):
    cfg = config(tmp_path)
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri, registry_uri=cfg.mlflow.tracking_uri)
    name = cfg.registry.model_name
    metrics = {"accuracy": {"mean": 0.5, "std": 0.0, "per_fold": [0.5]}, "auc_per_class": {"mean": [0.1]}}
    first = register(cfg, final["path"], metrics, data_source="synthetic", input_example=final["example"])
    again = register(cfg, final["path"], metrics, data_source="synthetic", input_example=final["example"])
    assert first.created and not again.created
    assert (again.version, again.run_id, again.content_hash) == (first.version, first.run_id, first.content_hash)
    assert again.promoted and again.reason == first.reason  # what the version recorded when it was made
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    assert len(client.search_runs([exp.experiment_id])) == 1
    # The hash is of the content: the same weights loaded again hash the same.
    assert content_hash(load_bundle(final["path"])[0]) == first.content_hash

    model, meta = load_champion(cfg)
    assert meta["version"] == first.version and meta["pipeline"] == "combined"
    assert meta["preprocess"] == final["bundle"].preprocess
    assert {t.device.type for t in model.parameters()} == {"cpu"}
    # The champion reproduces the outputs logged at registration ...
    inputs, outputs = reference_io(cfg, meta["run_id"])
    with torch.no_grad():
        np.testing.assert_allclose(model(torch.from_numpy(inputs)).numpy(), outputs, atol=1e-5, rtol=0)
        # ... the bundle's own model on real test cells, at any batch size ...
        cells = torch.from_numpy(final["example"])
        bundle_out = final["bundle"].model.eval()(cells).numpy()
        np.testing.assert_allclose(model(cells).numpy(), bundle_out, atol=1e-5, rtol=0)
        np.testing.assert_allclose(model(cells[:1]).numpy(), bundle_out[:1], atol=1e-5, rtol=0)
    # ... and the predictions of the bundle (class, score) through the pipeline's decoder.
    table = predict_items(final["bundle"], final["test"].iloc[:3])
    with torch.no_grad():
        decoded = get_pipeline(meta["pipeline"]).decode(model(cells))
    np.testing.assert_allclose(decoded.score.numpy(), table["score"].to_numpy(), atol=1e-5)
    assert decoded.label.tolist() == table["pred"].tolist()
    # The plain MLflow way loads the same model (what the serving side does).
    plain = mlflow.pytorch.load_model(f"models:/{name}@champion")
    with torch.no_grad():
        np.testing.assert_allclose(plain(cells).numpy(), bundle_out, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_other_pipelines_register_under_their_own_names(final, tmp_path):
    cfg = config(tmp_path)
    pipeline = get_pipeline("classification")
    torch.manual_seed(0)
    bundle = copy.deepcopy(final["bundle"])
    bundle.pipeline = pipeline
    bundle.model = build_model("resnet18", "none", pipeline.head).eval()
    path = save_bundle(bundle, tmp_path / "classification.pt")
    result = register(cfg, path, {"accuracy": 0.3}, data_source="synthetic", pipeline="classification")
    assert result.name == model_name_for(cfg, "classification") == "pap-severity-classification"
    assert result.promoted and result.version == "1"
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri, registry_uri=cfg.mlflow.tracking_uri)
    assert str(client.get_model_version_by_alias("pap-severity-classification", "champion").version) == "1"
    with pytest.raises(ValueError, match="not 'combined'"):
        register(cfg, path, {"accuracy": 0.3}, data_source="synthetic", pipeline="combined")
    model, meta = load_champion(cfg, "pap-severity-classification")
    assert meta["pipeline"] == "classification"
