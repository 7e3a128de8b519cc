import numpy as np
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


def _row(df: pd.DataFrame, path) -> pd.Series:
    return df.set_index("path").loc[path.as_posix()]


def test_a_mask_of_another_size_than_its_image_gets_no_fractions(tiny_herlev):
    """Issue 13.1: the fractions of a 20x30 mask beside a 32x32 cell describe some other cell."""
    from pap_severity.data.masks import CYTOPLASM, NUCLEUS, encode_mask

    folder = next(tiny_herlev.rglob("light_dysplastic"))
    victim = sorted(folder.glob("*.BMP"))[0]
    codes = np.full((30, 20), CYTOPLASM, np.uint8)
    codes[10:20, 5:15] = NUCLEUS
    encode_mask(codes).save(folder / f"{victim.stem}-d.bmp")
    df = build_manifest(tiny_herlev, progress=False)
    row = _row(df, victim)
    assert pd.isna(row.nucleus_fraction) and pd.isna(row.cytoplasm_fraction)
    assert (row.width, row.height, row.mask_width, row.mask_height) == (32, 32, 20, 30)
    assert row.mask_error == ""
    others = df[df["path"] != victim.as_posix()]
    assert others["nucleus_fraction"].notna().all()
    assert ((others["mask_width"] == others["width"]) & (others["mask_height"] == others["height"])).all()


def _break_links(folder):
    """A symlink loop, a dangling link, a named pipe, a 0-byte file and a dangling mask link in folder."""
    import os

    (folder / "loop-a.BMP").symlink_to("loop-b.BMP")
    (folder / "loop-b.BMP").symlink_to("loop-a.BMP")
    (folder / "dangling.BMP").symlink_to("gone.BMP")
    os.mkfifo(folder / "pipe.BMP")
    (folder / "empty.BMP").write_bytes(b"")
    masked = write_cell(folder, "maskgone", seed=77)
    (folder / "maskgone-d.bmp").unlink()
    (folder / "maskgone-d.bmp").symlink_to("nowhere-d.bmp")
    return masked


def test_links_that_lead_nowhere_and_pipes_are_named_and_every_good_cell_kept(tiny_herlev):
    """Issue 13.5: a symlink loop, a dangling link or a pipe is an error on its own row, not a crash."""
    folder = next(tiny_herlev.rglob("normal_columnar"))
    masked = _break_links(folder)
    df = build_manifest(tiny_herlev, progress=False)
    errors = df.set_index("path")["image_error"]
    assert "symbolic link loop" in errors[(folder / "loop-a.BMP").as_posix()]
    assert "symbolic link loop" in errors[(folder / "loop-b.BMP").as_posix()]
    assert "dangling symbolic link" in errors[(folder / "dangling.BMP").as_posix()]
    assert "gone.BMP" in errors[(folder / "dangling.BMP").as_posix()]
    assert "not a regular file" in errors[(folder / "pipe.BMP").as_posix()]
    assert "empty file" in errors[(folder / "empty.BMP").as_posix()]
    row = _row(df, masked)
    assert row.image_error == "" and "dangling symbolic link" in row.mask_error
    good = df[(df["image_error"] == "") & (df["mask_error"] == "")]
    assert len(good) == 56 and good["sha256"].str.fullmatch("[0-9a-f]{64}").all()
    assert len(df) == 56 + 6


def _sideways_jpeg(path, mask_path=None):
    """A 40x20 JPEG whose EXIF orientation 6 says: turn 90 degrees clockwise to view (20 wide, 40 high)."""
    from PIL import Image

    from pap_severity.data.masks import CYTOPLASM, NUCLEUS, encode_mask

    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (200, 30, 30)  # left half red as stored: the top half once upright
    stored[:, 20:] = (30, 30, 200)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, format="JPEG", quality=95, exif=exif)
    if mask_path is not None:
        codes = np.full((40, 20), CYTOPLASM, np.uint8)  # drawn on the upright cell: 20 wide, 40 high
        codes[:10] = NUCLEUS
        encode_mask(codes).save(mask_path)
    return path


def test_exif_orientation_is_applied_wherever_cells_are_read(tmp_path):
    """Issue 13.2: the manifest, the mask check and the training Dataset see the cell as a viewer does."""
    import torch
    from PIL import Image, ImageOps

    from pap_severity.data.dataset import CellDataset
    from pap_severity.transforms import Preprocess, eval_transform

    folder = tmp_path / "carcinoma_in_situ"
    folder.mkdir()
    jpeg = _sideways_jpeg(folder / "turned.jpg", folder / "turned-d.bmp")
    with Image.open(jpeg) as raw:
        assert raw.size == (40, 20)
        viewed = ImageOps.exif_transpose(raw)

    row = build_manifest(tmp_path, progress=False).iloc[0]
    assert (row.width, row.height) == (20, 40)
    assert (row.mask_width, row.mask_height) == (20, 40) and row.nucleus_fraction == pytest.approx(0.25)

    pre = Preprocess(image_size=24, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x, _ = CellDataset([jpeg.as_posix()], [4], pre)[0]
    torch.testing.assert_close(x, eval_transform(pre)(viewed))

    from pap_severity.data.reader import open_image  # what explain and the Dataset read through

    image = open_image(jpeg)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(viewed))
    top, bottom = np.asarray(image)[5, 10], np.asarray(image)[35, 10]
    assert top[0] > 150 > bottom[0] and bottom[2] > 150  # red on top: turned clockwise, as the tag says


def test_dataset_errors_name_the_file(tmp_path):
    from pap_severity.data.dataset import CellDataset
    from pap_severity.transforms import Preprocess

    (tmp_path / "loop.BMP").symlink_to("loop.BMP")
    pre = Preprocess(image_size=24, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    with pytest.raises(ValueError, match=r"loop\.BMP: symbolic link loop"):
        CellDataset([(tmp_path / "loop.BMP").as_posix()], [0], pre)
