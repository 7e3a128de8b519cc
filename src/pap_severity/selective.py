"""Selective prediction: answer the cells the model is surest about, refer the rest to a cytologist.

Cells are ranked by an uncertainty (higher = less sure). Keeping the fraction c (the coverage)
of surest cells, the risk is the error rate on them; the risk-coverage curve and its area (AURC,
Geifman & El-Yaniv 2017; lower is better, the error rate at full coverage is its ceiling) say
how well the uncertainty orders mistakes. The referral threshold is the uncertainty above which
a cell is referred, chosen on held-out cells for a target referral rate; the test part then says
what rate and accuracy it really gives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

COVERAGES = (0.8, 0.9)


def _check(correct, uncertainty) -> tuple[np.ndarray, np.ndarray]:
    correct = np.asarray(correct, dtype=float).ravel()
    uncertainty = np.asarray(uncertainty, dtype=float).ravel()
    if correct.shape != uncertainty.shape or correct.size == 0:
        raise ValueError(f"need one uncertainty per cell, got {correct.shape} and {uncertainty.shape}")
    if not np.isfinite(uncertainty).all():
        raise ValueError("the uncertainty is undefined (NaN) for some cells; rank by a defined measure")
    return correct, uncertainty


def risk_coverage(correct, uncertainty) -> tuple[np.ndarray, np.ndarray]:
    """Coverage i/N and the error rate of the i surest cells, for i = 1..N (ties broken by order)."""
    correct, uncertainty = _check(correct, uncertainty)
    order = np.argsort(uncertainty, kind="stable")
    errors = np.cumsum(1.0 - correct[order])
    kept = np.arange(1, correct.size + 1)
    return kept / correct.size, errors / kept


def aurc(correct, uncertainty) -> float:
    """Area under the risk-coverage curve: the mean of the risks over coverages 1/N .. 1."""
    return float(risk_coverage(correct, uncertainty)[1].mean())


def accuracy_at_coverage(correct, uncertainty, coverage: float) -> float:
    """Accuracy on the ceil(coverage * N) surest cells."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    correct, uncertainty = _check(correct, uncertainty)
    keep = max(1, int(np.ceil(coverage * correct.size - 1e-9)))
    return float(correct[np.argsort(uncertainty, kind="stable")[:keep]].mean())


def referral_threshold(uncertainty, max_rate: float) -> float:
    """The smallest threshold t such that at most `max_rate` of these cells have uncertainty > t."""
    if not 0 <= max_rate <= 1:
        raise ValueError(f"referral.max_rate must be in [0, 1], got {max_rate}")
    values = np.sort(np.asarray(uncertainty, dtype=float).ravel())
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError("no defined uncertainties to choose a referral threshold from")
    allowed = int(np.floor(max_rate * values.size + 1e-9))  # cells that may be referred
    return float(values[values.size - 1 - allowed]) if allowed < values.size else float(-np.inf)


def refer(uncertainty, threshold: float) -> np.ndarray:
    """Which cells to refer: those whose uncertainty is above the threshold."""
    return np.asarray(uncertainty, dtype=float) > threshold


def plot_risk_coverage(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str, path: Path,
                       referral_rate: float | None = None) -> Path:
    """Error rate against coverage per curve (name -> risk_coverage(...))."""
    fig = Figure(figsize=(6.5, 5), layout="constrained")
    ax = fig.subplots()
    for i, (name, (coverage, risk)) in enumerate(curves.items()):
        ax.plot(coverage, risk, color=f"C{i}", label=f"{name} (AURC {risk.mean():.3f})")
    if referral_rate is not None:
        ax.axvline(1 - referral_rate, color="grey", linestyle=":", label=f"referral rate {referral_rate:.0%}")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage (share of cells answered, surest first)")
    ax.set_ylabel("error rate on the answered cells")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
