r"""Does a caption control what is drawn? Text-to-image at toy scale.

  .venv/bin/python benchmarks/caption_control.py \
      [--config=digits_captions] [--workdir=/tmp/caption_control] \
      [--num_per_caption=50] [--guidance_scales=0,1,2,4]

Trains the config (configs/<--config>.py, a captioned model, as
`./run.sh train` would) into --workdir unless it already holds a
checkpoint, then, from its EMA parameters, draws --num_per_caption images
for each of the 20 template captions ("a thick 3", data/captions.py) at
each guidance weight w, and reports per caption:
  * digit accuracy: the share of samples the digits classifier
    (diffusion_jax/metrics/classifier.py: trained on the labelled train
    split, so it never saw a sample) labels as the caption's digit;
  * weight accuracy: the share whose stroke weight is the caption's, by the
    captioner's own rule and no classifier: ink mass (sum of the uint8
    pixel values) above the train split's median of the caption's digit
    is thick.
Chance is 0.1 and 0.5. Writes caption_control.md (the table) and
caption_control_w<w>.png (rows = the captions in table order, columns =
up to 16 samples) into --workdir, prints the table. `--smoke`: a tiny network, 2
training steps, 2 samples per caption.
"""

import importlib
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags, logging
import jax
import numpy as np

from benchmarks import common
from diffusion_jax import experiment, generate, parallel, trainer
from diffusion_jax import visualization
from diffusion_jax.data import captions as captions_lib
from diffusion_jax.metrics import classifier
# pylint: enable=g-import-not-at-top,wrong-import-position

flags.DEFINE_string('config', 'digits_captions',
                    'A module of configs/ with config.data.captions set.')
flags.DEFINE_string('workdir', '/tmp/caption_control',
                    'The run to sample (trained here if it holds no '
                    'checkpoint) and where the table and grids are written.')
flags.DEFINE_integer('num_per_caption', 50, 'Samples per caption and w.')
flags.DEFINE_list('guidance_scales', ['0', '1', '2', '4'],
                  'Guidance weights w to sample at.')
common.define_smoke_flags()
FLAGS = flags.FLAGS


def load_config():
  config = importlib.import_module(f'configs.{FLAGS.config}').get_config()
  if not config.data.captions:
    raise app.UsageError(f'configs/{FLAGS.config}.py has no '
                         'config.data.captions: not a captioned model')
  config.sample_quality.every_steps = 0
  if FLAGS.smoke:
    common.smoke_model(config)
    config.model.attn_resolutions = (8,)
    config.num_train_steps = 2
    config.log_every_steps = config.checkpoint_every_steps = 2
    config.sample_grid.every_steps = 0
  return config


def trained_params(config, mesh, workdir: str):
  """The EMA parameters of workdir's newest checkpoint (training first if
  there is none) and its step."""
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if not (os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir)):
    start = time.perf_counter()
    trainer.train_and_evaluate(experiment.build(config, mesh), workdir)
    logging.info('trained in %.0f s', time.perf_counter() - start)
  return generate.load_sample_params(
      experiment.build(config, mesh, mode='sample'), workdir)


def draw(exp, params, num: int, w: float) -> np.ndarray:
  """num uint8 samples at guidance weight w; image j has caption j mod K.
  The same noise for every w."""
  exp.method.guidance_scale = w
  # A new function per w: jit must not reuse the trace of another w.
  fn = jax.jit(lambda p, z, r: exp.method.sample(p, z, r))
  stream = experiment.SAMPLE_STREAM
  images = fn(params, exp.sample_noise(num, stream), exp.sample_rng(stream))
  return visualization.to_uint8(parallel.gather(images))


def score(images, captions, captioner, network) -> list[dict]:
  """Per caption: digit and weight accuracy of its images (images[k::K])."""
  rows = []
  for k, caption in enumerate(captions):
    mine = images[k::len(captions)]
    digit, thick = captions_lib.parse_caption(caption)
    digits = np.full((len(mine),), digit)
    rows.append(dict(
        caption=caption, num=len(mine),
        digit_accuracy=classifier.accuracy(
            network.variables, network.num_classes, mine, digits),
        weight_accuracy=float(np.mean(
            captioner.is_thick(mine, digits) == thick))))
  return rows


def main(_):
  common.apply_smoke(num_per_caption=2, guidance_scales=['0', '2'],
                     workdir=os.path.join(tempfile.gettempdir(),
                                          'caption_control_smoke'))
  config = load_config()
  captioner = captions_lib.create_captioner(config.data)
  captions = captioner.captions
  config.sample.captions = captions  # image j: caption j mod K
  mesh = parallel.create_mesh()
  params, step = trained_params(config, mesh, FLAGS.workdir)
  exp = experiment.build(config, mesh, mode='sample')
  network = classifier.load_or_train(
      config.data, cache_dir=os.path.join(FLAGS.workdir, 'classifier'))
  n, scales = FLAGS.num_per_caption, [float(w) for w in FLAGS.guidance_scales]
  num = n * len(captions)
  results, plots = {}, {}
  for w in scales:
    start = time.perf_counter()
    images = draw(exp, params, num, w)
    logging.info('w=%g: %d samples in %.0f s', w, num,
                 time.perf_counter() - start)
    results[w] = score(images, captions, captioner, network)
    # Row k: the first (up to 16) samples of caption k.
    cols = min(n, 16)
    order = (np.arange(len(captions))[:, None]
             + len(captions) * np.arange(cols)[None]).reshape(-1)
    plots[w] = visualization.save_png(
        os.path.join(FLAGS.workdir, f'caption_control_w{w:g}.png'),
        visualization.make_grid(images[order], ncols=cols))
  means = {w: dict(digit_accuracy=float(np.mean([r['digit_accuracy']
                                                  for r in rows])),
                   weight_accuracy=float(np.mean([r['weight_accuracy']
                                                   for r in rows])))
           for w, rows in results.items()}
  head = ' | '.join(f'w={w:g} digit | w={w:g} weight' for w in scales)
  lines = [
      f'# {common.cpu_model()}; jax {jax.__version__}; configs/{FLAGS.config}'
      f'.py at step {step}; {n} samples per caption and w, '
      f'{exp.method.sample_settings.sampler} '
      f'{exp.method.sample_settings.num_steps} steps; chance 0.1 / 0.5',
      f'| caption | {head} |', '|---' * (1 + 2 * len(scales)) + '|']
  for k, caption in enumerate(captions):
    cells = ' | '.join(f"{results[w][k]['digit_accuracy']:.2f} | "
                       f"{results[w][k]['weight_accuracy']:.2f}"
                       for w in scales)
    lines.append(f'| {caption} | {cells} |')
  cells = ' | '.join(f"**{means[w]['digit_accuracy']:.3f}** | "
                     f"**{means[w]['weight_accuracy']:.3f}**" for w in scales)
  lines.append(f'| mean | {cells} |')
  table = '\n'.join(lines)
  print(table)
  os.makedirs(FLAGS.workdir, exist_ok=True)
  with open(os.path.join(FLAGS.workdir, 'caption_control.md'), 'w') as f:
    f.write(table + '\n')
  common.write_json(FLAGS.json_out, dict(
      step=step, num_per_caption=n, captions=list(captions),
      rows=[dict(guidance_scale=w, **r) for w in scales for r in results[w]],
      means={f'{w:g}': m for w, m in means.items()},
      plots={f'{w:g}': p for w, p in plots.items()}))


if __name__ == '__main__':
  app.run(main)
