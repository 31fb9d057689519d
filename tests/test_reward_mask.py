"""Mask IoU, reward modes, RLE decoding and model-space -> image-space mapping."""
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from data.masks import decode_rle
from reward.mask_iou import mask_iou, mask_reward, to_original


def rle(mask):
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode()}


def test_mask_iou():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[:, :5] = True
    b[:, :4] = True
    assert mask_iou(a, b) == pytest.approx(40 / 50)
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, ~a) == 0.0
    assert mask_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 0.0  # Seg-Zero convention
    assert mask_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool), empty=1.0) == 1.0  # LISA
    with pytest.raises(ValueError):
        mask_iou(a, np.zeros((10, 11), bool))


@pytest.mark.parametrize("iou,continuous,threshold,tiered", [
    (0.0, 0.0, 0.0, 0.0), (0.4999, 0.4999, 0.0, 0.0), (0.5, 0.5, 0.0, 2.0), (0.5001, 0.5001, 1.0, 2.0),
    (0.6999, 0.6999, 1.0, 2.0), (0.7, 0.7, 1.0, 3.0), (0.7999, 0.7999, 1.0, 3.0), (0.8, 0.8, 1.0, 4.0),
    (1.0, 1.0, 1.0, 4.0)])
def test_mask_reward_modes(iou, continuous, threshold, tiered):
    assert mask_reward(iou, "continuous") == continuous
    assert mask_reward(iou, "threshold", 0.5) == threshold  # strictly above the threshold
    assert mask_reward(iou, "tiered") == tiered
    assert mask_reward(iou, "off") == 0.0
    with pytest.raises(ValueError):
        mask_reward(iou, "bogus")


def test_decode_rle_single_and_union():
    a = np.zeros((6, 8), bool)
    b = np.zeros((6, 8), bool)
    a[1:3, 1:3] = True
    b[4:6, 5:8] = True
    np.testing.assert_array_equal(decode_rle(rle(a)), a)
    np.testing.assert_array_equal(decode_rle([rle(a), rle(b)]), a | b)
    bytes_counts = mask_utils.encode(np.asfortranarray(a.astype(np.uint8)))
    np.testing.assert_array_equal(decode_rle(bytes_counts), a)


def test_to_original_scales_and_clamps():
    boxes, points = to_original([[28, 14, 56, 112]], [[[28, 28], [0, 56]]], model_size=112, height=224, width=448)
    np.testing.assert_allclose(boxes, [[112, 28, 224, 223]])  # y2 224 clamped to height-1
    np.testing.assert_allclose(points, [[[112, 56], [0, 112]]])
    boxes, points = to_original([[-10, 5, 500, 50]], [[[-3, 200]]], model_size=100, height=100, width=100)
    np.testing.assert_allclose(boxes, [[0, 5, 99, 50]])
    np.testing.assert_allclose(points, [[[0, 99]]])
    assert boxes.dtype == np.float32 and points.shape == (1, 1, 2)
