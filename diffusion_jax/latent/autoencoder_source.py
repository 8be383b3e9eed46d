"""The autoencoder of latent diffusion, from the path config.latent.autoencoder.

Two kinds of local directory hold one (Rombach et al. 2022's KL autoencoder,
models/autoencoder.py):
  diffusers: an `AutoencoderKL` folder (config.json and weights, or a
    pipeline root with a vae/ subfolder), converted by
    convert/diffusers_vae.py. Its scaling_factor is the latent scale
    (0.18215 for Stable Diffusion's VAE, LDM sec. 4.3.2).
  run: an autoencoder run of this project (config.json with
    method='autoencoder', and checkpoints/). Its EMA parameters are restored
    the way teacher.py restores a teacher, at config.latent.autoencoder_step
    (0: the newest). It carries no scale: the latent cache computes one,
    1/std of the training latents (LDM's scale_by_std for its KL models).

`describe` reads config files only (the module, the latent shape and the
cheap half of the identity), so building an experiment reads no weights;
`load` reads and hashes the parameters, once per identity and process.

Identity: kind, absolute path, checkpoint step (runs), a hash of the config
that defines the network and a hash of the parameters. The latent cache
records it (latent/store.py), and refuses to serve another autoencoder.
"""

import dataclasses
import hashlib
import json
import os
from typing import Any, Optional

import numpy as np

from diffusion_jax import errors

KEY = 'config.latent.autoencoder'
STEP_KEY = 'config.latent.autoencoder_step'
# Parameters of the decoder half: what decoding a latent needs (the encoder
# and quant_conv only ever run when latents are cached).
DECODER_PARTS = ('post_quant_conv', 'decoder')


class AutoencoderSourceError(errors.UserError, ValueError):
  """config.latent.autoencoder does not lead to a usable autoencoder."""


@dataclasses.dataclass(frozen=True)
class AutoencoderInfo:
  """What an autoencoder's config files say; no weights read.

  Attributes:
    kind: 'diffusers' or 'run'.
    path: absolute path of the directory.
    settings: keyword arguments of models.autoencoder.AutoencoderKL.
    in_channels: image channels the encoder takes.
    scaling_factor: the diffusers scaling_factor; None for runs (the cache
      computes 1/std).
    step: the restored checkpoint step of a run; None for diffusers.
    config_sha256: hash of the config that defines the network.
  """
  kind: str
  path: str
  settings: dict
  in_channels: int
  scaling_factor: Optional[float]
  step: Optional[int]
  config_sha256: str

  def model(self, **overrides):
    """The AutoencoderKL module (no parameters)."""
    from diffusion_jax.models import autoencoder  # pylint: disable=g-import-not-at-top
    return autoencoder.AutoencoderKL(**{**self.settings, **overrides})

  @property
  def down_factor(self) -> int:
    return 2 ** (len(self.settings['block_out_channels']) - 1)

  @property
  def latent_channels(self) -> int:
    return int(self.settings['latent_channels'])

  def latent_shape(self, image_size: int) -> tuple[int, int, int]:
    f = self.down_factor
    return (image_size // f, image_size // f, self.latent_channels)

  def identity(self) -> dict:
    """The identity without the parameters' hash (what config files give)."""
    return {'kind': self.kind, 'path': self.path, 'step': self.step,
            'config_sha256': self.config_sha256}


@dataclasses.dataclass(frozen=True)
class Autoencoder:
  """A loaded autoencoder: info, numpy float32 parameters and their hash."""
  info: AutoencoderInfo
  params: Any
  params_sha256: str

  def identity(self) -> dict:
    return {**self.info.identity(), 'params_sha256': self.params_sha256}

  def decoder_params(self) -> dict:
    return {k: self.params[k] for k in DECODER_PARTS}


def _canonical_hash(value) -> str:
  text = json.dumps(value, sort_keys=True, separators=(',', ':'))
  return hashlib.sha256(text.encode()).hexdigest()


def params_sha256(params) -> str:
  """sha256 over every leaf's name, dtype, shape and bytes, in name order."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  digest = hashlib.sha256()
  for name, leaf in sorted(traverse_util.flatten_dict(params, sep='/').items()):
    leaf = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f'{name}:{leaf.dtype.str}:{leaf.shape};'.encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise AutoencoderSourceError(f'{path}: not readable JSON ({e}); {KEY} '
                                 'must be a diffusers AutoencoderKL directory '
                                 'or an autoencoder run directory') from e


def _diffusers_config_dir(path: str) -> Optional[str]:
  for candidate in (path, os.path.join(path, 'vae')):
    config = os.path.join(candidate, 'config.json')
    if os.path.isfile(config) and '_class_name' in _read_json(config):
      return candidate
  return None


def _describe_diffusers(path: str, config_dir: str) -> AutoencoderInfo:
  from diffusion_jax.convert import diffusers_vae  # pylint: disable=g-import-not-at-top
  hf_config = _read_json(os.path.join(config_dir, 'config.json'))
  try:
    settings = diffusers_vae.settings_from_diffusers(hf_config)
  except ValueError as e:
    raise AutoencoderSourceError(f'{KEY}={path!r}: {e}') from e
  if hf_config.get('shift_factor') is not None:
    raise AutoencoderSourceError(
        f'{KEY}={path!r} has shift_factor={hf_config["shift_factor"]}: '
        'latents shifted before scaling are not supported; use a VAE without '
        'one (Stable Diffusion 1/2, sd-vae-ft-*)')
  in_channels = settings.pop('in_channels')
  scale = hf_config.get('scaling_factor', 0.18215)  # diffusers' default
  return AutoencoderInfo(
      kind='diffusers', path=path, settings=settings,
      in_channels=in_channels, scaling_factor=float(scale), step=None,
      config_sha256=_canonical_hash(
          {k: v for k, v in hf_config.items() if not k.startswith('_')}))


def _run_steps(path: str) -> list[int]:
  from diffusion_jax import checkpointing  # pylint: disable=g-import-not-at-top
  directory = os.path.join(path, 'checkpoints')
  if not os.path.isdir(directory):  # Opening a Checkpointer would create it.
    raise AutoencoderSourceError(
        f'no checkpoint in {directory}: train the autoencoder first '
        f'(configs/digits_autoencoder.py) or fix {KEY}')
  ckpt = checkpointing.Checkpointer(directory)
  try:
    return list(ckpt.all_steps())
  finally:
    ckpt.close()


def _describe_run(path: str, step: int) -> AutoencoderInfo:
  raw = _read_json(os.path.join(path, 'config.json'))
  if raw.get('method') != 'autoencoder':
    raise AutoencoderSourceError(
        f'{KEY}={path!r} is a run of config.method={raw.get("method")!r}, '
        "not 'autoencoder': point it at an autoencoder run or a diffusers "
        'AutoencoderKL directory')
  from diffusion_jax import run_config  # pylint: disable=g-import-not-at-top
  config = run_config.load(path, KEY)
  a = config.autoencoder
  settings = dict(block_out_channels=tuple(a.block_out_channels),
                  latent_channels=int(a.latent_channels),
                  layers_per_block=int(a.layers_per_block),
                  norm_num_groups=int(a.norm_num_groups),
                  out_channels=int(config.data.channels))
  steps = _run_steps(path)
  chosen = step or (max(steps) if steps else None)
  if chosen is None or chosen not in steps:
    raise AutoencoderSourceError(
        f'no checkpoint step {chosen} in {path}/checkpoints (it holds '
        f'{steps}): set {STEP_KEY} to one of them, or 0 for the newest')
  # The sections that define the network (the parameters' hash covers
  # how it was trained); the raw file, so defaults added later to
  # configs/default.py do not change it.
  defining = {k: raw.get(k) for k in ('method', 'autoencoder', 'data')}
  return AutoencoderInfo(
      kind='run', path=path, settings=settings,
      in_channels=int(config.data.channels), scaling_factor=None,
      step=int(chosen), config_sha256=_canonical_hash(defining))


def describe(path: str, step: int = 0) -> AutoencoderInfo:
  """The autoencoder at `path` (config.latent.autoencoder), from its config
  files alone; `step`: a run's checkpoint (0 = the newest)."""
  if not path:
    raise AutoencoderSourceError(
        f'{KEY} is empty: set it to a diffusers AutoencoderKL directory (e.g. '
        'a local copy of stabilityai/sd-vae-ft-ema) or an autoencoder run '
        'directory of this project')
  if '://' in path:
    raise AutoencoderSourceError(f'{KEY}={path!r}: only local directories '
                                 'are supported; copy it here')
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise AutoencoderSourceError(f'{KEY}={path!r} is not a directory')
  config_dir = _diffusers_config_dir(path)
  if config_dir is not None:
    if step:
      raise AutoencoderSourceError(
          f'{STEP_KEY}={step} applies to autoencoder runs; {path} is a '
          'diffusers directory: set it to 0')
    return _describe_diffusers(path, config_dir)
  if os.path.isfile(os.path.join(path, 'config.json')):
    return _describe_run(path, step)
  raise AutoencoderSourceError(
      f'{KEY}={path!r} holds neither a diffusers AutoencoderKL (config.json '
      'with _class_name, here or in vae/) nor a run (config.json, '
      f'checkpoints/); found {sorted(os.listdir(path))}')


def _restore_run(info: AutoencoderInfo):
  """The EMA parameters of a run's checkpoint (as teacher.load restores a
  teacher), as numpy arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  from diffusion_jax import checkpointing, methods, parallel, run_config  # pylint: disable=g-import-not-at-top
  method = methods.create_method(run_config.load(info.path, KEY))
  repl = parallel.replicated(parallel.create_mesh())
  abstract = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl),
      method.abstract_init())
  ckpt = checkpointing.Checkpointer(os.path.join(info.path, 'checkpoints'))
  try:
    state, _ = ckpt.restore(abstract, info.step)
  finally:
    ckpt.close()
  return jax.tree.map(np.asarray, jax.device_get(method.sample_params(state)))


_LOADED: dict = {}


def load(path: str, step: int = 0) -> Autoencoder:
  """The autoencoder with its parameters; read once per identity (path,
  step, config hash) and process."""
  info = describe(path, step)
  key = tuple(sorted(info.identity().items()))
  if key not in _LOADED:
    if info.kind == 'diffusers':
      from diffusion_jax.convert import diffusers_vae  # pylint: disable=g-import-not-at-top
      try:
        params = diffusers_vae.import_diffusers_vae(info.path).params
      except ValueError as e:
        raise AutoencoderSourceError(f'{KEY}={info.path!r}: {e}') from e
    else:
      params = _restore_run(info)
    _LOADED.clear()  # one at a time: an SD VAE is 335 MB
    _LOADED[key] = Autoencoder(info=info, params=params,
                               params_sha256=params_sha256(params))
  return _LOADED[key]
