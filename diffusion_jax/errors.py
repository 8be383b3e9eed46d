"""Errors a user can fix, as opposed to bugs.

The command line (main.py) ends a run that raises a `UserError` with its
message as one last line of stderr and exit code 2, without a traceback
(unless --verbosity=1); anything else is a bug and keeps its traceback.
Messages name the config key or path, the value, and what would work.
"""

import os
import sys

from absl import logging


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


def exit_now(code: int, last_line: str | None = None):
  """Ends the process now, `last_line` the last thing on stderr: os._exit,
  so no library thread (Orbax's clean-up, prefetchers) prints after it."""
  logging.flush()
  sys.stdout.flush()
  if last_line:
    sys.stderr.write(last_line + '\n')
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


def exit_on_user_error(error: UserError):
  """How a command line ends on a UserError: its traceback with
  --verbosity >= 1, else `error: <one line>` last on stderr, exit code 2."""
  if logging.get_verbosity() >= 1:
    raise error
  exit_now(2, f'error: {one_line(error)}')
