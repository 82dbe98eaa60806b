"""Checkpoints: the training-checkpoint layout (`layout`) and Hugging Face import/export (`hf`)."""
