"""The feature networks that sample-quality metrics are computed in.

A `FeatureNetwork` is a network's variables plus a pure function
`features(variables, images in [0, 1]) -> (features (B, D), logits (B, K))`.
The evaluator (`sample_quality`) streams features into the same statistics
whatever the network, so FID and its classifier analogue share every line
of code but this one:

* 'inception': pytorch-fid's InceptionV3 (pool3, 2048-d; 1008 logits), the
  published FID/IS/KID when given the real weights at 299 px.
* 'classifier': a small CNN trained on the labelled training split of the
  run's own data set (`metrics/classifier.py`), for data where Inception is
  meaningless or unavailable (8x8 digits, MNIST): its penultimate layer
  gives a Frechet distance ("FD"), a KID and an Inception-Score analogue.
  Like FID it is only comparable at equal sample counts, and only within
  one data set and one classifier (the fingerprint names it).
"""

import dataclasses
import functools
from typing import Any, Callable

import jax.numpy as jnp

from diffusion_jax.metrics import inception

NETWORKS = ('inception', 'classifier')


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureNetwork:
  kind: str  # one of NETWORKS
  # (variables, NHWC images in [0, 1]) -> (features, logits). Must be one
  # long-lived function object per architecture: compilations are cached on it.
  features: Callable[[Any, jnp.ndarray], tuple[jnp.ndarray, jnp.ndarray]]
  variables: Any
  feature_dim: int
  num_classes: int
  source: str  # where the variables came from (a path, 'random', a cache)
  fingerprint: str  # a hash of the variables: the key of cached statistics
  is_random: bool = False
  # 'inception' at 299 px with the real weights: FIDs comparable to papers.
  comparable_to_published: bool = False

  @property
  def tag(self) -> str:
    """The prefix of this network's metric names ('' for Inception's FID)."""
    return '' if self.kind == 'inception' else f'{self.kind}_'


@functools.lru_cache(maxsize=8)
def _inception_features(resize_to: int):
  model = inception.FIDInceptionV3(resize_to=resize_to)

  def features(variables, images):
    pool, _ = model.apply(variables, images)
    # IS uses the logits without the fc bias (see metrics/distances.py).
    return pool, pool @ variables['params']['fc']['kernel']

  return features


def inception_network(params: inception.InceptionParams,
                      resize_to: int = inception.INPUT_SIZE) -> FeatureNetwork:
  return FeatureNetwork(
      kind='inception', features=_inception_features(resize_to),
      variables=params.variables, feature_dim=inception.POOL_DIM,
      num_classes=inception.NUM_CLASSES,
      source=f'{params.source} @ {resize_to}px',
      fingerprint=f'{params.fingerprint}_r{resize_to}',
      is_random=params.is_random,
      comparable_to_published=(not params.is_random and
                               resize_to == inception.INPUT_SIZE))
