"""Running a trained model: loss and perplexity on documents, a fine-tuned head's task metrics, and text
generation with a KV cache (what `mbloom-eval` and `mbloom-generate` do, at any tensor-parallel size)."""
