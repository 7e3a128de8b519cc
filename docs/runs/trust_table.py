"""The trust table of docs/results.md from the ensemble stage's metrics files.

    python docs/runs/trust_table.py metrics/ensemble/classification.json metrics/ensemble/combined.json

One row per pipeline and candidate (single fold model: mean ± std over the fold models; fold
ensemble; ensemble with dihedral TTA; final model), all on the held-out test part, with the
temperature and referral threshold fitted on the calibration part.
"""

from __future__ import annotations

import json
import sys

COLUMNS = (("accuracy", "acc."), ("mean_auc", "mean AUC"), ("mse", "MSE"), ("binary_accuracy", "binary acc."),
           ("ece", "ECE"), ("ece_calibrated", "ECE calibrated"), ("nll", "NLL"), ("aurc", "AURC"),
           ("accuracy_at_coverage:0.8", "acc. @80% cov."), ("referral_rate", "referred"),
           ("accuracy_retained", "acc. retained"), ("sensitivity_retained", "sens. retained"),
           ("temperature", "T"))


def value(row: dict, key: str) -> str:
    """`name` or `name:sub` of a row; a single row's {mean, std} as mean ± std."""
    name, _, sub = key.partition(":")
    v = row.get(name)
    if sub and isinstance(v, dict):
        v = v.get(sub)
    if isinstance(v, dict) and "mean" in v:
        return f"{v['mean']:.3f} ± {v['std']:.3f}"
    return "—" if v is None else f"{v:.3f}"


def main(paths: list[str]) -> None:
    print("| pipeline | model | " + " | ".join(label for _, label in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for path in paths:
        content = json.loads(open(path).read())
        for variant, row in content["rows"].items():
            served = " (served)" if variant == content["served"] else ""
            print(f"| {content['pipeline']} | {variant}{served} | " + " | ".join(value(row, k) for k, _ in COLUMNS) + " |")
        print(f"<!-- {path}: {content['n_test_cells']} test cells, {content['n_calibration_cells']} calibration "
              f"cells, data {content['data_source']} -->")


if __name__ == "__main__":
    main(sys.argv[1:])
