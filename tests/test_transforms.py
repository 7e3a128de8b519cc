"""The preprocessing path's pure parts: stain space, stain jitter, EXIF orientation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pap_severity.config import AugmentConfig
from pap_severity.data.reader import upright
from pap_severity.transforms import (
    HED_FROM_RGB,
    HedJitter,
    Preprocess,
    augment_transform,
    hed_to_rgb,
    rgb_to_hed,
)

# scikit-image 0.25's colorconv.hed_from_rgb, printed there: the inverse of Ruifrok's rgb_from_hed.
SKIMAGE_HED_FROM_RGB = [[1.87798274, -1.00767869, -0.55611582],
                        [-0.06590806, 1.13473037, -0.1355218],
                        [-0.60190736, -0.48041419, 1.57358807]]


def test_stain_matrix_is_scikit_images():
    assert np.allclose(HED_FROM_RGB.numpy(), SKIMAGE_HED_FROM_RGB, atol=1e-7)


def test_rgb_to_hed_by_hand_and_back():
    # white has no stain; a pixel of OD d in every channel has concentrations d/ln(1e6) * column sums
    white = torch.ones(3, 1, 1)
    assert rgb_to_hed(white).abs().max().item() == pytest.approx(0.0, abs=1e-7)
    grey = torch.full((3, 1, 1), float(np.exp(-1.0)))  # OD 1 in each channel
    expected = np.asarray(SKIMAGE_HED_FROM_RGB).sum(axis=0) / np.log(1e6)
    assert rgb_to_hed(grey)[:, 0, 0].tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    x = torch.rand(3, 6, 6) * 0.9 + 0.05
    assert torch.allclose(hed_to_rgb(rgb_to_hed(x)), x, atol=1e-5)


def test_hed_jitter_of_zero_strength_is_identity_and_stays_in_range():
    x = torch.rand(3, 8, 8)
    assert torch.allclose(HedJitter(0.0)(x), x, atol=1e-5)
    torch.manual_seed(0)
    y = HedJitter(0.05)(x)
    assert y.shape == x.shape and 0.0 <= y.min().item() and y.max().item() <= 1.0
    assert not torch.allclose(y, x)


def test_augmentation_with_stain_jitter_gives_normalised_tensors():
    pre = Preprocess(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    out = augment_transform(pre, AugmentConfig(hed=0.03))(image)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32


def _jpeg(size: tuple[int, int], orientation: int | None) -> Image.Image:
    image = Image.new("RGB", size, (200, 10, 10))
    buffer = io.BytesIO()
    exif = image.getexif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(buffer, "JPEG", exif=exif)
    buffer.seek(0)
    return Image.open(buffer)


def test_upright_applies_the_exif_orientation_and_says_so():
    turned, was = upright(_jpeg((40, 20), 6))  # 6: rotate 90 degrees clockwise to view
    assert was and turned.size == (20, 40)
    same, was = upright(_jpeg((40, 20), 1))
    assert not was and same.size == (40, 20)
    same, was = upright(_jpeg((40, 20), None))
    assert not was and same.size == (40, 20)


def test_the_transforms_pickle_and_give_the_same_tensors():
    """A data loader that spawns its workers (macOS, Windows) pickles the dataset and its transforms."""
    import pickle

    from pap_severity.transforms import eval_transform

    pre = Preprocess(image_size=24, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 20, 3), dtype=np.uint8))
    transform = eval_transform(pre)
    copy = pickle.loads(pickle.dumps(transform))
    assert torch.equal(copy(image), transform(image)) and copy(image).shape == (3, 24, 24)
    augment = pickle.loads(pickle.dumps(augment_transform(pre, AugmentConfig(hed=0.05))))
    assert augment(image.resize((24, 24))).shape == (3, 24, 24)


def test_a_spawned_data_loader_worker_runs_the_transforms(tiny_herlev):
    from torch.utils.data import DataLoader

    from pap_severity.data.dataset import CellDataset

    paths = [str(p) for p in sorted(tiny_herlev.rglob("*.BMP"))[:4]]
    pre = Preprocess(image_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    for augment in (None, AugmentConfig()):
        dataset = CellDataset(paths, [0, 1, 2, 3], pre, augment=augment)
        loader = DataLoader(dataset, batch_size=2, num_workers=1, multiprocessing_context="spawn")
        batches = list(loader)
        assert [tuple(x.shape) for x, _ in batches] == [(2, 3, 16, 16)] * 2
        assert torch.cat([y for _, y in batches]).tolist() == [0, 1, 2, 3]
        if augment is None:  # the evaluation view is deterministic: the worker computes what we do
            assert torch.equal(batches[0][0][0], dataset[0][0])
