"""Rollout: a vLLM engine that samples answer groups and takes the learner's weights (worker.py), and
the protocol that turns a group's answers into its next turn or "done" (protocol.py). No Ray here."""
