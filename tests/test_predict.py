"""`pap-severity predict` without a model: which files are cells, which are masks, and the one-line
errors for what cannot be answered. (Its numbers against a real `bentoml serve`, heat maps and
At_N / At_C are tested in test_serving.py, on the one served model that module trains.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pap_severity.batch_predict import collect, parse_model_uri
from pap_severity.cli import app


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_folders_are_searched_and_masks_go_with_their_cell(tmp_path):
    a = touch(tmp_path / "smear" / "a.BMP")
    a_mask = touch(tmp_path / "smear" / "a-d.bmp")
    b = touch(tmp_path / "smear" / "deeper" / "b.png")
    touch(tmp_path / "smear" / "notes.txt")
    c = touch(tmp_path / "c.jpg")
    items = collect([tmp_path / "smear", c, b])  # b twice: answered once
    assert [i.path for i in items] == [a, b, c]
    assert items[0].mask == a_mask and items[1].mask is None and items[2].mask is None
    # Another suffix: then a-d.bmp is a cell like any other.
    assert [i.path.name for i in collect([tmp_path / "smear"], mask_suffix="_mask")] == ["a-d.bmp", "a.BMP", "b.png"]


def test_inputs_that_cannot_be_answered_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        collect([tmp_path / "missing.bmp"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images in this folder"):
        collect([tmp_path / "empty"])
    with pytest.raises(ValueError, match="only masks"):
        collect([touch(tmp_path / "x-d.bmp")])


@pytest.mark.parametrize("uri, expected", [("models:/pap-severity/3", ("pap-severity", "3", None)),
                                           ("models:/pap-severity@champion", ("pap-severity", None, "champion"))])
def test_model_uris(uri, expected):
    assert parse_model_uri(uri) == expected


@pytest.mark.parametrize("uri", ["pap-severity", "models:/", "models:/x/latest", "runs:/abc/model", "models:/a/b@c"])
def test_a_model_uri_that_is_no_registered_version_is_refused(uri):
    with pytest.raises(ValueError, match="models:/<name>/<version>"):
        parse_model_uri(uri)


def test_cli_says_what_is_wrong_in_one_line(tmp_path):
    done = CliRunner().invoke(app, ["predict", str(tmp_path / "nope.bmp"), "--out", str(tmp_path / "a.csv")])
    assert done.exit_code == 2 and "nope.bmp: no such file or folder" in done.output
    assert "Traceback" not in done.output
    touch(tmp_path / "a.bmp")
    done = CliRunner().invoke(app, ["predict", str(tmp_path / "a.bmp"), "--out", str(tmp_path / "a.txt")])
    assert done.exit_code == 2 and "give a .csv file" in done.output
