import pandas as pd
import pytest

from conftest import HERLEV_COUNTS, write_cell
from pap_severity.data.manifest import COLUMNS, build_manifest, data_source, read_manifest, write_manifest
from pap_severity.data.reader import DataError, find_cells


def test_finds_cells_at_any_depth_with_masks_beside_them(tiny_herlev):
    cells = find_cells(tiny_herlev)
    assert len(cells) == 56
    assert {c.class_name for c in cells} == set(HERLEV_COUNTS)
    assert all(c.mask is not None and c.mask.name == c.image.stem + "-d.bmp" for c in cells)


def test_any_case_and_other_formats_are_images_masks_are_not(tmp_path):
    folder = tmp_path / "carcinoma_in_situ"
    write_cell(folder, "a", seed=1)
    (folder / "a.BMP").rename(folder / "a.bmp")
    write_cell(folder, "b", seed=2, with_mask=False)
    from PIL import Image

    Image.open(folder / "b.BMP").save(folder / "b.JPG")
    (folder / "b.BMP").unlink()
    (folder / "notes.txt").write_text("not a cell")
    cells = find_cells(tmp_path)
    assert [(c.image.name, c.mask.name if c.mask else None) for c in cells] == [("a.bmp", "a-d.bmp"), ("b.JPG", None)]


def test_images_outside_class_folders_keep_their_folder_name(tmp_path):
    write_cell(tmp_path / "sub" / "light_dysplastic" / "extra", "x", seed=1)
    write_cell(tmp_path / "mystery", "y", seed=2)
    assert {c.image.name: c.class_name for c in find_cells(tmp_path)} == {
        "x.BMP": "light_dysplastic",
        "y.BMP": "mystery",
    }


@pytest.mark.parametrize("make", ["missing", "file", "empty"])
def test_a_root_without_cells_is_a_clear_error(tmp_path, make):
    root = tmp_path / "root"
    if make == "file":
        root.write_text("x")
    elif make == "empty":
        (root / "normal_columnar").mkdir(parents=True)
    with pytest.raises(DataError, match="no such folder|not a folder|no cell images found"):
        find_cells(root)


def test_manifest_columns_labels_and_fractions(tiny_herlev):
    df = build_manifest(tiny_herlev, progress=False)
    assert tuple(df.columns) == COLUMNS
    assert len(df) == 56
    assert (df["source"] == "herlev").all()
    row = df[df["class_name"] == "severe_dysplastic"].iloc[0]
    assert (row.severity, bool(row.abnormal), row.width, row.height, row["mode"]) == (3, True, 32, 32, "RGB")
    assert row.nucleus_fraction == pytest.approx(81 / 1024)  # the 81 pixels within radius 5 of the centre
    assert 0 < row.cytoplasm_fraction < 0.5
    assert (df["image_error"] == "").all() and (df["mask_error"] == "").all()
    assert df["sha256"].str.fullmatch("[0-9a-f]{64}").all()


def test_manifest_records_bad_files_instead_of_crashing(tiny_herlev):
    folder = next(tiny_herlev.rglob("light_dysplastic"))
    images = sorted(folder.glob("*.BMP"))
    data = images[0].read_bytes()
    images[0].write_bytes(data[: len(data) // 2])
    images[1].write_bytes(b"")
    images[2].write_text("this is not a bitmap")
    next(iter(sorted(folder.glob("*-d.bmp"))[3:4])).unlink()
    df = build_manifest(tiny_herlev, progress=False).set_index("path")
    assert "truncated" in df.loc[images[0].as_posix(), "image_error"]
    assert "empty file" in df.loc[images[1].as_posix(), "image_error"]
    assert "not an image" in df.loc[images[2].as_posix(), "image_error"]
    assert df.loc[images[3].as_posix(), "mask_path"] == ""
    assert pd.isna(df.loc[images[3].as_posix(), "nucleus_fraction"])


def test_manifest_round_trips_through_csv(tiny_herlev, tmp_path):
    df = build_manifest(tiny_herlev, progress=False)
    df.loc[0, "mask_path"] = ""
    df.loc[0, "nucleus_fraction"] = float("nan")
    back = read_manifest(write_manifest(df, tmp_path / "m.csv"))
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    assert str(back["severity"].dtype) == "Int64"


def test_read_manifest_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="pap-severity data manifest"):
        read_manifest(tmp_path / "nope.csv")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        read_manifest(tmp_path / "bad.csv")


def test_synthetic_marker_sets_the_source(tmp_path):
    from pap_severity.data.synth import SYNTH_MARKER

    write_cell(tmp_path / "set" / "normal_columnar", "a", seed=0)
    assert data_source(tmp_path / "set") == "herlev"
    (tmp_path / "set" / SYNTH_MARKER).write_text("synthetic")
    assert data_source(tmp_path / "set" / "normal_columnar") == "synthetic"


@pytest.mark.herlev
def test_real_herlev_40px_has_917_cells_and_917_masks(herlev_40px):
    df = build_manifest(herlev_40px, progress=False)
    assert len(df) == 917
    assert df["class_name"].value_counts().to_dict() == HERLEV_COUNTS
    assert (df["mask_path"] != "").sum() == 917
    assert (df["image_error"] == "").all() and (df["mask_error"] == "").all()
    assert (df["nucleus_fraction"] > 0).all()
    assert (df["source"] == "herlev").all()


@pytest.mark.herlev
def test_real_herlev_jpg_has_917_cells_without_masks(herlev_jpg):
    cells = find_cells(herlev_jpg)
    assert len(cells) == 917
    counts = pd.Series([c.class_name for c in cells]).value_counts().to_dict()
    assert counts == HERLEV_COUNTS
    assert all(c.mask is None for c in cells)
