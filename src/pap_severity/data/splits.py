"""Seeded, stratified splits: k cross-validation folds, a calibration part, a held-out test part.

The test part is drawn first (the same cells whatever the other settings), then the calibration
part from the rest: cells no model trains or early-stops on, where the served model's temperature
and referral threshold are fitted (a temperature fitted on single fold models' out-of-fold cells
does not transfer to their average). The remaining cells form the cv folds.

Cells with the same sha256 are one group, so an image and its duplicate always
land in the same part and fold: no leakage through copies.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from pap_severity.config import SplitConfig

TEST = "test"
CV = "cv"
CALIB = "calib"


def make_splits(manifest: pd.DataFrame, cfg: SplitConfig) -> pd.DataFrame:
    """Assign every labelled cell to `test` or to one of cfg.folds cv folds."""
    df = manifest.loc[manifest["severity"].notna(), ["path", "sha256", "severity"]].reset_index(drop=True)
    if df.empty:
        raise ValueError("the manifest has no labelled cells to split")
    y = df["severity"].astype(int).to_numpy()
    groups = df["sha256"].to_numpy()
    smallest = int(np.bincount(y).min()) if len(np.unique(y)) else 0
    n_test_splits = max(2, round(1 / cfg.test_fraction))
    if smallest < n_test_splits or len(np.unique(groups)) < n_test_splits * cfg.folds:
        raise ValueError(
            f"too few cells to split: the smallest class has {smallest}, and a test part of "
            f"{cfg.test_fraction:.0%} plus {cfg.folds} folds needs at least {n_test_splits} per class; "
            "add cells or lower split.folds"
        )
    outer = StratifiedGroupKFold(n_splits=n_test_splits, shuffle=True, random_state=cfg.seed)
    cv_idx, test_idx = next(outer.split(np.zeros(len(df)), y, groups))
    part = np.full(len(df), CV, dtype=object)
    part[test_idx] = TEST
    if cfg.calibration_fraction > 0:
        share = cfg.calibration_fraction / (1 - cfg.test_fraction)  # of the cells left
        calib_splits = max(2, round(1 / share))
        picker = StratifiedGroupKFold(n_splits=calib_splits, shuffle=True, random_state=cfg.seed)
        keep, calib = next(picker.split(np.zeros(len(cv_idx)), y[cv_idx], groups[cv_idx]))
        part[cv_idx[calib]] = CALIB
        cv_idx = cv_idx[keep]
    fold = np.full(len(df), -1, dtype=int)
    inner = StratifiedGroupKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.seed)
    for k, (_, val) in enumerate(inner.split(np.zeros(len(cv_idx)), y[cv_idx], groups[cv_idx])):
        fold[cv_idx[val]] = k
    df["part"] = part
    df["fold"] = fold
    return df


def write_splits(splits: pd.DataFrame, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    splits.to_csv(out, index=False)
    return out


def read_splits(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no splits file; write one with `pap-severity data split`")
    df = pd.read_csv(path, dtype={"path": str, "sha256": str, "part": str})
    missing = {"path", "sha256", "severity", "part", "fold"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: not a splits file, missing columns {sorted(missing)}")
    return df
