"""Command lines made of Hydra overrides (`key=value`), as `mbloom-train`, `-eval`, `-generate` take."""

from __future__ import annotations

import sys
from typing import List, Optional, Sequence

from megatron_bloom.errors import UserError


def parse_overrides(argv: Optional[Sequence[str]], program: str, usage: str) -> List[str]:
    """The overrides of a command line; `-h`/`--help` prints `usage` and exits; anything else is refused."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in args):
        print(f"usage: {program} {usage}")
        sys.exit(0)
    bad = [arg for arg in args if "=" not in arg or arg.startswith("-")]
    if bad:
        raise UserError(f"{program} takes Hydra overrides of the form key=value; cannot read "
                        f"{' '.join(bad)}. Example: {program} {usage}")
    return args
