import numpy as np
import pytest
from PIL import Image

from pap_severity.data import labels
from pap_severity.data.masks import (
    BACKGROUND,
    CYTOPLASM,
    NUCLEUS,
    UNKNOWN,
    decode_mask,
    encode_mask,
    read_mask,
    region_fractions,
)


def test_severity_merges_the_three_normal_folders():
    assert [labels.severity_of(c) for c in labels.CLASS_FOLDERS] == [0, 0, 0, 1, 2, 3, 4]
    assert [labels.score_of(s) for s in range(5)] == [1, 2, 3, 4, 5]
    assert [labels.is_abnormal(s) for s in range(5)] == [False, True, True, True, True]


def test_unknown_folder_and_bad_severity_say_what_is_wrong():
    with pytest.raises(ValueError, match="unknown Herlev class folder 'normal'"):
        labels.severity_of("normal")
    with pytest.raises(ValueError, match="severity must be 0..4"):
        labels.score_of(5)


def test_decode_maps_each_palette_colour_and_the_rest_to_unknown():
    rgb = np.array(
        [[[0, 0, 255], [0, 0, 128], [255, 0, 0], [128, 128, 128], [0, 0, 0], [0, 255, 0]]], dtype=np.uint8
    )
    assert decode_mask(rgb).tolist() == [[NUCLEUS, CYTOPLASM, BACKGROUND, UNKNOWN, UNKNOWN, UNKNOWN]]


def test_decode_takes_the_nearest_colour_under_small_noise():
    rgb = np.array([[[3, 2, 250], [5, 0, 133], [250, 4, 3]]], dtype=np.uint8)
    assert decode_mask(rgb).tolist() == [[NUCLEUS, CYTOPLASM, BACKGROUND]]


def test_decode_rejects_a_non_rgb_array():
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        decode_mask(np.zeros((4, 4)))


def test_palette_mask_round_trips_through_a_bmp(tmp_path):
    codes = np.array([[NUCLEUS, CYTOPLASM], [BACKGROUND, UNKNOWN]], dtype=np.uint8)
    encode_mask(codes).save(tmp_path / "x-d.bmp")
    assert Image.open(tmp_path / "x-d.bmp").mode == "P"
    assert read_mask(tmp_path / "x-d.bmp").tolist() == codes.tolist()


def test_region_fractions_count_over_all_pixels():
    codes = np.array([[NUCLEUS, CYTOPLASM, CYTOPLASM, UNKNOWN]], dtype=np.uint8)
    assert region_fractions(codes) == (0.25, 0.5)
