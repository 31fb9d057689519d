"""RewardWorker on real groups (GrabCut segmenter): rule terms, one encode + one batched decode, mask IoU."""
import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from config import RewardConfig
from reward.rules import TERMS, segzero_rewards
from reward.worker import RewardWorker

H, W, S = 120, 160, 112  # original image, model image size


def scene():
    """A red square (x 50..89, y 30..69) and a green distractor (x 10..29, y 90..109) on grey."""
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(225, 4, (H, W, 3)), 0, 255).astype(np.uint8)
    gt = np.zeros((H, W), bool)
    gt[30:70, 50:90] = True
    image[gt] = (200, 30, 40)
    image[90:110, 10:30] = (40, 160, 60)
    return image, gt


def to_model(x, y):
    return round(x * S / W), round(y * S / H)


def answer(box, p1, p2, quote='"'):
    (x1, y1), (x2, y2) = to_model(*box[:2]), to_model(*box[2:])
    obj = {"bbox": [x1, y1, x2, y2], "points_1": list(to_model(*p1)), "points_2": list(to_model(*p2))}
    return "<think>the red one</think><answer>" + json.dumps(obj).replace('"', quote) + "</answer>"


def make_group(responses, mask=True, solution=None):
    image, gt = scene()
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    rle = mask_utils.encode(np.asfortranarray(gt.astype(np.uint8)))
    (x1, y1), (x2, y2), p1, p2 = to_model(50, 30), to_model(89, 69), to_model(60, 45), to_model(78, 55)
    return {"sample_id": "s0", "image": png.getvalue(), "height": H, "width": W, "model_size": S,
            "solution": solution or (f"<box>({x1},{y1}),({x2},{y2})</box>"
                                     f"<points>({p1[0]},{p1[1]}),({p2[0]},{p2[1]})</points>"),
            "mask": {"size": rle["size"], "counts": rle["counts"].decode()} if mask else None,
            "responses": responses}


RESPONSES = [
    answer((50, 30, 89, 69), (60, 45), (78, 55)),  # right object
    answer((46, 27, 93, 73), (70, 50), (62, 40)),  # right object, loose box
    "I am not sure.",  # does not parse
    answer((50, 30, 89, 69), (60, 45), (78, 55), quote="'"),  # single quotes: does not parse
    answer((10, 90, 29, 109), (15, 95), (25, 105)),  # the distractor
]


class Spy:
    """Counts calls to a segmenter method and records the prompt batch size."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args):
        self.calls.append(len(args[0]) if not isinstance(args[0], str) else args[0])
        return self.fn(*args)


def spied_worker(**cfg):
    worker = RewardWorker(RewardConfig(**cfg))
    worker.segmenter.set_image = Spy(worker.segmenter.set_image)
    worker.segmenter.predict = Spy(worker.segmenter.predict)
    return worker


def test_group_scores_rules_mask_and_total():
    worker = spied_worker(weights={"mask_iou": 2.0, "bbox_l1": 0.5})
    group = make_group(RESPONSES)
    scores = worker.score_group(group)
    assert len(scores) == len(RESPONSES)
    for response, score in zip(RESPONSES, scores):
        assert list(score) == [*TERMS, "mask_iou", "total"]
        assert {t: score[t] for t in TERMS} == segzero_rewards(response, group["solution"])
        expected = sum(score[t] for t in TERMS) - 0.5 * score["bbox_l1"] + 2.0 * score["mask_iou"]
        assert score["total"] == pytest.approx(expected)
    ious = [s["mask_iou"] for s in scores]
    assert ious[0] > 0.8 and ious[1] > 0.8
    assert ious[2] == ious[3] == 0.0 and ious[4] == 0.0
    assert scores[0]["total"] > scores[4]["total"] > scores[2]["total"]
    # one encoding, one decode of exactly the three parseable answers
    assert len(worker.segmenter.set_image.calls) == 1
    assert worker.segmenter.predict.calls == [3]
    assert worker.last_stats["num_prompts"] == 3 and worker.last_stats["cache_hit"] is False

    again = worker.score_group(group)
    assert again == scores and worker.last_stats["cache_hit"] is True


def test_repeated_answers_are_segmented_once_with_the_same_scores():
    """G answers that repeat a box and points: one decode of the distinct prompts, every answer scored as
    if alone (the real GrabCut segmenter, so the masks are real)."""
    repeated = [RESPONSES[0], RESPONSES[1], RESPONSES[0], RESPONSES[4], RESPONSES[0], RESPONSES[1]]
    worker = spied_worker()
    scores = worker.score_group(make_group(repeated))
    assert worker.segmenter.predict.calls == [3] and worker.last_stats["num_prompts"] == 3
    alone = {r: spied_worker().score_group(make_group([r]))[0] for r in set(repeated)}
    assert scores == [alone[r] for r in repeated]


def test_unparseable_group_never_touches_the_segmenter():
    worker = spied_worker()
    scores = worker.score_group(make_group(["", "nothing", RESPONSES[3]]))
    assert [s["mask_iou"] for s in scores] == [0.0, 0.0, 0.0]
    assert worker.segmenter.set_image.calls == [] and worker.segmenter.predict.calls == []


def test_group_without_mask_scores_zero_and_flags_it():
    worker = spied_worker()
    scores = worker.score_group(make_group(RESPONSES, mask=False))
    assert all(s["mask_iou"] == 0.0 for s in scores) and scores[0]["bbox_iou"] == 1.0
    assert worker.last_stats["has_mask"] is False and worker.segmenter.predict.calls == []


def test_corrupt_image_zeroes_mask_terms_only():
    worker = RewardWorker(RewardConfig())
    group = {**make_group(RESPONSES), "image": b"not a png"}
    scores = worker.score_group(group)
    assert all(s["mask_iou"] == 0.0 for s in scores) and scores[0]["bbox_iou"] == 1.0
    assert worker.last_stats["mask_error"]


def test_modes_and_off():
    tiered = RewardWorker(RewardConfig(mask_iou="tiered")).score_group(make_group(RESPONSES[:1]))
    assert tiered[0]["mask_iou"] == 4.0
    off = RewardWorker(RewardConfig(mask_iou="off"))
    assert off.segmenter is None
    scores = off.score_group(make_group(RESPONSES[:2]))
    assert "mask_iou" not in scores[0] and scores[0]["total"] == 5.0


def test_threshold_mode_scores_against_mask_threshold():
    group = make_group(RESPONSES[1:2])  # the loose box
    iou = RewardWorker(RewardConfig(mask_iou="continuous")).score_group(group)[0]["mask_iou"]
    assert iou > 0.8
    # the term is 1 only for an IoU strictly above the threshold
    below = RewardWorker(RewardConfig(mask_iou="threshold", mask_threshold=iou)).score_group(group)
    above = RewardWorker(RewardConfig(mask_iou="threshold", mask_threshold=iou / 2)).score_group(group)
    assert (below[0]["mask_iou"], above[0]["mask_iou"]) == (0.0, 1.0)


def test_multi_object_group_masks_are_unions():
    (ax1, ay1), (ax2, ay2), (apx, apy) = to_model(50, 30), to_model(89, 69), to_model(70, 50)
    (bx1, by1), (bx2, by2), (bpx, bpy) = to_model(10, 90), to_model(29, 109), to_model(20, 100)
    red = {"bbox_2d": [ax1, ay1, ax2, ay2], "point_2d": [apx, apy]}
    green = {"bbox_2d": [bx1, by1, bx2, by2], "point_2d": [bpx, bpy]}
    group = make_group([f"<think>a.</think><answer>{json.dumps(objs)}</answer>" for objs in ([red], [red, green], [])],
                       solution=json.dumps([red]))
    worker = spied_worker(rules="multi_object")
    scores = worker.score_group(group)
    assert list(scores[0]) == ["think_format", "answer_format", "accuracy", "non_repeat", "mask_iou", "total"]
    assert scores[0]["accuracy"] == 3.0 and scores[1]["accuracy"] == 1.5
    assert scores[0]["mask_iou"] > 0.8
    assert 0.5 < scores[1]["mask_iou"] < scores[0]["mask_iou"]  # the green square is added to the union
    assert worker.segmenter.predict.calls == [2]  # red (in both answers) and green, each segmented once


@pytest.mark.parametrize("rules, terms", [
    ("segzero", {"think_format": 1.0, "answer_format": 1.0, "bbox_iou": 1.0, "bbox_l1": 1.0, "point_l1": 1.0}),
    ("segzero_soft", {"think_format": 1.0, "answer_format": 1.0, "bbox_iou": 1.0, "bbox_l1": 1.0, "point_l1": 1.0}),
    ("multi_object", {"think_format": 1.0, "answer_format": 2.0, "accuracy": 3.0, "non_repeat": 1.0}),
])
def test_reward_group_gives_each_rule_set_its_own_solution(tmp_path, rules, terms):
    """What the rollout round and evaluation score: the sample's reference answer in the rule set's
    format earns every rule term against the solution reward_group builds (under multi_object, the
    JSON list; the old driver sent Seg-Zero's string there, and accuracy was 0 at every step)."""
    from data.dataset import ParquetSource
    from data.synthetic import write_synthetic
    from reward.worker import reward_group

    multi = rules == "multi_object"
    path = write_synthetic(tmp_path / "d.parquet", 3, 112, seed=5, multi_object=multi, num_shapes=(1, 3),
                           kinds=("colour", "all_colour") if multi else ("colour",), barcodes="objects")
    worker = RewardWorker(RewardConfig(rules=rules, mask_iou="continuous", weights={"mask_iou": 2.0}))
    for sample in ParquetSource(path, shuffle=False).iter_epoch():
        group = reward_group(sample, [sample.reference_answer(112, rules), "no answer"], rules, 112)
        assert group["solution"] == sample.solution(112, rules)
        best, worst = worker.score_group(group)
        assert {k: best[k] for k in terms} == terms
        assert best["mask_iou"] > 0.5 and best["total"] == pytest.approx(sum(terms.values()) + 2 * best["mask_iou"])
        assert worst["total"] == worst.get("non_repeat", 0.0)
