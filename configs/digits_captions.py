"""Text-to-image at toy scale: the embedded 8x8 digits with template
captions "a thick 3" / "a thin 7" (20 captions: the digit and its stroke
weight, data/captions.py), through cross-attention to a jointly trained
text encoder, classifier-free guidance w = 2. Sample image i gets caption
i mod 20 (caption 2k: "a thick k", 2k + 1: "a thin k");
benchmarks/caption_control.py draws a grid with one row per caption and
scores each caption's samples.

  ./run.sh train --config=configs/digits_captions.py \\
      --workdir=runs/digits_captions
  .venv/bin/python benchmarks/caption_control.py \\
      --workdir=runs/digits_captions
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.captions = 'digit_weight'
  m = config.model
  # Cross-attention where the U-Net self-attends: at 4x4 (default
  # attn_resolutions) and in the middle block.
  m.context_dim = 64
  m.cross_attn_heads = 4
  m.text_vocab_size = 17  # 4 special tokens + a, thick, thin, 0-9
  m.text_max_length = 4  # the captions have 3 tokens
  m.text_depth = 1
  m.text_heads = 4
  m.context_dropout = 0.1
  # Not yet timed on an idle machine (the default's 400 steps take 4-5
  # min on 2 cores; the captions need more to control the stroke weight).
  config.num_train_steps = 1000
  config.checkpoint_every_steps = 500
  config.log_every_steps = 100
  config.sample.guidance_scale = 2.0
  config.sample.sampler = 'ddim'
  config.sample.num_steps = 50
  config.sample.batch_size = 200  # a multiple of the 20 captions
  config.sample_grid.num_images = 80  # each caption 4 times
  config.sample_grid.every_steps = 500
  # The caption benchmark measures what matters here; FD every 200 steps
  # would cost a minute of this CPU budget.
  config.sample_quality.every_steps = 0
  return config
