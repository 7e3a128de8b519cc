import numpy as np
import pandas as pd
import pytest

from pap_severity.config import SplitConfig
from pap_severity.data.splits import CALIB, CV, TEST, make_splits, read_splits, write_splits


def manifest(n_per_class=(40, 30, 25, 35, 30), duplicates=0, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for sev, n in enumerate(n_per_class):
        for i in range(n):
            rows.append({"path": f"c{sev}/{i}.BMP", "sha256": f"{sev:02d}{i:04d}" + "0" * 58, "severity": sev})
    df = pd.DataFrame(rows)
    for j in rng.choice(len(df), duplicates, replace=False):
        dup = df.iloc[j].copy()
        dup["path"] = dup["path"].replace(".BMP", "-copy.BMP")
        df = pd.concat([df, dup.to_frame().T], ignore_index=True)
    df["severity"] = df["severity"].astype("Int64")
    return df


def test_every_labelled_cell_gets_one_part_and_cv_cells_one_fold():
    splits = make_splits(manifest(), SplitConfig(folds=4, test_fraction=0.2, seed=0))
    assert len(splits) == 160
    assert set(splits["part"]) == {CV, CALIB, TEST}
    assert (splits.loc[splits["part"] != CV, "fold"] == -1).all()
    assert splits["part"].eq(CALIB).mean() == pytest.approx(0.1, abs=0.03)
    assert set(splits.loc[splits["part"] == CV, "fold"]) == {0, 1, 2, 3}
    assert splits["part"].eq(TEST).mean() == pytest.approx(0.2, abs=0.03)


def test_stratified_each_part_keeps_the_class_proportions():
    df = manifest()
    splits = make_splits(df, SplitConfig(folds=4, test_fraction=0.2, seed=1))
    overall = df["severity"].value_counts(normalize=True).sort_index()
    for _, group in splits.groupby("fold"):
        share = group["severity"].value_counts(normalize=True).sort_index()
        assert np.abs(share - overall).max() < 0.08


def test_duplicates_never_cross_parts_or_folds():
    splits = make_splits(manifest(duplicates=20), SplitConfig(folds=4, test_fraction=0.2, seed=2))
    assert (splits.groupby("sha256")[["part", "fold"]].nunique() == 1).all().all()
    assert splits["sha256"].duplicated().sum() == 20


def test_seeded_same_seed_same_split_other_seed_other_split():
    a = make_splits(manifest(), SplitConfig(seed=3))
    b = make_splits(manifest(), SplitConfig(seed=3))
    c = make_splits(manifest(), SplitConfig(seed=4))
    pd.testing.assert_frame_equal(a, b)
    assert not a["fold"].equals(c["fold"])


def test_unlabelled_rows_are_left_out():
    df = manifest()
    df.loc[0, "severity"] = pd.NA
    assert len(make_splits(df, SplitConfig())) == len(df) - 1


def test_too_few_cells_is_a_clear_error():
    with pytest.raises(ValueError, match="too few cells to split.*smallest class has 3"):
        make_splits(manifest(n_per_class=(10, 10, 3, 10, 10)), SplitConfig(folds=4))


def test_round_trip_and_missing_file(tmp_path):
    splits = make_splits(manifest(), SplitConfig())
    back = read_splits(write_splits(splits, tmp_path / "s.csv"))
    assert back[["path", "part", "fold"]].equals(splits[["path", "part", "fold"]])
    with pytest.raises(FileNotFoundError, match="pap-severity data split"):
        read_splits(tmp_path / "none.csv")


def test_the_calibration_part_leaves_the_test_part_as_it_was_and_keeps_duplicates_together():
    df = manifest(duplicates=12)
    without = make_splits(df, SplitConfig(folds=4, test_fraction=0.2, calibration_fraction=0.0, seed=3))
    with_calib = make_splits(df, SplitConfig(folds=4, test_fraction=0.2, calibration_fraction=0.1, seed=3))
    assert set(without["part"]) == {CV, TEST}
    test = lambda s: set(s.loc[s["part"] == TEST, "path"])  # noqa: E731
    assert test(without) == test(with_calib)
    calib = with_calib[with_calib["part"] == CALIB]
    assert not set(calib["path"]) & set(with_calib.loc[with_calib["part"] == CV, "path"])
    assert with_calib.groupby("sha256")["part"].nunique().max() == 1
    share = calib["severity"].value_counts(normalize=True).sort_index()
    overall = df["severity"].value_counts(normalize=True).sort_index()
    assert np.abs(share - overall).max() < 0.1


def test_parts_that_leave_too_little_to_train_on_are_refused_by_name():
    with pytest.raises(ValueError, match="calibration_fraction"):
        SplitConfig(test_fraction=0.45, calibration_fraction=0.4)
