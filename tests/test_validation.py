"""The Great Expectations suite: each bad input fails and names exactly its files."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pap_severity.config import DataConfig
from pap_severity.data.labels import CLASS_FOLDERS, severity_of
from pap_severity.validation import Failure, ValidationReport, validate_manifest

from conftest import write_cell
from pap_severity.data.masks import BACKGROUND, CYTOPLASM, encode_mask

CFG = DataConfig(min_size=16, max_size=256, require_masks=True)
EMPTY_SHA = hashlib.sha256(b"").hexdigest()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def cell(class_name: str, stem: str, **overrides) -> dict:
    """One clean manifest row as build_manifest writes it."""
    path = f"root/{class_name}/{stem}.BMP"
    known = class_name in CLASS_FOLDERS
    row = {
        "path": path,
        "mask_path": f"root/{class_name}/{stem}-d.bmp",
        "class_name": class_name,
        "severity": severity_of(class_name) if known else pd.NA,
        "abnormal": severity_of(class_name) > 0 if known else pd.NA,
        "width": 64,
        "height": 48,
        "mode": "RGB",
        "sha256": _sha(path),
        "nucleus_fraction": 0.1,
        "cytoplasm_fraction": 0.5,
        "source": "synthetic",
        "image_error": "",
        "mask_error": "",
    }
    row.update(overrides)
    # The mask has its image's size unless a test says otherwise.
    row.setdefault("mask_width", row["width"])
    row.setdefault("mask_height", row["height"])
    return row


def frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    return df.astype({"severity": "Int64", "abnormal": "boolean", "width": "Int64", "height": "Int64",
                      "mask_width": "Int64", "mask_height": "Int64"})


def clean_rows(per_class: int = 2) -> list[dict]:
    return [cell(c, f"{i:02d}{k}") for i, c in enumerate(CLASS_FOLDERS) for k in range(per_class)]


def by_name(report: ValidationReport) -> dict[str, Failure]:
    names = [f.expectation for f in report.failures]
    assert len(names) == len(set(names)), names
    return {f.expectation: f for f in report.failures}


def test_clean_manifest_passes():
    report = validate_manifest(frame(clean_rows()), CFG)
    assert report.success, report.failures
    assert report.failures == []
    assert report.class_counts == {c: 2 for c in CLASS_FOLDERS}
    assert report.result_path is None and report.data_docs is None


# One manifest holding every fault, each in its own file: every check must name exactly
# its own files, so a row failing one check cannot hide another file's failure.
NC, LD, CIS = "normal_columnar", "light_dysplastic", "carcinoma_in_situ"
UNDECODED = {"width": pd.NA, "height": pd.NA, "mode": ""}
NO_FRACTIONS = {"nucleus_fraction": np.nan, "cytoplasm_fraction": np.nan}
FAULTS = {
    "every image decodes": (
        [
            cell(NC, "truncated", **UNDECODED, image_error="truncated image (image file is truncated)"),
            cell(NC, "empty", **UNDECODED, sha256=EMPTY_SHA, image_error="empty file (0 bytes)"),
            cell(LD, "text", **UNDECODED, image_error="not an image Pillow can read"),
        ],
        ["root/normal_columnar/truncated.BMP", "root/normal_columnar/empty.BMP", "root/light_dysplastic/text.BMP"],
    ),
    "known class set": ([cell("misc", "stray")], ["root/misc/stray.BMP"]),
    "every cell has a mask": (
        [cell(LD, "nomask", mask_path="", **NO_FRACTIONS)], ["root/light_dysplastic/nomask.BMP"]),
    "every mask decodes": (
        [cell(LD, "badmask", **NO_FRACTIONS, mask_error="not an image Pillow can read")],
        ["root/light_dysplastic/badmask.BMP"]),
    "every mask holds a nucleus": (
        [cell(CIS, "nonucleus", nucleus_fraction=0.0)], ["root/carcinoma_in_situ/nonucleus.BMP"]),
    # Issue 13.1: a mask that is not the size of its image; the manifest left its fractions empty.
    "every mask has its image's size": (
        [cell(CIS, "smallmask", mask_width=20, mask_height=30, **NO_FRACTIONS)],
        ["root/carcinoma_in_situ/smallmask.BMP"]),
    "no image shared by two classes": (
        [cell(NC, "copy", sha256=_sha("dup")), cell(CIS, "copy", sha256=_sha("dup"))],
        ["root/normal_columnar/copy.BMP", "root/carcinoma_in_situ/copy.BMP"],
    ),
    "image width within [16, 256] px": ([cell(CIS, "wide", width=5000)], ["root/carcinoma_in_situ/wide.BMP"]),
    "image height within [16, 256] px": ([cell(CIS, "flat", height=8)], ["root/carcinoma_in_situ/flat.BMP"]),
}


@pytest.fixture(scope="module")
def faulty_report() -> ValidationReport:
    rows = clean_rows() + [cell(NC, "samecopy", sha256=_sha("same")), cell(NC, "samecopy2", sha256=_sha("same"))]
    for bad, _ in FAULTS.values():
        rows += bad
    return validate_manifest(frame(rows), CFG)


@pytest.mark.parametrize("name", list(FAULTS))
def test_each_fault_names_exactly_its_files(faulty_report, name):
    failures = by_name(faulty_report)
    assert name in failures, list(failures)
    assert sorted(failures[name].files) == sorted(FAULTS[name][1])
    assert failures[name].detail


def test_faulty_manifest_fails_nothing_else(faulty_report):
    assert not faulty_report.success
    assert set(by_name(faulty_report)) == set(FAULTS)
    assert faulty_report.class_counts["misc"] == 1
    # A copy within one class is fine; the undecodable image is not also a size failure.
    flagged = {f for failure in faulty_report.failures for f in failure.files}
    assert "root/normal_columnar/samecopy.BMP" not in flagged


def test_detail_says_what_is_wrong(faulty_report):
    failures = by_name(faulty_report)
    assert "truncated image" in failures["every image decodes"].detail
    assert "misc" in failures["known class set"].detail
    assert "5000x48" in failures["image width within [16, 256] px"].detail
    assert "mask 20x30 px, image 64x48 px" in failures["every mask has its image's size"].detail


def test_one_file_failing_two_checks_is_named_by_both():
    rows = clean_rows() + [cell("misc", "both", width=4), cell(LD, "other", nucleus_fraction=0.0)]
    failures = by_name(validate_manifest(frame(rows), CFG))
    assert failures["known class set"].files == ["root/misc/both.BMP"]
    assert failures["image width within [16, 256] px"].files == ["root/misc/both.BMP"]
    assert failures["every mask holds a nucleus"].files == ["root/light_dysplastic/other.BMP"]


def test_missing_class_fails():
    rows = [r for r in clean_rows() if r["class_name"] != "severe_dysplastic"]
    report = validate_manifest(frame(rows), CFG)
    failures = by_name(report)
    assert list(failures) == ["every class present"]
    assert failures["every class present"].files == []
    assert "severe_dysplastic" in failures["every class present"].detail
    assert report.class_counts["severe_dysplastic"] == 0


def test_masks_not_required():
    rows = clean_rows() + [cell(LD, "nomask", mask_path="", nucleus_fraction=np.nan)]
    report = validate_manifest(frame(rows), DataConfig(require_masks=False))
    assert report.success, report.failures


def splits_for(manifest: pd.DataFrame) -> pd.DataFrame:
    s = manifest[["path", "sha256", "severity"]].copy()
    s["part"] = ["test" if i % 4 == 0 else "cv" for i in range(len(s))]
    s["fold"] = [-1 if p == "test" else i % 3 for i, p in enumerate(s["part"])]
    return s


def test_disjoint_splits_pass():
    manifest = frame(clean_rows())
    assert validate_manifest(manifest, CFG, splits_for(manifest)).success


def test_overlapping_split_parts_fail():
    rows = clean_rows() + [
        cell(NC, "leak_a", sha256=_sha("leak")), cell(NC, "leak_b", sha256=_sha("leak")),
        cell(LD, "fold_a", sha256=_sha("fold")), cell(LD, "fold_b", sha256=_sha("fold")),
    ]
    manifest = frame(rows)
    splits = splits_for(manifest)
    by_path = splits.set_index("path")
    by_path.loc["root/normal_columnar/leak_a.BMP", ["part", "fold"]] = ["test", -1]
    by_path.loc["root/normal_columnar/leak_b.BMP", ["part", "fold"]] = ["cv", 0]
    by_path.loc["root/light_dysplastic/fold_a.BMP", ["part", "fold"]] = ["cv", 1]
    by_path.loc["root/light_dysplastic/fold_b.BMP", ["part", "fold"]] = ["cv", 2]
    failures = by_name(validate_manifest(manifest, CFG, by_path.reset_index()))
    assert set(failures) == {"test, calibration and cv parts disjoint", "cv folds disjoint"}
    assert failures["test, calibration and cv parts disjoint"].files == [
        "root/normal_columnar/leak_a.BMP", "root/normal_columnar/leak_b.BMP"]
    assert failures["cv folds disjoint"].files == [
        "root/light_dysplastic/fold_a.BMP", "root/light_dysplastic/fold_b.BMP"]


def test_bad_splits_frame_is_a_clear_error():
    manifest = frame(clean_rows())
    with pytest.raises(ValueError, match="splits lacks column"):
        validate_manifest(manifest, CFG, splits_for(manifest).drop(columns="fold"))
    bad = splits_for(manifest).assign(part="train")
    with pytest.raises(ValueError, match="unknown part"):
        validate_manifest(manifest, CFG, bad)


def test_empty_manifest_is_a_clear_failure():
    for empty in (frame(clean_rows()).iloc[:0], pd.DataFrame()):
        report = validate_manifest(empty, CFG)
        assert not report.success
        failures = by_name(report)
        assert "the manifest holds cells" in failures
        assert "no cell images were found" in failures["the manifest holds cells"].detail
        assert report.to_dict()["n_cells"] == 0


def test_manifest_without_columns_is_a_clear_error():
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['mask_path'"):
        validate_manifest(frame(clean_rows()).drop(columns=["mask_path"]), CFG)


def test_writes_json_and_data_docs(tmp_path):
    rows = clean_rows() + [cell("misc", "stray")]
    report = validate_manifest(frame(rows), CFG, out_dir=tmp_path / "validation")
    assert report.result_path == tmp_path / "validation" / "validation.json"
    data = json.loads(report.result_path.read_text())
    assert data == report.to_dict()
    assert data["success"] is False
    assert data["n_cells"] == len(rows)
    assert data["n_failures"] == 1
    assert data["n_failed_files"] == 1
    assert data["source"] == "synthetic"
    assert data["class_counts"]["misc"] == 1
    assert data["failures"][0]["files"] == ["root/misc/stray.BMP"]
    assert report.data_docs == (tmp_path / "validation" / "data_docs" / "index.html").resolve()
    assert report.data_docs.is_file()
    html = list((tmp_path / "validation" / "data_docs").rglob("*.html"))
    assert any("validations" in p.parts for p in html)


def test_is_quiet(capfd):
    validate_manifest(frame(clean_rows()), CFG)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_end_to_end_on_disk(tiny_herlev):
    from pap_severity.data.manifest import build_manifest

    root = tiny_herlev / "New database pictures"
    nc, ld = root / "normal_columnar", root / "light_dysplastic"
    good = next(iter(sorted(nc.glob("*.BMP"))))
    truncated = nc / "truncated.BMP"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    shutil.copy(good.with_name(good.stem + "-d.bmp"), nc / "truncated-d.bmp")
    (ld / "empty.BMP").write_bytes(b"")
    (ld / "text.BMP").write_text("not an image")
    stray = write_cell(root / "unsorted", "stray", seed=1007)
    nomask = write_cell(ld, "nomask", seed=1008, with_mask=False)
    nonucleus = write_cell(ld, "nonucleus", seed=1009)
    codes = np.full((32, 32), BACKGROUND, np.uint8)
    codes[8:24, 8:24] = CYTOPLASM
    encode_mask(codes).save(ld / "nonucleus-d.bmp")
    copy = root / "carcinoma_in_situ" / good.name
    shutil.copy(good, copy)
    shutil.copy(good.with_name(good.stem + "-d.bmp"), copy.with_name(good.stem + "-d.bmp"))

    manifest = build_manifest(tiny_herlev, progress=False)
    report = validate_manifest(manifest, DataConfig(min_size=16, max_size=256), out_dir=tiny_herlev / "report")
    failures = by_name(report)
    p = Path.as_posix
    assert sorted(failures["every image decodes"].files) == sorted(
        [p(truncated), p(ld / "empty.BMP"), p(ld / "text.BMP")])
    assert failures["known class set"].files == [p(stray)]
    # The empty and the text file have no mask either.
    assert sorted(failures["every cell has a mask"].files) == sorted(
        [p(nomask), p(ld / "empty.BMP"), p(ld / "text.BMP")])
    assert failures["every mask holds a nucleus"].files == [p(nonucleus)]
    assert sorted(failures["no image shared by two classes"].files) == sorted([p(good), p(copy)])
    assert set(failures) == {"every image decodes", "known class set", "every cell has a mask",
                             "every mask holds a nucleus", "no image shared by two classes"}
    assert report.class_counts["unsorted"] == 1
    assert report.result_path.is_file() and report.data_docs.is_file()


@pytest.mark.herlev
def test_real_herlev_passes(herlev_40px, tmp_path):
    from pap_severity.data.manifest import build_manifest
    from pap_severity.data.splits import make_splits
    from pap_severity.config import SplitConfig

    from conftest import HERLEV_COUNTS

    manifest = build_manifest(herlev_40px, progress=False)
    report = validate_manifest(manifest, DataConfig(), make_splits(manifest, SplitConfig()), out_dir=tmp_path)
    assert report.success, report.failures
    assert report.class_counts == HERLEV_COUNTS
    assert report.to_dict()["n_cells"] == sum(HERLEV_COUNTS.values())


def test_repeated_splits_pass_and_a_leak_within_one_repeat_fails():
    """Issue 12: folds are judged within each repeat, parts across all of them."""
    from pap_severity.config import SplitConfig
    from pap_severity.data.splits import make_splits

    manifest = frame(clean_rows(per_class=6))
    splits = make_splits(manifest, SplitConfig(folds=2, test_fraction=0.2, repeats=3, seed=0))
    assert validate_manifest(manifest, CFG, splits).success

    cv0 = splits[(splits["repeat"] == 1) & (splits["part"] == "cv")]
    a, b = cv0[cv0["fold"] == 0].index[0], cv0[cv0["fold"] == 1].index[0]
    leaky = splits.copy()
    leaky.loc[b, "sha256"] = leaky.loc[a, "sha256"]  # one image in two folds of repeat 1
    failures = by_name(validate_manifest(manifest, CFG, leaky))
    assert list(failures) == ["cv folds disjoint"]
    assert leaky.loc[a, "path"] in failures["cv folds disjoint"].files

    test_path = splits.loc[splits["part"] == "test", "path"].iloc[0]
    moved = splits.copy()
    in_repeat_2 = (moved["path"] == test_path) & (moved["repeat"] == 2)
    moved.loc[in_repeat_2, ["part", "fold"]] = ["cv", 0]  # test in repeats 0 and 1, cv in repeat 2
    failures = by_name(validate_manifest(manifest, CFG, moved))
    assert list(failures) == ["test, calibration and cv parts disjoint"]
    assert failures["test, calibration and cv parts disjoint"].files == [test_path]
