"""Are the probabilities honest? ECE, NLL, Brier, temperature scaling, the reliability diagram.

- ECE: torchmetrics' top-label expected calibration error, 15 equal-width bins (L1).
- NLL and Brier: scikit-learn's `log_loss` and multiclass `brier_score_loss` (mean over cells of
  the squared distance between the probability vector and the one-hot truth, as scikit-learn
  defines it).
- Temperature: the T > 0 minimising the NLL of softmax(log p / T) on held-out cells (Guo et al.
  2017), found by a bounded 1-D search on log T. It is fitted on what is served (the ensemble's
  averaged probabilities), never on the test part. scikit-learn's
  `CalibratedClassifierCV(method="temperature")` gives the same fit (a test checks it); this
  function returns the number itself, which the served module stores.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pap_severity.losses import NUM_CLASSES

ECE_BINS = 15
_EPS = 1e-12


def _probs(probs) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != NUM_CLASSES:
        raise ValueError(f"expected probabilities [N, {NUM_CLASSES}], got {probs.shape}")
    return probs / probs.sum(axis=1, keepdims=True)  # float32 rounding: rows sum to 1 within 1e-7


def ece(y_true, probs, n_bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error (torchmetrics MulticlassCalibrationError, L1)."""
    import torch
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs = _probs(probs)
    value = multiclass_calibration_error(torch.as_tensor(probs, dtype=torch.float64),
                                         torch.tensor(np.asarray(y_true, dtype=np.int64)),
                                         num_classes=NUM_CLASSES, n_bins=n_bins, norm="l1")
    return float(value)


def nll(y_true, probs) -> float:
    from sklearn.metrics import log_loss

    return float(log_loss(np.asarray(y_true, dtype=int), _probs(probs), labels=list(range(NUM_CLASSES))))


def brier(y_true, probs) -> float:
    from sklearn.metrics import brier_score_loss

    return float(brier_score_loss(np.asarray(y_true, dtype=int), _probs(probs), labels=list(range(NUM_CLASSES))))


def scale(probs, temperature: float) -> np.ndarray:
    """softmax(log p / T): T > 1 softens, T < 1 sharpens, T = 1 changes nothing."""
    logits = np.log(np.clip(_probs(probs), _EPS, None)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=1, keepdims=True)


def fit_temperature(y_true, probs, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature that minimises the NLL of `scale(probs, T)` on these cells."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y_true, dtype=int)
    log_p = np.log(np.clip(_probs(probs), _EPS, None))
    if len(y) == 0:
        raise ValueError("no cells to fit a temperature on")

    def loss(log_t: float) -> float:
        z = log_p / math.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        return float(-(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(axis=1))).mean())

    found = minimize_scalar(loss, bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded",
                            options={"xatol": 1e-6})
    return float(math.exp(found.x))


def summary(y_true, probs, calibrated) -> dict[str, float]:
    """ECE before and after the temperature, and the NLL and Brier of the calibrated probabilities."""
    return {"ece": ece(y_true, probs), "ece_calibrated": ece(y_true, calibrated), "nll": nll(y_true, calibrated),
            "brier": brier(y_true, calibrated), "nll_uncalibrated": nll(y_true, probs)}


def reliability(y_true, probs, n_bins: int = ECE_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-label reliability: per non-empty bin of confidence, the mean confidence, the accuracy
    (scikit-learn's calibration_curve on `correct` against max p) and the number of cells."""
    from sklearn.calibration import calibration_curve

    probs = _probs(probs)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(y_true, dtype=int)).astype(int)
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=n_bins, strategy="uniform")
    edges = np.linspace(0, 1, n_bins + 1)
    counts = np.histogram(confidence, bins=edges)[0]
    return mean_confidence, accuracy, counts[counts > 0]


def plot_reliability(curves: dict[str, tuple], title: str, path: Path) -> Path:
    """Accuracy against confidence per curve (name -> reliability(...)), with the diagonal."""
    fig = Figure(figsize=(6, 5.5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfectly calibrated")
    for i, (name, (confidence, accuracy, counts)) in enumerate(curves.items()):
        ax.plot(confidence, accuracy, marker="o", color=f"C{i}", label=name)
        ax.scatter(confidence, accuracy, s=8 + 60 * counts / max(counts.max(), 1), color=f"C{i}", alpha=0.3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"confidence (top-class probability, {ECE_BINS} bins; marker area ~ cells)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
