"""RewardPool on a real local Ray: streaming submit/collect, an actor killed or hung mid-step, resizing."""
import io
import json
import time

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # multi-process: a local Ray with reward actors

from cluster.reward_pool import RewardPool  # noqa: E402
from config import RewardConfig  # noqa: E402
from reward.worker import RewardWorker  # noqa: E402
from tests.helpers import Gate  # noqa: E402

CFG = RewardConfig()  # GrabCut segmenter, continuous mask IoU
G = 4


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)  # never a running cluster
    yield
    ray.shutdown()


def group(i, size=(240, 320)):
    """A red square on grey, its mask, and G answers around it (GrabCut work grows with the image)."""
    h, w = size
    rng = np.random.default_rng(i)
    image = np.clip(rng.normal(225, 4, (h, w, 3)), 0, 255).astype(np.uint8)
    y, x = 20 + 10 * (i % 5), 30 + 12 * (i % 7)
    gt = np.zeros((h, w), bool)
    gt[y:y + h // 3, x:x + w // 3] = True
    image[gt] = (200, 30, 40)
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    rle = mask_utils.encode(np.asfortranarray(gt.astype(np.uint8)))
    s = 112 / w, 112 / h
    box = [round(x * s[0]), round(y * s[1]), round((x + w // 3) * s[0]), round((y + h // 3) * s[1])]
    pts = [[(box[0] + box[2]) // 2, (box[1] + box[3]) // 2]] * 2
    responses = ["<think>red</think><answer>" + json.dumps(
        {"bbox": [v + j for v in box], "points_1": pts[0], "points_2": pts[1]}) + "</answer>" for j in range(G - 1)]
    return {"sample_id": f"s{i}", "image": png.getvalue(), "height": h, "width": w, "model_size": 112,
            "solution": f"<box>({box[0]},{box[1]}),({box[2]},{box[3]})</box>"
                        f"<points>({pts[0][0]},{pts[0][1]}),({pts[1][0]},{pts[1][1]})</points>",
            "mask": {"size": rle["size"], "counts": rle["counts"].decode()}, "responses": responses + ["no idea"]}


@pytest.fixture(scope="module")
def groups():
    gs = {f"s{i}": group(i) for i in range(8)}
    local = RewardWorker(CFG)
    return gs, {k: local.rewards(g) for k, g in gs.items()}


def test_streaming_submit_and_collect(groups):
    gs, expected = groups
    pool = RewardPool(CFG, num_workers=2, resources={"num_cpus": 1, "num_gpus": 0}, call_timeout_s=60)
    for key, g in gs.items():
        pool.submit(key, g)
    assert [len(w.inflight) for w in pool.workers] == [4, 4]  # least-loaded dispatch
    assert pool.collect(gs) == expected
    stats = pool.stats()
    assert stats["groups"] == 8 and stats["samples"] == 8 * G and stats["samples_per_s"] > 0
    assert [w["groups"] for w in stats["workers"]] == [4, 4]
    with pytest.raises(KeyError):
        pool.collect(["s0"])  # already collected
    pool.shutdown()


def test_killed_actor_mid_step_every_group_scored_once(groups, caplog):
    """The victim scores one group of the step, then is held (a call blocked on a gate, queued after that
    group) with three more of the step's groups queued behind: killed then, they move to a new actor."""
    gs, expected = groups
    pool = RewardPool(CFG, num_workers=2, resources={"num_cpus": 1, "num_gpus": 0}, call_timeout_s=60)
    ray.get([w.ready for w in pool.workers])  # both started: dispatch is least-loaded, in order
    victim, keys = pool.workers[0], list(gs)
    pool.submit(keys[0], gs[keys[0]])
    gate = Gate.remote()
    victim.actor.__ray_call__.remote(lambda self, g: ray.get(g.wait.remote()), gate)
    for key in keys[1:]:
        pool.submit(key, gs[key])
    refs = list(victim.inflight)
    assert len(refs) == 4
    ray.get(refs[0])  # the victim has scored a group of this step...
    _, unfinished = ray.wait(refs, num_returns=len(refs), timeout=0)
    assert len(unfinished) == 3  # ...and holds three more, which wait behind the gate
    ray.kill(victim.actor)
    with caplog.at_level("WARNING", logger="cluster.reward_pool"):
        result = pool.collect(list(gs))
    assert result == expected  # every key, once, with the right scores
    assert "reward actor died" in caplog.text
    assert pool.workers[0] is not victim
    assert pool.stats()["groups"] == 8  # counted once each, re-scored ones included
    pool.shutdown()


def test_hung_actor_is_replaced_after_the_call_timeout(groups):
    gs, expected = groups
    pool = RewardPool(CFG, num_workers=2, resources={"num_cpus": 1, "num_gpus": 0}, call_timeout_s=10)
    hung = pool.workers[0]
    hung.actor.__ray_call__.remote(lambda self: time.sleep(3600))  # blocks the actor's queue
    keys = list(gs)[:4]
    for key in keys:
        pool.submit(key, gs[key])
    assert len(hung.inflight) == 2
    assert pool.collect(keys) == {k: expected[k] for k in keys}
    assert hung not in pool.workers
    pool.shutdown()


def test_resize_between_steps_and_bad_group(groups):
    gs, expected = groups
    pool = RewardPool(CFG, num_workers=1, resources={"num_cpus": 1, "num_gpus": 0, "torch_threads": 2},
                      call_timeout_s=60)
    pool.resize(3)
    env = ray.get(pool.workers[2].actor.__ray_call__.remote(lambda self: __import__("os").environ["OMP_NUM_THREADS"]))
    assert env == "2"
    # The pool dispatches to started actors first: wait for the three constructors (the pool's own
    # readiness refs), so that the spread below does not depend on how fast the new actors start.
    ray.get([w.ready for w in pool.workers if w.ready is not None])
    for key in ["s0", "s1", "s2"]:
        pool.submit(key, gs[key])
    assert [len(w.inflight) for w in pool.workers] == [1, 1, 1]
    assert pool.collect(["s0", "s1", "s2"]) == {k: expected[k] for k in ["s0", "s1", "s2"]}
    pool.resize(1)
    pool.submit("s3", gs["s3"])
    assert pool.collect(["s3"]) == {"s3": expected["s3"]}
    assert pool.stats()["num_workers"] == 1
    pool.submit("bad", {"sample_id": "bad"})  # no responses: a malformed group is an error, not a retry
    with pytest.raises(RuntimeError, match="bad"):
        pool.collect(["bad"])
    pool.submit("s4", gs["s4"])  # the pool still works after the error
    assert pool.collect(["s4"]) == {"s4": expected["s4"]}
    pool.shutdown()


def test_worker_that_cannot_start_raises(groups, tmp_path):
    gs, _ = groups
    cfg = RewardConfig(segmenter="sam2", sam2_checkpoint=str(tmp_path / "missing.pt"))
    pool = RewardPool(cfg, num_workers=1, resources={"num_cpus": 1, "num_gpus": 0}, call_timeout_s=60)
    pool.submit("s0", gs["s0"])
    with pytest.raises(RuntimeError, match="failed to start"):
        pool.collect(["s0"])
    pool.shutdown()


def test_evaluation_runs_on_a_reward_actor_with_a_segmenter_even_without_the_mask_term(synthetic_split):
    """RewardPool.evaluate (what the job's held-out evaluation calls): scored on the pool's first actor,
    in its process and with its resources; a reward without the mask term gets a segmenter built there for
    evaluation; the same numbers as evaluate_answers in this process; overlays come back as PNG bytes."""
    from data.dataset import ParquetSource
    from evaluation.run import evaluate_answers

    size = 112
    samples = [s for _, s in zip(range(3), ParquetSource(synthetic_split, shuffle=False).iter_epoch())]
    responses = [s.reference_answer(size) for s in samples[:2]] + ["no idea"]
    cfg = CFG.model_copy(update={"mask_iou": "off"})
    pool = RewardPool(cfg, num_workers=1, resources={"num_cpus": 1, "num_gpus": 0}, call_timeout_s=60)
    try:
        result = pool.evaluate(samples, responses, [5, 5, 2], size, overlays=2, timeout_s=120)
        actor_pid = ray.get(pool.workers[0].actor.__ray_call__.remote(lambda self: __import__("os").getpid()))
        built = ray.get(pool.workers[0].actor.__ray_call__.remote(
            lambda self: self.evaluation_scorer.segmenter is not None))
    finally:
        pool.shutdown()
    here = evaluate_answers(samples, responses, [5, 5, 2], RewardWorker(cfg, segment=True), size, max_overlays=0)
    assert actor_pid != __import__("os").getpid() and built
    assert result["giou_segzero"] == pytest.approx(here["giou_segzero"]) and result["giou_segzero"] > 0.3
    assert result["parse_failure_rate"] == pytest.approx(1 / 3)
    assert len(result["overlays"]) == 2 and all(png.startswith(b"\x89PNG") for png in result["overlays"].values())


def test_discarded_groups_leave_the_pool_and_their_late_results_are_ignored(groups):
    """A dropped round (the learner group restarted from a checkpoint): its groups are forgotten while
    still being scored; the same keys can be submitted anew and each is collected once, scored again."""
    gs, expected = groups
    pool = RewardPool(CFG, num_workers=2, resources={"num_cpus": 1, "num_gpus": 0}, call_timeout_s=60)
    keys = list(gs)
    for key in keys[:4]:
        pool.submit(key, gs[key])
    assert pool.stats()["queued_groups"] == 2  # two groups waited behind another on a busy worker
    pool.discard(keys[:4])
    assert all(not w.inflight for w in pool.workers)
    with pytest.raises(KeyError):
        pool.collect(keys[:1])
    for key in keys:  # the discarded keys again, and the others
        pool.submit(key, gs[key])
    assert pool.collect(keys) == expected
    assert pool.stats()["groups"] == 8  # the late results of the dropped ones counted for nothing
    pool.shutdown()
