"""The mode matrix: short real jobs (every engine real: Ray, vLLM CPU, DeepSpeed, the reward pool,
MLflow; tiny policy; a short warm start; 3 GRPO steps) over every advertised switch, in a pairwise
design: every pair of values of every two switches runs together in at least one job
(``test_design_covers_every_pair``), in 12 jobs instead of the full product's ~7 million.

Each job checks the step's invariants itself (trajectory.check_batch: whose reward, whose advantage, trained
once, which weight version; a violation fails the job), and each test asserts: every metric finite;
each step either trained exactly G sequences per prompt, each once, or was skipped by dynamic sampling
after its refills; the weight version counts the updates; reward terms that are not all zero after
the warm start; the learner's logprobs of the tokens sampled with its current weights match vLLM's
(``logprob_drift_current``; on-policy every token, also at T = 0.5 with a minimum answer length);
off-policy, staleness at most one version; after every weight sync the parity probe passed on every
rollout worker (``sync/parity_max_diff``, checked by the job itself).
``--resume`` rows crash right after the step-2 checkpoint
and resume from it. ``policy`` picks what the job starts from: the warm-started tiny policy, or a
random-weight directory of a real family with Qwen's 151,936-row vocabulary (tests/conftest.py
``family_policy``; Qwen3-VL at 224 px, its answers in relative coordinates): those answer at random, so
the reward checks after the warm start are the tiny rows'; every other check holds for all three.
The jobs share one local Ray; each starts and stops its own actors.
"""
import itertools
import math

import mlflow
import pytest

from config import load_config
from learner.engine import learning_rate
from tests.conftest import FAMILY_IMAGE_SIZE

pytestmark = pytest.mark.slow

B, G, STEPS = 2, 4, 3
# Switch -> its levels (overrides, or for "--resume" whether the job is crashed and resumed).
LEVELS = {
    "reward.mask_iou": ["continuous", "off", "threshold", "tiered"],
    "learner.loss_agg": ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"],
    "reward.rules": ["segzero", "segzero_soft", "multi_object"],
    "learner.kl_kind": ["k3", "k1", "k2"],
    "rollout.stream_rewards": ["true", "false"],
    "rollout.off_policy": ["false", "true"],
    "rollout.dynamic_sampling": ["false", "true"],
    "learner.zero_stage": ["2", "3"],
    "cluster.learner_ranks": ["1", "2"],
    "cluster.rollout_workers": ["1", "2"],
    "cluster.reward_workers": ["1", "2"],
    "--resume": [False, True],
    "rollout.temperature": ["1.0", "0.5"],
    "learner.adv_scale": ["std", "none"],
    "learner.entropy_coef": ["0.0", "0.001"],
    "learner.freeze_vision": ["true", "false"],
    "learner.gradient_checkpointing": ["false", "true"],
    "learner.clip_ratio_c": ["null", "3.0"],
    "learner.lr_schedule": ["cosine", "constant"],
    "eval.keep_best": ["true", "false"],
    "rollout.weight_sync": ["rpc", "collective"],
    "learner.shared_prompt": ["true", "false"],
    "cluster.learner_update_threads": ["2", "0"],
    "cluster.reward_autoscale.enabled": ["false", "true"],
    "rollout.min_new_tokens": ["0", "40"],
    "learner.logprob_chunk_tokens": ["1024", "0"],
    "policy": ["tiny", "qwen2_5_vl", "qwen3_vl"],
}
# One row per job: the level index of each switch above, in order (a pairwise covering array).
DESIGN = [
    [0, 0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [0, 1, 1, 1, 1, 0, 1, 0, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1],
    [0, 2, 2, 2, 0, 1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2],
    [1, 0, 1, 2, 0, 0, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 1, 1, 2],
    [1, 1, 2, 0, 1, 1, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 2],
    [1, 2, 0, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 1, 0, 0, 1, 0, 1, 1],
    [2, 0, 2, 1, 1, 0, 1, 0, 0, 1, 0, 1, 0, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0],
    [2, 1, 0, 2, 0, 1, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 2],
    [2, 2, 1, 0, 1, 0, 0, 1, 1, 0, 1, 0, 1, 1, 1, 0, 0, 1, 0, 1, 0, 0, 0, 1, 1, 1, 1],
    [3, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0, 1, 1, 0, 1, 0, 1],
    [3, 1, 1, 1, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 1, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0],
    [3, 2, 2, 2, 1, 0, 1, 1, 1, 0, 0, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    [1, 2, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [3, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
]
# What every job shares: small. Each starts from a policy warm-started once per answer format (a real
# launch.py job, the default's 200-step warm start, tests/conftest.py), and runs 2 warm-start steps of
# its own (export, KL reference, sync).
COMMON = [f"train.steps={STEPS}", "train.sft_steps=2", "train.sft_batch_size=8", "train.sft_lr=1e-5",
          "learner.warmup_steps=5",
          "learner.lr=1e-4", "data.synthetic_train_size=128", "data.synthetic_eval_size=4", "eval.num_samples=4",
          f"rollout.prompts_per_step={B}", f"rollout.group_size={G}", "rollout.max_new_tokens=48",
          "rollout.max_refills=2", "tracking.system_metrics=false", "tracking.log_model=false",
          "cluster.sync_parity_check=true",
          # with the autoscaler on: a decision after every step, between 1 and 2 reward workers
          "cluster.reward_autoscale.cooldown_steps=1", "cluster.reward_autoscale.max_workers=2"]
def job_settings(row: list[int]) -> dict:
    return {name: LEVELS[name][level] for name, level in zip(LEVELS, row)}


def test_design_covers_every_pair():
    assert all(len(row) == len(LEVELS) for row in DESIGN)
    for (i, a), (j, b) in itertools.combinations(enumerate(LEVELS), 2):
        seen = {(row[i], row[j]) for row in DESIGN}
        assert len(seen) == len(LEVELS[a]) * len(LEVELS[b]), (a, b, sorted(seen))


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from cluster.controller import NAMESPACE
    from cluster.job import runtime_env

    # Logical CPUs for the largest job: 2 learner ranks, 2 rollout and 2 reward workers (0.5 + 1 + 0.5 each).
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, namespace=NAMESPACE,
             runtime_env=runtime_env())
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def warm_policies(local_ray, warm_policy):
    """The tiny policy warm-started on each answer format (tests/conftest.py)."""
    return {rules: warm_policy(rules) for rules in LEVELS["reward.rules"]}


def policy_overrides(policy: str, rules: str, warm_policies: dict, family_policy) -> list[str]:
    """The policy of a row and the image size it runs at."""
    if policy == "tiny":
        return [f"model.policy_path={warm_policies[rules]}"]
    return [f"model.policy_path={family_policy(policy)}", f"model.image_size={FAMILY_IMAGE_SIZE[policy]}"]


class Crash(Exception):
    pass


@pytest.mark.parametrize("row", range(len(DESIGN)), ids=[f"job{i}" for i in range(len(DESIGN))])
def test_mode(row, warm_policies, family_policy, tmp_path, monkeypatch):
    import launch
    from cluster.job import Job

    settings = job_settings(DESIGN[row])
    resume, policy = settings.pop("--resume"), settings.pop("policy")
    overrides = COMMON + [f"{k}={v}" for k, v in settings.items()] + [f"train.output_dir={tmp_path}"] + \
        policy_overrides(policy, settings["reward.rules"], warm_policies, family_policy)
    cfg = load_config(None, overrides + (["train.checkpoint_every=1"] if resume else []))
    if resume:  # a crash right after the step-2 checkpoint is complete, then --resume
        save = Job.save_checkpoint

        def save_then_crash(job, state):
            path = save(job, state)
            if state.step == 2:
                raise Crash(path)
            return path

        monkeypatch.setattr(Job, "save_checkpoint", save_then_crash)
        with pytest.raises(Crash):
            launch.train(cfg)
        monkeypatch.setattr(Job, "save_checkpoint", save)
        launch.train(cfg, resume="")
    else:
        launch.train(cfg)

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("seg-grpo").experiment_id])

    def history(name):
        points = client.get_metric_history(run.info.run_id, name)
        steps = [m.step for m in points]
        assert len(steps) == len(set(steps)), f"{name} logged twice at one step (a step trained twice?)"
        return {m.step: m.value for m in points}

    every = {key: history(key) for key in run.data.metrics}
    for name, values in every.items():
        assert all(math.isfinite(v) for v in values.values()), (name, values)
    skipped = every["batch/skipped"]
    assert sorted(skipped) == list(range(1, STEPS + 1))  # every step ran once (resumed ones included)
    trained = [s for s in skipped if not skipped[s]]
    dynamic = settings["rollout.dynamic_sampling"] == "true"
    for step in range(1, STEPS + 1):
        if skipped[step]:  # only dynamic sampling skips, and only after all its refills
            assert dynamic and every["batch/refills"][step] == cfg.rollout.max_refills
            continue
        prompts = every["batch/prompts"][step]
        assert prompts == B or (dynamic and 1 <= prompts <= B)
        assert every["batch/sequences"][step] == every["trained_seqs"][step] == G * prompts
    if not dynamic:
        assert trained == [1, 2, 3]
    assert ([every["weight_version"][s] for s in trained]
            == [cfg.train.sft_steps + i for i in range(1, len(trained) + 1)])
    # After the warm start the tiny policy's greedy answers already earn format points (and a mask, where it
    # is scored); a random real-vocabulary policy's are scored too, and earn nothing.
    if policy == "tiny":
        assert every["eval/reward_think_format"][0] > 0 and every["eval/reward_answer_format"][0] > 0
        assert any(every["reward/answer_format"].get(s, 0) > 0 for s in trained) or not trained
    else:
        assert cfg.reward.coordinates == ("relative_1000" if policy == "qwen3_vl" else "pixels")
    # vLLM and the learner score the sampled tokens under one distribution (policy/sampling.py: logit bias,
    # min tokens, temperature): the tokens sampled with the learner's current weights agree, checked by the
    # job itself (cluster.max_logprob_drift) and here. On-policy that is every token; one-step off-policy
    # the first trained step's (the step after it trains answers of the version before).
    current = [s for s in trained if every["tokens_current"][s] > 0]
    assert (current and current[0] == trained[0]) or not trained
    assert all(every["logprob_drift_current"][s] < 1e-3 for s in current), every["logprob_drift_current"]
    if settings["rollout.off_policy"] == "false":
        assert current == trained and all(every["logprob_drift"][s] < 1e-3 for s in trained), every["logprob_drift"]
        assert all(every["rollout/staleness"][s] == 0 for s in trained)
    else:
        assert all(every["rollout/staleness"][s] <= 1 for s in trained)
    if cfg.rollout.min_new_tokens:  # no answer ends before the minimum
        assert all(every["response/length_mean"][s] >= cfg.rollout.min_new_tokens for s in trained)
    # The learning rate of each update is the schedule's at its GRPO step (resume included).
    for step in trained:
        assert every["lr"][step] == pytest.approx(learning_rate(cfg.train.sft_steps + step - 1, cfg), rel=1e-6)
    # Every sync reached every rollout worker with the learner's weights (the job checks the probe itself):
    # the warm start's and every trained step's. A random real-vocabulary policy's rewards all tie, so under
    # dynamic sampling its steps are all skipped and the warm start's sync is its only one.
    parity = [*every["sft/sync/parity_max_diff"].values(), *every.get("sync/parity_max_diff", {}).values()]
    assert len(parity) == 1 + len(trained) and max(parity) <= cfg.cluster.sync_parity_tolerance, parity
    if settings["rollout.weight_sync"] == "collective" and trained:  # one group, built at the first sync, reused
        assert set(every["sync/group_rebuilds"].values()) == {0}
    assert (tmp_path / "best_policy" / "best.json").exists() == cfg.eval.keep_best
    assert ("best/step" in every) == cfg.eval.keep_best
    assert every["pool/rollout_workers"][1] == cfg.cluster.rollout_workers
    assert every["pool/reward_workers"][1] == cfg.cluster.reward_workers
    if cfg.cluster.reward_autoscale.enabled:
        # Each decision sizes the pool of the next round started: the next step's, or off-policy the one
        # after (the next round already runs while the step ends). A resumed job continues with the
        # checkpoint's pool and autoscaler state.
        decided, lag = every.get("autoscale/reward_workers", {}), 2 if settings["rollout.off_policy"] == "true" else 1
        assert sorted(decided) == trained and set(decided.values()) <= {1, 2}
        for step in trained:
            if step + lag <= STEPS:
                assert every["pool/reward_workers"][step + lag] == decided[step], (
                    every["pool/reward_workers"], decided)
    else:
        assert "autoscale/reward_workers" not in every
