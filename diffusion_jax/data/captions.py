"""Template captions of a labelled data set, for text-to-image at toy scale.

A captioner turns each (image, label) row into a caption that combines the
class with a second attribute of the image, so that a model conditioned on
the caption must control two things at once (issue 14, item 6).

'digit_weight' (config.data.captions; the 8x8 digits or any labelled set):
  "a thick 3" / "a thin 3". The stroke weight is measured, not applied: an
  image's ink mass (the sum of its uint8 pixel values) against the median
  ink mass of its own class in the train split; thick iff strictly above
  it. Per-class medians split every class in halves (up to ties at the
  median), so the 20 captions are about equally frequent and weight is
  independent of the digit; and a sample's weight is measured the same way
  without any classifier (benchmarks/caption_control.py).

Two consumers:
  * CaptionedRows: the training source's rows (image, (ids, mask)), ids
    (L,) int32 and mask (L,) bool from the template's WordTokenizer
    (models/text.py), L = the longest template caption in tokens; batched,
    (images, (ids (B, L), mask (B, L))).
  * CaptionContext: what DiffusionMethod feeds its network: token ids as
    they are (a jointly trained TextEncoder, text_vocab_size > 0) or, with
    config.model.context_path, precomputed embeddings looked up per example
    by the caption's tokens; and the sample captions of config.sample.
    captions, checked before anything compiles.
"""

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from diffusion_jax.data import sources
from diffusion_jax.models import text

# config_checks.CAPTIONERS repeats these names (it imports no JAX).
CAPTIONERS = ('digit_weight',)
WEIGHTS = ('thick', 'thin')


def ink_mass(images) -> np.ndarray:
  """uint8 images (N, H, W, C) -> (N,) float64 sums of pixel values."""
  images = np.asarray(images)
  return images.reshape(len(images), -1).astype(np.float64).sum(-1)


def class_medians(images, labels, num_classes: int) -> np.ndarray:
  """(num_classes,) median ink mass of each class's images."""
  ink, labels = ink_mass(images), np.asarray(labels)
  missing = [k for k in range(num_classes) if not (labels == k).any()]
  if missing:
    raise sources.DataError(f'classes {missing} have no training images, so '
                            'their median stroke weight is undefined')
  return np.array([np.median(ink[labels == k]) for k in range(num_classes)])


@dataclasses.dataclass(frozen=True)
class DigitWeightCaptioner:
  """'a {thick|thin} {class}' from a label and the image's ink mass.

  medians: (K,) per-class median ink mass of the train split.
  """
  medians: np.ndarray

  @classmethod
  def from_train(cls, images, labels) -> 'DigitWeightCaptioner':
    labels = np.asarray(labels)
    return cls(class_medians(images, labels, int(labels.max()) + 1))

  @property
  def num_classes(self) -> int:
    return len(self.medians)

  @property
  def captions(self) -> tuple[str, ...]:
    """Every caption, class-major: caption 2k + (0 thick, 1 thin)."""
    return template_captions(self.num_classes)

  def is_thick(self, images, classes) -> np.ndarray:
    """(N,) bool: ink mass strictly above the median of `classes` (N,)."""
    return ink_mass(images) > self.medians[np.asarray(classes)]

  def caption_index(self, images, labels) -> np.ndarray:
    """(N,) int: which of `captions` each row gets."""
    labels = np.asarray(labels)
    return 2 * labels + (~self.is_thick(images, labels)).astype(int)

  def caption(self, images, labels) -> list[str]:
    return [self.captions[i] for i in self.caption_index(images, labels)]


def template_captions(num_classes: int) -> tuple[str, ...]:
  return tuple(f'a {w} {k}' for k in range(num_classes) for w in WEIGHTS)


def parse_caption(caption: str) -> tuple[int, bool]:
  """'a thick 3' -> (3, True): the attributes a caption asks for."""
  _, weight, digit = text.split(caption)
  return int(digit), weight == 'thick'


def template_tokenizer(name: str) -> text.WordTokenizer:
  """The tokenizer of a captioner's template: its vocabulary does not
  depend on the data (any class index up to 9 is a word)."""
  check_name(name)
  return text.WordTokenizer.from_captions(template_captions(10))


def check_name(name: str) -> None:
  if name not in CAPTIONERS:
    raise ValueError(f'config.data.captions={name!r}: use one of '
                     f'{CAPTIONERS} (or \'\' for no captions)')


def max_tokens(tokenizer: text.WordTokenizer, captions: Sequence[str]) -> int:
  return max(tokenizer.num_tokens(c) for c in captions)


def create_captioner(data_config) -> DigitWeightCaptioner:
  """The captioner of config.data.captions, its statistics from the labelled
  train split (the whole split is read once: toy-scale data)."""
  check_name(data_config.captions)
  train = sources.load_split(data_config, data_config.train_split)
  if train.labels is None:
    raise sources.DataError(
        f'config.data.captions={data_config.captions!r} captions the class '
        f'labels, but source={data_config.source!r} has none: use a labelled '
        "source (digits, idx with labels, npz with labels) or captions=''")
  if train.labels.max() > 9:
    raise sources.DataError(
        f'config.data.captions={data_config.captions!r} names classes 0-9, '
        f'but the labels go up to {train.labels.max()}')
  return DigitWeightCaptioner.from_train(train.images, train.labels)


class CaptionedRows:
  """Rows (image uint8 (H, W, C), (ids (L,) int32, mask (L,) bool)) of a
  labelled source, captioned once at construction."""

  def __init__(self, source, captioner: DigitWeightCaptioner,
               tokenizer: text.WordTokenizer, where: str):
    data = source.load()
    if data.labels is None:
      raise sources.DataError(f'{where} has no class labels to caption: use '
                              "a labelled source or config.data.captions=''")
    self._images = data.images
    captions = captioner.caption(data.images, data.labels)
    length = max_tokens(tokenizer, captioner.captions)
    self._ids, self._mask = tokenizer.encode(captions, length)

  def __len__(self):
    return len(self._images)

  def __getitem__(self, i):
    return self._images[i], (self._ids[i], self._mask[i])


def captioned_rows(data_config, source):
  """The pipeline's hook (data/pipeline.py): `source` captioned by
  config.data.captions."""
  return CaptionedRows(source, create_captioner(data_config),
                       template_tokenizer(data_config.captions),
                       f'{data_config.source} split '
                       f'{data_config.train_split!r}')


# ------------------------------------------------------------- the method --


@dataclasses.dataclass(frozen=True)
class CaptionContext:
  """Captions as the network's context, for DiffusionMethod.

  sample_ids, sample_mask: (K, L) tokens of the sample captions; image i of
    a sample batch gets caption i mod K.
  table_ids: (M, L) tokens of the captions with precomputed embeddings
    (M = 0: the network encodes token ids itself).
  table_embeddings, table_mask: (M, L_e, D), (M, L_e) their embeddings.
  """
  sample_captions: tuple[str, ...]
  sample_ids: np.ndarray
  sample_mask: np.ndarray
  table_ids: np.ndarray
  table_embeddings: np.ndarray
  table_mask: np.ndarray

  @classmethod
  def from_config(cls, config) -> 'CaptionContext':
    """Checked before anything compiles; errors name the key to change."""
    m = config.model
    name = config.data.get('captions', '')
    tok = template_tokenizer(name)
    captions = template_captions(10)
    samples = tuple(config.sample.get('captions', ())) or captions
    if isinstance(config.sample.get('captions', ()), str):
      raise ValueError('config.sample.captions must be a tuple of strings, '
                       f'not one string: ({samples!r},)')
    for c in samples:
      unknown = [w for w in text.split(c) if w not in tok.words[4:]]
      if unknown or not text.split(c):
        raise ValueError(
            f'config.sample.captions has {c!r}, whose words {unknown} are not '
            f'in the vocabulary of config.data.captions={name!r} '
            f'({" ".join(tok.words[4:])}): captions look like {captions[6]!r}')
    path = m.get('context_path', '')
    vocab, max_len = m.get('text_vocab_size', 0), m.get('text_max_length', 0)
    if path and vocab:
      raise ValueError(
          f'config.model.context_path={path!r} gives precomputed embeddings, '
          f'but config.model.text_vocab_size={vocab} asks the network to '
          'encode token ids: set text_vocab_size=0 or context_path=\'\'')
    if not path and vocab < tok.vocab_size:
      raise ValueError(
          f'config.model.text_vocab_size={vocab} is smaller than the '
          f'vocabulary of config.data.captions={name!r} ({tok.vocab_size} '
          f'tokens with the 4 special ones): set config.model.text_vocab_size'
          f'={tok.vocab_size} (or more), or precomputed embeddings with '
          'config.model.context_path')
    length = max(max_tokens(tok, captions), max_tokens(tok, samples))
    if not path:
      try:
        tok.check_lengths(samples, max_len)
        tok.check_lengths(captions, max_len)
      except ValueError as e:
        raise ValueError(f'config.sample.captions / config.model.'
                         f'text_max_length: {e}') from e
    ids, mask = tok.encode(samples, length)
    empty = np.zeros((0, length), np.int32)
    table = (empty, np.zeros((0, 1, 1), np.float32), np.zeros((0, 1), bool))
    if path:
      table = _embedding_table(path, m.get('context_dim', 0), max_len, tok,
                               sorted(set(captions) | set(samples)), length)
    return cls(samples, ids, mask, *table)

  @property
  def precomputed(self) -> bool:
    return len(self.table_ids) > 0

  def sample_captions_of(self, num: int) -> list[str]:
    """The caption of each of `num` images of one sample call."""
    return [self.sample_captions[i % len(self.sample_captions)]
            for i in range(num)]

  def sample_tokens(self, num: int):
    """(ids (num, L), mask (num, L)): caption i mod K for image i, a
    function of the batch position only (as guidance.class_labels)."""
    rows = np.arange(num) % len(self.sample_ids)
    return jnp.asarray(self.sample_ids[rows]), jnp.asarray(
        self.sample_mask[rows])

  def network_context(self, ids, mask):
    """(B, L) ids and mask -> (context, mask) for the network: the ids as
    they are, or each row's precomputed embeddings (found by its tokens;
    the mask then is the embeddings')."""
    if not self.precomputed:
      return ids, mask
    match = jnp.all(ids[:, None, :] == jnp.asarray(self.table_ids)[None], -1)
    row = jnp.argmax(match, axis=-1)
    return (jnp.asarray(self.table_embeddings)[row],
            jnp.asarray(self.table_mask)[row])


def _embedding_table(path, context_dim, max_length, tok, captions, length):
  """(ids (M, L), embeddings (M, L_e, D), mask (M, L_e)) of `captions` from
  an .npz holding 'embeddings', 'mask' and 'captions' (one string per
  row)."""
  emb, mask = text.load_embeddings(path, context_dim, max_length)
  with np.load(path, allow_pickle=False) as npz:
    if 'captions' not in npz.files:
      raise ValueError(
          f"config.model.context_path={path!r} has no 'captions' array: save "
          'the caption of each embedding row as a string array "captions"')
    names = [str(c) for c in npz['captions']]
  if len(names) != len(emb):
    raise ValueError(f'config.model.context_path={path!r}: {len(names)} '
                     f'captions for {len(emb)} embedding rows')
  missing = [c for c in captions if c not in names]
  if missing:
    raise ValueError(
        f'config.model.context_path={path!r} has no embeddings of the '
        f'captions {missing[:4]} ({len(missing)} missing; training and '
        'config.sample.captions need every one): add them to the .npz')
  rows = [names.index(c) for c in captions]
  ids, _ = tok.encode(captions, length)
  return ids, emb[rows], mask[rows]
