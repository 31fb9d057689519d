"""Weight loading inside vLLM's worker: methods that `llm.collective_rpc("name", ...)` calls by name.

vLLM mixes this class into its worker class when the engine is built with
``worker_extension_cls="rollout.vllm_extension.WeightSyncExtension"``, so ``self`` here is vLLM's
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

This is the host-memory path (CPU, or a GPU engine fed tensors by RPC). The GPU path is NCCL, at
the end of this file: its receiving side is vLLM's own weight-transfer engine, not these methods.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch


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
            from safetensors.torch import load

            bucket = list(load(bytes(bucket)).items())
        with set_current_vllm_config(self.vllm_config):
            self.get_model().load_weights(bucket)
        return len(bucket)

    def end_weight_load(self, version: int) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        # vLLM warns "Failed to load weights" for every layer that received nothing; here that is the
        # documented case (frozen sub-models are not pushed and keep their weights), so it is silenced
        # for this call only. A layer that received only part of its tensors is not covered by this.
        layerwise_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        level = layerwise_log.level
        layerwise_log.setLevel(logging.ERROR)
        try:
            with set_current_vllm_config(self.vllm_config):
                finalize_layerwise_reload(self.get_model(), self.vllm_config.model_config)
        finally:
            layerwise_log.setLevel(level)
        self._loaded_weight_version = version

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


# ---------------------------------------------------------------------- GPU path: NCCL broadcast
# GPU PATH, UNTESTED ON CPU (NCCL needs CUDA; the development machines have none).
#
# Learner rank 0 broadcasts HF-named tensors to every vLLM GPU worker. Receivers are vLLM 0.32's
# own NCCL weight-transfer engine (``WeightTransferConfig(backend="nccl")``, enabled by
# rollout.weight_sync=nccl), driven by ``RolloutWorker.init_weight_broadcast`` and
# ``RolloutWorker.receive_weight_broadcast``. The group is vLLM's StatelessProcessGroup +
# PyNcclCommunicator: it does not touch torch.distributed, so DeepSpeed's groups are unaffected.
#
#   group of world_size = 1 + rollout_workers * tensor_parallel_size ranks:
#     rank 0                          learner rank 0 (sender)
#     ranks 1 + i*tp .. i*tp + tp     rollout worker i's vLLM GPU workers (rank_offset = 1 + i*tp)
#
# Once, concurrently (each side blocks until all members joined):
#   learner rank 0: group = open_sender(addr, port, world_size)
#   rollout i:      worker.init_weight_broadcast(addr, port, 1 + i*tp, world_size)
# Each sync, concurrently:
#   learner rank 0: broadcast_weights(group, named_tensors)            # e.g. per ZeRO-3 gather bucket
#   rollout i:      worker.receive_weight_broadcast(metadata, version)  # metadata = tensor_metadata(...)
# The metadata lists every tensor of the update in send order. It is known before any gather (names,
# dtypes and full shapes of the learner's parameters), so one receive call covers all buckets.
# Other learner ranks take part only in their own ZeRO gathers.


def tensor_metadata(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, str, list[int]]]:
    """[(name, dtype name, full shape)] in send order: what receive_weight_broadcast expects."""
    return [(name, str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in named_tensors]


def open_sender(master_address: str, master_port: int, world_size: int):
    """Learner rank 0 joins the group as rank 0 on its current CUDA device; returns the communicator."""
    from vllm.distributed.weight_transfer.nccl_common import trainer_init

    return trainer_init({"master_address": master_address, "master_port": master_port,
                         "world_size": world_size}, rank=0)


def broadcast_weights(group, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Sends each tensor (already gathered to full shape, on this GPU) in metadata order."""
    stream = torch.cuda.current_stream()
    for _, tensor in named_tensors:
        # NCCL reads numel elements from data_ptr(): a non-contiguous view would send garbage.
        group.broadcast(tensor.contiguous(), src=0, stream=stream)
    stream.synchronize()
