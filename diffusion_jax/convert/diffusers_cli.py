r"""The diffusers import command: a released checkpoint -> a new workdir.

Usage (from a local copy; nothing is downloaded):

  python -m diffusion_jax.convert.diffusers_cli --src=/path/to/ddpm-cifar10-32 \
      --workdir=runs/ddpm_cifar10_released --config=configs/cifar10_ddpm.py
  python -m diffusion_jax.main --config=configs/cifar10_ddpm.py \
      --workdir=runs/ddpm_cifar10_released --mode=sample

The workdir gets `checkpoints/0`: a TrainState with step 0, params =
ema_params = the released weights (they are the EMA weights of the paper's
runs) and a fresh optimizer state, so sampling, evaluation and fine-tuning
all start from it like from any of our checkpoints.

A U-Net (UNet2DModel) sets the model and image keys itself (printed as
overrides). A DiT (DiTTransformer2DModel, or a pipeline root with
transformer/; recognised from its config.json) goes into the method of
--config, which must already describe it: every disagreeing key is named
before anything is written. With config.latent.autoencoder set (a diffusers
VAE) that is latent diffusion, and the state's decoder is the VAE's, as
when a run starts:

  python -m diffusion_jax.convert.diffusers_cli --src=/data/DiT-XL-2-256 \
      --config=configs/imagenet256_dit_xl2.py \
      --config.latent.autoencoder=/data/sd-vae-ft-ema \
      --workdir=runs/dit_xl2_released

Sample mode then needs no latent cache (methods/latent_diffusion.py).

Reading and mapping the checkpoint is `convert.diffusers` (`diffusers_dit`);
this module adds the TrainState, the checkpoint and config.json, and the
command line.
"""

import json
import os
import sys

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from diffusion_jax.convert import diffusers, diffusers_dit


# ---------------------------------------------------------------- workdir --
def _checkpoint_dir(workdir: str) -> str:
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise ValueError(f'{ckpt_dir} already holds checkpoints: refusing to mix '
                     'converted weights into an existing run; use a new '
                     '--workdir')
  return ckpt_dir


def _write(state, config, ckpt_dir: str, workdir: str, src: str) -> None:
  """checkpoints/0 and config.json."""
  # Imported here: the training stack (TensorFlow via clu) is slow to import
  # and not needed to read or map weights.
  from diffusion_jax import checkpointing, experiment  # pylint: disable=g-import-not-at-top
  num = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  checkpointer = checkpointing.Checkpointer(ckpt_dir)
  # The input pipeline's position ({'step': 0}), so fine-tuning resumes.
  checkpointer.save(0, state, {'step': 0})
  checkpointer.wait_until_finished()
  checkpointer.close()
  experiment.write_config(config, workdir)
  logging.info('Converted %s (%s parameters) into %s/checkpoints/0',
               src, f'{num:,}', workdir)


def convert_to_workdir(src: str, workdir: str,
                       base_config: ml_collections.ConfigDict):
  """Writes workdir/checkpoints/0 and workdir/config.json; returns the config.

  The TrainState has step 0, params = ema_params = the checkpoint's weights
  and a freshly initialised optimizer state (released checkpoints carry
  none), so training from it is a fine-tune that starts Adam anew.
  """
  from diffusion_jax import methods  # pylint: disable=g-import-not-at-top
  from diffusion_jax.train_state import create_train_state  # pylint: disable=g-import-not-at-top
  ckpt_dir = _checkpoint_dir(workdir)
  hf_config, state_dict = diffusers.load_diffusers_unet(src)
  config = diffusers.config_from_diffusers(hf_config, base_config)
  method = methods.DiffusionMethod.from_config(config)
  abstract = jax.eval_shape(method.init_params, jax.random.key(0))
  params = jax.tree.map(jnp.asarray,
                        diffusers.convert_params(state_dict, abstract))
  _write(create_train_state(params, method.optimizer), config, ckpt_dir,
         workdir, src)
  return config


# -------------------------------------------------------------------- DiT --
def is_dit(src: str) -> bool:
  """Whether src's config.json (or its transformer/ one's) is a DiT's."""
  for folder in (src, os.path.join(src, diffusers_dit.SUBFOLDER)):
    try:
      with open(os.path.join(folder, diffusers.CONFIG_NAME)) as f:
        name = json.load(f).get('_class_name')
    except (OSError, ValueError, AttributeError):
      continue
    return name in diffusers_dit.CLASS_NAMES
  return False


def check_dit_against_config(hf_config, config, method, where: str) -> None:
  """Raises ValueError naming every key of `config` that disagrees with the
  DiT config.json `hf_config` (of the directory `where`); `method` is built
  from `config` (its image_shape: the network's input, latents for latent
  diffusion).

  Checked: what fixes the parameters' shapes and meaning (model.name, the
  sizes, patch_size, mlp_ratio, num_classes, no context), the input shape
  and, from out_channels, whether diffusion.loss learns the variance.
  dit_time_freq_shift and dit_mlp_norm_eps stay the config's choice (the
  reference's conventions or diffusers', convert/diffusers_dit.py).
  """
  from diffusion_jax.diffusion import losses  # pylint: disable=g-import-not-at-top
  from diffusion_jax.models import dit  # pylint: disable=g-import-not-at-top
  want = diffusers_dit.model_config_from_diffusers(hf_config)
  size, channels, learned = diffusers_dit.sample_shape(hf_config)
  sizes = dit.DIT_VARIANTS.get(want.dit_variant, (
      want.dit_depth, want.dit_hidden_size, want.dit_num_heads))
  m, bad = config.model, []  # bad: (key, value, fix)
  if m.name != 'dit':
    bad.append(('config.model.name', m.name, '--config.model.name=dit'))
  else:
    try:
      ours = dit.resolve_size(m.dit_variant, m.dit_depth, m.dit_hidden_size,
                              m.dit_num_heads)
    except ValueError:
      ours = None
    if ours != sizes:
      fix = f'--config.model.dit_variant={want.dit_variant}'
      if want.dit_variant == 'custom':
        fix += ''.join(f' --config.model.dit_{k}={v}' for k, v in zip(
            ('depth', 'hidden_size', 'num_heads'), sizes))
      bad.append(('config.model.dit_variant', m.dit_variant,
                  f'{fix}: the file has depth {sizes[0]}, hidden size '
                  f'{sizes[1]}, {sizes[2]} heads'))
    for key in ('patch_size', 'mlp_ratio', 'num_classes'):
      if m[key] != want[key]:
        bad.append((f'config.model.{key}', m[key],
                    f'--config.model.{key}={want[key]}'))
    if m.get('context_dim', 0):
      bad.append(('config.model.context_dim', m.context_dim,
                  '--config.model.context_dim=0: a DiT of diffusers has no '
                  'cross-attention'))
  if tuple(method.image_shape) != (size, size, channels):
    h, w, c = method.image_shape
    info = getattr(method, 'autoencoder_info', None)
    if info:  # latents: image_size / f, the autoencoder's channels
      fix = f'--config.data.image_size={size * info.down_factor}' + (
          '' if channels == c else ' and config.latent.autoencoder with '
          f'{channels} latent channels')
      through = f' through the f={info.down_factor} autoencoder'
    else:
      fix = (f'--config.data.image_size={size} '
             f'--config.data.channels={channels}')
      through = ''
    bad.append(('config.data.image_size', config.data.image_size,
                f'{fix}: the network takes {size}x{size}x{channels} '
                f'(config.json sample_size, in_channels), this config gives '
                f'{h}x{w}x{c}{through}'))
  if losses.learns_variance(config.diffusion.loss) != learned:
    out = 2 * channels if learned else channels
    bad.append(('config.diffusion.loss', config.diffusion.loss,
                f'--config.diffusion.loss=hybrid: out_channels {out} = 2 x '
                'in_channels, a learned variance' if learned else
                f'--config.diffusion.loss=mse: out_channels {out} = '
                'in_channels, no learned variance'))
  if bad:
    raise ValueError(
        f'the diffusers DiT in {where} does not fit the config: '
        + '; '.join(f'{k}={v!r} (use {fix})' for k, v, fix in bad)
        + '. Pass these overrides, or import into a config made for it')


def convert_dit_to_workdir(src: str, workdir: str,
                           config: ml_collections.ConfigDict):
  """A diffusers DiT into config's method: checkpoints/0 (params =
  ema_params = the DiT's, the method's own aux state: for latent diffusion
  the decoder of config.latent.autoencoder) and config.json (config
  itself). A bad config value, or any disagreement of config and the
  DiT's config.json, raises ValueError naming the key before the weights
  are read or anything is written."""
  from diffusion_jax import config_checks, methods  # pylint: disable=g-import-not-at-top
  config_checks.check(config, 'sample')  # as main.py does first
  if config.method != 'diffusion':
    raise ValueError(f'config.method={config.method!r}: a DiT imports into '
                     "config.method='diffusion'")
  ckpt_dir = _checkpoint_dir(workdir)
  model_dir, hf_config = diffusers_dit.read_config(src)
  method = methods.create_method(config)  # config files only
  check_dit_against_config(hf_config, config, method, model_dir)
  shift, eps = config.model.dit_time_freq_shift, config.model.dit_mlp_norm_eps
  logging.info('DiT conventions of the config: time frequency shift %d, MLP '
               'LayerNorm eps %g (the reference code: 0, 1e-6; diffusers: 1, '
               'its norm_eps)', shift, eps)
  _, state_dict = diffusers.load_diffusers_unet(model_dir)
  abstract = jax.eval_shape(method.init_params, jax.random.key(0))
  params = jax.tree.map(jnp.asarray, diffusers_dit.convert_params(
      state_dict, method.network.depth, abstract))
  del state_dict
  state = method.state_from(params, method.init_aux_state())
  _write(state, config, ckpt_dir, workdir, model_dir)
  return config


# -------------------------------------------------------------------- CLI --
def config_overrides(base_config, config) -> list[str]:
  """The --config.X=V flags that turn base_config's model/data into config's."""
  flags_ = []
  for section in ('model', 'data'):
    for key, value in config[section].items():
      if base_config[section][key] != value:
        if isinstance(value, tuple):
          value = '(' + ','.join(map(str, value)) + (',)' if len(value) == 1
                                                     else ')')
        flags_.append(f'--config.{section}.{key}={value}')
  return flags_


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from configs import default  # pylint: disable=g-import-not-at-top
  base = FLAGS.config if FLAGS.config is not None else default.get_config()
  workdir = os.path.abspath(FLAGS.workdir)
  dit = is_dit(FLAGS.src)
  if dit and FLAGS.config is None:
    raise app.UsageError('a DiT imports into the method of --config (e.g. '
                         '--config=configs/imagenet256_dit_xl2.py): give it')
  try:
    if dit:
      config = convert_dit_to_workdir(FLAGS.src, workdir, base)
    else:
      config = convert_to_workdir(FLAGS.src, workdir, base)
  except (ValueError, ImportError) as e:
    # Bad input, not a bug: the message alone says what to do.
    sys.exit(f'diffusers_cli: {e}')
  # A DiT's model is the config's: the --config.* flags given here.
  overrides = ([a for a in sys.argv[1:] if a.startswith('--config.')] if dit
               else config_overrides(base, config))
  config_file = ('configs/default.py' if FLAGS.config is None else
                 config_flags.get_config_filename(FLAGS['config']))
  # Sample mode rebuilds the model from its own --config: these overrides
  # make it the checkpoint's model (plus any --config.* passed here).
  print('Converted. Sample with:\n  python -m diffusion_jax.main '
        + ' '.join([f'--config={config_file}', *overrides,
                    f'--workdir={workdir}', '--mode=sample']))


FLAGS = flags.FLAGS

if __name__ == '__main__':
  # Flags are defined only when run as a script: main.py defines --config and
  # --workdir too, and tests import both modules.
  flags.DEFINE_string('src', None, 'Local diffusers UNet2DModel or '
                      'DiTTransformer2DModel directory, or a pipeline root '
                      '(with unet/ or transformer/).')
  flags.DEFINE_string('workdir', None, 'New run directory to write the '
                      'converted checkpoint and config.json into.')
  config_flags.DEFINE_config_file(
      'config', None, 'Base experiment config (schedule, sampling, optimiser); '
      "a U-Net's model and image shape come from the checkpoint, a DiT's "
      'must be this config\'s. Default: configs/default.py (U-Nets).',
      lock_config=True)
  flags.mark_flags_as_required(['src', 'workdir'])
  app.run(main)
