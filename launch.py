"""Train a reasoning-segmentation policy with GRPO on Ray.

    python launch.py [--config configs/default.yaml] [--resume [PATH]] [section.field=value ...]
    ray job submit --working-dir . -- python launch.py --config configs/segzero_7b.yaml

The job, top to bottom (``train``): start the actors -> optional supervised warm start on reference
answers -> GRPO steps -> held-out evaluation -> export. One GRPO step (``grpo_step``): take B prompts ->
the rollout actors (vLLM) sample G answers per prompt -> each finished group goes straight to the
reward pool (format/box/point rules + segmenter mask IoU) -> group-normalised advantages -> the learner
ranks (DeepSpeed ZeRO) take one GRPO step -> rank 0's new weights reach every rollout actor (version =
optimizer steps so far) -> MLflow. The step's data are ``trajectory`` types (Group, LearnerBatch); the
loop's state is one ``TrainState`` written here alone; the actor groups behind ``job.rollouts`` and
``job.learners`` (cluster/) hide the fan-out to Ray actors.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

log = logging.getLogger("launch")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue from a checkpoint (default: the latest in train.output_dir), same MLflow run")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.group_size=8")
    args = p.parse_args(argv)
    if args.resume and "=" in args.resume and not Path(args.resume).exists():  # `--resume a.b=c`: an override
        args.overrides.insert(0, args.resume)
        args.resume = ""
    return args


def main(argv=None) -> int:
    from config import load_config_or_exit

    args = parse_args(argv)
    cfg = load_config_or_exit(args.config, args.overrides)
    if cfg.model.policy_path:  # the checkpoint's family against the config, before anything starts
        from policy.prepare import prepare_policy

        try:
            prepare_policy(cfg)
        except (RuntimeError, ValueError) as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from cluster.job import STOPPING_ERRORS

    try:
        train(cfg, resume=args.resume)
    except STOPPING_ERRORS as exc:
        log.error("training stopped: %s", exc)
        return 1
    return 0


def train(cfg, resume: str | None = None) -> None:
    """The whole job; ``resume``: a checkpoint path, "" for the output dir's latest, None to start anew.
    A learner rank lost at any point (warm start, GRPO, evaluation, export) restarts the learner group
    from the latest checkpoint, and the job goes on from the state ``job.recover`` returns."""
    import mlflow

    from cluster.job import Job
    from cluster.tracking import start_run

    job, state = Job.start(cfg, resume)
    try:
        with start_run(cfg, state.run_id) as run:
            state.run_id = run.info.run_id
            log.info("mlflow run %s at %s", state.run_id, mlflow.get_tracking_uri())
            while True:
                try:
                    run_from(job, state)
                    return
                except Exception as exc:  # a learner rank lost is recovered; anything else stops the job
                    lost = job.learners.lost(exc)
                    if lost is None:
                        raise
                    state = job.recover(lost, state)
    finally:
        job.shutdown()


def run_from(job, state) -> None:
    """The job from ``state`` on: warm start, GRPO steps (evaluations, checkpoints, operations between
    them), the end."""
    import mlflow
    from tqdm import tqdm

    cfg = job.cfg
    # 1. Supervised warm start: the answer format, and roughly where the object is.
    if state.sft_done < cfg.train.sft_steps:
        warm_start(job, state)
    if cfg.eval.enabled and state.step == 0:
        evaluate(job, state, 0)

    # 2. GRPO, one step at a time; between steps: operations (autoscaler, nodes, status), evaluations,
    # checkpoints.
    bar = tqdm(desc="grpo", unit="step", initial=state.step, total=cfg.train.steps)
    while state.step < cfg.train.steps:
        step = state.step + 1
        metrics = grpo_step(job, state, step)
        metrics.update(job.ops.after_step(step, metrics, state))
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
        bar.set_postfix(reward=f"{metrics.get('reward/total', float('nan')):.3f}",
                        gen=f"{metrics['time/generate']:.1f}s", learn=f"{metrics.get('time/learner', 0.0):.1f}s",
                        sync=f"{metrics.get('time/sync', 0.0):.1f}s")
        bar.update()
        if step < cfg.train.steps and due(step, cfg.eval.every_n_steps if cfg.eval.enabled else 0):
            evaluate(job, state, step)
        if step < cfg.train.steps and due(step, cfg.train.checkpoint_every):
            job.save_checkpoint(state)
    bar.close()

    # 3. The end: held-out evaluation, learning curve, checkpoint, the policies as HF directories.
    finish(job, state)


def due(step: int, every: int) -> bool:
    """Whether a task run every ``every`` steps (0: never) is due after ``step``."""
    return bool(every) and step % every == 0


def evaluate(job, state, step: int) -> None:
    """Held-out evaluation logged at ``step``; the policy kept when it is the best so far."""
    from cluster.evaluation import evaluate_and_log

    state.best = job.keep_if_best(state.best, step, evaluate_and_log(job, step))


def finish(job, state) -> None:
    """The final evaluation, the learning curve, the last checkpoint, and the final (and best) policy as
    HF directories, logged to MLflow."""
    import mlflow

    from evaluation.curve import metric_history, plot_learning_curve

    cfg = job.cfg
    if cfg.eval.enabled:
        evaluate(job, state, state.step)
    curve = plot_learning_curve(metric_history(state.run_id), job.out / "learning_curve.png", title=cfg.run_name)
    mlflow.log_artifact(str(curve))
    job.save_checkpoint(state)
    if cfg.tracking.log_model:
        final = job.out / "final_policy"
        job.learners.export_hf(final)
        mlflow.log_artifacts(str(final), artifact_path="final_policy")
        log.info("final policy: %s (logged to MLflow run %s)", final, state.run_id)
        if state.best is not None:
            mlflow.log_artifacts(str(job.best_dir), artifact_path="best_policy")
    if state.best is not None:
        b = state.best
        reported = {f"best/{key}": b[key] for key in ("eval_giou", "ood_giou") if key in b}
        mlflow.log_metrics({"best/step": b["step"], "best/giou": b["giou"], **reported}, step=state.step)
        score = lambda key: f"{b[key]:.4f}" if key in b else "-"  # noqa: E731
        log.info("best policy (selected on the validation split): step %d, val gIoU %.4f +- %.4f, test %s, OOD %s "
                 "(%s)", b["step"], b["giou"], b["giou_se"], score("eval_giou"), score("ood_giou"), job.best_dir)


def warm_start(job, state) -> None:
    """Supervised steps on the dataset's reference answers (in the rule set's answer format); then the
    warm-started policy is exported (Seg-Zero's SFT baseline, GRPO's KL reference) and synced."""
    import mlflow
    from tqdm import tqdm

    from policy.family import pixels_per_unit
    from policy.prepare import reference_tokenizer
    from policy.prompt import chat_prompt
    from trajectory import LearnerBatch, LearnerSequence

    cfg = job.cfg
    size, rules, coordinates = cfg.model.image_size, cfg.reward.rules, cfg.reward.coordinates
    unit = pixels_per_unit(coordinates, size)  # reference answers in the policy's coordinate convention
    tokenize = reference_tokenizer(job.policy_path)
    for sft_step in tqdm(range(state.sft_done + 1, cfg.train.sft_steps + 1), desc="warm start", unit="step"):
        sequences = [LearnerSequence(chat_prompt(s.problem, rules, coordinates), s.model_image(size),
                                     tokenize(s.reference_answer(size, rules, unit)))
                     for s in job.data.next_batch(cfg.train.sft_batch_size)]
        metrics = job.learners.sft_step(LearnerBatch(sequences, position=sft_step - 1))
        mlflow.log_metrics({f"sft/{k}": float(v) for k, v in metrics.items()}, step=sft_step)
        state.sft_done = state.version = sft_step
    job.learners.export_hf(job.warm_start_dir)
    log.info("warm-started policy: %s", job.warm_start_dir)
    job.learners.set_reference(job.warm_start_dir)
    # the first sync's time and parity, under sft/ at the last warm-start step (a run whose GRPO steps are
    # all skipped by dynamic sampling syncs nothing else)
    synced = job.rollouts.sync_from(job.learners, state.version)
    mlflow.log_metrics({f"sft/{k}": float(v) for k, v in synced.items()}, step=state.sft_done)


def grpo_step(job, state, step: int) -> dict:
    """One GRPO step; returns its metrics. When no group can be trained (every group tied under dynamic
    sampling, or no prompt fitted the context) the step is skipped, weights unchanged: ``batch/skipped``
    is 1 and only the rollout's metrics are returned."""
    import torch

    from learner.grpo import group_advantages
    from trajectory import check_batch, learner_batch, reward_metrics

    cfg, r, t0 = job.cfg, job.cfg.rollout, time.perf_counter()
    state.step = step

    # Rollout + reward: G answers per prompt, each group scored as soon as it is generated. Off-policy,
    # this step's round was started during the last step's learner update.
    round_, state.pending = state.pending or draw_round(job, state, step, r.prompts_per_step), None
    groups, metrics = round_.finish()
    kept, dropped = trainable(groups, r.dynamic_sampling)

    # Dynamic sampling (DAPO): groups whose G rewards tie carry no gradient; refill with new prompts.
    refills = 0
    while r.dynamic_sampling and len(kept) < r.prompts_per_step and refills < r.max_refills:
        refills += 1
        refill = draw_round(job, state, step, r.prompts_per_step - len(kept), refills, {g.uid for g in groups})
        more, timings = refill.finish()
        for key in ("time/generate", "time/reward_tail"):  # every round of the step counts
            metrics[key] += timings[key]
        groups += more
        more_kept, more_dropped = trainable(more, True)
        kept, dropped = kept + more_kept, dropped + more_dropped
    metrics.update({"batch/refills": refills, "batch/dropped_groups": sum(dropped.values()),
                    **{f"batch/dropped_groups/{why}": n for why, n in dropped.items()}, "batch/skipped": int(not kept)})
    if not kept:
        log.warning("step %d: no group to train (dropped: %s, refills: %d); skipping the update",
                    step, dict(dropped), refills)
        return {**metrics, **reward_metrics(groups)}

    # Advantages: rewards normalised within each group of G answers to the same prompt; checked. The
    # learning rate is the schedule's at this GRPO step, whether or not earlier steps were skipped.
    for g in kept:
        g.advantages = group_advantages(torch.tensor(g.totals), len(g.totals), cfg.learner.adv_scale).tolist()
    batch = learner_batch(kept, cfg.model.image_size, state.version, position=cfg.train.sft_steps + step - 1)
    check_batch(kept, batch, job.rollouts.versions, int(r.off_policy))

    # Operators' requests due by the next step apply now, while no round is in flight.
    job.ops.apply_scaling(step + 1)

    # Learner: one update over the whole batch. Off-policy, the next step's round generates meanwhile,
    # with the weights before this update (staleness one version).
    t_learn = time.perf_counter()
    if r.off_policy and step < cfg.train.steps:
        state.pending = draw_round(job, state, step + 1, r.prompts_per_step)
    learner_metrics = job.learners.train_step(batch, while_waiting=state.pending.pump if state.pending else None)
    metrics["time/learner"] = time.perf_counter() - t_learn
    check_update(learner_metrics, cfg.max_logprob_drift, step)

    # Weight sync: the next round samples from the updated policy.
    staleness = state.version - min(a.weight_version for g in kept for a in g.answers)
    state.version += 1
    metrics.update(job.rollouts.sync_from(job.learners, state.version, state.pending.pump if state.pending else None))
    return step_metrics(job, state, kept, groups, learner_metrics, metrics, staleness, time.perf_counter() - t0)


def check_update(learner_metrics: dict, bound: float, step: int) -> None:
    """The update must be finite: a nan loss or gradient norm has reached every weight through the
    optimizer step. And the learner and vLLM must score the sampled tokens under the same distribution:
    their mean per-token |logprob difference| over the tokens sampled with the learner's current weights
    stays under cluster.max_logprob_drift (a sampling setting, stale or misnamed weights). Either stops
    the run; a nan drift is a broken bound too."""
    from trajectory import InvariantError

    bad = {k: learner_metrics[k] for k in ("loss", "grad_norm") if not math.isfinite(learner_metrics.get(k, 0.0))}
    if bad:
        raise InvariantError(f"step {step}: the learner's update is not finite ({bad}): the weights are now "
                             "invalid; the run stops (the last checkpoint is from before this step)")
    drift = learner_metrics.get("logprob_drift_current", 0.0)
    if learner_metrics.get("tokens_current", 0) and not drift <= bound:
        raise InvariantError(f"step {step}: the learner's logprobs of the sampled tokens differ from vLLM's by "
                             f"{drift:.4g} per token (cluster.max_logprob_drift={bound:g}): the two sides score "
                             "different distributions")


def draw_round(job, state, step: int, prompts: int, refill: int = 0, taken: set | None = None):
    """The next ``prompts`` samples of the data stream as groups (ids unique within the step), their
    round started on the rollout workers with a seed fixed by (train.seed, step, refill)."""
    from trajectory import make_groups

    groups, renamed = make_groups(job.data.next_batch(prompts), step, set(taken or ()))
    seed = job.cfg.train.seed * 1_000_003 + step * 101 + refill * 10_007
    return job.rollouts.round(groups, seed, state.version, metrics={"batch/renamed_ids": renamed})


def trainable(groups: list, dynamic_sampling: bool) -> tuple[list, Counter]:
    """(groups to train, dropped groups counted by reason): ``no_answers`` (the prompt did not fit
    rollout.max_model_len), ``tied`` (dynamic sampling: all G rewards equal)."""
    kept, dropped = [], Counter()
    for g in groups:
        if not g.answers:
            dropped["no_answers"] += 1
        elif dynamic_sampling and not g.informative():
            dropped["tied"] += 1
        else:
            kept.append(g)
    return kept, dropped


def step_metrics(job, state, trained: list, generated: list, learner_metrics: dict, metrics: dict,
                 staleness: int, seconds: float) -> dict:
    """Everything one step logs: rewards over every group generated and over the trained ones, advantages,
    the learner's numbers, stage times, throughput, weight version, staleness, reward pool throughput and
    queueing, dataset rows skipped so far (``metrics`` holds the rounds': pool sizes, redone chunks,
    dropped and renamed groups)."""
    from trajectory import batch_metrics

    out = {**batch_metrics(trained, generated), **learner_metrics, **metrics}
    pool = job.reward_pool.stats(reset=True)
    out.update({"time/step": seconds, "perf/samples_per_s": out["batch/sequences"] / seconds,
                "perf/tokens_per_s": learner_metrics.get("tokens", 0) / seconds,
                "weight_version": state.version, "rollout/staleness": staleness,
                # which prompts this step trained on, as a number MLflow can plot (resume checks)
                "batch/ids_crc": zlib.crc32(",".join(g.sample.id for g in trained).encode()) % 2**24,
                "pool/reward_samples_per_s": pool["samples_per_s"], "pool/queued_groups": pool["queued_groups"],
                "pool/idle_workers": pool["idle_workers"], **job.data.skipped_metrics()})
    return out


if __name__ == "__main__":
    sys.exit(main())
