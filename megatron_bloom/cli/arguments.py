"""Command lines of Hydra overrides (`key=value`), as `mbloom-train`, `-eval`, `-generate`, `-launch` and `-plan`
take, with the few `--flags` a command adds. (A user's mistake is printed by `megatron_bloom.cli.errors`.)"""

from __future__ import annotations

import sys
from typing import Dict, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from megatron_bloom.checkpoint.layout import read_metadata
from megatron_bloom.config import TrainConfig, compose_dictconfig, load_config
from megatron_bloom.errors import UserError

def parse_command_line(argv: Optional[Sequence[str]], program: str, usage: str, switches: Sequence[str] = (),
                       options: Sequence[str] = (), description: str = "") -> Tuple[List[str], Dict[str, object]]:
    """(overrides, flags): `switches` are `--name` flags (True when given), `options` take a value
    (`--name VALUE` or `--name=VALUE`). `-h`/`--help` prints `usage` and `description`, and exits;
    anything else that is not key=value is refused in one paragraph."""
    args = list(sys.argv[1:] if argv is None else argv)
    overrides: List[str] = []
    flags: Dict[str, object] = {}
    while args:
        arg = args.pop(0)
        name = arg.split("=", 1)[0]
        if arg in ("-h", "--help"):
            from megatron_bloom.config.reference import render_help  # reads the schema's source: only for help

            print(f"usage: {program} {usage}" + (f"\n\n{description}" if description else "") + "\n\n"
                  + render_help())
            sys.exit(0)
        elif arg in switches:
            flags[arg] = True
        elif name in options:
            if "=" not in arg and not args:
                raise UserError(f"{name} needs a value. Usage: {program} {usage}")
            flags[name] = arg.split("=", 1)[1] if "=" in arg else args.pop(0)
        elif arg.startswith("-") or "=" not in arg:
            accepted = ", ".join([*switches, *(f"{option} VALUE" for option in options)])
            raise UserError(f"{program} takes {accepted + ' and ' if accepted else ''}Hydra overrides of the form "
                            f"key=value; cannot read {arg!r}. Usage: {program} {usage}")
        else:
            overrides.append(arg)
    return overrides, flags


def parse_overrides(argv: Optional[Sequence[str]], program: str, usage: str) -> List[str]:
    """The overrides of a command line that takes nothing else."""
    return parse_command_line(argv, program, usage)[0]


def checkpoint_command_config(overrides: Sequence[str], program: str, usage: str, required: Sequence[str],
                              one_of: Sequence[str] = ()) -> TrainConfig:
    """The config of a command that runs a checkpoint's model (mbloom-eval, -generate): the keys it needs
    are set (all of `required`, one of `one_of`), and the layout is validated against the checkpoint's
    model, not against the default preset."""
    raw = compose_dictconfig(overrides)
    missing = [key for key in ("checkpoint.load", *required) if not OmegaConf.select(raw, key)]
    if one_of and not any(OmegaConf.select(raw, key) for key in one_of):
        missing.append(" or ".join(one_of))
    if missing:
        raise UserError(f"{program} needs {', '.join(missing)}. Usage: {program} {usage}")
    return load_config(overrides, model=read_metadata(raw.checkpoint.load).model)
