"""Training: configuration, learning-rate schedule, checkpoints, metrics and the loop."""
