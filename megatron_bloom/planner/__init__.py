"""`mbloom-plan`'s arithmetic: parameters, memory per rank, FLOPs and pipeline bubble of a config, and the
accelerators to hold them against. No processes, no weights."""
