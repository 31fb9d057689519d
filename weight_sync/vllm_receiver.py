"""Weight loading inside vLLM's worker: methods that `llm.collective_rpc("name", ...)` calls by name.

vLLM mixes this class into its worker class when the engine is built with
``worker_extension_cls="weight_sync.vllm_receiver.WeightSyncExtension"``, so ``self`` here is vLLM's
worker (CPUWorker on CPU, Worker on GPU): ``self.get_model()``, ``self.vllm_config`` are vLLM's.
Method names must not collide with the worker's own (vLLM asserts this at start-up), which is why
these are ``begin_weight_load``/``end_weight_load`` and not vLLM's ``start/finish_weight_update``.

One update is a session (vLLM's "layerwise reload"), driven by ``RolloutWorker.load_weights`` /
``commit_weights``:

    begin_weight_load()                  every layer's weights move aside; loaders buffer
    load_weights(bucket)  x N            HF-named tensors; a layer is rebuilt and copied back into
                                         its original storage as soon as all its tensors arrived
    end_weight_load(version)             layers that received nothing keep their old weights

A session may span any number of buckets in any order, but each decoder layer must receive all of
its tensors (q, k and v; gate and up) within the session or none of them: a layer that got only
some would be finalised with uninitialised memory for the rest. Pushing the whole model, or whole
sub-models (e.g. only the language model when the vision tower is frozen), is always safe.

Names are Hugging Face checkpoint names, either layout: transformers 5 ``named_parameters()``
(``model.language_model.layers.0...``, ``model.visual...``, ``lm_head.weight``) or the saved
checkpoint's (``model.layers.0...``, ``visual...``); vLLM's Qwen2.5-VL name mapper takes both and
fuses q/k/v and gate/up itself.

The same session takes buckets from the broadcast group (``rollout.weight_sync=collective``,
weight_sync/group.py): ``join_weight_group`` once per membership, then ``receive_weights`` per sync
runs the whole session with the buckets as they arrive.
"""
from __future__ import annotations

import torch

from engine_logs import filter_expected_engine_warnings
from weight_sync.buckets import from_bytes


class WeightSyncExtension:
    """Mixed into vLLM's worker; see the module docstring for the session protocol."""

    def begin_weight_load(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.get_model())

    @torch.no_grad()
    def load_weights(self, bucket: list[tuple[str, torch.Tensor]] | bytes) -> int:
        """Loads one bucket of HF-named tensors; returns how many tensors it held.

        ``bytes`` is a safetensors blob (``safetensors.torch.save``): used when the engine runs in
        other processes, where vLLM's RPC cannot carry tensors (it fails with "cannot pickle
        memoryview objects"); an in-process engine takes the tensors as they are, without a copy.
        """
        from vllm.config import set_current_vllm_config

        if isinstance(bucket, (bytes, bytearray)):
            bucket = from_bytes(bucket)
        with set_current_vllm_config(self.vllm_config):
            self.get_model().load_weights(bucket)
        return len(bucket)

    def end_weight_load(self, version: int) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        # vLLM warns "Failed to load weights" for every layer that received nothing: here the documented
        # case (frozen sub-models are not pushed and keep their weights), filtered (engine_logs.py;
        # this may be vLLM's engine process, not the actor's). A layer that received only part of its
        # tensors is not covered by this.
        filter_expected_engine_warnings()
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self.get_model(), self.vllm_config.model_config)
        self._loaded_weight_version = version

    # -- collective path (weight_sync/group.py) ----------------------------------------------------
    def join_weight_group(self, address: str, port: int, rank_offset: int, world_size: int, timeout_s: float,
                          epoch: int) -> None:
        """Joins the broadcast group as rank ``rank_offset`` + this worker's tensor-parallel rank; blocks
        until every member joined (the driver calls all members at once)."""
        from vllm.distributed import get_tensor_model_parallel_rank

        from weight_sync.group import WeightGroup

        self._weight_group = None  # a previous membership's group is dropped first
        self._weight_group = WeightGroup(address, port, rank_offset + get_tensor_model_parallel_rank(),
                                         world_size, timeout_s, epoch, self.device)

    def weight_group_epoch(self) -> int | None:
        group = getattr(self, "_weight_group", None)
        return None if group is None else group.epoch

    def receive_weights(self, plan: list, version: int) -> list[int]:
        """One whole update from the broadcast group: every bucket of ``plan`` (lists of (name, dtype,
        shape), in send order) received and loaded in one session; returns the buckets' checksums.
        On failure (a peer hung or died) the group is dropped and the session closed, and the error
        raised: the layers it touched hold mixed weights until the driver's next full update."""
        group = getattr(self, "_weight_group", None)
        if group is None:
            raise RuntimeError("receive_weights: this vLLM worker is in no broadcast group (restarted since "
                               "the group was built)")
        self.begin_weight_load()
        sums = []
        try:
            for bucket in plan:
                tensors, total = group.receive(bucket)
                sums.append(total)
                self.load_weights(tensors)
        except BaseException:
            self._weight_group = None
            self.end_weight_load(-1)
            raise
        self.end_weight_load(version)
        return sums

    def reseed(self, seed: int) -> None:
        """Reseeds the generators the sampler draws from when requests carry no seed of their own."""
        import random

        import numpy as np

        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def weight_version(self) -> int:
        """Version passed to the last ``end_weight_load`` (0: the weights the engine started with)."""
        return getattr(self, "_loaded_weight_version", 0)
