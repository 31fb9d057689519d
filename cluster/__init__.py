"""Everything that knows about Ray: connecting, placing actors, the streaming rollout->reward hand-off,
weight broadcast between learner and rollout actors, and MLflow tracking of the driver."""
