"""The lambda sweep: lambda 0 is the classification pipeline, and the reports are written."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pap_severity import training
from pap_severity.config import Config
from pap_severity.sweep import lambda_sweep, with_lambda


def tiny() -> Config:
    cfg = Config()
    return cfg.model_copy(update={
        "model": cfg.model.model_copy(update={"image_size": 32}),
        "train": cfg.train.model_copy(update={"epochs": 1, "batch_size": 16, "device": "cpu", "threads": 1}),
    })


@pytest.mark.slow
def test_lambda_zero_combined_equals_classification_on_the_same_seed(synth_set, tmp_path):
    cfg = tiny()
    combined = training.cross_validate(with_lambda(cfg, 0.0), "combined", synth_set["manifest"],
                                       synth_set["splits"], tmp_path / "a", progress=False)
    classification = training.cross_validate(cfg, "classification", synth_set["manifest"], synth_set["splits"],
                                             tmp_path / "b", progress=False)
    columns = ["repeat", "fold", "part", "path", "pred", "score", "p0", "p1", "p2", "p3", "p4"]
    pd.testing.assert_frame_equal(combined[columns], classification[columns])


@pytest.mark.slow
def test_the_sweep_reports_every_lambda_over_the_splits(synth_set, tmp_path):
    table = lambda_sweep(tiny(), synth_set["manifest"], synth_set["splits"], (0.0, 2.0), models=tmp_path / "m",
                         out=tmp_path / "r", data_source="synthetic", progress=False)
    assert sorted(table["lambda"].unique()) == [0.0, 2.0] and len(table) == 4  # 2 lambdas x 2 folds
    summary = json.loads((tmp_path / "r" / "lambda.json").read_text())
    assert set(summary["lambda"]) == {"0", "2"} and summary["part"] == "validation folds"
    assert (tmp_path / "r" / "lambda.png").stat().st_size > 1000
    assert "| 2 |" in (tmp_path / "r" / "lambda.md").read_text()
    with pytest.raises(ValueError, match="lambda must be >= 0"):
        lambda_sweep(tiny(), synth_set["manifest"], synth_set["splits"], (-1.0,), data_source="synthetic")
