"""PixelCNN++ on CIFAR-10 (Salimans et al. 2017, ICLR): the paper's model.

Paper result (Table 1): 2.92 bits/dim on the CIFAR-10 test set (PixelCNN,
van den Oord et al. 2016: 3.03). openai/pixel-cnn's README: 3.0 bits/dim
after about 10 hours and 2.92 after about 5 days on 8 Maxwell TITAN X GPUs.

  python -m diffusion_jax.main --config=configs/cifar10_pixelcnn.py \
      --workdir=runs/cifar10_pixelcnn \
      --config.data.data_dir=/path/to/tensorflow_datasets [--mode=eval]

The settings are openai/pixel-cnn's train.py defaults (the code of the
paper): 3 resolutions (32, 16, 8) of nr_resnet = 5 gated ResNet blocks per
stream, 160 filters, a mixture of 10 discretised logistics, dropout 0.5;
Adam with learning rate 1e-3 multiplied by 0.999995 every step, betas
(0.95, 0.9995), no warm-up, no clipping; Polyak averaging (EMA) 0.9995;
batch 16 per GPU on 8 GPUs = 128; no flips. 53,618,660 parameters.

Differences, stated rather than hidden: openai's layers are weight-
normalised with a data-dependent initialisation (models/pixelcnn.py:
plain convolutions here); its Adam adds 1e-8 under the square root (optax:
eps outside it, config.optim.adam_eps). The paper gives no step count:
train.py allows 5,000 epochs (1.95M steps at 390 per epoch); 1M steps
here, where the decayed learning rate is 1e-3 e^-5 = 6.7e-6.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.method = 'pixelcnn'

  config.data.source = 'tfds'
  config.data.name = 'cifar10'
  config.data.image_size = 32
  config.data.channels = 3
  config.data.random_flip = False  # openai's DataLoader does not flip

  p = config.pixelcnn
  p.nr_resnet = 5
  p.nr_filters = 160
  p.nr_logistic_mix = 10
  p.num_resolutions = 3  # 32 -> 16 -> 8
  p.dropout = 0.5
  p.lr_decay = 0.999995

  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 0
  config.optim.grad_clip_norm = 0.0
  config.optim.adam_b1 = 0.95
  config.optim.adam_b2 = 0.9995
  config.optim.ema_decay = 0.9995  # train.py's polyak_decay
  config.optim.ema_warmup = False

  config.batch_size = 128  # 16 per GPU x 8 GPUs
  config.num_train_steps = 1_000_000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 10_000
  config.keep_checkpoints = 3
  # 1,024 network passes per batch of samples.
  config.sample_grid.every_steps = 100_000
  config.sample_grid.num_images = 64
  config.sample_quality.every_steps = 0
  config.sample_quality.num_samples = 0  # the paper reports bits/dim only
  config.sample.num_images = 256
  config.sample.batch_size = 128
  config.eval.batch_size = 256  # bits/dim of the 10,000 test images
  return config
