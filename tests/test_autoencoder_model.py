"""The latent-diffusion VAE: diffusers equivalence, size, KL, shapes, import.

The comparison builds a randomly initialised diffusers AutoencoderKL with
stabilityai/sd-vae-ft-ema's config (nothing is downloaded) and checks that
our model, given the converted weights, encodes and decodes the same. Tests
that need torch, diffusers or safetensors (requirements-convert.txt) skip
when they are not installed.
"""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.convert import diffusers as unet_convert
from diffusion_jax.convert import diffusers_vae
from diffusion_jax.models import autoencoder as ae

# stabilityai/sd-vae-ft-ema's config.json (the Stable Diffusion VAE, f = 8).
SD_VAE_CONFIG = {
    '_class_name': 'AutoencoderKL',
    'act_fn': 'silu',
    'block_out_channels': [128, 256, 512, 512],
    'down_block_types': ['DownEncoderBlock2D'] * 4,
    'in_channels': 3,
    'latent_channels': 4,
    'layers_per_block': 2,
    'norm_num_groups': 32,
    'out_channels': 3,
    'sample_size': 256,
    'scaling_factor': 0.18215,
    'up_block_types': ['UpDecoderBlock2D'] * 4,
}
TINY_CONFIG = {
    **SD_VAE_CONFIG,
    'block_out_channels': [16, 32],
    'down_block_types': ['DownEncoderBlock2D'] * 2,
    'up_block_types': ['UpDecoderBlock2D'] * 2,
    'layers_per_block': 1,
    'norm_num_groups': 4,
}


def _abstract(model, in_channels=3):
  return jax.eval_shape(functools.partial(ae.init_params, model,
                                          in_channels=in_channels),
                        jax.random.key(0))


def _diffusers():
  pytest.importorskip('torch')
  pytest.importorskip('safetensors')
  return pytest.importorskip('diffusers')


def _hf_vae(hf_config, seed=0):
  """A diffusers AutoencoderKL with every weight random and non-trivial:
  GroupNorm scales 1 +- 0.2 and biases drawn too, so a scale<->bias swap or
  a wrong eps cannot hide; weights ~ N(0, 1/fan_in) keep activations O(1)."""
  diffusers = _diffusers()
  torch = pytest.importorskip('torch')
  kwargs = {k: v for k, v in hf_config.items() if not k.startswith('_')}
  with torch.device('meta'):  # diffusers' own init of 8e7 weights is slow
    model = diffusers.AutoencoderKL(**kwargs).eval()
  model = model.to_empty(device='cpu')
  assert not list(model.buffers())
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        center = 1.0 if name.endswith('weight') else 0.0  # norm scales
        p.copy_(center + 0.2 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
  return model


def _rel_err(ours, theirs):
  """max |ours - theirs| / max |theirs|."""
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def test_matches_diffusers_sd_vae(tmp_path):
  """Encoder moments and decoder output equal diffusers' (SD VAE config)."""
  torch = pytest.importorskip('torch')
  hf = _hf_vae(SD_VAE_CONFIG)
  hf.save_pretrained(tmp_path)
  imported = diffusers_vae.import_diffusers_vae(str(tmp_path))
  assert imported.scaling_factor == pytest.approx(0.18215)
  assert imported.shift_factor is None and imported.in_channels == 3
  model = imported.model()
  params = jax.tree.map(jnp.asarray, imported.params)

  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)  # NCHW
  z = rng.normal(size=(2, 4, 4, 4)).astype(np.float32)
  with torch.no_grad():
    posterior = hf.encode(torch.from_numpy(x)).latent_dist
    mean_t, logvar_t = posterior.mean.numpy(), posterior.logvar.numpy()
    dec_t = hf.decode(torch.from_numpy(z)).sample.numpy()
  encode = jax.jit(functools.partial(model.apply, method=model.encode))
  decode = jax.jit(functools.partial(model.apply, method=model.decode))
  mean, logvar = encode({'params': params}, x.transpose(0, 2, 3, 1))
  dec = decode({'params': params}, z.transpose(0, 2, 3, 1))
  to_nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)
  errors = {'mean': _rel_err(to_nchw(mean), mean_t),
            'logvar': _rel_err(to_nchw(logvar), logvar_t),
            'decode': _rel_err(to_nchw(dec), dec_t)}
  print('relative errors vs diffusers:', errors)
  assert all(e <= 1e-4 for e in errors.values()), errors


def test_parameter_count_equals_diffusers():
  """83,653,863 parameters for SD's VAE, as diffusers counts them."""
  n_ours = sum(math.prod(p.shape) for p in
               jax.tree.leaves(_abstract(ae.AutoencoderKL())))
  assert n_ours == 83_653_863
  diffusers = _diffusers()
  torch = pytest.importorskip('torch')
  kwargs = {k: v for k, v in SD_VAE_CONFIG.items() if not k.startswith('_')}
  with torch.device('meta'):
    hf = diffusers.AutoencoderKL(**kwargs)
  assert n_ours == sum(p.numel() for p in hf.parameters())


def test_kl_divergence_closed_form():
  """0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2) per example, and zero for
  the prior itself; checked against scipy's entropy-based Gaussian KL."""
  rng = np.random.default_rng(1)
  mean = rng.normal(size=(3, 4, 4, 2))
  logvar = rng.uniform(-3, 2, size=(3, 4, 4, 2))
  kl = np.asarray(ae.kl_divergence(jnp.asarray(mean), jnp.asarray(logvar)))
  # KL(p || q) = cross-entropy(p, q) - entropy(p), per dimension; scipy
  # gives the Gaussian entropy 0.5 log(2 pi e sigma^2).
  stats = pytest.importorskip('scipy.stats')
  var = np.exp(logvar)
  entropy = stats.norm(mean, np.sqrt(var)).entropy()
  cross_entropy = 0.5 * np.log(2 * np.pi) + 0.5 * (var + mean ** 2)
  expected = (cross_entropy - entropy).sum(axis=(1, 2, 3))
  np.testing.assert_allclose(kl, expected, rtol=1e-5)
  zeros = jnp.zeros((2, 4, 4, 2))
  np.testing.assert_allclose(ae.kl_divergence(zeros, zeros), 0.0, atol=1e-7)


def test_sample_has_posterior_moments():
  mean = jnp.array([-1.0, 0.5, 2.0])[None, None, None, :]
  logvar = jnp.log(jnp.array([0.25, 1.0, 4.0]))[None, None, None, :]
  n = 200_000
  z = ae.sample(jnp.broadcast_to(mean, (n, 1, 1, 3)),
                jnp.broadcast_to(logvar, (n, 1, 1, 3)), jax.random.key(3))
  z = np.asarray(z).reshape(n, 3)
  # Standard errors: sigma / sqrt(n) <= 0.0045 for the mean, about
  # sigma^2 sqrt(2 / n) <= 0.013 for the variance; allow ~4 of them.
  np.testing.assert_allclose(z.mean(0), [-1.0, 0.5, 2.0], atol=0.02)
  np.testing.assert_allclose(z.var(0), [0.25, 1.0, 4.0], rtol=0.015)


@pytest.mark.parametrize('channels,latent_channels,factor', [
    ((16, 16, 32), 4, 4),
    ((16, 16, 32, 32, 32), 16, 16),
    ((16, 32, 32, 32), 8, 8),
])
def test_latent_shapes(channels, latent_channels, factor):
  model = ae.AutoencoderKL(block_out_channels=channels,
                           latent_channels=latent_channels,
                           layers_per_block=1, norm_num_groups=8)
  assert model.down_factor == factor
  params = _abstract(model)
  x = jax.ShapeDtypeStruct((2, 64, 32, 3), jnp.float32)
  mean, logvar = jax.eval_shape(
      functools.partial(model.apply, method=model.encode), {'params': params},
      x)
  latent = (2, 64 // factor, 32 // factor, latent_channels)
  assert mean.shape == logvar.shape == latent
  rec, mean, _ = jax.eval_shape(model.apply, {'params': params}, x,
                                jax.random.key(0))
  assert rec.shape == (2, 64, 32, 3) and rec.dtype == jnp.float32
  assert mean.shape == latent


def test_runs_and_clips_logvar():
  """A tiny model run for real: finite outputs, log-variance within
  [-30, 20], the posterior mean decoded without rng; with bfloat16 compute
  (traced only) parameters and outputs stay float32."""
  kw = dict(block_out_channels=(16, 32), latent_channels=4,
            layers_per_block=1, norm_num_groups=4)
  model = ae.AutoencoderKL(**kw)
  # Random params of the right shapes: compiling init's RNG for every
  # tensor took ~12 s on the 2-core CPU, the forward pass ~2 s.
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype),
      _abstract(model))
  x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3), minval=-1)
  apply = jax.jit(model.apply, static_argnames='sample_posterior')
  rec, mean, logvar = apply({'params': params}, x, sample_posterior=False)
  assert rec.shape == (2, 8, 8, 3) and mean.shape == (2, 4, 4, 4)
  assert np.isfinite(rec).all()
  assert ae.LOGVAR_MIN <= float(logvar.min()) <= float(logvar.max()) <= 20.0
  with pytest.raises(ValueError, match='needs rng'):
    jax.eval_shape(model.apply, {'params': params}, x)

  bf16 = ae.AutoencoderKL(**kw, dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(_abstract(bf16)))
  outputs = jax.eval_shape(bf16.apply, {'params': params}, x,
                           jax.random.key(0))
  assert all(o.dtype == jnp.float32 for o in outputs)


def test_indivisible_image_size_raises():
  model = ae.AutoencoderKL()  # f = 8
  params = _abstract(model)
  x = jax.ShapeDtypeStruct((1, 36, 32, 3), jnp.float32)
  with pytest.raises(ValueError, match=r'36x32 is not divisible by the down '
                     r'factor f=8.*e\.g\. 32x32'):
    jax.eval_shape(functools.partial(model.apply, method=model.encode),
                   {'params': params}, x)


# ---------------------------------------------------------------- importer --
def _write_checkpoint(path, hf_config, edit=None, legacy_attention=False):
  """A diffusers-format checkpoint written with numpy alone: every tensor
  our model has, named and laid out as diffusers does (via the U-Net
  converter's name map), filled with its index. `edit(state_dict)` may
  change it before it is saved."""
  save_file = pytest.importorskip('safetensors.numpy').save_file
  settings = diffusers_vae.settings_from_diffusers(hf_config)
  in_channels = settings.pop('in_channels')
  abstract = _abstract(ae.AutoencoderKL(**settings), in_channels)
  state_dict = {}
  for path_keys, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    names = tuple(k.key for k in path_keys)
    prefix = names[0] + '.' if names[0] in ('encoder', 'decoder') else ''
    rest = names[1:] if prefix else names
    # pylint: disable=protected-access
    key, kind = unet_convert._diffusers_name(rest)
    shape = unet_convert._torch_shape(tuple(leaf.shape), kind)
    # pylint: enable=protected-access
    state_dict[prefix + key] = np.full(shape, len(state_dict), np.float32)
  if legacy_attention:
    state_dict = {k.replace('.to_q.', '.query.').replace('.to_out.0.',
                                                         '.proj_attn.'): v
                  for k, v in state_dict.items()}
  if edit:
    edit(state_dict)
  path.mkdir(parents=True, exist_ok=True)
  save_file(state_dict, str(path / unet_convert.SAFETENSORS_NAME))
  (path / unet_convert.CONFIG_NAME).write_text(json.dumps(hf_config))
  return state_dict


def test_import_maps_every_tensor_once(tmp_path):
  """Every checkpoint tensor lands in its own parameter (distinct fill
  values), old attention names included, from a pipeline's vae/ folder."""
  state_dict = _write_checkpoint(tmp_path / 'vae', TINY_CONFIG,
                                 legacy_attention=True)
  imported = diffusers_vae.import_diffusers_vae(str(tmp_path))
  values = sorted(float(np.ravel(p)[0])
                  for p in jax.tree.leaves(imported.params))
  assert values == list(range(len(state_dict)))
  enc = imported.params['encoder']
  q = enc['mid_block_attentions_0']['to_q']['kernel']
  assert q.shape == (32, 32)  # (in, out) from diffusers' (out, in)
  assert imported.params['quant_conv']['kernel'].shape == (1, 1, 8, 8)
  assert imported.settings == dict(block_out_channels=(16, 32),
                                   latent_channels=4, layers_per_block=1,
                                   norm_num_groups=4, out_channels=3)


@pytest.mark.parametrize('field,value,message', [
    ('_class_name', 'VQModel', r"_class_name='VQModel'.*only AutoencoderKL"),
    ('act_fn', 'gelu', r"act_fn='gelu'.*silu only"),
    ('down_block_types', ['DownEncoderBlock2D', 'AttnDownEncoderBlock2D'],
     r"down_block_types\[1\]='AttnDownEncoderBlock2D'.*DownEncoderBlock2D"),
    ('up_block_types', ['UpDecoderBlock2D'],
     r'up_block_types=.*one block per entry'),
    ('use_quant_conv', False, r'use_quant_conv=False.*needs True'),
    ('use_post_quant_conv', False, r'use_post_quant_conv=False.*needs True'),
    ('mid_block_add_attention', False, r'mid_block_add_attention=False'),
])
def test_refuses_unsupported_config(tmp_path, field, value, message):
  _write_checkpoint(tmp_path, TINY_CONFIG)
  (tmp_path / 'config.json').write_text(
      json.dumps({**TINY_CONFIG, field: value}))
  with pytest.raises(ValueError, match=message):
    diffusers_vae.import_diffusers_vae(str(tmp_path))


def _drop_key(sd):
  del sd['decoder.up_blocks.1.resnets.1.conv2.weight']


def _reshape_key(sd):
  sd['encoder.conv_out.weight'] = np.zeros((8, 32, 1, 1), np.float32)


def _add_key(sd):
  sd['encoder.extra.weight'] = np.zeros((3,), np.float32)


@pytest.mark.parametrize('edit,message', [
    (_drop_key, r'decoder\.\* tensors.*1 tensors of our model are not in '
     r'the checkpoint.*up_blocks\.1\.resnets\.1\.conv2\.weight'),
    (_reshape_key, r'encoder\.\* tensors.*conv_out\.weight has shape '
     r'\(8, 32, 1, 1\) but our model \(config\) expects \(8, 32, 3, 3\)'),
    (_add_key, r'encoder\.\* tensors.*1 checkpoint tensors have no place in '
     r'our model.*extra\.weight'),
])
def test_refuses_bad_tensors(tmp_path, edit, message):
  _write_checkpoint(tmp_path, TINY_CONFIG, edit=edit)
  with pytest.raises(ValueError, match=message):
    diffusers_vae.import_diffusers_vae(str(tmp_path))


def test_refuses_stray_top_level_tensor(tmp_path):
  _write_checkpoint(tmp_path, TINY_CONFIG,
                    edit=lambda sd: sd.update(bogus=np.zeros(3, np.float32)))
  with pytest.raises(ValueError, match=r'outside encoder.*no place.*bogus'):
    diffusers_vae.import_diffusers_vae(str(tmp_path))


def test_refuses_missing_directory(tmp_path):
  with pytest.raises(ValueError, match='holds no diffusers AutoencoderKL'):
    diffusers_vae.import_diffusers_vae(str(tmp_path))


def test_reads_torch_bin_with_old_attention_names(tmp_path):
  """A .bin written by torch (legacy query/key/value/proj_attn names)
  converts to the same params as the model's safetensors."""
  torch = pytest.importorskip('torch')
  hf = _hf_vae(TINY_CONFIG, seed=1)
  hf.save_pretrained(tmp_path / 'new')
  legacy = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value',
            'to_out.0': 'proj_attn'}
  state_dict = {}
  for key, value in hf.state_dict().items():
    for new, old in legacy.items():
      key = key.replace(f'.attentions.0.{new}.', f'.attentions.0.{old}.')
    state_dict[key] = value
  assert any('.proj_attn.' in k for k in state_dict)
  (tmp_path / 'old').mkdir()
  torch.save(state_dict, tmp_path / 'old' / unet_convert.BIN_NAME)
  (tmp_path / 'old' / 'config.json').write_text(json.dumps(TINY_CONFIG))
  new = diffusers_vae.import_diffusers_vae(str(tmp_path / 'new')).params
  old = diffusers_vae.import_diffusers_vae(str(tmp_path / 'old')).params
  jax.tree.map(np.testing.assert_array_equal, new, old)
