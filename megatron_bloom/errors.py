"""User-facing errors: a mistake in a config, a flag or a file becomes one clear paragraph, never a traceback."""

from __future__ import annotations

import functools
import sys
import textwrap
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """Something the user can fix (a flag, a config value, a file). Printed without a traceback."""


class ConfigError(UserError):
    """A config value is invalid or inconsistent with another one."""


def exit_on_user_error(program: str) -> Callable[[F], F]:
    """Decorate a console-script `main`: a `UserError` prints `program: error: ...` and exits with status 2."""

    def decorate(main: F) -> F:
        @functools.wraps(main)
        def wrapped(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except UserError as error:
                message = textwrap.fill(str(error), width=100, break_long_words=False,
                                        break_on_hyphens=False)
                print(f"{program}: error: {message}", file=sys.stderr)
                sys.exit(2)

        return wrapped  # type: ignore[return-value]

    return decorate
