"""The fold ensemble, TTA, temperature scaling and referral: by hand and against the libraries."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TINY_ARCH
from pap_severity import calibration, selective
from pap_severity.ensemble import COLUMNS, FoldEnsemble, decode, dihedral_views, entropy, with_temperature
from pap_severity.models import ClassifierHead, RegressionHead, build_model


def member(seed: int, head=ClassifierHead) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(TINY_ARCH, "none", head).eval()


@torch.no_grad()
def test_an_ensemble_of_identical_members_equals_the_member():
    net = member(0)
    x = torch.randn(3, 3, 32, 32)
    alone = net(x)
    out = FoldEnsemble([net, copy.deepcopy(net), copy.deepcopy(net)], "combined", tta="none")(x)
    pred = decode(out, "combined")
    assert torch.allclose(pred.probs, torch.softmax(alone[:, :5], dim=1), atol=1e-5)
    assert torch.allclose(pred.score, alone[:, -1], atol=1e-5)
    assert torch.allclose(pred.uncertainty["score_std"], torch.zeros(3), atol=1e-5)
    assert torch.allclose(pred.uncertainty["mutual_info"], torch.zeros(3), atol=1e-5)
    assert pred.uncertainty["disagreement"].tolist() == [0.0, 0.0, 0.0]
    assert out.shape == (3, len(COLUMNS))


@torch.no_grad()
def test_tta_of_a_rotation_invariant_input_equals_the_plain_prediction():
    net = member(1)
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    radius = ((y - 15.5) ** 2 + (x - 15.5) ** 2).sqrt()  # invariant under the 8 dihedral maps
    image = torch.stack([torch.cos(radius / 3), torch.sin(radius / 5), radius / 20])[None]
    plain = FoldEnsemble([net], "classification", tta="none")(image)
    tta = FoldEnsemble([net], "classification", tta="dihedral8")(image)
    assert torch.allclose(plain[:, :5], tta[:, :5], atol=1e-4)
    assert torch.allclose(plain[:, -1], tta[:, -1], atol=1e-4)


def test_dihedral_views_are_the_eight_distinct_poses_grouped_by_view():
    x = torch.arange(2 * 9, dtype=torch.float32).reshape(2, 1, 3, 3)
    views = dihedral_views(x).view(8, 2, 1, 3, 3)
    assert torch.equal(views[0], x)
    assert torch.equal(views[1][0, 0], torch.rot90(x[0, 0], 1))
    assert torch.equal(views[4][0, 0], torch.flip(x[0, 0], dims=(-1,)))
    assert len({tuple(v[0].flatten().tolist()) for v in views}) == 8


@torch.no_grad()
def test_one_member_leaves_the_spread_undefined_not_zero():
    out = FoldEnsemble([member(2)], "combined", tta="none")(torch.randn(2, 3, 32, 32))
    u = decode(out, "combined").uncertainty
    for name in ("score_std", "mutual_info", "disagreement"):
        assert torch.isnan(u[name]).all()
    assert torch.isfinite(u["entropy"]).all()


@torch.no_grad()
def test_members_that_differ_show_spread_and_the_mean_of_their_scores():
    a, b = member(3), member(4)
    x = torch.randn(4, 3, 32, 32)
    out = decode(FoldEnsemble([a, b], "combined", tta="none")(x), "combined")
    sa, sb = a(x)[:, -1], b(x)[:, -1]
    assert torch.allclose(out.score, (sa + sb) / 2, atol=1e-5)
    assert torch.allclose(out.uncertainty["score_std"], (sa - sb).abs() / math.sqrt(2), atol=1e-5)


@torch.no_grad()
def test_a_regression_ensemble_reads_its_class_from_the_score():
    out = decode(FoldEnsemble([member(5, RegressionHead), member(6, RegressionHead)], "regression",
                              tta="none")(torch.randn(3, 3, 32, 32)), "regression")
    assert out.label.tolist() == torch.round(out.score.clamp(1, 5)).long().sub(1).tolist()


@torch.no_grad()
def test_the_temperature_scales_log_probabilities_and_keeps_the_score():
    net = [member(7), member(8)]
    x = torch.randn(3, 3, 32, 32)
    cold = FoldEnsemble(net, "combined", tta="none")
    warm = with_temperature(cold, 2.0)
    a, b = decode(cold(x), "combined"), decode(warm(x), "combined")
    assert torch.allclose(b.probs, torch.softmax(torch.log(a.probs) / 2.0, dim=1), atol=1e-5)
    assert torch.allclose(a.score, b.score) and (b.uncertainty["entropy"] >= a.uncertainty["entropy"] - 1e-6).all()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="ensemble.tta"):
        FoldEnsemble([member(0)], "combined", tta="rot4")
    with pytest.raises(ValueError, match="at least one member"):
        FoldEnsemble([], "combined")
    with pytest.raises(ValueError, match="temperature"):
        FoldEnsemble([member(0)], "combined", temperature=0.0)


def test_entropy_by_hand():
    assert entropy(torch.full((1, 5), 0.2)).item() == pytest.approx(math.log(5))
    assert entropy(torch.eye(5)[:1]).item() == pytest.approx(0.0, abs=1e-9)


# Calibration --------------------------------------------------------------------------------


def overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Cells whose true class is drawn from softmax(z), reported as softmax(3 z): over-confident."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1, (n, 5))
    true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(5, p=p) for p in true])
    reported = np.exp(3 * z) / np.exp(3 * z).sum(1, keepdims=True)
    return y, reported


def test_temperature_scaling_lowers_the_nll_of_overconfident_held_out_cells():
    y_fit, p_fit = overconfident(2000, 0)
    y_new, p_new = overconfident(2000, 1)
    t = calibration.fit_temperature(y_fit, p_fit)
    assert t == pytest.approx(3.0, rel=0.15)  # undoes the factor 3 by construction
    assert calibration.nll(y_new, calibration.scale(p_new, t)) < calibration.nll(y_new, p_new) - 0.1
    assert calibration.ece(y_new, calibration.scale(p_new, t)) < calibration.ece(y_new, p_new)


def test_the_temperature_agrees_with_scikit_learns_temperature_scaling():
    from sklearn.base import BaseEstimator, ClassifierMixin
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.frozen import FrozenEstimator

    class LogProbs(ClassifierMixin, BaseEstimator):  # X is already the log-probabilities
        def fit(self, X, y):
            self.classes_ = np.arange(5)
            return self

        def decision_function(self, X):
            return X

        def predict(self, X):
            return np.argmax(X, axis=1)

    y, p = overconfident(600, 2)
    ours = calibration.scale(p, calibration.fit_temperature(y, p))
    frozen = FrozenEstimator(LogProbs().fit(np.log(p), y))
    theirs = CalibratedClassifierCV(frozen, method="temperature").fit(np.log(p), y).predict_proba(np.log(p))
    assert calibration.nll(y, ours) == pytest.approx(calibration.nll(y, theirs), abs=2e-3)


def test_ece_nll_and_brier_by_hand():
    # two cells, both with confidence 0.8 in one bin: accuracy 1/2 -> ECE |0.8 - 0.5| = 0.3
    p = np.array([[0.8, 0.05, 0.05, 0.05, 0.05], [0.05, 0.8, 0.05, 0.05, 0.05]])
    y = np.array([0, 2])
    assert calibration.ece(y, p) == pytest.approx(0.3, abs=1e-6)
    assert calibration.nll(y, p) == pytest.approx(-(math.log(0.8) + math.log(0.05)) / 2)
    first = 0.2**2 + 4 * 0.05**2
    second = 0.05**2 + 0.8**2 + 0.95**2 + 2 * 0.05**2
    assert calibration.brier(y, p) == pytest.approx((first + second) / 2)


# Selective prediction ------------------------------------------------------------------------


def test_risk_coverage_and_aurc_by_hand():
    correct = [1, 0, 1, 1]
    uncertainty = [0.1, 0.4, 0.2, 0.3]  # surest first: 1, 1, 1, 0
    coverage, risk = selective.risk_coverage(correct, uncertainty)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk.tolist() == pytest.approx([0, 0, 0, 0.25])
    assert selective.aurc(correct, uncertainty) == pytest.approx(0.0625)
    assert selective.accuracy_at_coverage(correct, uncertainty, 0.75) == 1.0
    assert selective.accuracy_at_coverage(correct, uncertainty, 1.0) == 0.75


def test_the_threshold_gives_the_target_referral_rate_on_the_cells_it_was_chosen_on():
    rng = np.random.default_rng(0)
    u = rng.gamma(2.0, 1.0, 1000)
    for rate in (0.0, 0.05, 0.2, 0.5, 1.0):
        t = selective.referral_threshold(u, rate)
        assert selective.refer(u, t).mean() == pytest.approx(rate, abs=1e-3)
    with pytest.raises(ValueError, match="max_rate"):
        selective.referral_threshold(u, 1.2)


def test_undefined_uncertainties_are_refused_by_name():
    with pytest.raises(ValueError, match="undefined"):
        selective.aurc([1, 0], [0.1, float("nan")])


@torch.no_grad()
def test_members_keep_their_own_normalisation_behind_one_raw_input():
    from pap_severity.checkpoints import ModelBundle
    from pap_severity.ensemble import from_bundles
    from pap_severity.pipelines import get_pipeline
    from pap_severity.transforms import Preprocess

    pre_a, pre_b = Preprocess(32, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)), Preprocess(32, (0.6, 0.5, 0.4), (0.3, 0.25, 0.2))
    a, b = member(9), member(10)
    bundles = [ModelBundle(a, get_pipeline("combined"), TINY_ARCH, pre_a),
               ModelBundle(b, get_pipeline("combined"), TINY_ARCH, pre_b)]
    model, pre = from_bundles(bundles, tta="none")
    raw = torch.rand(2, 3, 32, 32)
    expected = []
    for net, p in ((a, pre_a), (b, pre_b)):
        x = (raw - torch.tensor(p.mean).view(1, 3, 1, 1)) / torch.tensor(p.std).view(1, 3, 1, 1)
        expected.append(net(x)[:, -1])
    assert pre.mean == (0.0, 0.0, 0.0) and pre.std == (1.0, 1.0, 1.0) and pre.image_size == 32
    assert torch.allclose(decode(model(raw), "combined").score, (expected[0] + expected[1]) / 2, atol=1e-5)
    with pytest.raises(ValueError, match="share a pipeline"):
        from_bundles([bundles[0], ModelBundle(a, get_pipeline("sord"), TINY_ARCH, pre_a)])
