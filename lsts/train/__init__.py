"""The training loop and its parts: data pipeline, checkpoints, metrics."""
