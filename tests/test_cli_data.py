"""The `pap-severity data ...` commands, end to end through the CLI."""

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from pap_severity.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_synth_manifest_split_validate_chain(tmp_path):
    synth = tmp_path / "synth"
    assert run("data", "synth", "--out", synth, "--per-class", 10, "--size", 32, "--seed", 1).exit_code == 0
    manifest = tmp_path / "manifest.csv"
    res = run("data", "manifest", synth, "--out", manifest)
    assert res.exit_code == 0, res.output
    assert "70 cells (synthetic)" in res.output
    splits = tmp_path / "splits.csv"
    res = run("data", "split", manifest, "--out", splits)
    assert res.exit_code == 0, res.output
    res = run("data", "validate", manifest, "--splits", splits, "--out", tmp_path / "val")
    assert res.exit_code == 0, res.output
    assert "validation passed" in res.output
    result = json.loads((tmp_path / "val" / "validation.json").read_text())
    assert result["success"] is True and result["source"] == "synthetic"
    assert (tmp_path / "val" / "data_docs" / "index.html").is_file()


def test_validate_a_folder_with_bad_files_exits_1_and_names_them(tiny_herlev):
    folder = next(tiny_herlev.rglob("moderate_dysplastic"))
    victim = sorted(folder.glob("*.BMP"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    res = run("data", "validate", tiny_herlev)
    assert res.exit_code == 1
    assert "every image decodes" in res.output and victim.as_posix() in res.output


@pytest.mark.parametrize(
    "args, message",
    [
        (("data", "manifest", "/nonexistent/dir"), "no such folder"),
        (("data", "split", "/nonexistent/m.csv"), "no manifest"),
        (("data", "synth", "--out", "{tmp}/s", "--per-class", 0), "per_class"),
        (("data", "fetch", "--zip", "/nonexistent/smear2005.zip", "--dest", "{tmp}/raw"), "no such file"),
        (("data", "fetch", "--url", "http://127.0.0.1:9/smear2005.zip", "--dest", "{tmp}/raw"), "--zip"),
        (("data", "split", "--params", "{tmp}/missing.yaml"), "no such params file"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, args, message):
    res = run(*[str(a).replace("{tmp}", str(tmp_path)) for a in args])
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and message in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("key, value", [("folds", 1), ("repeats", 0)])
def test_a_wrong_params_value_names_the_key(tmp_path, key, value):
    (tmp_path / "p.yaml").write_text(f"split:\n  {key}: {value}\n")
    res = run("data", "split", tmp_path / "m.csv", "--params", tmp_path / "p.yaml")
    assert res.exit_code == 2 and f"split.{key}" in res.output


def test_links_that_lead_nowhere_are_named_by_manifest_and_validate(tiny_herlev, tmp_path):
    """Issue 13.5: a symlink loop, a dangling link and a pipe: named, no traceback, good cells kept."""
    folder = next(tiny_herlev.rglob("normal_columnar"))
    (folder / "loop-a.BMP").symlink_to("loop-b.BMP")
    (folder / "loop-b.BMP").symlink_to("loop-a.BMP")
    (folder / "dangling.BMP").symlink_to("gone.BMP")
    os.mkfifo(folder / "pipe.BMP")
    bad = [(folder / name).as_posix() for name in ("loop-a.BMP", "loop-b.BMP", "dangling.BMP", "pipe.BMP")]

    manifest = tmp_path / "manifest.csv"
    res = run("data", "manifest", tiny_herlev, "--out", manifest)
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    assert all(f"warning: {path}: " in res.output for path in bad)
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    assert len(df) == 60 and (df["image_error"] == "").sum() == 56

    res = run("data", "validate", tiny_herlev)
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    named = {line.strip() for line in res.output.splitlines() if line.startswith("  /")}
    assert set(bad) <= named
    assert "symbolic link loop" in res.output and "dangling symbolic link" in res.output


def test_validate_lists_20_files_per_failure_then_counts_the_rest(tiny_herlev, tmp_path):
    """Issue 15: 56 cells without masks: 20 named, then where the other 36 are listed."""
    for mask in tiny_herlev.rglob("*-d.bmp"):
        mask.unlink()
    res = run("data", "validate", tiny_herlev, "--out", tmp_path / "val")
    assert res.exit_code == 1
    named = [line for line in res.output.splitlines() if line.startswith("  /")]
    assert len(named) == 20
    assert f"  ... and 36 more; full list in {tmp_path / 'val' / 'validation.json'}" in res.output
    listed = json.loads((tmp_path / "val" / "validation.json").read_text())["failures"][0]["files"]
    assert len(listed) == 56 and {line.strip() for line in named} <= set(listed)
    res = run("data", "validate", tiny_herlev)
    assert "  ... and 36 more; --out DIR writes the full list" in res.output


@pytest.mark.herlev
def test_real_herlev_40px_validates(herlev_40px, tmp_path):
    res = run("data", "validate", herlev_40px, "--out", tmp_path / "val")
    assert res.exit_code == 0, res.output
    assert "917 cells (herlev)" in res.output


@pytest.mark.herlev
def test_damaged_herlev_copy_fails_naming_exactly_the_damaged_files(herlev_40px, tmp_path):
    """One BMP truncated, one mask deleted, one image copied into another class folder."""
    copy = tmp_path / "herlev"
    shutil.copytree(herlev_40px, copy)
    light = sorted((copy / "light_dysplastic").glob("*.BMP"))
    truncated, unmasked = light[0], light[1]
    truncated.write_bytes(truncated.read_bytes()[:200])
    (unmasked.parent / f"{unmasked.stem}-d.bmp").unlink()
    original = sorted((copy / "severe_dysplastic").glob("*.BMP"))[0]
    duplicate = copy / "carcinoma_in_situ" / f"copied-{original.name}"
    shutil.copy(original, duplicate)
    shutil.copy(original.parent / f"{original.stem}-d.bmp", duplicate.parent / f"{duplicate.stem}-d.bmp")

    res = run("data", "validate", copy)
    assert res.exit_code == 1
    named = {line.strip() for line in res.output.splitlines() if line.startswith("  /")}
    assert named == {p.as_posix() for p in (truncated, unmasked, original, duplicate)}


@pytest.mark.herlev
def test_herlev_jpg_validation_names_20_files_not_917(herlev_jpg):
    """Issue 15: herlev-jpg has no masks; the output stays readable."""
    res = run("data", "validate", herlev_jpg)
    assert res.exit_code == 1
    assert len(res.output.splitlines()) < 60, len(res.output.splitlines())
    assert "  ... and 897 more; --out DIR writes the full list" in res.output


@pytest.mark.herlev
def test_a_mask_of_the_wrong_size_fails_validation_on_a_herlev_copy(herlev_40px, tmp_path):
    """Issue 13.1: a 20x30 -d.bmp beside a 40x40 cell passed validation and got fractions of 0.1217."""
    from PIL import Image

    copy = tmp_path / "herlev"
    shutil.copytree(herlev_40px, copy)
    cell = sorted((copy / "moderate_dysplastic").glob("*.BMP"))[0]
    mask = cell.with_name(f"{cell.stem}-d.bmp")
    with Image.open(mask) as m:
        m.resize((20, 30), Image.Resampling.NEAREST).save(mask)

    res = run("data", "validate", copy)
    assert res.exit_code == 1, res.output
    assert "every mask has its image's size" in res.output and "mask 20x30 px, image 40x40 px" in res.output
    named = {line.strip() for line in res.output.splitlines() if line.startswith("  /")}
    assert named == {cell.as_posix()}

    res = run("data", "manifest", copy, "--out", tmp_path / "manifest.csv")
    assert res.exit_code == 0, res.output
    row = pd.read_csv(tmp_path / "manifest.csv").set_index("path").loc[cell.as_posix()]
    assert np.isnan(row["nucleus_fraction"]) and np.isnan(row["cytoplasm_fraction"])
    assert (row["mask_width"], row["mask_height"]) == (20, 30)
