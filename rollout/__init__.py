"""Rollout: a vLLM engine that samples answer groups and takes the learner's weights (no Ray here)."""
