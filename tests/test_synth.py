"""The synthetic Herlev-like set: layout, masks, determinism and a visible severity signal."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pap_severity.data.labels import CLASS_FOLDERS, NUM_SEVERITIES, severity_of
from pap_severity.data.masks import (
    BACKGROUND_RGB,
    BORDER_RGB,
    CYTOPLASM,
    CYTOPLASM_RGB,
    NUCLEUS,
    NUCLEUS_RGB,
    decode_mask,
    read_mask,
)
from pap_severity.data.synth import SYNTH_MARKER, make_synthetic

PER_CLASS = 20
SIZE = 48


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("synth")
    return root, make_synthetic(root, per_class=PER_CLASS, size=SIZE, seed=3, progress=False)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _mask_path(image_path: Path) -> Path:
    return image_path.with_name(f"{image_path.stem}-d.bmp")


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    make_synthetic(tmp_path / "a", per_class=2, size=32, seed=7, progress=False)
    make_synthetic(tmp_path / "b", per_class=2, size=32, seed=7, progress=False)
    make_synthetic(tmp_path / "c", per_class=2, size=32, seed=8, progress=False)
    a, b, c = (_digests(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    images = [name for name in a if name.endswith(".BMP")]
    assert all(a[name] != c[name] for name in images)


def test_layout_sizes_and_modes(synth_set: tuple[Path, list[Path]]) -> None:
    root, paths = synth_set
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(CLASS_FOLDERS)
    assert len(paths) == PER_CLASS * len(CLASS_FOLDERS)
    for folder in CLASS_FOLDERS:
        images = sorted((root / folder).glob("*.BMP"))
        masks = sorted((root / folder).glob("*-d.bmp"))
        assert len(images) == len(masks) == PER_CLASS
    for path in paths:
        assert path.suffix == ".BMP" and path.is_file()
        with Image.open(path) as image, Image.open(_mask_path(path)) as mask:
            assert (image.format, image.mode, image.size) == ("BMP", "RGB", (SIZE, SIZE))
            assert (mask.format, mask.mode, mask.size) == ("BMP", "P", (SIZE, SIZE))


def test_masks_use_only_herlev_colours_and_hold_nucleus_and_cytoplasm(
    synth_set: tuple[Path, list[Path]],
) -> None:
    _, paths = synth_set
    allowed = {NUCLEUS_RGB, CYTOPLASM_RGB, BACKGROUND_RGB, BORDER_RGB}
    for path in paths:
        with Image.open(_mask_path(path)) as mask:
            rgb = np.asarray(mask.convert("RGB"))
        colours = {tuple(c) for c in np.unique(rgb.reshape(-1, 3), axis=0).tolist()}
        assert colours <= allowed, f"{path.name}: unexpected colours {colours - allowed}"
        codes = decode_mask(rgb)
        assert set(np.unique(codes).tolist()) <= {0, 1, 2, 255}
        assert (codes == NUCLEUS).any(), f"{path.name}: no nucleus"
        assert (codes == CYTOPLASM).any(), f"{path.name}: no cytoplasm"


def test_nucleus_grows_and_darkens_with_severity(synth_set: tuple[Path, list[Path]]) -> None:
    _, paths = synth_set
    fractions: dict[int, list[float]] = {s: [] for s in range(NUM_SEVERITIES)}
    darkness: dict[int, list[float]] = {s: [] for s in range(NUM_SEVERITIES)}
    for path in paths:
        severity = severity_of(path.parent.name)
        nucleus = read_mask(_mask_path(path)) == NUCLEUS
        with Image.open(path) as image:
            gray = np.asarray(image.convert("RGB"), dtype=np.float64).mean(axis=-1)
        fractions[severity].append(float(nucleus.mean()))
        darkness[severity].append(float(gray[nucleus].mean()))
    mean_fraction = [np.mean(fractions[s]) for s in range(NUM_SEVERITIES)]
    mean_intensity = [np.mean(darkness[s]) for s in range(NUM_SEVERITIES)]
    assert all(np.diff(mean_fraction) > 0), mean_fraction
    assert all(np.diff(mean_intensity) < 0), mean_intensity


def test_marker_is_written(synth_set: tuple[Path, list[Path]]) -> None:
    root, _ = synth_set
    text = (root / SYNTH_MARKER).read_text()
    assert "SYNTHETIC" in text
    assert f"per_class={PER_CLASS}" in text and f"size={SIZE}" in text and "seed=3" in text


def test_previous_synthetic_set_is_replaced(tmp_path: Path) -> None:
    make_synthetic(tmp_path, per_class=2, size=24, seed=0, progress=False)
    paths = make_synthetic(tmp_path, per_class=1, size=24, seed=0, progress=False)
    assert len(paths) == len(CLASS_FOLDERS)
    assert len(list(tmp_path.rglob("*.BMP"))) == len(CLASS_FOLDERS)


def test_refuses_a_non_synthetic_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("real data lives here")
    with pytest.raises(ValueError, match="not a synthetic set"):
        make_synthetic(tmp_path, per_class=1, size=24, seed=0, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_refuses_to_delete_foreign_entries_beside_a_synthetic_set(tmp_path: Path) -> None:
    make_synthetic(tmp_path, per_class=1, size=24, seed=0, progress=False)
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="mine.txt"):
        make_synthetic(tmp_path, per_class=1, size=24, seed=0, progress=False)
    assert (tmp_path / "mine.txt").is_file()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"per_class": 0}, "per_class must be >= 1"),
        ({"size": 16}, "size must be >= 24"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"per_class": 2.5}, "per_class must be an integer"),
    ],
)
def test_bad_arguments_raise_clear_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    arguments = {"per_class": 1, "size": 24, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_synthetic(tmp_path / "out", progress=False, **arguments)
    assert not (tmp_path / "out").exists()
