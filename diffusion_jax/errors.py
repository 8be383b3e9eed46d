"""Errors a user can fix, as opposed to bugs.

The command line (main.py) ends a run that raises a `UserError` with its
message as one last line of stderr and exit code 2, without a traceback
(unless --verbosity=1); anything else is a bug and keeps its traceback.
Messages name the config key or path, the value, and what would work.
"""


class UserError(Exception):
  """Bad config, data, checkpoints or a diverged run; the message says what
  to do."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message names the key."""


def one_line(message: str, limit: int = 600) -> str:
  """A message on one line, cut at `limit` characters (library errors can
  embed whole TensorStore specs)."""
  text = ' '.join(str(message).split())
  return text if len(text) <= limit else text[:limit - 3] + '...'
