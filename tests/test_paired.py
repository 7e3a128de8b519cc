"""Paired statistics against hand-computed values and SciPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from pap_severity.paired import bootstrap_accuracy, paired_difference


def test_mean_interval_and_wilcoxon_by_hand_and_against_scipy():
    challenger = [0.60, 0.55, 0.58, 0.62, 0.57, 0.59]
    reference = [0.55, 0.54, 0.55, 0.58, 0.57, 0.56]
    d = np.array(challenger) - np.array(reference)  # 0.05 0.01 0.03 0.04 0 0.03
    out = paired_difference(challenger, reference)
    assert out["n"] == 6 and out["mean_diff"] == pytest.approx(0.16 / 6)
    half = stats.t.ppf(0.975, 5) * d.std(ddof=1) / math.sqrt(6)
    assert out["ci95"] == pytest.approx([d.mean() - half, d.mean() + half])
    assert out["p_value"] == pytest.approx(stats.wilcoxon(d).pvalue)


def test_the_nadeau_bengio_correction_widens_the_interval_by_hand():
    d = np.array([0.02, -0.01, 0.03, 0.00, 0.04, 0.01, 0.02, -0.02])
    out = paired_difference(d, np.zeros_like(d), val_fraction=1 / 3)  # 4 folds: n_val/n_train = 1/3
    half = stats.t.ppf(0.975, 7) * d.std(ddof=1) * math.sqrt(1 / 8 + 1 / 3)
    assert out["ci95"] == pytest.approx([d.mean() - half, d.mean() + half])
    plain = out["ci95_uncorrected"]
    assert plain[1] - plain[0] < out["ci95"][1] - out["ci95"][0]


def test_too_few_pairs_give_a_null_p_value_with_the_reason():
    out = paired_difference([0.5, 0.6, 0.7, 0.55], [0.4, 0.5, 0.6, 0.5])
    assert out["n"] == 4 and out["p_value"] is None and "fewer than 5" in out["reason"]
    assert out["ci95"] is not None
    one = paired_difference([0.5], [0.4])
    assert one["ci95"] is None and one["p_value"] is None and one["mean_diff"] == pytest.approx(0.1)


def test_identical_pipelines_differ_by_nothing():
    out = paired_difference([0.5] * 6, [0.5] * 6)
    assert out["mean_diff"] == 0 and out["p_value"] == 1.0


def test_nan_pairs_are_dropped():
    out = paired_difference([0.5, float("nan"), 0.7, 0.6, 0.8, 0.9], [0.4, 0.5, 0.6, 0.5, 0.7, 0.8])
    assert out["n"] == 5


def test_bootstrap_over_cells():
    rng = np.random.default_rng(0)
    ref = rng.random(400) < 0.6
    same = bootstrap_accuracy(ref, ref)
    assert same["mean_diff"] == 0 and same["ci95"] == [0.0, 0.0] and same["p_value"] == 1.0
    better = ref | (rng.random(400) < 0.3)  # strictly more correct cells
    out = bootstrap_accuracy(better, ref, n_boot=2000)
    assert out["mean_diff"] == pytest.approx(better.mean() - ref.mean())
    assert out["ci95"][0] > 0 and out["p_value"] <= 1 / 1000
    with pytest.raises(ValueError, match="one outcome per test cell"):
        bootstrap_accuracy([1, 0], [1])
