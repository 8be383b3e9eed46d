"""The config a run wrote to <workdir>/config.json, read back.

Tools that work on finished runs (post-hoc EMA, a distillation student's
teacher, benchmarks scoring students) rebuild the run's objects from it.
JSON turns tuples into lists (turned back here), and keys the code gained
after the run was written take configs/default.py's values, new features
defaulting to off, as they would if the run resumed.
"""

import json

from etils import epath
import ml_collections

from diffusion_jax import errors


class RunConfigError(errors.UserError, ValueError):
  """No readable config.json where a run directory was expected."""


def _tuples(value):
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def _fill(values: dict, defaults: dict) -> dict:
  """values with every key of defaults it lacks added, recursively."""
  for key, value in defaults.items():
    if key not in values:
      values[key] = value
    elif isinstance(value, dict) and isinstance(values[key], dict):
      _fill(values[key], value)
  return values


def load(workdir, flag: str = '--workdir') -> ml_collections.ConfigDict:
  """The run's ConfigDict; `flag` names where the directory came from, for
  the error message."""
  path = epath.Path(workdir) / 'config.json'
  if not path.exists():
    raise RunConfigError(f'{path} does not exist: {flag} must be a run '
                         'directory (the trainer writes config.json there)')
  try:
    values = _tuples(json.loads(path.read_text()))
  except ValueError as e:
    raise RunConfigError(f'{path} is not readable JSON ({e}): {flag} must '
                         'be a run directory') from e
  try:
    from configs import default  # pylint: disable=g-import-not-at-top
    values = _fill(values, default.get_config().to_dict())
  except ImportError:  # installed without the repository's configs/
    pass
  return ml_collections.ConfigDict(values)
