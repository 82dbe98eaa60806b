"""Where megatron_bloom relies on a library beyond its public API: DeepSpeed's engine, optimizer wrappers,
pipeline module and checkpoint files (`fence/deepspeed.py`). Nothing else in the code base touches them;
tests/test_deepspeed_internals.py checks each one against the installed DeepSpeed."""
