"""The rollout engine's vLLM worker extension (``worker_extension_cls``): weight sync's receiving side
(weight_sync/vllm_receiver.py) and reseeding, methods ``llm.collective_rpc("name", ...)`` calls by name."""
from __future__ import annotations

import random

import numpy as np
import torch

from weight_sync.vllm_receiver import WeightSyncExtension


class RolloutExtension(WeightSyncExtension):
    def reseed(self, seed: int) -> None:
        """Reseeds the generators the sampler draws from when requests carry no seed of their own."""
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
