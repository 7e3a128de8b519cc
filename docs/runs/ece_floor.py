"""How large an ECE a perfectly calibrated model shows on this many cells: the estimator's floor.

    python docs/runs/ece_floor.py models/ensemble/classification.predictions.csv [--variant ensemble_tta]

ECE with 15 bins on a few hundred cells is biased upward: even labels drawn from the model's
own probabilities (calibrated by construction) give ECE > 0. This draws such labels --draws times
for the variant's test predictions (the calibrated probabilities p0..p4 the ensemble stage wrote)
and prints the mean and 95th percentile of their ECE beside the ECE measured on the true labels,
so an aim such as "ECE at most 0.05" can be read against what the test part can resolve.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from pap_severity.calibration import ece
from pap_severity.evaluation import PROB_COLUMNS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("predictions")
    ap.add_argument("--variant", default=None, help="default: every variant in the file")
    ap.add_argument("--draws", type=int, default=2000)
    args = ap.parse_args()
    table = pd.read_csv(args.predictions)
    table = table[table["part"] == "test"]
    rng = np.random.default_rng(0)
    print("| variant | cells | ECE measured | ECE of a calibrated model: mean | 95th percentile |")
    print("|---|---|---|---|---|")
    for variant, rows in table.groupby("variant", sort=False):
        if args.variant and variant != args.variant:
            continue
        probs = rows[list(PROB_COLUMNS)].to_numpy()
        probs = probs / probs.sum(1, keepdims=True)
        cumulative = probs.cumsum(1)
        floor = [ece((rng.random((len(probs), 1)) > cumulative).sum(1).clip(max=probs.shape[1] - 1), probs)
                 for _ in range(args.draws)]
        measured = ece(rows["severity"].to_numpy(), probs)
        print(f"| {variant} | {len(rows)} | {measured:.3f} | {np.mean(floor):.3f} | {np.quantile(floor, 0.95):.3f} |")


if __name__ == "__main__":
    main()
