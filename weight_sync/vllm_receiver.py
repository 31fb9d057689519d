"""The engine's side, inside vLLM's worker: methods ``llm.collective_rpc("name", ...)`` calls by name.

vLLM mixes this class into its worker (CPUWorker, Worker) when the engine is built with it as
``worker_extension_cls`` (the rollout engine's subclass ``rollout.vllm_extension.RolloutExtension``):
``self.get_model()`` and ``self.vllm_config`` are vLLM's. Names must not collide with the worker's own
(vLLM asserts it), hence ``begin_weight_load``/``end_weight_load``, not vLLM's
``start/finish_weight_update``. One update is a vLLM "layerwise reload" session (the contract's update
session):

    begin_weight_load()          every layer's weights move aside; loaders buffer
    load_weights(bucket) x N     a layer is rebuilt in its original storage once all its tensors arrived
    end_weight_load(version)     layers that received nothing keep their old weights

vLLM's Qwen2.5-VL name mapper takes both name layouts (``named_parameters()``'s and the checkpoint's)
and fuses q/k/v and gate/up itself. The collective path runs the same session over the buckets as they
arrive from the broadcast group: ``join_weight_group`` once per membership, ``receive_weights`` per sync.
"""
from __future__ import annotations

import torch
from vllm.config import set_current_vllm_config
from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

from engine_logs import filter_expected_engine_warnings
from weight_sync.buckets import from_bytes


class WeightSyncExtension:
    """Mixed into vLLM's worker; see the module docstring for the session protocol."""
    _weight_group = None  # the broadcast group's member (collective path)
    _loaded_weight_version = 0  # 0: the weights the engine started with

    def begin_weight_load(self) -> None:
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.get_model())

    @torch.no_grad()
    def load_weights(self, bucket: list[tuple[str, torch.Tensor]] | bytes) -> int:
        """Loads one bucket of HF-named tensors; returns how many tensors it held. ``bytes``: a safetensors
        blob, for an engine in other processes, whose RPC cannot carry tensors ("cannot pickle memoryview
        objects"); an in-process engine takes the tensors as they are, without a copy."""
        if isinstance(bucket, (bytes, bytearray)):
            bucket = from_bytes(bucket)
        with set_current_vllm_config(self.vllm_config):
            self.get_model().load_weights(bucket)
        return len(bucket)

    def end_weight_load(self, version: int) -> None:
        # vLLM warns "Failed to load weights" for every layer that received nothing: the documented case
        # (frozen sub-models are not pushed and keep their weights), filtered in this process
        # (engine_logs.py). A layer that received only part of its tensors is not covered by this.
        filter_expected_engine_warnings()
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self.get_model(), self.vllm_config.model_config)
        self._loaded_weight_version = version

    def weight_version(self) -> int:
        return self._loaded_weight_version

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
        return None if self._weight_group is None else self._weight_group.epoch

    def receive_weights(self, plan: list, version: int) -> list[int]:
        """Every bucket of ``plan`` received and loaded in one session; returns the buckets' checksums.
        On failure (a peer hung or died) the group is dropped, the session closed and the error raised:
        the layers it touched hold mixed weights until the driver's next full update."""
        if self._weight_group is None:
            raise RuntimeError("receive_weights: this vLLM worker is in no broadcast group (restarted since "
                               "the group was built)")
        self.begin_weight_load()
        sums = []
        try:
            for bucket in plan:
                tensors, total = self._weight_group.receive(bucket)
                sums.append(total)
                self.load_weights(tensors)
        except BaseException:
            self._weight_group = None
            self.end_weight_load(-1)
            raise
        self.end_weight_load(version)
        return sums
