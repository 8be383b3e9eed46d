"""Importing diffusers DDPM checkpoints: same outputs, same sizes, bad input.

The comparisons build randomly initialised diffusers UNet2DModels (nothing is
downloaded) with the released DDPM configs and check that our U-Net, given
the converted weights, predicts the same eps. Tests that need torch or
diffusers (requirements-convert.txt) skip when they are not installed.
"""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10_ddpm, default
from diffusion_jax.convert import diffusers as cd
from diffusion_jax.convert import diffusers_cli
from diffusion_jax import experiment, generate, methods, parallel
from tests.compile_flags import FAST_COMPILE
from tests.util import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# google/ddpm-cifar10-32's unet/config.json (the paper's CIFAR-10 model).
CIFAR10_CONFIG = {
    '_class_name': 'UNet2DModel',
    'act_fn': 'silu',
    'attention_head_dim': None,
    'block_out_channels': [128, 256, 256, 256],
    'center_input_sample': False,
    'down_block_types': ['DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D',
                         'DownBlock2D'],
    'downsample_padding': 0,
    'flip_sin_to_cos': False,
    'freq_shift': 1,
    'in_channels': 3,
    'layers_per_block': 2,
    'mid_block_scale_factor': 1,
    'norm_eps': 1e-06,
    'norm_num_groups': 32,
    'out_channels': 3,
    'sample_size': 32,
    'time_embedding_type': 'positional',
    'up_block_types': ['UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'],
}
# google/ddpm-{church,bedroom,cat,celebahq}-256: attention at 16x16 only.
LSUN256_CONFIG = {
    **CIFAR10_CONFIG,
    'block_out_channels': [128, 128, 256, 256, 512, 512],
    'down_block_types': ['DownBlock2D'] * 4 + ['AttnDownBlock2D',
                                               'DownBlock2D'],
    'up_block_types': ['UpBlock2D', 'AttnUpBlock2D'] + ['UpBlock2D'] * 4,
    'sample_size': 256,
}
# Same blocks as LSUN256 at 1/4 width and 64x64: attention at 4x4 (level 4).
SMALL256_LAYOUT_CONFIG = {
    **LSUN256_CONFIG,
    'block_out_channels': [32, 32, 64, 64, 128, 128],
    'norm_num_groups': 8,
    'sample_size': 64,
}
TINY_CONFIG = {
    **CIFAR10_CONFIG,
    'block_out_channels': [16, 32],
    'down_block_types': ['DownBlock2D', 'AttnDownBlock2D'],
    'up_block_types': ['AttnUpBlock2D', 'UpBlock2D'],
    'layers_per_block': 1,
    'norm_num_groups': 4,
    'in_channels': 1,
    'out_channels': 1,
    'sample_size': 8,
}


def _torch():
  return pytest.importorskip('torch')


def _diffusers():
  _torch()
  pytest.importorskip('safetensors')
  return pytest.importorskip('diffusers')


def _hf_model(hf_config, seed=0, randomize=True):
  """A diffusers UNet2DModel with every weight random and non-trivial
  (or zero: for shape-only checks).

  diffusers' own init already leaves nothing at zero, but GroupNorms start at
  scale 1 / bias 0, which would hide a scale<->bias swap: everything is
  redrawn (weights ~ N(0, 1/fan_in) keep activations O(1) through the net).
  """
  diffusers = _diffusers()
  torch = _torch()
  kwargs = {k: v for k, v in hf_config.items() if not k.startswith('_')}
  # Built on the meta device (diffusers' own init of 10^8 weights takes
  # seconds), then given real memory and filled here.
  with torch.device('meta'):
    model = diffusers.UNet2DModel(**kwargs, dropout=0.1).eval()
  model = model.to_empty(device='cpu')
  assert not list(model.buffers())  # everything is filled below
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if not randomize:
        p.zero_()
      elif p.ndim == 1:
        center = 1.0 if name.endswith('weight') else 0.0  # norm scales
        p.copy_(center + 0.2 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
  return model


def _numpy_state_dict(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _our_model(hf_config, base=None):
  config = cd.config_from_diffusers(hf_config, base or default.get_config())
  method = methods.DiffusionMethod.from_config(config)
  abstract = jax.eval_shape(method.init_params, jax.random.key(0))
  return config, method.network, abstract


def _num_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _max_abs_diff(hf_config, timesteps, seed=0, hf=None):
  """Largest |ours - diffusers| of eps over batches of 2 at these t."""
  torch = _torch()
  hf = _hf_model(hf_config, seed) if hf is None else hf
  config, model, abstract = _our_model(hf_config)
  params = cd.convert_params(_numpy_state_dict(hf), abstract)
  # params as an argument: closed over, they would be baked into the HLO
  # as constants and compile several times slower.
  apply = jax.jit(lambda p, x, t: model.apply({'params': p}, x, t,
                                              train=False))
  rng = np.random.default_rng(seed)
  size, ch = config.data.image_size, config.data.channels
  worst, scale = 0.0, 0.0
  for t in timesteps:
    x = rng.standard_normal((2, ch, size, size)).astype(np.float32)
    with torch.no_grad():
      theirs = hf(torch.from_numpy(x), torch.tensor(t)).sample.numpy()
    ours = np.asarray(apply(params, x.transpose(0, 2, 3, 1),
                            np.array(t, np.int32)))
    worst = max(worst, float(np.abs(ours.transpose(0, 3, 1, 2) - theirs).max()))
    scale = max(scale, float(np.abs(theirs).max()))
  print(f'max |ours - diffusers| = {worst:.2e} (outputs up to {scale:.2f})')
  assert scale > 0.1  # A meaningful comparison: not two near-zero outputs.
  return worst


# ------------------------------------------------------------ equivalence --
def test_paper_cifar10_model_matches_diffusers():
  hf = _hf_model(CIFAR10_CONFIG)
  assert sum(p.numel() for p in hf.parameters()) == 35_746_307
  config, _, abstract = _our_model(CIFAR10_CONFIG,
                                   base=cifar10_ddpm.get_config())
  assert _num_params(abstract) == 35_746_307
  # The released checkpoint maps onto exactly the paper config.
  want = cifar10_ddpm.get_config()
  assert config.model.to_dict() == want.model.to_dict()
  assert config.data.to_dict() == want.data.to_dict()
  diff = _max_abs_diff(CIFAR10_CONFIG, [[0, 999], [1, 500], [250, 42]],
                       hf=hf)
  assert diff < 1e-4


def test_256_layout_param_counts_and_conversion_by_shape():
  hf = _hf_model(LSUN256_CONFIG, randomize=False)  # only shapes matter
  assert sum(p.numel() for p in hf.parameters()) == 113_673_219
  config, _, abstract = _our_model(LSUN256_CONFIG)
  assert _num_params(abstract) == 113_673_219
  assert tuple(config.model.ch_mult) == (1, 1, 2, 2, 4, 4)
  assert tuple(config.model.attn_resolutions) == (16,)
  assert config.data.image_size == 256
  state_dict = _numpy_state_dict(hf)
  del hf
  params = cd.convert_params(state_dict, abstract)
  jax.tree.map(lambda p, a: (p.shape, p.dtype) == (a.shape, a.dtype) or
               pytest.fail(f'{p.shape} != {a.shape}'), params, abstract)
  np.testing.assert_array_equal(
      params['down_blocks_4_attentions_1']['to_out']['kernel'],
      state_dict['down_blocks.4.attentions.1.to_out.0.weight'].T)


def test_256_layout_at_reduced_width_matches_diffusers():
  diff = _max_abs_diff(SMALL256_LAYOUT_CONFIG, [[0, 999], [3, 640]])
  assert diff < 1e-4


@pytest.mark.slow
def test_full_256_model_matches_diffusers():
  assert _max_abs_diff(LSUN256_CONFIG, [[10, 900]]) < 1e-4


def test_legacy_attention_names_convert_the_same():
  hf = _hf_model(TINY_CONFIG)
  _, _, abstract = _our_model(TINY_CONFIG)
  state_dict = _numpy_state_dict(hf)
  legacy = {}
  for key, value in state_dict.items():
    for new, old in (('to_q', 'query'), ('to_k', 'key'), ('to_v', 'value'),
                     ('to_out.0', 'proj_attn')):
      key = key.replace(f'.{new}.', f'.{old}.')
    legacy[key] = value
  assert any('proj_attn' in k for k in legacy)
  jax.tree.map(np.testing.assert_array_equal,
               cd.convert_params(legacy, abstract),
               cd.convert_params(state_dict, abstract))


# ----------------------------------------------------------------- loading --
def test_safetensors_and_bin_load_the_same_and_pipeline_root(tmp_path):
  torch = _torch()
  hf = _hf_model(TINY_CONFIG)
  hf.save_pretrained(tmp_path / 'st')  # safetensors by default
  assert os.path.exists(tmp_path / 'st' / cd.SAFETENSORS_NAME)
  # A pipeline root, as the released google/ddpm-* repositories are laid out.
  root = tmp_path / 'pipe'
  (root / 'unet').mkdir(parents=True)
  (root / 'model_index.json').write_text('{"_class_name": "DDPMPipeline"}')
  torch.save(hf.state_dict(), root / 'unet' / cd.BIN_NAME)
  (root / 'unet' / cd.CONFIG_NAME).write_text(
      (tmp_path / 'st' / cd.CONFIG_NAME).read_text())
  cfg_st, sd_st = cd.load_diffusers_unet(str(tmp_path / 'st'))
  cfg_bin, sd_bin = cd.load_diffusers_unet(str(root))
  assert cfg_st == cfg_bin and cfg_st['block_out_channels'] == [16, 32]
  assert sorted(sd_st) == sorted(sd_bin) == sorted(hf.state_dict())
  for key in sd_st:
    np.testing.assert_array_equal(sd_st[key], sd_bin[key])


class _RunsCodeWhenUnpickled:
  """Pickles as 'call _record_unpickling(path)': a stand-in for an exploit."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (_record_unpickling, (self.path,))


def _record_unpickling(path):
  with open(path, 'w') as f:
    f.write('code ran')


def test_bin_whose_pickle_needs_code_execution_is_refused(tmp_path):
  torch = _torch()
  marker = tmp_path / 'ran'
  (tmp_path / cd.CONFIG_NAME).write_text(json.dumps(TINY_CONFIG))
  torch.save({'conv_in.weight': torch.zeros(2),
              'evil': _RunsCodeWhenUnpickled(str(marker))},
             tmp_path / cd.BIN_NAME)
  with pytest.raises(ValueError, match='code execution'):
    cd.load_diffusers_unet(str(tmp_path))
  assert not marker.exists()


def test_missing_files_say_what_was_expected(tmp_path):
  (tmp_path / cd.CONFIG_NAME).write_text('{}')
  with pytest.raises(ValueError, match='diffusion_pytorch_model.safetensors'):
    cd.load_diffusers_unet(str(tmp_path))
  with pytest.raises(ValueError, match='not a directory'):
    cd.load_diffusers_unet(str(tmp_path / 'nope'))


# ------------------------------------------------------------- bad input --
def test_shape_mismatch_names_tensor_and_both_shapes():
  hf = _hf_model(TINY_CONFIG)
  _, _, abstract = _our_model({**TINY_CONFIG, 'block_out_channels': [8, 16]})
  with pytest.raises(ValueError) as e:
    cd.convert_params(_numpy_state_dict(hf), abstract)
  msg = str(e.value)
  assert 'conv_in.bias' in msg and '(16,)' in msg and '(8,)' in msg, msg


def test_missing_and_unused_tensors_are_errors():
  hf = _hf_model(TINY_CONFIG)
  _, _, abstract = _our_model(TINY_CONFIG)
  state_dict = _numpy_state_dict(hf)
  extra = {**state_dict, 'class_embedding.weight': np.zeros((2, 64))}
  with pytest.raises(ValueError, match='class_embedding.weight'):
    cd.convert_params(extra, abstract)
  del state_dict['mid_block.attentions.0.to_k.bias']
  with pytest.raises(ValueError, match='mid_block.attentions.0.to_k.bias'):
    cd.convert_params(state_dict, abstract)


@pytest.mark.parametrize('field,value', [
    ('flip_sin_to_cos', True),
    ('freq_shift', 0),
    ('resnet_time_scale_shift', 'scale_shift'),
    ('act_fn', 'gelu'),
    ('add_attention', False),
    ('downsample_padding', 1),
    ('center_input_sample', True),
    ('time_embedding_type', 'fourier'),
    ('num_class_embeds', 10),
    ('attention_head_dim', 8),
    ('norm_eps', 1e-5),
    ('out_channels', 6),
    ('up_block_types', ['UpBlock2D', 'UpBlock2D', 'UpBlock2D', 'UpBlock2D']),
])
def test_unrepresentable_diffusers_configs_are_rejected(field, value):
  with pytest.raises(ValueError, match=field):
    cd.config_from_diffusers({**CIFAR10_CONFIG, field: value},
                             default.get_config())


def test_missing_config_fields_take_diffusers_defaults():
  # Without the field diffusers builds 8-dim heads: 32 heads on 256 channels.
  config = dict(CIFAR10_CONFIG)
  del config['attention_head_dim']
  with pytest.raises(ValueError, match='attention_head_dim=8 .*32 heads'):
    cd.config_from_diffusers(config, default.get_config())


# --------------------------------------------------------------------- CLI --
def test_cli_writes_a_checkpoint_that_sample_mode_restores(tmp_path):
  hf = _hf_model(TINY_CONFIG)
  hf.save_pretrained(tmp_path / 'src')
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'diffusion_jax.convert.diffusers_cli',
         f'--src={tmp_path / "src"}', f'--workdir={workdir}',
         '--config=configs/default.py']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': FAST_COMPILE}
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert '--config.model.temb_dim=64' in out.stdout, out.stdout

  config = cd.config_from_diffusers(TINY_CONFIG, default.get_config())
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['model']['ch_mult'] == [1, 2] and saved['data']['channels'] == 1
  _, _, abstract = _our_model(TINY_CONFIG)
  want = cd.convert_params(_numpy_state_dict(hf), abstract)
  ema, step = generate.load_sample_params(
      experiment.build(config, parallel.create_mesh(), mode='sample'),
      str(workdir))
  assert step == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(ema), want)

  with pytest.raises(ValueError, match='already holds checkpoints'):
    diffusers_cli.convert_to_workdir(str(tmp_path / 'src'), str(workdir),
                                     tiny_config())
