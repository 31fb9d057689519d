"""Learner side of GRPO: grpo.py (the loss math), batch.py (model inputs, token logprobs), engine.py
(process group, DeepSpeed engines, optimizer groups, learning-rate schedule), forward.py (vision
features and logprobs of a micro-batch), export.py (HF directories), learner.py (one rank). No Ray."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed picks an accelerator
