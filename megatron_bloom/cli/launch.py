"""`mbloom-launch`: start training the way the config says (`launcher=local | deepspeed | slurm`), one job
or a Hydra-style sweep, after checking everything a job would refuse.

    mbloom-launch [--dry-run] model=bloom-tiny data.paths=[data/corpus] parallel.tp=2 parallel.pp=2
    mbloom-launch --multirun optim.lr=1e-4,3e-4 parallel.tp=1,2 ...          (4 jobs, one after another)
    mbloom-launch launcher=slurm slurm.nodes=4 slurm.partition=gpu ...       (writes the sbatch script, submits)

`local` runs torchrun on this machine (tp x pp x dp processes, or launcher.nproc_per_node), `deepspeed`
the deepspeed launcher, `slurm` writes `launch/slurm/train.sbatch` with `#SBATCH` lines from `slurm.*`
into the run dir and submits it. `--dry-run` prints the command (or the script) and starts nothing.
With `--multirun`, every combination of the comma-separated values is its own job in `run.dir/<number>`;
locally they run in turn (output in each run dir's `launch.log`), on SLURM they are queued together and
followed; a table of what each reached ends the sweep and `run.dir/summary.jsonl` keeps it.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from megatron_bloom.cli.arguments import parse_command_line
from megatron_bloom.cli.errors import exit_on_user_error
from megatron_bloom.launcher.run import launch

USAGE = "[--dry-run] [--multirun] [launcher=local|deepspeed|slurm] model=... data.paths=[...] key=value ..."
SWITCHES = ("--dry-run", "--multirun", "-m")  # flags besides the overrides


@exit_on_user_error("mbloom-launch")
def main(argv: Optional[Sequence[str]] = None) -> None:
    overrides, flags = parse_command_line(argv, "mbloom-launch", USAGE, switches=SWITCHES,
                                          description=__doc__)
    status = launch(overrides, dry_run=bool(flags.get("--dry-run")),
                    multirun=bool(flags.get("--multirun") or flags.get("-m")))
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
