"""Config to objects, once: checks, mesh, method, data and compiled functions.

`build(config)` runs every check before anything is loaded or compiled and
returns an `Experiment`: the objects the training loop (trainer.py), sample
mode (sampling.py) and eval mode (evaluation.py) receive. Only this module
reads the config; the others read the objects.

Noise streams of one seed: training folds the step into key(seed); the
training grid uses stream 1, sample mode and sample quality 1000 + batch
index (so quality is measured on exactly the images sample mode writes) and
the likelihood evaluation stream 2.
"""

import dataclasses
import functools
from typing import Any, Iterator

from etils import epath
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections

from diffusion_jax import config_checks, methods, parallel, sharding
from diffusion_jax.data import pipeline
from diffusion_jax.metrics import networks
from diffusion_jax.methods import Method
from diffusion_jax.models import conv

GRID_STREAM = 1
EVAL_STREAM = 2
SAMPLE_STREAM = 1000


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """What the training loop does when (config's top-level keys)."""
  num_train_steps: int
  batch_size: int
  log_every_steps: int
  checkpoint_every_steps: int
  keep_checkpoints: int
  steps_per_call: int
  grid_every_steps: int  # config.sample_grid.every_steps; 0: never
  grid_num_images: int
  quality_every_steps: int  # config.sample_quality.every_steps; 0: never
  quality_num_samples: int  # config.sample_quality.train_num_samples
  train_ynn_conv: bool = True  # config.cpu.train_ynn_conv (XLA:CPU only)
  # config.posthoc_ema.snapshot_every_steps (power-EMA snapshots; 0: none)
  ema_snapshot_every_steps: int = 0


@dataclasses.dataclass(frozen=True)
class QualitySettings:
  """config.sample_quality: FD / IS / KID of samples (metrics/)."""
  network: str  # 'classifier' | 'inception' (metrics/networks.py)
  floor_seeds: int  # draws of real training images scored beside samples
  weights_path: str
  reference: str
  num_samples: int  # --mode=eval; 0 skips
  resize_to: int
  cache_dir: str  # '' = workdir/fid_stats


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a mode needs, built once from the config."""
  config: ml_collections.ConfigDict  # written to config.json, never read
  mesh: Mesh
  method: Method
  seed: int
  data: ml_collections.ConfigDict  # config.data, for the input pipeline
  loop: LoopSettings
  quality: QualitySettings
  eval_batch_size: int
  sample_batch_size: int
  sample_num_images: int
  progressive_timesteps: tuple[int, ...]
  progressive_num_images: int
  # config.mesh's rules for the state over 'fsdp' (sharding.py); train
  # mode only: sample and eval modes restore it replicated, as their
  # jits (evaluate.py) take it.
  sharding_rules: sharding.ShardingRules = sharding.ShardingRules()
  shard_state: bool = True

  # ------------------------------------------------------------- state --

  @functools.cached_property
  def state_sharding(self) -> Any:
    """The state's NamedShardings (sharding.py): parameters, EMAs and Adam
    moments split over 'fsdp' by their logical axis names, the rest
    replicated; all replicated when fsdp is 1 or shard_state is off."""
    shapes = self.method.abstract_init()
    if not self.shard_state:
      return jax.tree.map(lambda _: parallel.replicated(self.mesh), shapes)
    return sharding.state_shardings(shapes, self.mesh, self.sharding_rules)

  def init_state(self, rng: jax.Array | None = None):
    """A fresh train state on its shardings (rng: key(seed)): each device
    computes only its shards."""
    rng = jax.random.key(self.seed) if rng is None else rng
    self.method.prepare()
    return jax.jit(self.method.init, out_shardings=self.state_sharding,
                   compiler_options=conv.one_shot_compiler_options())(rng)

  def abstract_state(self):
    """Shapes, dtypes and shardings of the state, no compute (what a
    checkpoint is restored onto: another topology is just other
    shardings of the same global arrays)."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        self.method.abstract_init(), self.state_sharding)

  # ---------------------------------------------------- compiled steps --

  def jit_train_step(self, steps_per_call: int | None = None):
    """(state, batch) -> (state, metrics), jitted over the mesh; with
    k = steps_per_call > 1 it takes a tuple of k batches and runs them in one
    lax.scan (score_sde's way: one dispatch per k steps), metrics with a
    leading k axis so logging and the NaN check still see every step."""
    k = self.loop.steps_per_call if steps_per_call is None else steps_per_call

    # A new function on every call: jit keys its trace cache on the function,
    # and code read while tracing (models/conv.py's WEIGHT_GRAD) may differ.
    def step(state, batch):
      return self.method.train_step(state, batch)
    if k > 1:
      one_step = step

      def step(state, batches):  # pylint: disable=function-redefined
        stacked = jax.tree.map(lambda *b: jax.numpy.stack(b), *batches)
        # XLA:CPU ran the U-Net's step 14x slower inside a while loop
        # (5.3 vs 0.39 s at batch 64, jaxlib 0.10): unroll it there.
        return jax.lax.scan(one_step, state, stacked,
                            unroll=k if jax.default_backend() == 'cpu' else 1)
    # FSDP (ZeRO-3) by shardings alone: XLA all-gathers each sharded
    # weight where the step uses it and reduces its gradient onto the
    # shards that the optimizer and EMA update in place (XLA:CPU: one
    # combined full-size all-reduce, then slices; BENCHMARKS.md).
    state = self.state_sharding
    return jax.jit(step, in_shardings=(state, parallel.batch_sharded(self.mesh)),
                   out_shardings=(state, parallel.replicated(self.mesh)),
                   donate_argnums=(0,),
                   compiler_options=conv.train_compiler_options(
                       self.loop.train_ynn_conv))

  def jit_sample_fn(self, x0_at: tuple[int, ...] = ()):
    """(params, noise, rng) -> images, noise sharded over the batch axes.
    With x0_at (diffusion, ddpm only) -> (images, x0 predictions
    (len(x0_at), B, ...)). Params come on any sharding (a training run's
    are split over 'fsdp'): gathered once per call, not once per network
    evaluation of the sampling loop."""
    batch = parallel.batch_sharded(self.mesh)
    repl = parallel.replicated(self.mesh)
    sample = (self.method.sample_progressive if x0_at else self.method.sample)
    extra = (x0_at,) if x0_at else ()

    def fn(params, noise, rng):
      params = jax.lax.with_sharding_constraint(params, repl)
      return sample(params, noise, rng, *extra)
    if x0_at:
      out = (batch, NamedSharding(self.mesh,
                                  P(None, parallel.batch_axes(self.mesh))))
    else:
      out = batch
    return jax.jit(fn, in_shardings=(None, batch, None),
                   out_shardings=out,
                   compiler_options=conv.inference_compiler_options())

  def sample_noise(self, num: int, stream: int) -> jax.Array:
    """Fixed standard normal noise of stream `stream`, the same on any
    device layout."""
    shape = self.method.noise_shape(num)
    make = jax.jit(lambda k: jax.random.normal(k, shape),
                   out_shardings=parallel.batch_sharded(self.mesh))
    return make(self.sample_rng(stream))

  def sample_rng(self, stream: int) -> jax.Array:
    """key(seed) folded with a stream number (see the module docstring)."""
    return jax.random.fold_in(jax.random.key(self.seed), stream)

  def sample_batch_fn(self, params, batch_size: int, sample_fn=None):
    """i -> batch i of samples from stream SAMPLE_STREAM + i (what sample
    mode writes); for the sample-quality evaluator."""
    sample_fn = sample_fn or self.jit_sample_fn()

    def sample_batch(i: int) -> jax.Array:
      stream = SAMPLE_STREAM + i
      return sample_fn(params, self.sample_noise(batch_size, stream),
                       self.sample_rng(stream))
    return sample_batch

  # -------------------------------------------------------------- data --

  def train_iterator(self, start_step: int = 0) -> pipeline.BatchIterator:
    return pipeline.create_train_iterator(
        self.data, global_batch_size=self.loop.batch_size, seed=self.seed,
        sharding=parallel.batch_sharded(self.mesh), start_step=start_step,
        with_labels=self.method.with_labels,
        num_classes=getattr(self.method, 'num_classes', 0))

  def eval_iterator(self, split: str) -> Iterator[dict]:
    return pipeline.create_eval_iterator(
        self.data, split, global_batch_size=self.eval_batch_size,
        sharding=parallel.batch_sharded(self.mesh))


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """workdir/config.json: the full config of a run (process 0 writes)."""
  if jax.process_index() == 0:
    path = epath.Path(workdir)  # Local or gs://.
    path.mkdir(parents=True, exist_ok=True)
    (path / 'config.json').write_text(
        config.to_json_best_effort(indent=2, sort_keys=True))


def _check_loop(config, mesh) -> None:
  """Batch sizes fit the mesh; intervals are positive and fall on the
  boundaries of compiled calls."""
  parallel.check_batch_size(config.batch_size, mesh, 'config.batch_size')
  if config.sample_grid.every_steps:
    parallel.check_batch_size(config.sample_grid.num_images, mesh,
                              'config.sample_grid.num_images')
  # Positive counts and sizes: config_checks.check, which build runs first.
  # The loop only sees the state between calls, so every boundary must fall
  # on a call boundary.
  k = config.steps_per_call
  for key, value in (('num_train_steps', config.num_train_steps),
                     ('log_every_steps', config.log_every_steps),
                     ('checkpoint_every_steps', config.checkpoint_every_steps),
                     ('sample_grid.every_steps', config.sample_grid.every_steps),
                     ('sample_quality.every_steps',
                      config.sample_quality.every_steps)):
    if value % k:
      raise ValueError(
          f'config.{key}={value} is not a multiple of '
          f'config.steps_per_call={k}: the loop can only log, checkpoint or '
          f'sample between calls of {k} steps. Set config.{key} to a multiple '
          f'of {k} or lower config.steps_per_call.')
  m = config.grad_accum_steps
  per_device = config.batch_size // parallel.num_batch_shards(mesh)
  if per_device % m:
    raise ValueError(
        f'config.grad_accum_steps={m} does not divide the per-device batch '
        f'{per_device} (config.batch_size={config.batch_size} over '
        f'{mesh.devices.size} devices): each device splits its own rows into '
        f'{m} micro-batches. Use a divisor of {per_device}.')


def build(config: ml_collections.ConfigDict, mesh: Mesh | None = None, *,
          mode: str = 'train', method: Method | None = None) -> Experiment:
  """Checks the config for `mode` ('train', 'sample', 'eval') and builds the
  objects; fails with the key's name before anything compiles. `method`
  replaces the config's (benchmarks that train an MLP on points)."""
  config_checks.check(config, mode)  # values alone; then the mesh's
  mesh_config = config.get('mesh')  # a given mesh wins over config.mesh
  if mesh is None:
    mesh = (parallel.create_mesh(data=mesh_config.data, fsdp=mesh_config.fsdp)
            if mesh_config else parallel.create_mesh())
  rules = sharding.ShardingRules.from_config(mesh_config)
  if (mode == 'train' and config.posthoc_ema.sigma_rels
      and dict(mesh.shape).get(parallel.FSDP_AXIS, 1) > 1):
    # posthoc_ema.flatten reads each process's first shard of an array.
    raise ValueError(
        f'config.posthoc_ema.sigma_rels={tuple(config.posthoc_ema.sigma_rels)}'
        f' with config.mesh.fsdp={mesh.shape[parallel.FSDP_AXIS]}: power-EMA '
        'snapshots are written from replicated states only; set '
        'config.mesh.fsdp=1 or config.posthoc_ema.sigma_rels=()')
  if mode == 'train':
    _check_loop(config, mesh)
  if mode == 'sample':
    parallel.check_batch_size(config.sample.batch_size, mesh,
                              'config.sample.batch_size')
  q = config.sample_quality
  if mode == 'eval' or (mode == 'train' and q.every_steps):
    parallel.check_batch_size(config.eval.batch_size, mesh,
                              'config.eval.batch_size')
  if q.network not in networks.NETWORKS:
    raise ValueError(f'config.sample_quality.network={q.network!r}: use one '
                     f'of {", ".join(networks.NETWORKS)}')
  if (q.every_steps or q.num_samples) and q.reference not in ('train', 'eval'):
    if not (q.reference.endswith('.npz') and epath.Path(q.reference).exists()):
      raise ValueError(
          f'config.sample_quality.reference={q.reference!r}: use "train", '
          '"eval" or the path of an existing statistics .npz (mu, sigma)')
  method = methods.create_method(config) if method is None else method
  if (mode == 'sample' and config.sample.progressive_timesteps
      and not hasattr(method, 'sample_progressive')):
    raise ValueError('config.sample.progressive_timesteps needs a diffusion '
                     f'method; {method.describe()} has no x0 predictions')
  exp = Experiment(
      config=config, mesh=mesh, method=method, seed=config.seed,
      data=config.data,
      loop=LoopSettings(
          num_train_steps=config.num_train_steps,
          batch_size=config.batch_size,
          log_every_steps=config.log_every_steps,
          checkpoint_every_steps=config.checkpoint_every_steps,
          keep_checkpoints=config.keep_checkpoints,
          steps_per_call=config.steps_per_call,
          grid_every_steps=config.sample_grid.every_steps,
          grid_num_images=config.sample_grid.num_images,
          quality_every_steps=q.every_steps,
          quality_num_samples=q.train_num_samples,
          train_ynn_conv=config.cpu.train_ynn_conv,
          ema_snapshot_every_steps=(
              config.posthoc_ema.snapshot_every_steps
              if config.posthoc_ema.sigma_rels else 0)),
      quality=QualitySettings(network=q.network, floor_seeds=q.floor_seeds,
                              weights_path=q.weights_path,
                              reference=q.reference,
                              num_samples=q.num_samples,
                              resize_to=q.resize_to, cache_dir=q.cache_dir),
      eval_batch_size=config.eval.batch_size,
      sample_batch_size=config.sample.batch_size,
      sample_num_images=config.sample.num_images,
      progressive_timesteps=tuple(config.sample.progressive_timesteps),
      progressive_num_images=config.sample.progressive_num_images,
      sharding_rules=rules, shard_state=mode == 'train')
  if mode == 'train' and dict(mesh.shape).get(parallel.FSDP_AXIS, 1) > 1:
    # An indivisible parameter (replicate_indivisible=False) fails here,
    # before any restore or compile.
    exp.state_sharding  # pylint: disable=pointless-statement
  return exp
