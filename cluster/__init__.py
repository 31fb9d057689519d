"""Everything that knows about Ray: the job (set-up, checkpoints, operators' requests), the actor groups
behind plain methods (learner ranks, rollout engines with their rounds and weight sync, the reward
pool), placement, and MLflow tracking of the driver."""
