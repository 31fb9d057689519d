"""A training job on Ray: its set-up, checkpoints, learner recovery and tear-down. launch.py holds the
algorithm and the loop's state (cluster/state.py); this holds everything around it.

    job, state = Job.start(cfg, resume=None)   # data, policy, Ray, actors; a checkpoint's state
    job.save_checkpoint(state)
    state = job.recover(lost, state)           # a learner rank died: the state to continue from
    job.shutdown()
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.exceptions import RayError

from cluster import checkpoint
from cluster.controller import NAMESPACE, start_controller
from cluster.learners import LearnerGroup, LearnerLost
from cluster.operations import Operations
from cluster.plan import check as check_plan
from cluster.reward_pool import RewardPool
from cluster.rollout import CompletedRound, RolloutGroup, RolloutRound
from cluster.state import TrainState
from cluster.topology import format_topology
from config import REPO, Config
from data.dataset import ParquetSource, Sample
from data.prepare import held_out_samples, log_shared_content, prepare_data
from policy.family import pixels_per_unit
from policy.prepare import prepare_policy, reference_tokenizer
from policy.prompt import chat_prompt
from trajectory import LearnerSequence

log = logging.getLogger(__name__)

# What stops a job with one line in the log and exit code 1 (launch.py), rather than a traceback.
STOPPING_ERRORS = (TimeoutError, RuntimeError, FileNotFoundError, RayError)


def connect(cfg: Config) -> str:
    """Join the Ray cluster the job runs on, else start a local one sized for the configured actors.

    Inside ``ray job submit`` RAY_ADDRESS is set and we join that cluster; ``cluster.address`` forces an
    address. Otherwise a local Ray starts with logical CPUs for twice the configured actors (room to
    scale; actors time-share the physical cores, their torch thread counts are set per actor).
    """
    if ray.is_initialized():
        return "existing"
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env(), log_to_driver=True, namespace=NAMESPACE)
        return address
    c = cfg.cluster
    need = (c.rollout_workers * c.rollout.num_cpus + c.reward_workers * c.reward.num_cpus
            + c.learner_ranks * c.learner.num_cpus)
    ray.init(address="local", num_cpus=max(2 * int(need + 0.999), os.cpu_count() or 1), include_dashboard=False,
             runtime_env=runtime_env(), log_to_driver=True, namespace=NAMESPACE)
    return "local"


def runtime_env() -> dict:
    """What every actor of the job needs in its environment (the repo on its path, quiet vLLM)."""
    return {"env_vars": {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "TOKENIZERS_PARALLELISM": "false",
        # vLLM's per-request INFO lines drown the progress bar; VLLM_LOGGING_LEVEL=INFO brings them back.
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}}


def parity_probe(sample: Sample, policy_path: str, cfg: Config) -> dict:
    """The fixed sequence of the post-sync parity check: a prompt and its reference answer (the training
    file's first row)."""
    size, rules, coordinates = cfg.model.image_size, cfg.reward.rules, cfg.reward.coordinates
    answer = sample.reference_answer(size, rules, pixels_per_unit(coordinates, size))
    image, ids = sample.model_image(size), reference_tokenizer(policy_path)(answer)
    return {"problem": sample.problem, "image": image, "response_ids": ids,
            "sequence": LearnerSequence(chat_prompt(sample.problem, rules, coordinates), image, ids)}


@dataclass
class Job:
    cfg: Config
    out: Path
    policy_path: str
    data: ParquetSource
    eval_samples: dict[str, list[Sample]]  # held-out split (val, eval = test, ood) -> its evaluated rows
    learners: LearnerGroup
    rollouts: RolloutGroup
    reward_pool: RewardPool
    controller: object
    where: str
    ops: Operations
    start_data: dict          # the data stream's position at the start (recovery before any checkpoint)
    checkpoint: Path | None = None  # the last one written or restored: where a learner restart goes back to

    @property
    def warm_start_dir(self) -> Path:
        return self.out / "warm_start_policy"

    @property
    def best_dir(self) -> Path:
        return self.out / "best_policy"

    @classmethod
    def start(cls, cfg: Config, resume: str | None = None) -> tuple["Job", TrainState]:
        """Data, policy, Ray and every actor; with ``resume`` ("" = the latest), the checkpoint restored.
        Returns the job and the loop's state to start from."""
        out = Path(cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        ckpt = checkpoint.resolve(resume or None, out) if resume is not None else None  # fail before start-up
        log.info("outputs: %s", out.resolve())
        if "runtime_resources" in str(out.resolve()):
            log.warning("train.output_dir is inside the Ray job's temporary working dir; set train.output_dir="
                        "/an/absolute/path (and tracking.mlflow_uri) to keep checkpoints and the MLflow store")
        policy_path = prepare_policy(cfg)
        for warning in check_plan(cfg, policy_path).warnings:  # stops here when the job cannot run
            log.warning("plan: %s (python -m cluster.plan prints the whole plan)", warning)
        train_path, held_out = prepare_data(cfg)
        log_shared_content(train_path, held_out)
        eval_samples = {role: held_out_samples(path, cfg.eval.num_samples) for role, path in held_out.items()}
        data = ParquetSource(train_path, seed=cfg.train.seed, shuffle=cfg.data.shuffle)

        where = connect(cfg)
        log.info("ray: %s, resources %s", where, ray.cluster_resources())
        controller = start_controller(cfg.cluster.job_name)
        learners = LearnerGroup(cfg, policy_path)
        reward_pool = RewardPool(cfg.reward, cfg.cluster.reward_workers, cfg.cluster.reward.model_dump(),
                                 cfg.cluster.call_timeout_s, startup_timeout_s=cfg.cluster.startup_timeout_s)
        probe = parity_probe(held_out_samples(train_path, 1)[0], policy_path, cfg) if cfg.cluster.sync_parity_check \
            else None
        rollouts = RolloutGroup(cfg, policy_path, reward_pool, cfg.cluster.rollout_workers, probe)
        t0 = time.perf_counter()
        learners.ready()
        rollouts.ready()
        ops = Operations(cfg, controller, learners, rollouts, reward_pool)
        job = cls(cfg, out, policy_path, data, eval_samples, learners, rollouts, reward_pool, controller, where, ops,
                  data.state_dict())
        ops.refresh_topology(wait_s=cfg.cluster.startup_timeout_s)
        log.info("actors ready in %.1f s on %d node(s); topology:\n%s", time.perf_counter() - t0, len(ops.nodes),
                 format_topology(ops.places))
        if cfg.reward.mask_iou != "off" and cfg.reward.segmenter == "grabcut":
            log.info("mask reward: OpenCV GrabCut (weight-free stand-in for SAM2; set reward.segmenter=sam2 "
                     "reward.sam2_checkpoint=PATH for production masks)")
        return job, (job.restore(ckpt) if ckpt is not None else TrainState())

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, state: TrainState) -> Path:
        """Learner, loop state and operations now; a pending off-policy round is finished and stored with
        it, so a resumed job trains the next step on exactly those answers."""
        saved = {**state.saved(), "data": self.data.state_dict(), "versions": sorted(self.rollouts.versions),
                 "operations": self.ops.saved()}
        path = checkpoint.save(self.out, state.run_id, state.step, self.learners.save_checkpoint, saved,
                               self.cfg.train.keep_checkpoints)
        self.checkpoint = path
        log.info("checkpoint: %s", path)
        return path

    def restore(self, ckpt: Path) -> TrainState:
        """Learner state from DeepSpeed; the loop's state (step, versions, best, MLflow run, pending round),
        the data position, RNG and operations from the checkpoint; the rollout workers synced to it."""
        self.learners.load_checkpoint(ckpt)
        self.checkpoint = ckpt
        saved = checkpoint.load_driver_state(ckpt)
        self.data.load_state_dict(saved["data"])
        self.rollouts.versions = {0, *saved.get("versions", ())}  # in-job recovery: later versions are void
        self.ops.restore(saved.get("operations"))
        pending = CompletedRound(*saved["pending"]) if saved.get("pending") is not None else None
        state = TrainState(saved["step"], saved["sft_done"], saved["weight_version"], pending,
                           self._forget_best_of_later_steps(saved.get("best")), saved["mlflow_run_id"])
        self.rollouts.sync_from(self.learners, state.version)
        log.info("resumed from %s: step %d, warm-start steps %d, MLflow run %s", ckpt, state.step, state.sft_done,
                 state.run_id)
        if state.sft_done >= self.cfg.train.sft_steps > 0:  # past the warm start: its policy is the KL reference
            if self.warm_start_dir.exists():
                self.learners.set_reference(self.warm_start_dir)
            else:
                log.warning("%s is missing: the KL reference is the initial policy", self.warm_start_dir)
        return state

    def _start_again(self, run_id: str | None) -> TrainState:
        """No checkpoint yet: the fresh learner group holds the initial policy; the data stream goes back
        to where it started and the rollout workers get the initial weights (version 0 again)."""
        self.data.load_state_dict(self.start_data)
        self.rollouts.versions = {0}
        self.rollouts.sync_from(self.learners, 0)
        log.info("no checkpoint yet: starting again from the initial policy")
        return TrainState(best=self._forget_best_of_later_steps(None), run_id=run_id)

    def _forget_best_of_later_steps(self, best: dict | None) -> dict | None:
        """After going back to a checkpoint, ``best_dir`` may hold a policy of the steps after it, which
        are redone differently: it is removed unless it is the checkpoint's own best. Returns the best
        to continue with."""
        on_disk = self.best_dir / "best.json"
        saved = json.loads(on_disk.read_text()) if on_disk.exists() else None
        if self.best_dir.exists() and (saved is None or best is None or saved.get("step") != best["step"]):
            log.warning("%s is from step %s, not the checkpoint's best (step %s): removed (the next evaluations "
                        "choose anew)", self.best_dir, (saved or {}).get("step"), (best or {}).get("step"))
            shutil.rmtree(self.best_dir)
            return None
        return None if saved is None else best

    def keep_if_best(self, best: dict | None, step: int, results: dict[str, dict]) -> dict | None:
        """Exports the current policy to ``best_dir`` when this evaluation's validation gIoU beats every
        earlier one (eval.keep_best); returns the best evaluation so far: its step, val gIoU (``giou``),
        and the test (``eval_*``) and OOD (``ood_*``) gIoU of the same policy, reported, never compared."""
        val = results.get("val")
        if not (self.cfg.eval.keep_best and val) or (best and val["giou_segzero"] <= best["giou"]):
            return best
        best = {"step": step, "giou": val["giou_segzero"], "giou_se": val["giou_segzero_se"], "rows": val["n"]}
        for role in ("eval", "ood"):
            if results.get(role):
                best.update({f"{role}_giou": results[role]["giou_segzero"],
                             f"{role}_giou_se": results[role]["giou_segzero_se"]})
        (self.best_dir / "best.json").unlink(missing_ok=True)  # written last: an export cut short is not kept
        self.learners.export_hf(self.best_dir)
        (self.best_dir / "best.json").write_text(json.dumps(best, indent=2))
        log.info("best policy so far: step %d, validation gIoU %.4f -> %s", step, best["giou"], self.best_dir)
        return best

    # -- learner recovery -------------------------------------------------------------------------
    def recover(self, lost: LearnerLost, state: TrainState) -> TrainState:
        """A learner rank died (in the warm start, a GRPO step, an evaluation or the final export): the
        group restarts from this run's latest checkpoint (step, data position, weights, optimizer, the
        pending off-policy round), or from the initial policy when there is none yet; the rollout workers
        get its weights, and the job goes on in the same MLflow run from the returned state. Bounded by
        cluster.max_learner_restarts."""
        limit, ckpt = self.cfg.cluster.max_learner_restarts, self.checkpoint
        self.ops.learner_restarts += 1
        if self.ops.learner_restarts > limit:
            raise RuntimeError(f"{lost}; the learner group was restarted {limit} time(s) already "
                               "(cluster.max_learner_restarts)") from lost
        t0, failed_step = time.perf_counter(), state.step
        if isinstance(state.pending, RolloutRound):  # made with weights that are about to be void
            state.pending.abandon()
        self.reward_pool.discard_all()  # the failed step's rounds (refills included): their ids come again
        self.reward_pool.stats(reset=True)  # the dropped work counts for no step
        log.warning("%s at step %d; restarting the learner group from %s", lost, failed_step, ckpt or "the start")
        while True:
            try:
                self.learners.restart()
                # collective weight sync: a new sender, so a new broadcast group
                state = self.restore(ckpt) if ckpt is not None else self._start_again(state.run_id)
                break
            except Exception as exc:  # a rank lost again while restarting: again, within the bound
                again = self.learners.lost(exc)
                if again is None:
                    raise
                self.ops.learner_restarts += 1
                if self.ops.learner_restarts > limit:
                    raise RuntimeError(f"{again}, while restarting the learner group; restarted {limit} time(s) "
                                       "already (cluster.max_learner_restarts)") from again
                log.warning("%s while restarting the learner group; restarting it again", again)
        self.ops.refresh_topology()
        self.ops.event(failed_step, "learner_restart", checkpoint=str(ckpt), resumes_at=state.step + 1,
                       steps_redone=failed_step - state.step, seconds=round(time.perf_counter() - t0, 1),
                       cause=str(lost))
        return state

    def shutdown(self) -> None:
        """Every actor of the job killed, its placement groups removed; a local Ray stopped."""
        for stop in (self.rollouts.shutdown, self.reward_pool.shutdown, self.learners.shutdown):
            try:
                stop()
            except Exception as exc:  # tearing down must not hide the error that ended the job
                log.warning("shutdown: %s", exc)
        ray.kill(self.controller)
        if self.where == "local":
            ray.shutdown()
