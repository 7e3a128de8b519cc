"""Seeded, stratified splits: a held-out test part, a calibration part, and k cross-validation
folds repeated R times.

The test part is drawn first (the same cells whatever the other settings), then the calibration
part from the rest: cells no model trains or early-stops on, where the served model's temperature
and referral threshold are fitted (a temperature fitted on single fold models' out-of-fold cells
does not transfer to their average). The remaining cells form the cv folds, drawn anew for each
repeat; the test and calibration parts are the same in every repeat.

Cells with the same sha256 are one group, so an image and its duplicate always
land in the same part and fold: no leakage through copies.

The table holds one row per (cell, repeat): columns path, sha256, severity, repeat
(0..R-1), part (`cv` or `test`) and fold (0..k-1, -1 for test). The test part is drawn
once and is the same in every repeat; each repeat deals the cv cells into k folds with
its own seed (repeat 0 with split.seed, so one repeat is the split of a plain k-fold).
So the rows of one repeat form a complete split, and `cv_pairs` walks every
(repeat, fold) training/validation pair in a fixed order, the same for every pipeline.
"""

from __future__ import annotations

import warnings

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from pap_severity.config import SplitConfig
from pap_severity.files import write_csv

TEST = "test"
CV = "cv"
CALIB = "calib"
COLUMNS = ("path", "sha256", "severity", "repeat", "part", "fold")


def repeat_seed(seed: int, repeat: int) -> int:
    """The fold seed of a repeat: split.seed for repeat 0, then distinct seeds derived from both."""
    if repeat == 0:
        return seed
    return int(np.random.SeedSequence([seed, repeat]).generate_state(1)[0])


def make_splits(manifest: pd.DataFrame, cfg: SplitConfig) -> pd.DataFrame:
    """Assign every labelled cell to `test`, or in each of cfg.repeats repeats to one of cfg.folds cv folds."""
    from sklearn.model_selection import StratifiedGroupKFold  # here: every stage reads splits, one makes them

    df = manifest.loc[manifest["severity"].notna(), ["path", "sha256", "severity"]].reset_index(drop=True)
    if df.empty:
        raise ValueError("the manifest has no labelled cells to split")
    y = df["severity"].astype(int).to_numpy()
    # A file that could not be read has no checksum: it is a group of its own, not one with every other.
    sha = df["sha256"].fillna("").astype(str)
    groups = sha.where(sha != "", "path:" + df["path"].astype(str)).to_numpy()
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
        with warnings.catch_warnings():  # a class smaller than calib_splits simply lands in fewer parts
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            keep, calib = next(picker.split(np.zeros(len(cv_idx)), y[cv_idx], groups[cv_idx]))
        part[cv_idx[calib]] = CALIB
        cv_idx = cv_idx[keep]
    tables = []
    for r in range(cfg.repeats):
        fold = np.full(len(df), -1, dtype=int)
        inner = StratifiedGroupKFold(n_splits=cfg.folds, shuffle=True, random_state=repeat_seed(cfg.seed, r))
        for k, (_, val) in enumerate(inner.split(np.zeros(len(cv_idx)), y[cv_idx], groups[cv_idx])):
            fold[cv_idx[val]] = k
        tables.append(df.assign(repeat=r, part=part, fold=fold))
    return pd.concat(tables, ignore_index=True).loc[:, list(COLUMNS)]


def cv_pairs(splits: pd.DataFrame) -> Iterator[tuple[int, int, pd.DataFrame, pd.DataFrame]]:
    """(repeat, fold, training rows, validation rows) for every cv fold of every repeat, in that order.

    The rows are those of `splits` (index reset); the test part is in neither.
    """
    repeats = splits["repeat"] if "repeat" in splits else pd.Series(0, index=splits.index)
    cv = splits[splits["part"] == CV]
    for r in sorted(int(v) for v in repeats[cv.index].unique()):
        rows = cv[repeats[cv.index] == r]
        for k in sorted(int(v) for v in rows["fold"].unique()):
            in_fold = rows["fold"] == k
            yield r, k, rows[~in_fold].reset_index(drop=True), rows[in_fold].reset_index(drop=True)


def held_out(splits: pd.DataFrame, part: str = TEST) -> pd.DataFrame:
    """The cells of a held-out part (test or calib), one row each (they are the same in every repeat)."""
    rows = splits[splits["part"] == part]
    return rows.drop_duplicates("path").reset_index(drop=True)


def write_splits(splits: pd.DataFrame, out: str | Path) -> Path:
    return write_csv(splits, out)


def read_splits(path: str | Path) -> pd.DataFrame:
    """Read a splits CSV; a file from before repeats (no `repeat` column) reads as repeat 0."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no splits file; write one with `pap-severity data split`")
    df = pd.read_csv(path, dtype={"path": str, "sha256": str, "part": str}, keep_default_na=False)
    missing = {"path", "sha256", "severity", "part", "fold"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: not a splits file, missing columns {sorted(missing)}")
    if "repeat" not in df.columns:
        df.insert(df.columns.get_loc("part"), "repeat", 0)
    return df
