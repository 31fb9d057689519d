"""evaluate.py --protocol segzero: the papers' evaluation scripts (Seg-Zero's evaluation.py +
calculate_iou.py, VisionReasoner's evaluation_visionreasoner.py), checked on hand-made answers with a
recording segmenter, so every count is known."""
import numpy as np
import pytest
from PIL import Image

from data.dataset import Sample
from evaluation.protocols import ScriptMetrics, script_prompts


class Recorder:
    """Segmenter stand-in: records the prompts; predicts each prompt's box as its mask."""

    def __init__(self):
        self.calls = []

    def set_image(self, image_id, image):
        self.shape = image.shape[:2]
        self.image_ids = getattr(self, "image_ids", []) + [image_id]

    def predict(self, boxes, points, best_of_three=False):
        self.calls.append((np.asarray(boxes).tolist(), np.asarray(points).tolist(), best_of_three))
        masks = np.zeros((len(boxes), *self.shape), bool)
        for k, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, int)):
            masks[k, y1:y2 + 1, x1:x2 + 1] = True
        return masks


def sample(width=200, height=100):
    return Sample(id="s", image=Image.new("RGB", (width, height)), problem="the thing", mask_rle=None,
                  bbox=[0, 0, 1, 1], points=[[0, 0], [1, 1]], height=height, width=width, source="test")


SEG = ('<think>it is there</think><answer>{"bbox": [10, 20, 30, 41], "points_1": ["12", 22], '
       '"points_2": [25, 35]}</answer>')


def test_segzero_script_parsing_and_mapping():
    # model space 100 -> a 200 x 100 image: x * 2, y * 1, round(int(v) * factor)
    boxes, points = script_prompts(SEG, "segzero", 200, 100, 100)
    assert boxes.tolist() == [[20, 20, 60, 41]] and points.tolist() == [[[24, 22], [50, 35]]]
    soft_keys = SEG.replace('"bbox"', '"BBox_2d"').replace("points_1", "Points_a")
    assert script_prompts(soft_keys, "segzero", 200, 100, 100)[0].tolist() == [[20, 20, 60, 41]]
    for broken in (SEG.replace("<think>it is there</think>", ""),       # the script reads the think text
                   SEG.replace("it is there", "a < b"),                   # [^<]+ finds no think text
                   SEG.replace('"points_2"', '"point_2"'),               # two keys containing "points"
                   SEG.replace("[10, 20, 30, 41]", "[10, 20, 30]"),
                   SEG.replace('"12"', '"12.5"')):                        # int("12.5") raises
        with pytest.raises(Exception):
            script_prompts(broken, "segzero", 200, 100, 100)


def test_visionreasoner_script_parsing_and_mapping():
    answer = ('<answer> [{"bbox_2d": [10, 20, 30, 41], "point_2d": [12, 22]}, '
              '{"bbox_2d": [1, 1, 2, 2], "point_2d": [1, 1]}] </answer>')
    boxes, points = script_prompts(answer, "multi_object", 200, 100, 100)  # no think needed; int(v * f + 0.5)
    assert boxes.tolist() == [[20, 20, 60, 41], [2, 1, 4, 2]] and points.tolist() == [[[24, 22]], [[2, 1]]]
    assert script_prompts("<answer>[]</answer>", "multi_object", 200, 100, 100)[0].shape == (0, 4)
    with pytest.raises(Exception):
        script_prompts('<answer>[{"bbox_2d": ["10", 20, 30, 41], "point_2d": [1, 1]}]</answer>', "multi_object",
                       200, 100, 100)


def test_counting_as_the_scripts_count():
    seg, s = Recorder(), sample()
    gt = np.zeros((100, 200), bool)
    gt[20:42, 20:61] = True  # exactly the mapped box of SEG
    metrics = ScriptMetrics()
    metrics.add(seg, s, SEG, "segzero", 100, gt)                           # IoU 1
    assert seg.calls == [([[20, 20, 60, 41]], [[[24, 22], [50, 35]]], True)]  # SAM2's best of three masks
    metrics.add(seg, s, "no answer", "segzero", 100, gt)                   # failed parse: I 0, U |G|
    empty = np.zeros_like(gt)
    metrics.add(seg, s, "<answer>[]</answer>", "multi_object", 100, empty)  # empty on empty: skipped
    metrics.add(seg, s, "no answer", "segzero", 100, empty)                # failed parse on empty: IoU 0, counted
    out = metrics.result()
    assert out["scored"] == 3 and out["skipped"] == 1
    assert out["giou"] == pytest.approx(1 / 3)
    assert out["ciou"] == pytest.approx(gt.sum() / (2 * gt.sum()))


def test_a_segmentation_error_counts_for_seg_zero_and_is_skipped_for_visionreasoner():
    class Broken(Recorder):
        def predict(self, *args, **kwargs):
            raise RuntimeError("CUDA out of memory")

    gt = np.ones((100, 200), bool)
    metrics = ScriptMetrics()
    metrics.add(Broken(), sample(), SEG, "segzero", 100, gt)
    metrics.add(Broken(), sample(), '<answer>[{"bbox_2d": [1, 1, 5, 5], "point_2d": [2, 2]}]</answer>',
                "multi_object", 100, gt)
    assert metrics.result() == {"giou": 0.0, "ciou": 0.0, "scored": 1, "skipped": 1}


def test_the_segmenter_state_is_keyed_by_the_image_not_the_sample_id():
    """A converted file can repeat an id: its second image must not reuse the first one's encoding,
    and a repeated image under another id may reuse it."""
    seg, metrics, gt = Recorder(), ScriptMetrics(), np.zeros((100, 200), bool)
    first, same_id = sample(), sample()
    same_id.image = Image.new("RGB", (200, 100), (255, 0, 0))
    other_id = sample()
    other_id.id = "t"
    for s in (first, same_id, other_id):
        metrics.add(seg, s, SEG, "segzero", 100, gt)
    assert seg.image_ids[0] != seg.image_ids[1] and seg.image_ids[0] == seg.image_ids[2]
