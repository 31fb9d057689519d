"""Learner side of GRPO: grpo.py (the loss math), batch.py (model inputs, token logprobs),
weights.py (checkpoint names, buckets, safetensors), learner.py (one DeepSpeed rank)."""
