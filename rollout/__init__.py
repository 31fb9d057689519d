"""Rollout: a vLLM engine that samples answer groups and takes the learner's weights, and the typed
step those groups travel in (group.py). No Ray here."""
