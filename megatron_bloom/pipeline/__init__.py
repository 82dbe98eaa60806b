"""Pipeline parallelism: BLOOM as DeepSpeed pipeline stages (tied embeddings, 1F1B), or stacked at pp = 1."""
