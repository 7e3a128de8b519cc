"""The compare stage: pipelines side by side and paired against the reference."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_evaluation import SETTINGS, assert_png, fake_predictions

from pap_severity import comparison
from pap_severity import evaluation as ev


def test_compare_writes_every_pipeline_and_the_data_source(tmp_path):
    predictions = fake_predictions(pipelines=("classification", "combined"), folds=2)
    files = {}
    for pipeline in ("classification", "combined"):
        files[pipeline] = tmp_path / "metrics" / f"{pipeline}.json"
        files[pipeline].parent.mkdir(exist_ok=True)
        metrics = ev.evaluate_predictions(predictions, pipeline, "synthetic", SETTINGS)
        files[pipeline].write_text(json.dumps(metrics))
    md, js = tmp_path / "reports" / "comparison.md", tmp_path / "reports" / "comparison.json"
    fig = tmp_path / "auc.png"

    result = comparison.compare(files, md, js, fig)
    text = md.read_text()
    for pipeline in ("classification", "combined"):
        assert f"| {pipeline} |" in text
    assert "synthetic data" in text
    assert "arch=resnet18" in text
    assert "| paper: combined | 0.745 |" in text
    assert " ± " in text
    assert json.loads(js.read_text()) == result
    assert set(result["test"]) == {"classification", "combined"}
    assert result["paper"]["combined"]["mean_auc"] == 0.94
    assert_png(fig)
    auc = pd.read_csv(fig.with_suffix(".csv"))
    assert list(auc.columns) == ["pipeline", "class", "fold", "auc"]
    assert len(auc) == 2 * 5 * 2  # pipelines x classes x folds
    assert set(auc["class"]) == {"1 normal", "2 light", "3 moderate", "4 severe", "5 carcinoma_in_situ"}

    from_list = comparison.compare(list(files.values()), md, js, fig)
    assert set(from_list["test"]) == {"classification", "combined"}


def metrics_files(tmp_path, predictions, pipelines=("classification", "combined")) -> dict:
    files = {}
    for pipeline in pipelines:
        files[pipeline] = tmp_path / "metrics" / f"{pipeline}.json"
        files[pipeline].parent.mkdir(exist_ok=True)
        files[pipeline].write_text(json.dumps(ev.evaluate_predictions(predictions, pipeline, "synthetic", SETTINGS)))
    return files


def test_a_better_pipeline_is_paired_split_by_split_against_the_reference(tmp_path):
    predictions = fake_predictions(folds=4, repeats=3, boost={"combined": 1.5}, cells=60)
    files = metrics_files(tmp_path, predictions)
    md, js = tmp_path / "comparison.md", tmp_path / "comparison.json"
    result = comparison.compare(files, md, js, tmp_path / "auc.png", reference="classification",
                                paired_dir=tmp_path / "paired")
    accuracy = result["paired"]["combined"]["accuracy"]
    assert accuracy["n"] == 12 and accuracy["mean_diff"] > 0 and accuracy["p_value"] < 0.05
    assert accuracy["ci95"][0] > 0
    # the same numbers by hand from the per-split validation accuracies
    m = {p: json.loads(files[p].read_text()) for p in files}
    diffs = np.subtract(m["combined"]["validation"]["accuracy"]["per_fold"],
                        m["classification"]["validation"]["accuracy"]["per_fold"])
    assert accuracy["mean_diff"] == pytest.approx(diffs.mean())
    assert {"mean_auc", "auc_normal", "auc_carcinoma_in_situ", "mse", "qwk", "binary_accuracy",
            "balanced_accuracy"} <= set(result["paired"]["combined"])
    assert "classification" not in result["paired"]
    assert "Nadeau-Bengio" in result["interval"] and "## Paired against classification" in md.read_text()
    assert_png(tmp_path / "paired" / "combined_vs_classification.png")


def test_an_untrained_reference_and_too_few_pairs_are_said_and_the_rest_written(tmp_path):
    predictions = fake_predictions(folds=2, repeats=1)
    files = metrics_files(tmp_path, predictions)
    result = comparison.compare(files, tmp_path / "c.md", tmp_path / "c.json", tmp_path / "auc.png",
                                reference="sord")
    assert result["paired"] == {} and "'sord' has no metrics" in result["notes"][0]
    assert set(result["test"]) == {"classification", "combined"}  # the side-by-side part is still there
    few = comparison.compare(files, tmp_path / "c.md", tmp_path / "c.json", tmp_path / "auc.png")
    accuracy = few["paired"]["combined"]["accuracy"]
    assert accuracy["n"] == 2 and accuracy["p_value"] is None and "fewer than 5" in accuracy["reason"]
    assert any("fewer than 5" in note for note in few["notes"])


def test_pipelines_trained_on_other_splits_are_not_paired(tmp_path):
    one = fake_predictions(pipelines=("classification",), folds=4)
    other = fake_predictions(pipelines=("combined",), folds=3)
    files = metrics_files(tmp_path, pd.concat([one, other]))
    result = comparison.compare(files, tmp_path / "c.md", tmp_path / "c.json", tmp_path / "auc.png")
    assert result["paired"] == {} and "other (repeat, fold) splits" in result["notes"][0]


def test_served_models_are_compared_cell_by_cell_on_the_test_part(tmp_path):
    predictions = fake_predictions(folds=2)
    files = metrics_files(tmp_path, predictions)
    cells = pd.DataFrame({"path": [f"c{i}" for i in range(50)], "severity": np.arange(50) % 5})
    served = {"classification": cells.assign(pred=np.where(np.arange(50) < 25, cells["severity"], 0)),
              "combined": cells.assign(pred=cells["severity"])}
    result = comparison.compare(files, tmp_path / "c.md", tmp_path / "c.json", tmp_path / "auc.png",
                                served_predictions=served)
    boot = result["paired_test"]["combined"]["accuracy"]
    assert boot["mean_diff"] == pytest.approx(1.0 - 0.6)  # 25 right + 5 of 25 lucky normals against 50
    assert boot["ci95"][0] > 0 and boot["n"] == 50
