"""Glow on CIFAR-10 (Kingma & Dhariwal 2018): the paper's model.

Paper result (Table 2, "Best results in bits per dimension of our model
compared to RealNVP"): CIFAR-10 3.35 bits/dim for Glow (RealNVP: 3.49),
test set, 8-bit data. Model and optimisation as openai/glow's README
command for that number:

  train.py --problem cifar10 --image_size 32 --n_level 3 --depth 32
      --flow_permutation 2 --flow_coupling 1 --seed 0 --learntop
      --lr 0.001 --n_bits_x 8        (under mpiexec -n 8)

i.e. L = 3 levels of K = 32 steps, affine coupling, the learned 1x1
convolution (its plain W), 512 hidden channels (train.py's --width), a
learned top prior, learning rate 1e-3 warmed up linearly over 10 epochs.
Batch: --n_batch_train 64 per MPI worker, 8 workers: 512 images per update.
Differences: openai's train.py defaults to Adamax (--optimizer adamax);
here Adam with its beta2 and the EMA decay set to openai's
1 - 1 / (iterations per epoch) = 1 - 1/98 (Polyak averaging over one
epoch); openai's edge-bias padding channel is not reproduced
(models/glow_layers.py).

  python -m diffusion_jax.main --config=configs/cifar10_glow.py \
      --workdir=runs/cifar10_glow \
      --config.data.data_dir=/path/to/tensorflow_datasets [--mode=eval]
"""

from configs import default


def get_config():
  config = default.get_config()
  config.method = 'glow'

  config.data.source = 'tfds'
  config.data.name = 'cifar10'
  config.data.image_size = 32
  config.data.channels = 3
  config.data.random_flip = False  # openai/glow does not flip CIFAR-10

  glow = config.glow
  glow.levels = 3
  glow.steps_per_level = 32
  glow.hidden_channels = 512
  glow.coupling = 'affine'
  glow.permutation = 'invconv'
  glow.learn_top = True
  glow.n_bits = 8
  glow.temperature = 1.0

  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 977  # 10 epochs of 50,000 at batch 512
  config.optim.grad_clip_norm = 0.0  # openai/glow does not clip
  config.optim.adam_b1 = 0.9
  config.optim.adam_b2 = 1 - 1 / 98
  config.optim.ema_decay = 1 - 1 / 98
  config.optim.ema_warmup = False

  config.batch_size = 512
  # The paper does not state its number of updates; openai/glow trains
  # until stopped.
  config.num_train_steps = 500_000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 10_000
  config.sample_grid.every_steps = 10_000
  config.sample_grid.num_images = 64
  config.eval.batch_size = 200
  config.sample.num_images = 10_000
  config.sample.batch_size = 500
  config.sample_quality.network = 'inception'
  config.sample_quality.every_steps = 0  # --mode=eval
  return config
