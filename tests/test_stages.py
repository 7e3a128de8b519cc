"""The stage functions of stages.py, where they do more than call one library function."""

from __future__ import annotations

from conftest import tiny_config

from pap_severity import stages
from pap_severity.config import SplitConfig
from pap_severity.data.splits import make_splits, write_splits


def test_the_final_model_is_measured_once_per_test_cell_whatever_the_repeats(synth_set, tmp_path):
    splits = make_splits(synth_set["manifest"], SplitConfig(folds=2, test_fraction=0.2, seed=0, repeats=2))
    split_file = write_splits(splits, tmp_path / "splits.csv")
    result = stages.train_final(tiny_config(), "classification", manifest=synth_set["manifest_csv"],
                                splits=split_file, out=tmp_path / "final", metrics=tmp_path / "metrics",
                                progress=False)
    test_cells = splits.loc[splits["part"] == "test", "path"]
    assert len(test_cells) == 2 * test_cells.nunique()  # the splits list each test cell once per repeat
    assert result["n_test_cells"] == test_cells.nunique()
    assert sum(map(sum, result["confusion_matrix"])) == test_cells.nunique()
