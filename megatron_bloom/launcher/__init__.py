"""Starting training jobs: validated commands for torchrun, the deepspeed launcher and SLURM, and sweeps."""
