"""Every config value checked up front, naming the key, the value and a fix.

Pure Python on the ConfigDict (no JAX): the command line runs `check` before
it imports JAX, restores or compiles anything, in every mode, so a bad value
fails in a second and never touches a work directory. Checks that need the
device mesh (batch sizes over devices) or a method's registries (process,
prediction, sampler) run next, in experiment.build and the method's
from_config; they raise ValueError, which the command line reports the same
way.
"""

import math

from diffusion_jax.errors import ConfigError

# key: what it must be. Keys absent from a config (a method's own config, a
# test's) are skipped.
POSITIVE = (
    'batch_size', 'num_train_steps', 'log_every_steps',
    'checkpoint_every_steps', 'steps_per_call', 'grad_accum_steps',
    'data.image_size', 'data.channels', 'model.ch', 'model.num_res_blocks',
    'model.num_groups', 'model.temb_dim', 'model.mlp_ratio',
    'model.dit_mlp_norm_eps', 'diffusion.num_timesteps',
    'sample.num_images', 'sample.batch_size', 'sample.progressive_num_images',
    'sample_grid.num_images', 'eval.batch_size',
    'sample_quality.train_num_samples', 'sample_quality.resize_to',
    'optim.adam_eps', 'diffusion.beta_start',
    'diffusion.beta_end', 'diffusion.vp_beta_min', 'diffusion.vp_beta_max',
    'diffusion.ve_sigma_min', 'diffusion.ve_sigma_max',
    'diffusion.logit_normal_std', 'sample.snr', 'diffusion.edm_sigma_min',
    'diffusion.edm_sigma_max', 'diffusion.edm_p_std', 'sample.rho',
    'sample.s_noise', 'sample.solver_order', 'consistency.rho',
    'consistency.p_std', 'consistency.curriculum_s0',
    'consistency.curriculum_s1', 'consistency.num_levels',
    'autoencoder.latent_channels', 'autoencoder.layers_per_block',
    'autoencoder.norm_num_groups', 'autoencoder.disc_layers',
    'autoencoder.disc_ch')
NON_NEGATIVE = (
    'sample_grid.every_steps', 'sample_quality.every_steps',
    'sample_quality.num_samples', 'sample_quality.floor_seeds',
    'sample.num_steps', 'sample.corrector_steps', 'sample.ddim_eta',
    'sample.guidance_scale', 'sample.t_min', 'diffusion.t_min',
    'optim.learning_rate', 'optim.warmup_steps', 'optim.grad_clip_norm',
    'sample.sigma_min', 'sample.sigma_max', 'sample.s_churn',
    'sample.s_tmin', 'sample.s_tmax',
    'data.prefetch',
    'model.num_classes', 'consistency.huber_c', 'distill.guidance_min',
    'model.dit_depth', 'model.dit_hidden_size', 'model.dit_num_heads',
    'autoencoder.kl_weight', 'autoencoder.perceptual_weight',
    'autoencoder.disc_start', 'autoencoder.disc_weight',
    'autoencoder.disc_learning_rate', 'latent.scale_factor',
    'latent.autoencoder_step')
# key: (low, high, high included)
INTERVALS = {
    'optim.ema_decay': (0.0, 1.0, False),
    'optim.adam_b1': (0.0, 1.0, False),
    'optim.adam_b2': (0.0, 1.0, False),
    'model.dropout': (0.0, 1.0, False),
    'model.label_dropout': (0.0, 1.0, True),
    'model.context_dropout': (0.0, 1.0, True),
    'diffusion.beta_end': (0.0, 1.0, False),
    'diffusion.t_min': (0.0, 1.0, False),
    'sample.t_min': (0.0, 1.0, False),
    'consistency.target_ema': (0.0, 1.0, False),
    'autoencoder.adam_b1': (0.0, 1.0, False),
    'autoencoder.adam_b2': (0.0, 1.0, False),
}
# Registries (networks, methods, processes, samplers) are checked against
# the registry itself in experiment.build and the method's from_config.
CHOICES = {
    'model.dtype': ('float32', 'bfloat16', 'float16'),
    'optim.param_dtype': ('float32', 'bfloat16'),  # train_state.PARAM_DTYPES
    'model.remat': ('none', 'dots_saveable', 'full'),  # models/remat.py
    # models/dit.py's DIT_VARIANTS (not imported: no JAX here), or 'custom'.
    'model.dit_variant': ('S', 'B', 'L', 'XL', 'custom'),
    'model.patch_size': (2, 4, 8),
    'model.dit_time_freq_shift': (0, 1),
    'sample.spacing': ('karras', 'logsnr', 'time'),
    'consistency.metric': ('pseudo_huber', 'l2'),
    'sample.solver_order': (1, 2, 3),
    'sample.unipc_variant': ('bh1', 'bh2'),
    # methods/autoencoder_losses.py's REC_LOSSES and DISC_LOSSES.
    'autoencoder.rec_loss': ('l1', 'l2'),
    'autoencoder.disc_loss': ('hinge', 'non_saturating'),
    # latent/store.py's DTYPES and data/sources.py's RESIZE_MODES.
    'latent.cache_dtype': ('float16', 'float32'),
    'latent.images.resize': ('', 'center_crop', 'pad'),
    'data.resize': ('', 'center_crop', 'pad'),
    'data.captions': ('', 'digit_weight'),  # data/captions.py's CAPTIONERS
}
# Why keep_checkpoints must be >= 1: Orbax's max_to_keep=0 deletes every
# checkpoint of the work directory, old ones included (issue 18).
KEEP_CHECKPOINTS_FIX = ('must be >= 1 (0 would delete every checkpoint of '
                        'the work directory, old ones included)')
# The widest post-hoc EMA (posthoc_ema.py): sigma_rel at gamma = 0, a uniform
# average of the whole run, sqrt(1) / (2 sqrt(3)) by EDM2 eq. 123.
POSTHOC_SIGMA_REL_MAX = 1.0 / (2.0 * math.sqrt(3.0))


def _get(config, key):
  node = config
  for part in key.split('.'):
    if not hasattr(node, 'keys') or part not in node.keys():
      return None
    node = node[part]
  return node


def _number(key, value):
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ConfigError(f'config.{key}={value!r} must be a number')
  if not math.isfinite(value):
    raise ConfigError(f'config.{key}={value!r} must be finite')
  return value


def check(config, mode: str = 'train') -> None:
  """Raises ConfigError on the first value that cannot work in `mode`
  ('train', 'sample' or 'eval')."""
  for key in POSITIVE:
    value = _get(config, key)
    if value is not None and _number(key, value) <= 0:
      raise ConfigError(f'config.{key}={value!r} must be positive (> 0)')
  for key in NON_NEGATIVE:
    value = _get(config, key)
    if value is not None and _number(key, value) < 0:
      raise ConfigError(f'config.{key}={value!r} must be >= 0 (0: off or '
                        'the default, see configs/default.py)')
  for key, (low, high, closed) in INTERVALS.items():
    value = _get(config, key)
    if value is None:
      continue
    _number(key, value)
    if not (low <= value <= high if closed else low <= value < high):
      raise ConfigError(f'config.{key}={value!r} must be in [{low}, {high}'
                        f'{"]" if closed else ")"}')
  for key, allowed in CHOICES.items():
    value = _get(config, key)
    if value is not None and value not in allowed:
      raise ConfigError(f'config.{key}={value!r}: use one of '
                        f'{", ".join(map(repr, allowed))}')
  keep = _get(config, 'keep_checkpoints')
  if keep is not None and (isinstance(keep, bool) or keep < 1):
    raise ConfigError(f'config.keep_checkpoints={keep!r} '
                      f'{KEEP_CHECKPOINTS_FIX}')
  del mode  # every mode checks every value (issue 18)
  _check_pairs(config)
  _check_model(config)
  _check_dit(config)
  _check_guidance_input(config)
  _check_posthoc_ema(config)
  _check_consistency_sigmas(config)
  _check_autoencoder(config)
  _check_latent(config)
  _check_captions(config)


def _check_pairs(config):
  """Values that must be ordered or fit each other."""
  pairs = (('diffusion.beta_start', 'diffusion.beta_end'),
           ('diffusion.vp_beta_min', 'diffusion.vp_beta_max'),
           ('diffusion.ve_sigma_min', 'diffusion.ve_sigma_max'),
           ('diffusion.edm_sigma_min', 'diffusion.edm_sigma_max'),
           # 0 is "none" for the sample keys: the process's own / no limit.
           ('sample.sigma_min', 'sample.sigma_max'),
           ('sample.s_tmin', 'sample.s_tmax'),
           ('consistency.curriculum_s0', 'consistency.curriculum_s1'),
           ('distill.guidance_min', 'distill.guidance_max'))
  for low_key, high_key in pairs:
    low, high = _get(config, low_key), _get(config, high_key)
    if low is not None and high is not None and low > high and not (
        high_key.startswith('sample.') and high == 0):
      raise ConfigError(f'config.{low_key}={low!r} is above config.{high_key}'
                        f'={high!r}: swap them or lower config.{low_key}')
  label, classes = (_get(config, 'sample.class_label'),
                    _get(config, 'model.num_classes'))
  if label is not None and classes is not None and (
      label < -1 or (classes and label >= classes)):
    raise ConfigError(
        f'config.sample.class_label={label} is not a class of this model: '
        f'use -1 (every class in turn) or 0..{max(classes - 1, 0)}')


def _check_model(config):
  """The U-Net's sizes fit together (GroupNorm groups, levels)."""
  if _get(config, 'model.name') != 'unet':
    return
  ch, groups = _get(config, 'model.ch'), _get(config, 'model.num_groups')
  mult = _get(config, 'model.ch_mult')
  if not mult or any(m <= 0 for m in mult):
    raise ConfigError(f'config.model.ch_mult={tuple(mult or ())!r}: give one '
                      'positive multiplier per resolution level, e.g. (1, 2)')
  for m in mult:
    if (ch * m) % groups:
      raise ConfigError(
          f'config.model.num_groups={groups} does not divide the {ch * m} '
          f'channels of a level (config.model.ch={ch} x ch_mult {m}): '
          'GroupNorm needs a divisor of every level\'s channels, e.g. '
          f'{math.gcd(*[ch * k for k in mult])}')


def _check_dit(config):
  """DiT's sizes: from the variant or all custom, heads dividing the hidden
  size, patches tiling the image."""
  if _get(config, 'model.name') != 'dit':
    return
  variant = _get(config, 'model.dit_variant')
  keys = ('model.dit_depth', 'model.dit_hidden_size', 'model.dit_num_heads')
  sizes = [_get(config, k) or 0 for k in keys]
  if variant != 'custom' and any(sizes):
    key, value = next((k, v) for k, v in zip(keys, sizes) if v)
    raise ConfigError(
        f'config.{key}={value} is set but config.model.dit_variant='
        f'{variant!r} fixes the sizes (paper Table 1): set '
        "dit_variant='custom' to use dit_depth, dit_hidden_size and "
        'dit_num_heads, or set them to 0')
  if variant == 'custom':
    for key, value in zip(keys, sizes):
      if value <= 0:
        raise ConfigError(
            f"config.{key}={value}: config.model.dit_variant='custom' takes "
            'its sizes from dit_depth, dit_hidden_size and dit_num_heads; set '
            'all three > 0 (e.g. 2, 64, 4), or pick a variant S/B/L/XL')
    _, hidden, heads = sizes
    if hidden % heads:
      divisors = [h for h in range(1, hidden + 1) if hidden % h == 0]
      near = min(divisors, key=lambda h: abs(h - heads))
      raise ConfigError(
          f'config.model.dit_num_heads={heads} does not divide '
          f'config.model.dit_hidden_size={hidden}: each head gets '
          f'hidden/heads channels; use a divisor, e.g. {near}')
    if hidden % 4:
      raise ConfigError(
          f'config.model.dit_hidden_size={hidden} must be a multiple of 4 '
          '(the 2-D sin-cos position embedding gives a quarter of it to each '
          f'of sin/cos x row/column): e.g. {hidden + 4 - hidden % 4}')
  size, patch = (_get(config, 'data.image_size'),
                 _get(config, 'model.patch_size'))
  if size and patch and size % patch:
    fits = [p for p in (2, 4, 8) if size % p == 0]
    fix = (f'use config.model.patch_size={fits[-1]}' if fits else
           'use an image size divisible by 2, 4 or 8')
    raise ConfigError(
        f'config.data.image_size={size} is not divisible by '
        f'config.model.patch_size={patch}: DiT tiles the image with '
        f'{patch}x{patch} patches; {fix}')


def _check_guidance_input(config):
  """A guidance-conditioned network learns w only from a guided teacher."""
  if not _get(config, 'model.guidance_input'):
    return
  if not _get(config, 'model.num_classes'):
    raise ConfigError(
        'config.model.guidance_input=True needs a class-conditional model '
        '(config.model.num_classes > 0): guidance mixes conditional and '
        'unconditional predictions')
  if _get(config, 'method') != 'progressive_distillation':
    raise ConfigError(
        'config.model.guidance_input=True: only a progressive-distillation '
        "student learns the guidance weight as an input (config.method="
        "'progressive_distillation'); other methods use classifier-free "
        'guidance at config.sample.guidance_scale: set guidance_input=False')


def _check_posthoc_ema(config):
  """Tracked profiles in the range posthoc_ema.py can reconstruct from, and
  a snapshot interval the loop can keep."""
  sigma_rels = _get(config, 'posthoc_ema.sigma_rels')
  every = _get(config, 'posthoc_ema.snapshot_every_steps')
  if sigma_rels is None:
    return
  for value in sigma_rels:
    if not 0 < _number('posthoc_ema.sigma_rels', value) <= (
        POSTHOC_SIGMA_REL_MAX):
      raise ConfigError(
          f'config.posthoc_ema.sigma_rels={tuple(sigma_rels)!r}: each must be '
          f'in (0, {POSTHOC_SIGMA_REL_MAX:.6f}] ({POSTHOC_SIGMA_REL_MAX:.6f}: '
          'the plain average of the whole run); EDM2 tracks (0.05, 0.1)')
  if not sigma_rels or every is None:
    return
  k = _get(config, 'steps_per_call') or 1
  if isinstance(every, bool) or not isinstance(every, int) or every <= 0 or (
      every % k):
    raise ConfigError(
        f'config.posthoc_ema.snapshot_every_steps={every!r} must be a '
        f'positive multiple of config.steps_per_call={k} when '
        'config.posthoc_ema.sigma_rels is set (the reconstruction needs '
        'snapshots spread over the run): set it, e.g. to num_train_steps / '
        '20, or set sigma_rels=() to turn tracking off')


def _check_consistency_sigmas(config):
  """Consistency sampling's levels (Song et al. 2023, Algorithm 1): noise
  levels the model was trained at, from noise towards the data."""
  sigmas = _get(config, 'consistency.sample_sigmas')
  if not sigmas:
    return
  lo = _get(config, 'diffusion.edm_sigma_min')
  hi = _get(config, 'diffusion.edm_sigma_max')
  sigmas = tuple(_number('consistency.sample_sigmas', s) for s in sigmas)
  if any(not lo < s <= hi for s in sigmas) or any(
      b >= a for a, b in zip(sigmas, sigmas[1:])):
    raise ConfigError(
        f'config.consistency.sample_sigmas={sigmas!r} must be strictly '
        'decreasing noise levels in (diffusion.edm_sigma_min, edm_sigma_max]'
        f' = ({lo}, {hi}]: e.g. () for one step from {hi}, ({hi}, 0.821) '
        'for two (iCT on CIFAR-10)')


def _check_autoencoder(config):
  """The autoencoder's levels fit its GroupNorm and the image, and the
  patch discriminator's logit map is at least 1x1 (config.method=
  'autoencoder' only: other methods do not build these networks)."""
  if _get(config, 'method') != 'autoencoder':
    return
  widths = tuple(_get(config, 'autoencoder.block_out_channels') or ())
  groups = _get(config, 'autoencoder.norm_num_groups')
  if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w <= 0
                       for w in widths):
    raise ConfigError(
        f'config.autoencoder.block_out_channels={widths!r}: give one positive '
        'width per level, e.g. (64, 128, 128) for f = 4')
  for width in widths:
    if width % groups:
      raise ConfigError(
          f'config.autoencoder.norm_num_groups={groups} does not divide the '
          f'width {width} of config.autoencoder.block_out_channels={widths}:'
          f' use a divisor of every width, e.g. {math.gcd(*widths)}')
  size = _get(config, 'data.image_size')
  f = 2 ** (len(widths) - 1)
  if size % f:
    fits = [2 ** k for k in range(len(widths)) if size % 2 ** k == 0]
    raise ConfigError(
        f'config.data.image_size={size} is not divisible by the down factor '
        f'f={f} of config.autoencoder.block_out_channels={widths} (f = '
        f'2^(levels - 1)): use {len(fits)} levels or fewer (f={fits[-1]}), '
        f'or an image size divisible by {f}')
  layers = _get(config, 'autoencoder.disc_layers')
  # models/discriminator.output_size (not imported: no JAX here): each
  # stride-2 4x4 conv (padding 1) floors the size by half, the two
  # stride-1 ones take 1 each.
  out = lambda n: (size >> n) - 2
  if out(layers) < 1:
    fit = max((n for n in range(1, layers) if out(n) >= 1), default=0)
    raise ConfigError(
        f'config.autoencoder.disc_layers={layers} is too deep for config.data.'
        f'image_size={size}: the patch discriminator\'s logit map would be '
        f'{max(out(layers), 0)}x{max(out(layers), 0)}; '
        + (f'use disc_layers <= {fit}' if fit else
           'the images are too small for it (at least 6x6 with one layer)'))


def _check_latent(config):
  """Latent diffusion (methods/latent_diffusion.py): an autoencoder and a
  latent cache go together, only diffusion trains on latents, and latents
  are not clipped like pixels."""
  source = _get(config, 'data.source')
  autoencoder = _get(config, 'latent.autoencoder')
  method = _get(config, 'method')
  if source == 'latents' and not autoencoder:
    raise ConfigError(
        "config.data.source='latents' trains on an autoencoder's latents: "
        'set config.latent.autoencoder to it (a diffusers AutoencoderKL '
        'directory or an autoencoder run)')
  if autoencoder and method == 'diffusion' and source != 'latents':
    raise ConfigError(
        f'config.latent.autoencoder={autoencoder!r} asks for latent '
        f'diffusion, which trains on cached latents, not on '
        f'config.data.source={source!r}: write the cache with python -m '
        "diffusion_jax.cache_latents, then set config.data.source='latents' "
        'and config.data.data_dir to the cache (config.latent.images names '
        'the images)')
  if source != 'latents':
    return
  if method != 'diffusion':
    raise ConfigError(
        f"config.data.source='latents': config.method={method!r} does not "
        "train on latents; only 'diffusion' does")
  if _get(config, 'latent.images.source') == 'latents':
    raise ConfigError(
        "config.latent.images.source='latents': name the images the cache "
        "encodes (e.g. 'digits', 'tfds', 'idx')")
  if _get(config, 'diffusion.clip_denoised'):
    raise ConfigError(
        'config.diffusion.clip_denoised=True clips x0 predictions to [-1, 1],'
        ' the range of pixels, not of scaled latents (unit variance; LDM '
        'samples them unclipped): set it False')



def _check_captions(config):
  """Captions (data/captions.py) need a cross-attending diffusion network on
  a labelled pixel source, without class labels."""
  name, dim = _get(config, 'data.captions'), _get(config, 'model.context_dim')
  fixes = ((not name and dim, f'config.model.context_dim={dim} needs '
            f"config.data.captions (one of {CHOICES['data.captions'][1:]}) "
            'or context_dim=0'),
           (name and not dim, 'captions need config.model.context_dim > 0'),
           (name and _get(config, 'model.num_classes'), 'captions name the '
            'class: set config.model.num_classes=0'),
           (name and _get(config, 'method') != 'diffusion', 'only '
            "config.method='diffusion' feeds captions to its network"),
           (name and _get(config, 'data.source') == 'latents', 'a latent '
            "cache holds no captions: use a pixel source"))
  for wrong, fix in fixes:
    if wrong:
      raise ConfigError(f'config.data.captions={name!r}: {fix}')
