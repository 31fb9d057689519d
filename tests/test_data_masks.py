import numpy as np
import pytest

from data.masks import (
    bbox_from_mask,
    check_rle,
    coco_segmentation_mask,
    decode_rle,
    encode_rle,
    points_from_mask,
    polygon_mask,
    rle_counts,
)


def rectangle():
    # rows 2..5, columns 3..10 of a 10x14 image
    m = np.zeros((10, 14), bool)
    m[2:6, 3:11] = True
    return m


def l_shape():
    # vertical bar x 1..3, y 1..6 plus horizontal bar x 1..9, y 7..9, in a 12x12 image
    m = np.zeros((12, 12), bool)
    m[1:7, 1:4] = True
    m[7:10, 1:10] = True
    return m


def test_rle_round_trip_random_masks():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 5), (64, 48)]:
        m = rng.random(shape) < 0.3
        rle = encode_rle(m)
        assert rle["size"] == list(shape) and isinstance(rle["counts"], str)
        assert np.array_equal(decode_rle(rle), m)
        assert sum(rle_counts(rle["counts"])) == m.size


def test_decode_list_is_union():
    a, b = np.zeros((6, 6), bool), np.zeros((6, 6), bool)
    a[0:2, 0:2] = True
    b[3:6, 4:6] = True
    assert np.array_equal(decode_rle([encode_rle(a), encode_rle(b)]), a | b)


def test_uncompressed_rle_decodes():
    # column-major runs: 2 zeros, 3 ones, 1 zero in a 3x2 mask
    m = decode_rle({"size": [3, 2], "counts": [2, 3, 1]})
    assert m.T.ravel().tolist() == [False, False, True, True, True, False]


@pytest.mark.parametrize("bad", [
    {"size": [4, 4], "counts": "0<"},          # runs for a 3x4 mask
    {"size": [4, 4], "counts": "\x7f\x7f"},    # characters outside the alphabet
    {"size": [4, 4]},                           # no counts
    {"size": [4, 4], "counts": [20]},           # too many pixels
    "not a dict",
])
def test_malformed_rle_raises_value_error(bad):
    with pytest.raises(ValueError):
        decode_rle(bad)


def test_check_rle_accepts_valid():
    assert check_rle(encode_rle(np.ones((3, 4), bool))) == (3, 4)


def test_bbox_and_points_rectangle():
    m = rectangle()
    assert bbox_from_mask(m) == [3, 2, 10, 5]
    # distance transform = min(row distance, column distance) to the background; its maximum 2 is
    # first reached (row-major) at (x=4, y=3). Median distance to it over the 32 pixels is
    # (2.828 + 3) / 2; the first farther pixel with distance-transform 2 is (x=7, y=3), at distance 3.
    assert points_from_mask(m) == [[4, 3], [7, 3]]


def test_bbox_and_points_l_shape():
    m = l_shape()
    assert bbox_from_mask(m) == [1, 1, 9, 9]
    # maximum distance transform 2 is first reached at (2, 2); the median distance to it over the 45
    # pixels is 5.831 (pixel (6, 7)); the first farther pixel with distance transform 2 is (2, 8).
    assert points_from_mask(m) == [[2, 2], [2, 8]]


def test_points_single_pixel_and_empty():
    m = np.zeros((5, 5), bool)
    m[1, 3] = True
    assert points_from_mask(m) == [[3, 1], [3, 1]]
    with pytest.raises(ValueError):
        points_from_mask(np.zeros((5, 5), bool))
    with pytest.raises(ValueError):
        bbox_from_mask(np.zeros((5, 5), bool))


def test_polygon_conventions():
    square = [[2, 3], [10, 3], [10, 8], [2, 8]]
    lisa = polygon_mask(square, 12, 14)            # outline included
    assert bbox_from_mask(lisa) == [2, 3, 10, 8] and lisa.sum() == 9 * 6
    coco = coco_segmentation_mask([sum(square, [])], 12, 14)   # pixel centres inside
    assert bbox_from_mask(coco) == [2, 3, 9, 7] and coco.sum() == 8 * 5
    assert np.array_equal(decode_rle(encode_rle(coco)), coco)
