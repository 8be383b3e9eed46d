"""The FID InceptionV3 in Flax Linen: 2048-d pool3 features and 1008 logits.

This is the 2015-12-05 TensorFlow Inception graph that every published FID
(and the original Inception Score) was computed with, in the layout of
pytorch-fid's port (`pytorch_fid.inception.fid_inception_v3`): torchvision's
InceptionV3 stem, Mixed_6a and Mixed_7a, and pytorch-fid's `FIDInceptionA`
(Mixed_5b-d), `FIDInceptionC` (Mixed_6b-e), `FIDInceptionE_1` (Mixed_7b) and
`FIDInceptionE_2` (Mixed_7c) blocks. They differ from torchvision's in ways
that change the numbers, so they are reproduced exactly:

* the 3x3 average pools of the branch_pool paths ignore the zero padding
  (TensorFlow's behaviour; torch's `count_include_pad=False`);
* Mixed_7c pools its branch_pool path with a 3x3 *max* pool (a quirk of the
  TF graph that the FID weights were trained with);
* every conv is bias-free and followed by BatchNorm with eps 1e-3, here in
  inference mode (running statistics in the 'batch_stats' collection);
* the classifier has 1008 classes (the original graph's, not 1000).

Module names follow pytorch-fid's state dict (`Mixed_5b/branch1x1/conv`, ...)
so `load_pytorch_fid_weights` maps `pt_inception-2015-12-05-6726825d.pth`
onto our variables one tensor at a time.

Input handling is pytorch-fid's `InceptionV3(resize_input=True,
normalize_input=True)`: images in [0, 1] are resized to 299x299 with
bilinear interpolation, half-pixel centres (`align_corners=False`) and *no*
antialiasing, then scaled to [-1, 1]. `jax.image.resize(..., 'bilinear')`
antialiases by default when downsampling, which torch's F.interpolate does
not; we pass `antialias=False`, which matches F.interpolate when up- or
downsampling (and the antialias flag changes nothing when upsampling, the
usual case for 32x32 samples).

No Inception weights exist on a machine without internet: `random_params`
then gives a randomly initialised network so the whole code path runs, with
a loud warning, since such FIDs are not comparable to published ones.
"""

import dataclasses
import functools
import hashlib
import os
from typing import Any, Mapping

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.errors import UserError

FID_WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
INPUT_SIZE = 299
# The smallest input for which every VALID conv/pool keeps a positive size.
MIN_INPUT_SIZE = 75
POOL_DIM = 2048
NUM_CLASSES = 1008


class BasicConv2d(nn.Module):
  """Bias-free conv, BatchNorm (eps 1e-3, running statistics), ReLU."""
  features: int
  kernel: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)
  kernel_init: Any = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')

  @nn.compact
  def __call__(self, x):
    (ph, pw) = self.padding
    x = nn.Conv(self.features, self.kernel, strides=self.strides,
                padding=((ph, ph), (pw, pw)), use_bias=False,
                kernel_init=self.kernel_init, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


def _conv(features, kernel, name, strides=1, padding=0):
  pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
  return BasicConv2d(features, pair(kernel), pair(strides), pair(padding),
                     name=name)


def _avg_pool_3x3(x):
  # TF's (and FID's) average pool divides by the number of real pixels.
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), (2, 2), 'VALID')


class FIDInceptionA(nn.Module):
  """Mixed_5b/c/d: 1x1, 5x5, double 3x3 and pooled branches."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = _conv(64, 1, 'branch1x1')(x)
    b5 = _conv(48, 1, 'branch5x5_1')(x)
    b5 = _conv(64, 5, 'branch5x5_2', padding=2)(b5)
    b3 = _conv(64, 1, 'branch3x3dbl_1')(x)
    b3 = _conv(96, 3, 'branch3x3dbl_2', padding=1)(b3)
    b3 = _conv(96, 3, 'branch3x3dbl_3', padding=1)(b3)
    bp = _conv(self.pool_features, 1, 'branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (torchvision's, unpatched): grid reduction 35 -> 17."""

  @nn.compact
  def __call__(self, x):
    b3 = _conv(384, 3, 'branch3x3', strides=2)(x)
    bd = _conv(64, 1, 'branch3x3dbl_1')(x)
    bd = _conv(96, 3, 'branch3x3dbl_2', padding=1)(bd)
    bd = _conv(96, 3, 'branch3x3dbl_3', strides=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
  """Mixed_6b-e: factorised 7x7 branches."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = _conv(192, 1, 'branch1x1')(x)
    b7 = _conv(c7, 1, 'branch7x7_1')(x)
    b7 = _conv(c7, (1, 7), 'branch7x7_2', padding=(0, 3))(b7)
    b7 = _conv(192, (7, 1), 'branch7x7_3', padding=(3, 0))(b7)
    bd = _conv(c7, 1, 'branch7x7dbl_1')(x)
    bd = _conv(c7, (7, 1), 'branch7x7dbl_2', padding=(3, 0))(bd)
    bd = _conv(c7, (1, 7), 'branch7x7dbl_3', padding=(0, 3))(bd)
    bd = _conv(c7, (7, 1), 'branch7x7dbl_4', padding=(3, 0))(bd)
    bd = _conv(192, (1, 7), 'branch7x7dbl_5', padding=(0, 3))(bd)
    bp = _conv(192, 1, 'branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (torchvision's, unpatched): grid reduction 17 -> 8."""

  @nn.compact
  def __call__(self, x):
    b3 = _conv(192, 1, 'branch3x3_1')(x)
    b3 = _conv(320, 3, 'branch3x3_2', strides=2)(b3)
    b7 = _conv(192, 1, 'branch7x7x3_1')(x)
    b7 = _conv(192, (1, 7), 'branch7x7x3_2', padding=(0, 3))(b7)
    b7 = _conv(192, (7, 1), 'branch7x7x3_3', padding=(3, 0))(b7)
    b7 = _conv(192, 3, 'branch7x7x3_4', strides=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
  """Mixed_7b (pool='avg', FIDInceptionE_1) and 7c (pool='max', E_2)."""
  pool: str

  @nn.compact
  def __call__(self, x):
    b1 = _conv(320, 1, 'branch1x1')(x)
    b3 = _conv(384, 1, 'branch3x3_1')(x)
    b3 = jnp.concatenate([
        _conv(384, (1, 3), 'branch3x3_2a', padding=(0, 1))(b3),
        _conv(384, (3, 1), 'branch3x3_2b', padding=(1, 0))(b3)], axis=-1)
    bd = _conv(448, 1, 'branch3x3dbl_1')(x)
    bd = _conv(384, 3, 'branch3x3dbl_2', padding=1)(bd)
    bd = jnp.concatenate([
        _conv(384, (1, 3), 'branch3x3dbl_3a', padding=(0, 1))(bd),
        _conv(384, (3, 1), 'branch3x3dbl_3b', padding=(1, 0))(bd)], axis=-1)
    if self.pool == 'avg':
      pooled = _avg_pool_3x3(x)
    else:  # The FID graph's quirk: a max pool in the last block.
      pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
    bp = _conv(192, 1, 'branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def preprocess(images: jax.Array, resize_to: int = INPUT_SIZE) -> jax.Array:
  """NHWC images in [0, 1] (1 or 3 channels) -> 3-channel, resized, [-1, 1].

  The resize is bilinear with half-pixel centres and no antialiasing, i.e.
  torch's F.interpolate(mode='bilinear', align_corners=False), as in
  pytorch-fid. Grayscale is repeated to RGB, as pytorch-fid's ImagePathDataset
  does with PIL's convert('RGB').
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'expected NHWC images with 1 or 3 channels, got shape '
                     f'{images.shape}')
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (resize_to, resize_to):
    x = jax.image.resize(x, (x.shape[0], resize_to, resize_to, 3), 'bilinear',
                         antialias=False)
  return 2.0 * x - 1.0


class FIDInceptionV3(nn.Module):
  """Images in [0, 1] -> (pool3 features (B, 2048), logits (B, 1008)).

  Attributes:
    resize_to: the side the input is resized to; 299 for real FIDs. Smaller
      sizes (>= 75) exist only to make tests and random-network smoke runs
      cheap: the weights were trained at 299.
  """
  resize_to: int = INPUT_SIZE

  @nn.compact
  def __call__(self, images):
    if self.resize_to < MIN_INPUT_SIZE:
      raise ValueError(f'resize_to={self.resize_to} is below the smallest '
                       f'input InceptionV3 accepts ({MIN_INPUT_SIZE})')
    x = preprocess(images, self.resize_to)
    x = _conv(32, 3, 'Conv2d_1a_3x3', strides=2)(x)
    x = _conv(32, 3, 'Conv2d_2a_3x3')(x)
    x = _conv(64, 3, 'Conv2d_2b_3x3', padding=1)(x)
    x = _max_pool_3x3_s2(x)
    x = _conv(80, 1, 'Conv2d_3b_1x1')(x)
    x = _conv(192, 3, 'Conv2d_4a_3x3')(x)
    x = _max_pool_3x3_s2(x)
    x = FIDInceptionA(32, name='Mixed_5b')(x)
    x = FIDInceptionA(64, name='Mixed_5c')(x)
    x = FIDInceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160),
                     ('Mixed_6e', 192)):
      x = FIDInceptionC(c7, name=name)(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = FIDInceptionE('avg', name='Mixed_7b')(x)
    x = FIDInceptionE('max', name='Mixed_7c')(x)
    pool = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d(1): pool_3.
    logits = nn.Dense(NUM_CLASSES, name='fc')(pool)
    return pool, logits


# ----------------------------------------------------------------- weights --


@dataclasses.dataclass(frozen=True, eq=False)
class InceptionParams:
  """The network's variables and where they came from.

  `source` travels with the variables so that every metric (and every cached
  reference statistic) says which network produced it: FIDs of a random
  network must never be mixed up with, or compared to, real ones.
  """
  variables: Mapping[str, Any]  # {'params': ..., 'batch_stats': ...}
  source: str

  @property
  def is_random(self) -> bool:
    return self.source.startswith('random')

  @functools.cached_property
  def fingerprint(self) -> str:
    """A short hash of every tensor: the key of cached reference stats."""
    h = hashlib.sha256(self.source.split(':')[0].encode())
    flat = jax.tree_util.tree_flatten_with_path(self.variables)[0]
    for path, leaf in flat:
      h.update(jax.tree_util.keystr(path).encode())
      h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return h.hexdigest()[:16]


RANDOM_WARNING = (
    'RANDOM Inception weights: FID/IS/KID from this network are NOT '
    'comparable to published numbers (only to each other, as a smoke test). '
    'For real metrics pass load_pytorch_fid_weights(<path to '
    f'{FID_WEIGHTS_FILE}>).')


def random_params(rng: jax.Array | int = 0) -> InceptionParams:
  """A randomly initialised network, for machines without the FID weights.

  Convs get He-normal kernels so activations keep their scale through the 94
  ReLU layers (a LeCun init would shrink the features ~1000x); BatchNorm
  starts as the identity (mean 0, var 1, scale 1, bias 0); fc is LeCun
  normal. Drawn with numpy from the shapes: jitting `model.init` of this
  network takes over a minute to compile on a 2-core CPU, this ~1 s.
  """
  logging.warning(RANDOM_WARNING)
  if not isinstance(rng, int):
    rng = int(jax.random.randint(rng, (), 0, np.iinfo(np.int32).max))
  gen = np.random.default_rng(rng)

  def draw(keypath, spec):
    *_, leaf = [k.key for k in keypath]
    if leaf == 'kernel':
      fan_in = int(np.prod(spec.shape[:-1]))
      gain = 1.0 if len(spec.shape) == 2 else 2.0  # fc vs conv (ReLU after)
      value = gen.standard_normal(spec.shape, np.float32) * np.sqrt(
          gain / fan_in, dtype=np.float32)
    elif leaf in ('scale', 'var'):
      value = np.ones(spec.shape, np.float32)
    else:
      value = np.zeros(spec.shape, np.float32)
    return jnp.asarray(value)

  variables = jax.tree_util.tree_map_with_path(draw, abstract_variables())
  return InceptionParams(dict(variables), 'random')


def abstract_variables() -> Mapping[str, Any]:
  """Shapes and dtypes of the network's variables, without compute."""
  model = FIDInceptionV3(resize_to=MIN_INPUT_SIZE)
  return jax.eval_shape(
      model.init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3),
                           jnp.float32))


class WeightsError(UserError, ValueError):
  """The weights file is missing or does not fit the network."""


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A .pth (via torch, imported only here) or an .npz of the same keys."""
  if not os.path.isfile(path):
    raise WeightsError(
        f'FID Inception weights not found at {path!r}. Copy '
        f'{FID_WEIGHTS_FILE} (pytorch-fid\'s release asset) there and set '
        'config.sample_quality.weights_path to it; nothing is downloaded at '
        "run time. Without it, set config.sample_quality.weights_path='' (a "
        'random network: numbers not comparable to published FIDs) or '
        "config.sample_quality.network='classifier'.")
  if path.endswith('.npz'):
    with np.load(path) as npz:
      return {k: npz[k] for k in npz.files}
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise WeightsError(
        f'reading {path} needs torch (pip install -r requirements-fid.txt), '
        'or convert it once elsewhere to an .npz of the same keys: '
        'np.savez(out, **{k: v.numpy() for k, v in torch.load(path).items()})'
    ) from e
  state = torch.load(path, map_location='cpu', weights_only=True)
  return {k: v.detach().cpu().numpy() for k, v in state.items()}


def convert_state_dict(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """pytorch-fid / torchvision FID Inception state dict -> Flax variables.

  Conv kernels go OIHW -> HWIO, the fc matrix is transposed, BatchNorm
  weight/bias -> params scale/bias and running_mean/var -> batch_stats.
  Every expected tensor must be present with the right shape; extra ones
  (num_batches_tracked, an aux classifier) are ignored.
  """
  abstract = abstract_variables()
  out: dict[str, Any] = {}

  def put(collection, path, value):
    node = out.setdefault(collection, {})
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value

  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  for keypath, spec in flat:
    collection, *path = [k.key for k in keypath]
    *module, leaf = path
    prefix = '.'.join(module)
    if collection == 'batch_stats':
      key, transform = prefix + {'mean': '.running_mean',
                                 'var': '.running_var'}[leaf], None
    elif leaf == 'kernel' and module[-1] == 'conv':
      key, transform = prefix + '.weight', (2, 3, 1, 0)
    elif leaf == 'kernel':  # fc
      key, transform = prefix + '.weight', (1, 0)
    else:
      key, transform = prefix + {'scale': '.weight', 'bias': '.bias'}[leaf], None
    if key not in state:
      raise WeightsError(f'weights lack tensor {key!r} (needed for '
                         f'{collection}/{"/".join(path)}); is this the FID '
                         f'Inception ({FID_WEIGHTS_FILE})?')
    value = np.asarray(state[key], np.float32)
    expected = spec.shape if transform is None else tuple(
        spec.shape[transform.index(i)] for i in range(len(transform)))
    if value.shape != expected:
      raise WeightsError(f'tensor {key!r} has shape {value.shape}, the FID '
                         f'Inception expects {expected}')
    if transform is not None:
      value = value.transpose(transform)
    put(collection, path, jnp.asarray(value))
  return out


def load_pytorch_fid_weights(path: str) -> InceptionParams:
  """Reads pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (local).

  torch is needed only to unpickle a .pth (an optional dependency, imported
  here); an .npz holding the same keys and arrays works without it.
  """
  variables = convert_state_dict(_read_state_dict(path))
  return InceptionParams(variables, f'pytorch_fid:{os.path.basename(path)}')
