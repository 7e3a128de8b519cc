"""Is a pipeline better than the reference? Paired statistics over folds and over cells.

Two pipelines trained on the same (repeat, fold) splits give one paired difference per split,
challenger minus reference. For those differences d_1..d_n:

- `mean_diff`: their mean;
- `ci95`: a 95% interval from Student's t with the Nadeau-Bengio correction for resampled
  cross-validation (2003): the variance s^2 / n becomes s^2 (1/n + n_val/n_train), because the
  training sets of different folds overlap and their differences are not independent. Without the
  correction the interval is too narrow (it is also given, as `ci95_uncorrected`);
- `p_value`: the two-sided Wilcoxon signed-rank test (SciPy), which assumes no distribution
  but, like the plain t, independent differences: read it as a guide, the corrected interval as
  the answer;
- `n`: the number of pairs. Under 5 pairs no test can reach p < 0.05 (Wilcoxon's smallest
  two-sided p with 4 pairs is 0.125): the p-value is null, with the reason.

On the held-out test part the two ensembles are compared cell by cell: a paired bootstrap over
cells of the accuracy difference (`bootstrap_accuracy`).
"""

from __future__ import annotations

import math

import numpy as np

MIN_PAIRS = 5


def paired_difference(challenger, reference, val_fraction: float | None = None) -> dict:
    """The paired summary of challenger - reference over splits (NaN pairs dropped).

    val_fraction: n_val / n_train of one split, for the Nadeau-Bengio correction; None
    (or 0) gives the uncorrected t interval as `ci95`."""
    from scipy import stats

    a = np.asarray(challenger, dtype=float).ravel()
    b = np.asarray(reference, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same splits: {a.shape} against {b.shape}")
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    n = int(d.size)
    out: dict = {"mean_diff": float(d.mean()) if n else None, "ci95": None, "ci95_uncorrected": None,
                 "p_value": None, "n": n}
    if n < 2:
        out["reason"] = f"{n} pair(s): no interval or test"
        return out
    sd = float(d.std(ddof=1))
    t = float(stats.t.ppf(0.975, n - 1))
    plain = t * sd / math.sqrt(n)
    corrected = t * sd * math.sqrt(1 / n + (val_fraction or 0.0))
    out["ci95_uncorrected"] = [out["mean_diff"] - plain, out["mean_diff"] + plain]
    out["ci95"] = [out["mean_diff"] - corrected, out["mean_diff"] + corrected]
    if n < MIN_PAIRS:
        out["reason"] = f"{n} pairs: fewer than {MIN_PAIRS}, no test can reach p < 0.05"
    elif np.all(d == 0):
        out["p_value"] = 1.0
    else:
        out["p_value"] = float(stats.wilcoxon(d, alternative="two-sided").pvalue)
    return out


def bootstrap_accuracy(correct_challenger, correct_reference, n_boot: int = 10_000, seed: int = 0) -> dict:
    """Paired bootstrap over cells of the accuracy difference (challenger - reference).

    `ci95` is the percentile interval; `p_value` the two-sided bootstrap p, twice the smaller
    share of resampled differences on either side of 0 (at least 1 / n_boot)."""
    a = np.asarray(correct_challenger, dtype=float).ravel()
    b = np.asarray(correct_reference, dtype=float).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"need one outcome per test cell for both, got {a.shape} and {b.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, (n_boot, a.size))
    diffs = a[idx].mean(1) - b[idx].mean(1)
    low, high = np.percentile(diffs, [2.5, 97.5])
    side = min((diffs <= 0).mean(), (diffs >= 0).mean())
    return {"mean_diff": float(a.mean() - b.mean()), "ci95": [float(low), float(high)],
            "p_value": float(min(1.0, max(2 * side, 1 / n_boot))), "n": int(a.size), "n_boot": n_boot}
