"""RolloutWorker: one vLLM engine that samples G answers per prompt and takes the learner's weights.

Plain Python (no Ray): a Ray actor in cluster/ holds one; tests and benchmarks build one directly.

    worker = RolloutWorker(cfg, policy_path, seed=0)
    groups = worker.generate([{"sample_id": "a", "problem": "the red square", "image": pil}], n=8)
    worker.update_weights(buckets, version=1)     # buckets: lists of (HF name, tensor)
    # or, streamed bucket by bucket (cluster/weight_sync.py):
    for bucket in buckets: worker.load_weights(bucket)
    worker.commit_weights(version=1)

On CPU the engine runs inside the calling process by default (rollout.engine_in_process): it starts
in ~5-15 s instead of ~55 s on 2 cores, spawns no processes, and weight tensors reach the model by
reference. It then decodes with torch's threads of the calling process: set them (e.g. to the
actor's CPU count) before generating. More threads than free cores is ruinous on CPU (measured on
a loaded 2-core machine: 2 threads 350 tok/s, 1 thread 2,400 tok/s); vLLM's own processes
(engine_in_process=false) bind one thread per core they own and decode at the same ~2,400 tok/s.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable

import torch

from config import Config
from engine_logs import filter_expected_engine_warnings
from policy.family import fixed_size
from policy.prompt import chat_prompt
from policy.sampling import SamplingRule
from weight_sync.buckets import to_bytes

log = logging.getLogger(__name__)

EXTENSION = "rollout.vllm_extension.RolloutExtension"


class RolloutWorker:
    def __init__(self, cfg: Config, policy_path: str, seed: int = 0):
        self.cfg = cfg
        self.weight_version = 0
        self._update_open = False
        self._warned_truncation = False
        r = cfg.rollout
        on_gpu = torch.cuda.is_available()
        # Must be set before vLLM reads it (engine construction); should an engine built earlier in this
        # process have left vLLM's environment cache on, it would keep that engine's value.
        from vllm import envs

        envs.disable_envs_cache()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if r.engine_in_process else "1"
        # vLLM's RPC carries tensors only within one process; otherwise buckets travel as bytes.
        self._tensors_by_reference = r.engine_in_process and r.tensor_parallel_size == 1
        args = engine_args(cfg, policy_path, seed, on_gpu)
        dtype = args["dtype"]
        filter_expected_engine_warnings()

        from vllm import LLM

        start = time.perf_counter()
        set_num_threads = torch.set_num_threads
        self.llm = LLM(**args)
        # vLLM's CPU worker turns torch.set_num_threads into a no-op to protect its thread binding;
        # in-process there is no binding, and the rest of this process keeps the real function.
        torch.set_num_threads = set_num_threads
        self.start_seconds = time.perf_counter() - start
        self.tokenizer = self.llm.get_tokenizer()
        # The distribution sampled from, as the learner scores it (vision placeholders banned, min tokens).
        self.rule = SamplingRule.of(self.tokenizer, policy_path, r.temperature, r.min_new_tokens)
        log.info("vLLM engine for %s ready in %.1f s (%s, %s, in_process=%s)", policy_path,
                 self.start_seconds, "GPU" if on_gpu else "CPU", dtype, r.engine_in_process)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: list[dict], n: int, max_new_tokens: int | None = None,
                 temperature: float | None = None, greedy: bool = False, seed: int | None = None) -> list[dict]:
        """n sampled answers per prompt ({"sample_id", "problem", "image": PIL at model size}).

        Returns one dict per prompt, in order: {"sample_id", "prompt" (chat text), "prompt_ids"
        (as vLLM tokenized it, image pads expanded), "responses": n x {"token_ids", "logprobs",
        "text", "finish_reason"}, "weight_version"}. A prompt longer than rollout.max_model_len
        gets "responses": [] and "prompt_ids": [] (logged), not an exception for the batch.
        ``token_ids`` end with <|im_end|> when the answer finished ("stop"). ``logprobs[t]`` = log p(token_t)
        under the distribution sampled from (vLLM's processed logprobs: logit bias, min tokens,
        temperature; policy/sampling.py), the quantity the learner recomputes. Greedy answers
        (evaluation) take the argmax with no minimum length.

        Randomness comes from the engine's generator: vLLM's CPU build crashes on per-request seeds
        ("CPU Generator does not use offset"), so none are set; ``seed`` reseeds the engine's workers
        before this batch instead, so that the same weights and prompts give the same answers (the
        driver passes one per step: a resumed run samples what the uninterrupted one did).
        """
        from vllm import SamplingParams

        if self._update_open:
            raise RuntimeError("a weight update is open: call commit_weights(version) before generating")
        if greedy and n != 1:
            raise ValueError(f"greedy decoding gives one answer per prompt: n must be 1, got {n}")
        if seed is not None:
            self.llm.collective_rpc("reseed", args=(seed,))
        r = self.cfg.rollout
        max_tokens = max_new_tokens or r.max_new_tokens
        rule = self.rule.vllm_kwargs(max_tokens)
        if greedy:
            rule.update(temperature=0.0, min_tokens=0)
        elif temperature is not None:
            rule["temperature"] = temperature
        params = SamplingParams(n=n, max_tokens=max_tokens, logprobs=0, **rule)
        texts = [chat_prompt(p["problem"], self.cfg.reward.rules, self.cfg.reward.coordinates) for p in prompts]
        fits = self._fits_context(texts, params.max_tokens)
        requests = [{"prompt": text, "multi_modal_data": {"image": p["image"]}}
                    for text, p, ok in zip(texts, prompts, fits) if ok]
        outputs = iter(self.llm.generate(requests, params, use_tqdm=False))
        results = []
        for p, text, ok in zip(prompts, texts, fits):
            out = next(outputs) if ok else None
            results.append({
                "sample_id": p["sample_id"],
                "prompt": text,
                "prompt_ids": list(out.prompt_token_ids) if ok else [],
                "responses": [{
                    "token_ids": list(c.token_ids),
                    "logprobs": [position[token].logprob for token, position in zip(c.token_ids, c.logprobs)],
                    "text": c.text,
                    "finish_reason": c.finish_reason,
                } for c in out.outputs] if ok else [],
                "weight_version": self.weight_version,
            })
        return results

    def _fits_context(self, texts: list[str], max_new_tokens: int) -> list[bool]:
        """False for prompts longer than max_model_len: vLLM would reject the whole batch for one
        of them, so they get no answers (responses == []) and a warning instead."""
        max_len = self.cfg.rollout.max_model_len
        # <|image_pad|> expands to one token per 28x28 pixels (14-px patches, 2x2 merge).
        image_tokens = (self.cfg.model.image_size // 28) ** 2
        fits = []
        for text in texts:
            length = len(self.tokenizer.encode(text, add_special_tokens=False)) - 1 + image_tokens
            fits.append(length < max_len)
            if length >= max_len:
                log.warning("prompt of %d tokens does not fit rollout.max_model_len=%d: no answers for it",
                            length, max_len)
            elif length + max_new_tokens > max_len and not self._warned_truncation:
                self._warned_truncation = True
                log.warning("prompt of %d tokens + max_new_tokens %d > rollout.max_model_len=%d: answers "
                            "are cut at %d tokens", length, max_new_tokens, max_len, max_len - length)
        return fits

    def probe_logprobs(self, prompt: dict, token_ids: list[int]) -> list[float]:
        """log p(token_ids[t] | prompt, token_ids[:t]) under vLLM's current weights (parity checks).

        Scores prompt + response as one prompt (prompt_logprobs) and keeps the response part.
        The prompt goes in as token ids with one <|image_pad|>, which vLLM expands as for text.
        """
        from vllm import SamplingParams

        text = chat_prompt(prompt["problem"], self.cfg.reward.rules, self.cfg.reward.coordinates)
        prompt_ids = self.tokenizer.encode(text, add_special_tokens=False)
        request = {"prompt_token_ids": prompt_ids + list(token_ids),
                   "multi_modal_data": {"image": prompt["image"]}}
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        scored = self.llm.generate([request], params, use_tqdm=False)[0].prompt_logprobs
        tail = scored[len(scored) - len(token_ids):]
        return [position[token].logprob for token, position in zip(token_ids, tail)]

    # ------------------------------------------------------------------ weights
    def load_weights(self, bucket: list[tuple[str, torch.Tensor]]) -> int:
        """Loads one bucket of HF-named tensors into vLLM (the first after a commit opens an update
        session, weight_sync/vllm_receiver.py); returns its size in bytes. No generating before
        ``commit_weights``."""
        if not self._update_open:
            self.llm.collective_rpc("begin_weight_load")
            self._update_open = True
        n_bytes = sum(t.numel() * t.element_size() for _, t in bucket)
        self.llm.collective_rpc("load_weights", args=(bucket if self._tensors_by_reference else to_bytes(bucket),))
        return n_bytes

    def commit_weights(self, version: int) -> int:
        """Ends the update and drops every cache computed with the old weights: prefix (KV), encoder (a
        stale one reuses old image embeddings) and multimodal processor caches. Returns ``version``."""
        if self._update_open:
            self.llm.collective_rpc("end_weight_load", args=(version,))
            self._update_open = False
        return self._serve(version)

    def update_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], version: int) -> int:
        """load_weights for every bucket, then commit_weights(version); returns the bytes loaded."""
        start = time.perf_counter()
        n_bytes = sum(self.load_weights(bucket) for bucket in buckets)
        self.commit_weights(version)
        log.info("weights v%d loaded: %.1f MB in %.2f s", version, n_bytes / 1e6, time.perf_counter() - start)
        return n_bytes

    def join_weight_group(self, address: str, port: int, rank_offset: int, world_size: int, timeout_s: float,
                          epoch: int) -> None:
        """Every vLLM worker process joins the broadcast group (ranks rank_offset + TP rank); blocks until
        every member joined."""
        self.llm.collective_rpc("join_weight_group", args=(address, port, rank_offset, world_size, timeout_s, epoch))

    def weight_group_epoch(self) -> int | None:
        """The membership epoch of the group every vLLM worker process is in (None: not all in one)."""
        epochs = set(self.llm.collective_rpc("weight_group_epoch"))
        return epochs.pop() if len(epochs) == 1 else None

    def receive_weights(self, plan: list, version: int) -> list[list[int]]:
        """One whole update from the broadcast group, then the caches dropped as in ``commit_weights``.
        Returns each vLLM worker process's bucket checksums, for the driver to compare with the sender's."""
        if self._update_open:
            raise RuntimeError("receive_weights: an RPC weight update is open")
        start = time.perf_counter()
        sums = self.llm.collective_rpc("receive_weights", args=(plan, version))
        self._serve(version)
        log.info("weights v%d received from the broadcast group in %.2f s", version, time.perf_counter() - start)
        return sums

    def _serve(self, version: int) -> int:
        """From now on answers come from ``version``: the caches computed with the old weights go."""
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_mm_cache()
        self.weight_version = version
        return version


def engine_args(cfg: Config, policy_path: str, seed: int, on_gpu: bool) -> dict:
    """vLLM's engine arguments for this config; ``on_gpu`` picks the GPU branch (tests force it on CPU and
    validate the result with vLLM's own EngineArgs, tests/test_rollout_engine_args.py)."""
    r = cfg.rollout
    args = dict(
        model=policy_path,
        dtype=cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if on_gpu else "float32"),
        seed=seed, enforce_eager=r.enforce_eager, max_model_len=r.max_model_len,
        tensor_parallel_size=r.tensor_parallel_size, limit_mm_per_prompt={"image": 1, "video": 0},
        # min = max = image_size^2, as the learner's processor: images arrive pre-resized to
        # image_size x image_size and neither side may resize them again.
        mm_processor_kwargs={"size": fixed_size(cfg.model.image_size)},
        worker_extension_cls=EXTENSION,
        # logprobs of the distribution sampled from (after the logit bias, min tokens and temperature),
        # what the learner computes (policy/sampling.py); raw logprobs would ignore all three
        logprobs_mode="processed_logprobs",
    )
    if on_gpu:
        args.update(gpu_memory_utilization=r.gpu_memory_utilization)
        if r.tensor_parallel_size > 1:  # TP workers as Ray actors in this engine's placement group
            args["distributed_executor_backend"] = "ray"
    else:
        # What VLLM_CPU_KVCACHE_SPACE sets, without the env var and with fractional GiB.
        args["kv_cache_memory_bytes"] = int(r.kv_cache_gib * 2**30)
    return args
