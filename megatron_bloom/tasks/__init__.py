"""Fine-tuning tasks on the BLOOM heads: their data formats, model inputs and metrics."""
