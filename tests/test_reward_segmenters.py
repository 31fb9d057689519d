"""Segmenters: GrabCut recovers a synthetic shape; SAM2 (random weights) decodes K prompts in one call
and serves a second set_image of the same id from its embedding cache."""
import numpy as np
import pytest

from config import RewardConfig
from reward.mask_iou import mask_iou
from reward.segmenters import GrabCutSegmenter, Sam2Segmenter, make_segmenter

SAM2_TINY = "configs/sam2.1/sam2.1_hiera_t.yaml"


def scene(h=120, w=160, seed=0):
    """A red square on a plain, slightly noisy background, plus a green distractor; the square's mask."""
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(225, 4, (h, w, 3)), 0, 255).astype(np.uint8)
    gt = np.zeros((h, w), bool)
    gt[30:70, 50:90] = True
    image[gt] = (200, 30, 40)
    image[90:110, 10:30] = (40, 160, 60)
    return image, gt


def test_grabcut_recovers_a_coloured_square():
    image, gt = scene()
    seg = GrabCutSegmenter(cache_size=2)
    seg.set_image("img", image)
    boxes = np.array([[45, 26, 95, 74], [5, 85, 35, 115]], dtype=np.float32)  # loose box, distractor box
    points = np.array([[[60, 40], [80, 60]], [[20, 100], [20, 100]]], dtype=np.float32)
    masks = seg.predict(boxes, points)
    assert masks.shape == (2, 120, 160) and masks.dtype == bool
    assert mask_iou(masks[0], gt) > 0.8
    assert mask_iou(masks[1], gt) == 0.0


def test_grabcut_degenerate_prompts_fall_back_to_the_box():
    image, _ = scene()
    seg = GrabCutSegmenter(cache_size=0)
    seg.set_image("img", image)
    masks = seg.predict(np.array([[0, 0, 159, 119], [70, 50, 70, 50], [200, -5, 100, 10]], float),
                        np.zeros((3, 2, 2)))
    assert masks[0].all()  # no background left to model: the box (whole image)
    assert masks.shape == (3, 120, 160)


def test_lru_cache_bounded_and_ordered():
    image, _ = scene()
    seg = GrabCutSegmenter(cache_size=2)
    assert ([seg.set_image(k, image) for k in ["a", "b", "a", "c", "b", "a"]]
            == [False, False, True, False, False, False])
    assert list(seg._cache) == ["b", "a"] and (seg.hits, seg.misses) == (1, 5)
    with pytest.raises(ValueError):
        seg.set_image("gray", image[..., 0])


def test_make_segmenter_and_sam2_guards(tmp_path):
    assert isinstance(make_segmenter(RewardConfig(), "cpu"), GrabCutSegmenter)
    with pytest.raises(ValueError):
        Sam2Segmenter(SAM2_TINY, checkpoint=None, allow_random_weights=False)
    with pytest.raises(FileNotFoundError):
        Sam2Segmenter(SAM2_TINY, checkpoint=str(tmp_path / "missing.pt"))


@pytest.mark.slow
def test_sam2_random_weights_one_batched_decode_and_cache_hit():
    seg = make_segmenter(RewardConfig(segmenter="sam2", sam2_allow_random_weights=True, embedding_cache_size=4), "cpu")
    assert isinstance(seg, Sam2Segmenter)
    calls = {"encoder": 0, "decoder": 0}
    model = seg.predictor.model
    model.image_encoder.register_forward_hook(lambda *_: calls.__setitem__("encoder", calls["encoder"] + 1))
    model.sam_mask_decoder.register_forward_hook(lambda *_: calls.__setitem__("decoder", calls["decoder"] + 1))

    image, _ = scene()
    assert seg.set_image("img", image) is False
    k = 5
    boxes = np.tile(np.array([[45, 26, 95, 74]], np.float32), (k, 1)) + np.arange(k)[:, None]
    points = np.tile(np.array([[[60, 40], [80, 60]]], np.float32), (k, 1, 1))
    masks = seg.predict(boxes, points)
    assert masks.shape == (k, 120, 160) and masks.dtype == bool
    assert calls == {"encoder": 1, "decoder": 1}

    one = seg.predict(boxes[:1], points[:1])  # K = 1 keeps its leading axis
    assert one.shape == (1, 120, 160)
    np.testing.assert_array_equal(one[0], masks[0])  # same prompt, same embedding, same mask

    # Seg-Zero's evaluation: three candidates per prompt, the one with the highest predicted IoU
    best = seg.predict(boxes[:2], points[:2], best_of_three=True)
    import torch
    with torch.inference_mode():
        three, scores, _ = seg.predictor.predict(point_coords=points[:2], point_labels=np.ones((2, 2), np.int32),
                                                 box=boxes[:2], multimask_output=True)
    assert three.shape[:2] == (2, 3) and best.shape == (2, 120, 160)
    for k in range(2):
        np.testing.assert_array_equal(best[k], three[k, scores[k].argmax()] > 0)

    other, _ = scene(64, 96, seed=1)
    assert seg.set_image("other", other) is False
    assert seg.set_image("img", image) is True  # restored from the cache: no encoder call
    assert calls["encoder"] == 2
    np.testing.assert_array_equal(seg.predict(boxes, points), masks)


@pytest.mark.parametrize("name, blocks", [("t", 1 + 2 + 7 + 2), ("s", 1 + 2 + 11 + 2)])
def test_sam2_config_picks_the_model_size(name, blocks):
    """reward.sam2_config builds the named SAM2 (Hiera-T and -S share their width, not their depth)."""
    cfg = RewardConfig(segmenter="sam2", sam2_allow_random_weights=True,
                       sam2_config=f"configs/sam2.1/sam2.1_hiera_{name}.yaml")
    seg = make_segmenter(cfg, "cpu")
    assert len(seg.predictor.model.image_encoder.trunk.blocks) == blocks
