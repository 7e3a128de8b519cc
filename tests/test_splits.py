import numpy as np
import pandas as pd
import pytest

from pap_severity.config import SplitConfig
from pap_severity.data.splits import CALIB, CV, TEST, cv_pairs, held_out, make_splits, read_splits, write_splits


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


# Repeated k-fold (issue 12): one row per (cell, repeat).

REPEATED = SplitConfig(folds=4, test_fraction=0.2, seed=5, repeats=3)


@pytest.fixture(scope="module")
def repeated():
    return make_splits(manifest(duplicates=20), REPEATED)


def test_each_repeat_is_a_complete_split_of_every_cell(repeated):
    assert sorted(repeated["repeat"].unique()) == [0, 1, 2]
    cells = manifest(duplicates=20)["path"]
    for _, rows in repeated.groupby("repeat"):
        assert sorted(rows["path"]) == sorted(cells)  # each cell once per repeat
        cv = rows[rows["part"] == CV]
        assert sorted(cv["fold"].unique()) == [0, 1, 2, 3]  # so each cv cell in exactly one fold


def test_the_test_part_is_the_same_in_every_repeat_and_never_in_a_fold(repeated):
    test_sets = [frozenset(rows.loc[rows["part"] == TEST, "path"]) for _, rows in repeated.groupby("repeat")]
    assert len(set(test_sets)) == 1 and len(test_sets[0]) > 0
    assert (repeated.loc[repeated["part"] == TEST, "fold"] == -1).all()
    assert repeated.groupby("path")["part"].nunique().max() == 1
    single = make_splits(manifest(duplicates=20), SplitConfig(folds=4, test_fraction=0.2, seed=5))
    assert set(single.loc[single["part"] == TEST, "path"]) == test_sets[0]


def test_repeats_deal_different_folds(repeated):
    folds = repeated[repeated["part"] == CV].pivot(index="path", columns="repeat", values="fold")
    for a in range(3):
        for b in range(a + 1, 3):
            together_a = folds[a].to_numpy()[:, None] == folds[a].to_numpy()[None, :]
            together_b = folds[b].to_numpy()[:, None] == folds[b].to_numpy()[None, :]
            assert (together_a != together_b).mean() > 0.1, f"repeats {a} and {b} group the cells alike"


def test_duplicates_stay_together_in_every_repeat(repeated):
    assert (repeated.groupby(["repeat", "sha256"])[["part", "fold"]].nunique() == 1).all().all()


def test_repeat_zero_is_the_plain_split_and_one_repeat_has_only_repeat_zero():
    df = manifest()
    single = make_splits(df, SplitConfig(folds=4, seed=5))
    assert (single["repeat"] == 0).all()
    three = make_splits(df, SplitConfig(folds=4, seed=5, repeats=3))
    pd.testing.assert_frame_equal(three[three["repeat"] == 0].reset_index(drop=True), single)


def test_cv_pairs_walk_every_fold_of_every_repeat_without_the_test_part(repeated):
    pairs = list(cv_pairs(repeated))
    assert [(r, k) for r, k, _, _ in pairs] == [(r, k) for r in range(3) for k in range(4)]
    test = set(held_out(repeated)["path"])
    for r, k, train, val in pairs:
        assert (val["fold"] == k).all() and (train["fold"] != k).all()
        assert (train["repeat"] == r).all() and (val["repeat"] == r).all()
        assert not set(train["path"]) & set(val["path"])
        assert not (set(train["path"]) | set(val["path"])) & test
        assert not set(train["sha256"]) & set(val["sha256"])
    for r in range(3):
        vals = [set(val["path"]) for rr, _, _, val in pairs if rr == r]
        assert sum(map(len, vals)) == len(set().union(*vals))  # every cv cell validated once per repeat


def test_held_out_gives_each_test_cell_once(repeated):
    test = held_out(repeated)
    assert test["path"].is_unique
    assert set(test["path"]) == set(repeated.loc[repeated["part"] == TEST, "path"])


def test_a_splits_file_from_before_repeats_reads_as_repeat_zero(tmp_path):
    old = make_splits(manifest(), SplitConfig()).drop(columns="repeat")
    old.to_csv(tmp_path / "old.csv", index=False)
    back = read_splits(tmp_path / "old.csv")
    assert (back["repeat"] == 0).all()
    assert [(r, k) for r, k, _, _ in cv_pairs(back)] == [(0, k) for k in range(4)]


def test_repeats_below_one_are_refused():
    with pytest.raises(ValueError, match="repeats"):
        SplitConfig(repeats=0)
