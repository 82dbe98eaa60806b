"""User-facing errors: a mistake in a config, a flag or a file is raised as a `UserError`, which every
command prints as one clear paragraph, never a traceback (`cli/errors.py`, `exit_on_user_error`)."""


class UserError(Exception):
    """Something the user can fix (a flag, a config value, a file). Printed without a traceback."""


class ConfigError(UserError):
    """A config value is invalid or inconsistent with another one."""
