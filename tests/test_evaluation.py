"""Metrics against scikit-learn and against hand-computed values; files the stages write."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn import metrics as skm

from pap_severity import evaluation as ev

# Ten hand-made cells: true severity, predicted severity, predicted score, probabilities.
Y = np.array([0, 0, 0, 1, 1, 2, 2, 3, 4, 4])
LABEL = np.array([0, 0, 1, 1, 2, 2, 2, 3, 4, 3])
SCORE = np.array([1.0, 1.5, 2.0, 2.0, 3.0, 3.0, 2.5, 4.0, 5.0, 4.0])
PROBS = np.array(
    [
        [0.9, 0.05, 0.03, 0.01, 0.01],
        [0.8, 0.1, 0.05, 0.03, 0.02],
        [0.3, 0.5, 0.1, 0.05, 0.05],
        [0.4, 0.45, 0.1, 0.03, 0.02],
        [0.1, 0.3, 0.4, 0.1, 0.1],
        [0.1, 0.1, 0.6, 0.1, 0.1],
        [0.1, 0.2, 0.5, 0.1, 0.1],
        [0.0, 0.1, 0.2, 0.6, 0.1],
        [0.0, 0.0, 0.1, 0.2, 0.7],
        [0.0, 0.0, 0.1, 0.5, 0.4],
    ]
)


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_hand_example(no_warnings):
    m = ev.compute_metrics(Y, PROBS, LABEL, SCORE)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1 + 1 + 1 / 2) / 5)
    # class 0: positives 0.9, 0.8, 0.3 against 0.4, 0.1 x3, 0.0 x3 -> 20 of 21 pairs;
    # class 1: positives 0.45, 0.3 each lose only to 0.5 -> 14 of 16 pairs.
    assert m["auc_per_class"] == pytest.approx([20 / 21, 14 / 16, 1.0, 1.0, 1.0])
    assert m["mean_auc"] == pytest.approx((20 / 21 + 14 / 16 + 3) / 5)
    # |errors| = 0 .5 1 0 1 0 .5 0 0 1
    assert m["mae"] == pytest.approx(0.4)
    assert m["mse"] == pytest.approx(0.35)
    # per true class: (0 + .5 + 1)/3, (0 + 1)/2, (0 + .5)/2, 0, (0 + 1)/2
    assert m["macro_mae"] == pytest.approx((0.5 + 0.5 + 0.25 + 0 + 0.5) / 5)
    # sum (i-j)^2 O_ij = 3; sum (i-j)^2 E_ij = 378 / 10 with rows 3 2 2 1 2, cols 2 2 3 2 1
    assert m["qwk"] == pytest.approx(1 - 3 / 37.8)
    # binary: TP 7, FP 1 (cell 2), FN 0, TN 2
    assert m["binary_accuracy"] == pytest.approx(0.9)
    assert m["sensitivity"] == pytest.approx(1.0)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["binary_f1"] == pytest.approx(14 / 15)
    assert m["confusion_matrix"] == [
        [2, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 2, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    assert m["n_cells"] == 10


def test_matches_scikit_learn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 200)
    probs = rng.dirichlet(np.ones(5), 200)
    label = probs.argmax(1)
    score = probs @ np.arange(1, 6)
    m = ev.compute_metrics(y, probs, label, score)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, label))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, label))
    assert m["auc_per_class"] == pytest.approx(list(skm.roc_auc_score(y, probs, multi_class="ovr", average=None)))
    assert m["mean_auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["mse"] == pytest.approx(skm.mean_squared_error(y + 1, score))
    assert m["mae"] == pytest.approx(skm.mean_absolute_error(y + 1, score))
    assert m["qwk"] == pytest.approx(skm.cohen_kappa_score(y, label, weights="quadratic"))
    assert m["binary_f1"] == pytest.approx(skm.f1_score(y > 0, label > 0))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y > 0, label > 0))
    assert m["specificity"] == pytest.approx(skm.recall_score(y > 0, label > 0, pos_label=False))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, label).tolist()


def test_macro_mae_weights_classes_equally():
    """Nine perfect normals and one light cell off by 2: MAE 0.2 but macro MAE (0 + 2) / 2."""
    y = np.array([0] * 9 + [1])
    score = np.array([1.0] * 9 + [4.0])
    m = ev.compute_metrics(y, np.full((10, 5), 0.2), np.array([0] * 9 + [3]), score)
    assert m["mae"] == pytest.approx(0.2)
    assert m["macro_mae"] == pytest.approx(1.0)


def test_missing_classes_give_nan_without_warnings(no_warnings):
    m = ev.compute_metrics(Y[:8], PROBS[:8], LABEL[:8], SCORE[:8])  # no carcinoma_in_situ
    assert math.isnan(m["auc_per_class"][4])
    assert m["mean_auc"] == pytest.approx(np.mean(m["auc_per_class"][:4]))
    assert len(m["confusion_matrix"]) == 5

    only_normal = ev.compute_metrics([0, 0], PROBS[:2], [0, 0], [1.0, 1.2])
    assert all(math.isnan(a) for a in only_normal["auc_per_class"])
    assert math.isnan(only_normal["mean_auc"])
    assert math.isnan(only_normal["qwk"])
    assert math.isnan(only_normal["sensitivity"])
    assert math.isnan(only_normal["binary_f1"])
    assert only_normal["specificity"] == 1.0
    assert only_normal["accuracy"] == 1.0

    only_abnormal = ev.compute_metrics([3], PROBS[:1], [3], [4.0])
    assert math.isnan(only_abnormal["specificity"])
    assert only_abnormal["sensitivity"] == 1.0


def test_non_finite_scores_or_probs_give_nan(no_warnings):
    score = SCORE.copy()
    score[0] = np.nan
    probs = PROBS.copy()
    probs[0, 1] = np.nan
    m = ev.compute_metrics(Y, probs, LABEL, score)
    assert math.isnan(m["mse"]) and math.isnan(m["mae"]) and math.isnan(m["macro_mae"])
    assert math.isnan(m["auc_per_class"][1]) and not math.isnan(m["auc_per_class"][0])
    assert m["accuracy"] == pytest.approx(0.7)


@pytest.mark.parametrize(
    "args",
    [
        ([], np.zeros((0, 5)), [], []),
        (Y, PROBS[:, :4], LABEL, SCORE),
        (Y, PROBS, LABEL[:9], SCORE),
        (Y + 1, PROBS, LABEL, SCORE),
        (Y, PROBS, LABEL - 1, SCORE),
    ],
)
def test_bad_inputs_are_named(args):
    with pytest.raises(ValueError):
        ev.compute_metrics(*args)


def test_summarise_by_hand(no_warnings):
    folds = [
        {"accuracy": 0.5, "auc_per_class": [0.6, float("nan")], "confusion_matrix": [[1, 0], [0, 1]]},
        {"accuracy": 0.7, "auc_per_class": [0.8, 0.9], "confusion_matrix": [[2, 1], [0, 0]]},
        {"accuracy": 0.9, "auc_per_class": [1.0, float("nan")], "confusion_matrix": [[0, 0], [3, 4]]},
    ]
    s = ev.summarise(folds)
    assert s["accuracy"]["mean"] == pytest.approx(0.7)
    assert s["accuracy"]["std"] == pytest.approx(0.2)  # sqrt((0.2^2 + 0 + 0.2^2) / (3 - 1))
    assert s["accuracy"]["per_fold"] == [0.5, 0.7, 0.9]
    assert s["auc_per_class"]["mean"] == pytest.approx([0.8, 0.9])  # NaN folds skipped
    assert s["auc_per_class"]["std"][0] == pytest.approx(0.2)
    assert math.isnan(s["auc_per_class"]["std"][1])  # a single defined fold has no spread
    assert len(s["auc_per_class"]["per_fold"]) == 3
    assert s["confusion_matrix"] == [[3, 1], [3, 5]]


def fake_predictions(pipelines=("classification", "combined"), folds=4, cells=40, test_cells=15, seed=0,
                     repeats=1, boost=None):
    """A predictions table shaped like cross-validation's: val folds plus a shared test part.
    `boost` (pipeline -> logit added to the true class) makes one pipeline better on purpose."""
    rng = np.random.default_rng(seed)
    severity = np.arange(cells) % 5
    rows = []
    for pipeline, repeat in ((p, r) for p in pipelines for r in range(repeats)):
        for fold in range(folds):
            for cell in range(cells):
                is_test = cell >= cells - test_cells
                if not is_test and cell % folds != fold:
                    continue
                logits = rng.normal(0, 1, 5)
                logits[severity[cell]] += 2 + (boost or {}).get(pipeline, 0.0)
                p = np.exp(logits) / np.exp(logits).sum()
                rows.append(
                    {
                        "pipeline": pipeline,
                        "repeat": repeat,
                        "fold": fold,
                        "part": "test" if is_test else "val",
                        "path": f"cells/{cell:03d}.bmp",
                        "severity": int(severity[cell]),
                        "pred": int(p.argmax()),
                        "score": float(p @ np.arange(1, 6)),
                        **{f"p{k}": p[k] for k in range(5)},
                    }
                )
    return pd.DataFrame(rows)


SETTINGS = {"arch": "resnet18", "image_size": 64, "weights": "none", "epochs": 2, "root": Path("data/synth")}


def test_evaluate_predictions_content(no_warnings):
    predictions = fake_predictions()
    m = ev.evaluate_predictions(predictions, "combined", "synthetic", SETTINGS)
    for key in ev.METRICS:
        assert set(m[key]) == {"mean", "std", "per_fold"}
        assert len(m[key]["per_fold"]) == 4
        assert set(m["validation"][key]) == {"mean", "std", "per_fold"}
    assert m["data_source"] == "synthetic"
    assert (m["n_folds"], m["n_test_cells"], m["n_validation_cells"]) == (4, 15, 25)
    assert np.sum(m["confusion_matrix"]) == 4 * 15  # each test cell once per fold model
    assert np.sum(m["validation"]["confusion_matrix"]) == 25  # out-of-fold: each cell once
    assert m["settings"]["root"] == "data/synth"
    json.dumps(m, allow_nan=False)

    test_rows = predictions[(predictions["pipeline"] == "combined") & (predictions["part"] == "test")]
    by_hand = [
        skm.accuracy_score(rows["severity"], rows["pred"]) for _, rows in test_rows.groupby("fold")
    ]
    assert m["accuracy"]["per_fold"] == pytest.approx(by_hand)
    assert m["accuracy"]["mean"] == pytest.approx(np.mean(by_hand))
    assert m["accuracy"]["std"] == pytest.approx(np.std(by_hand, ddof=1))


def test_evaluate_predictions_writes_null_for_undefined(no_warnings):
    predictions = fake_predictions(pipelines=("regression",))
    no_normal_in_test = ~((predictions["part"] == "test") & (predictions["severity"] == 0))
    m = ev.evaluate_predictions(predictions[no_normal_in_test], "regression", "herlev", {})
    assert m["auc_per_class"]["mean"][0] is None
    assert m["specificity"]["mean"] is None
    assert all(fold[0] is None for fold in m["auc_per_class"]["per_fold"])
    assert "NaN" not in json.dumps(m)
    json.dumps(m, allow_nan=False)


def test_evaluate_predictions_refuses_bad_input():
    predictions = fake_predictions(pipelines=("combined",))
    with pytest.raises(ValueError, match="corn"):
        ev.evaluate_predictions(predictions, "corn", "synthetic", {})
    with pytest.raises(ValueError, match="data_source"):
        ev.evaluate_predictions(predictions, "combined", "mnist", {})
    with pytest.raises(ValueError, match="p4"):
        ev.evaluate_predictions(predictions.drop(columns="p4"), "combined", "synthetic", {})
    with pytest.raises(ValueError, match="test"):
        ev.evaluate_predictions(predictions[predictions["part"] == "val"], "combined", "synthetic", {})


def assert_png(path: Path) -> None:
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()


def test_figures_are_pngs(tmp_path, no_warnings):
    predictions = fake_predictions(pipelines=("combined",), folds=2)
    cm = np.array(ev.compute_metrics(Y, PROBS, LABEL, SCORE)["confusion_matrix"])
    cm[0] = 0  # an empty row must not divide by zero
    assert_png(ev.plot_confusion_matrix(cm, "test part, synthetic data", tmp_path / "cm.png"))
    no_severe = predictions[predictions["severity"] != 3]
    assert_png(ev.plot_score_distribution(no_severe, "test part, synthetic data", tmp_path / "a" / "scores.png"))
    m = ev.evaluate_predictions(predictions, "combined", "synthetic", {})
    from pap_severity.comparison import plot_auc_per_fold

    assert_png(plot_auc_per_fold({"combined": m, "other": m}, tmp_path / "auc.png"))


def test_evaluate_writes_metrics_figures_and_plot_data(tmp_path):
    csv = tmp_path / "predictions.csv"
    fake_predictions().to_csv(csv, index=False)
    out = ev.evaluate(csv, "combined", "synthetic", SETTINGS, tmp_path / "metrics", tmp_path / "figures")
    written = json.loads((tmp_path / "metrics" / "combined.json").read_text())
    assert out["metrics_path"] == tmp_path / "metrics" / "combined.json"
    assert written == out["metrics"]
    for name in ("confusion_test", "scores_test", "confusion_val", "scores_val"):
        assert out["figures"][name].parent == tmp_path / "figures" / "combined"
        assert_png(out["figures"][name])
    confusion = pd.read_csv(out["plots"]["confusion_test"])
    assert list(confusion.columns) == ["pipeline", "fold", "path", "actual", "predicted"]
    assert len(confusion) == 4 * 15 and set(confusion["pipeline"]) == {"combined"}
    # classes by their severity score 1..5, as the report and the paper count them
    assert set(confusion["actual"]) == {"1 normal", "2 light", "3 moderate", "4 severe", "5 carcinoma_in_situ"}
    scores = pd.read_csv(out["plots"]["scores_val"])
    assert {"true_score", "score", "actual"} <= set(scores.columns)
    assert len(scores) == 25
