"""Training: the DeepSpeed engine from the config, the optimizer and schedule, the loop and its metrics."""
