"""Shared defaults for every experiment.

On their own they train the embedded scikit-learn digits (1,797 real 8x8
images, no download) with a small U-Net in a few minutes on a laptop CPU.
Experiment files (e.g. `cifar10_ddpm.py`) start from `get_config()` here and
state only what differs.
"""

import ml_collections

from configs import families


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # The generative method (diffusion_jax/methods/): 'diffusion',
  # 'progressive_distillation' (config.distill), 'consistency_training' or
  # 'consistency_distillation' (config.consistency), 'autoencoder'
  # (config.autoencoder); the seeds' other families: 'glow', 'vae', 'gan',
  # 'pixelcnn' (config.glow, .vae, .gan, .pixelcnn; configs/families.py).
  config.method = 'diffusion'

  # Input pipeline (diffusion_jax/data/).
  config.data = data = ml_collections.ConfigDict()
  data.source = 'digits'  # digits | tfds | idx | image_folder | npz | latents
  data.name = ''  # tfds data set name, e.g. 'cifar10' (source=tfds only).
  data.data_dir = ''  # local directory or file holding the data.
  data.download = False  # tfds only: allow downloading (never in tests).
  data.train_split = 'train'
  data.eval_split = 'test'
  data.image_size = 8  # images are checked to be image_size x image_size.
  data.channels = 1
  data.random_flip = False  # horizontal flips; never for digits.
  # '' (images must be image_size already), 'pad' (centred, zeros: 28x28
  # Fashion-MNIST -> 32x32) or 'center_crop' (then BICUBIC, as ADM).
  data.resize = ''
  data.prefetch = 2  # batches prepared ahead on a background thread.
  # Template captions of a labelled source (data/captions.py): '' or
  # 'digit_weight' ("a thick 3"); needs model.context_dim > 0.
  data.captions = ''

  # Diffusion process (diffusion_jax/diffusion/schedules.py, losses.py, samplers.py;
  # continuous time: sde.py, sde_samplers.py).
  config.diffusion = diffusion = ml_collections.ConfigDict()
  # 'ddpm': the discrete process of num_timesteps steps and beta_schedule.
  # Continuous time, t in [0, 1]: 'vp' (score-SDE VP, the continuous DDPM),
  # 've' (NCSN's variance exploding SDE), 'rectified_flow'
  # (x_t = (1 - t) x + t eps).
  diffusion.process = 'ddpm'
  diffusion.num_timesteps = 1000
  diffusion.beta_schedule = 'linear'
  diffusion.beta_start = 1e-4
  diffusion.beta_end = 0.02
  # What the network predicts: 'eps', 'x0', 'v' (alpha eps - sigma x0) or
  # 'velocity' (dx_t/dt, rectified flow's target; continuous processes) or
  # 'edm' (EDM's preconditioned F, sigma_data = 0.5; any process).
  diffusion.prediction = 'eps'
  # 'mse': || target - f(x_t, t) ||^2, L_simple (Ho et al. 2020, eq. 14)
  # for eps. 'hybrid' (L_simple + 0.001 L_vlb) and 'vlb' learn the variance
  # too (improved DDPM; ddpm and eps only; set sampler_variance='learned').
  diffusion.loss = 'mse'
  # sigma_t^2 of the DDPM sampler: 'beta', 'beta_tilde' or 'learned'.
  diffusion.sampler_variance = 'beta'
  diffusion.clip_denoised = True  # clip x0_hat to [-1, 1] while sampling.
  # How training draws t: 'uniform'; 'importance' (ddpm with hybrid/vlb:
  # p_t ~ sqrt(E[L_t^2]) over the last 10 losses of each t); 'logit_normal'
  # (continuous: t = sigmoid(N(mean, std)), Esser et al. 2024);
  # 'log_normal' (the edm process: ln sigma ~ N(edm_p_mean, edm_p_std^2)).
  diffusion.time_sampling = 'uniform'
  diffusion.logit_normal_mean = 0.0
  diffusion.logit_normal_std = 1.0
  # Continuous processes (Song et al. 2021): beta(t) = beta_min +
  # t (beta_max - beta_min) for vp; sigma(t) = sigma_min (sigma_max /
  # sigma_min)^t for ve (sigma_max ~ the largest distance between training
  # images). Training draws t in [t_min, 1]; 0 = the process's default
  # (1e-5 for vp/ve as score_sde, 0 for rectified flow).
  diffusion.vp_beta_min = 0.1
  diffusion.vp_beta_max = 20.0
  diffusion.ve_sigma_min = 0.01
  diffusion.ve_sigma_max = 50.0
  diffusion.t_min = 0.0
  # 'edm' (Karras et al. 2022): x = x0 + sigma eps, the time is sigma in
  # [edm_sigma_min, edm_sigma_max]; training draws ln(sigma) ~
  # N(edm_p_mean, edm_p_std^2) (set time_sampling='log_normal'); pair it
  # with prediction='edm' (the paper's preconditioning) and sampler='edm'.
  diffusion.edm_sigma_min = 0.002
  diffusion.edm_sigma_max = 80.0
  diffusion.edm_p_mean = -1.2
  diffusion.edm_p_std = 1.2

  # Network (diffusion_jax/models/): 'unet', or 'mlp' (width ch, depth
  # num_res_blocks, flattened inputs).
  config.model = model = ml_collections.ConfigDict()
  model.name = 'unet'
  model.ch = 32
  model.ch_mult = (1, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (4,)
  model.dropout = 0.1
  model.num_groups = 8
  model.temb_dim = 128  # 4 * ch, as in the paper.
  model.dtype = 'float32'  # compute dtype; params stay float32.
  # Activation checkpointing per U-Net/DiT block (models/remat.py): 'none',
  # 'dots_saveable' (recompute elementwise ops) or 'full' (whole blocks).
  model.remat = 'none'
  # Class conditioning: 0 = unconditional; K > 0 embeds labels 0..K-1 (the
  # data source must provide labels) plus a null class K.
  model.num_classes = 0
  # Training replaces a label by the null class with this probability, so
  # one network is both conditional and unconditional (classifier-free
  # guidance, Ho & Salimans 2022: 0.1-0.2).
  model.label_dropout = 0.1
  # A guidance-conditioned network (Meng et al. 2023): the guidance weight w
  # is an input, embedded like the time and added to its embedding, so one
  # call samples at any w. Only for progressive distillation students
  # (config.distill.guidance_min/max); the w embedding starts at zero, so a
  # student initialised from its teacher predicts what the teacher does.
  model.guidance_input = False
  # Captions via cross-attention (models/text.py; data.captions): context
  # width (0: off); text_vocab_size > 0: a jointly trained text encoder of
  # that many rows (>= the caption vocabulary, errors say how many), 0: the
  # embeddings of context_path (.npz: embeddings, mask, captions).
  model.context_dim = 0
  model.cross_attn_heads = 4  # divides the channels at attn_resolutions
  model.text_vocab_size = 0
  model.context_path = ''
  model.text_max_length = 0  # >= the longest caption in tokens
  model.text_depth = 2
  model.text_heads = 4
  # P(caption -> the null sequence), for classifier-free guidance.
  model.context_dropout = 0.1
  # DiT (model.name='dit', models/dit.py; Peebles & Xie 2023). Sizes: from
  # dit_variant 'S', 'B', 'L' or 'XL' (paper Table 1: depth 12/12/24/28,
  # hidden 384/768/1024/1152, heads 6/12/16/16), the three dit_* sizes then
  # staying 0; or dit_variant='custom' (tiny models), which takes all three
  # from dit_depth, dit_hidden_size (a multiple of 4 and of the heads) and
  # dit_num_heads. num_classes, label_dropout and dtype apply as above;
  # dropout and the U-Net's keys (ch, ch_mult, ...) are unused by DiT (the
  # paper trains it without dropout).
  model.dit_variant = 'S'
  model.dit_depth = 0
  model.dit_hidden_size = 0
  model.dit_num_heads = 0
  # p: tokens are p x p patches (DiT-XL/2: p = 2); 2, 4 or 8, dividing
  # data.image_size.
  model.patch_size = 2
  model.mlp_ratio = 4.0  # MLP width / hidden size (4 in every variant).
  # Where diffusers' DiTTransformer2DModel differs from the reference code
  # (github.com/facebookresearch/DiT, which trained the released weights):
  # time frequencies 10000^(-i/(128 - shift)), shift 0 as the reference, 1
  # as diffusers; the LayerNorm before each MLP uses eps 1e-6 in the
  # reference, diffusers' norm_eps (default 1e-5). convert/diffusers_dit.py
  # sets both.
  model.dit_time_freq_shift = 0
  model.dit_mlp_norm_eps = 1e-6

  # Optimisation (diffusion_jax/train_state.py).
  config.optim = optim = ml_collections.ConfigDict()
  # Larger than the paper's 2e-4: a small model and a 400-step budget.
  optim.learning_rate = 1e-3
  optim.warmup_steps = 100
  optim.grad_clip_norm = 1.0
  optim.adam_b1 = 0.9
  optim.adam_b2 = 0.999
  optim.adam_eps = 1e-8
  optim.ema_decay = 0.995  # ~200-step horizon for a short run.
  # decay_n = min(ema_decay, (1 + n) / (10 + n)) at update n (diffusers'
  # EMAModel, TF's num_updates): a 400-step run's EMA then tracks its last
  # steps instead of averaging in the first ones. False: the constant decay.
  optim.ema_warmup = True
  # Storage dtype of the trained parameters (one-optimizer methods):
  # 'bfloat16' halves what the forward reads and fsdp gathers, with a
  # float32 master copy in the optimizer state that the updates go to
  # (train_state.with_float32_master); the EMAs stay float32. Pair it with
  # model.dtype='bfloat16' to also compute in bfloat16.
  optim.param_dtype = 'float32'
  # Post-hoc EMA (EDM2, Karras et al. 2024; diffusion_jax/posthoc_ema.py):
  # power-function EMAs of these relative lengths sigma_rel are tracked
  # beside ema_decay's and saved to workdir/ema_snapshots/ every
  # snapshot_every_steps steps (a multiple of steps_per_call) and at the
  # last; any sigma_rel in (0, 0.288675] is reconstructed from them after
  # training. () = off; EDM2 tracks (0.05, 0.1).
  config.posthoc_ema = posthoc = ml_collections.ConfigDict()
  posthoc.sigma_rels = ()
  posthoc.snapshot_every_steps = 0

  # Training loop (diffusion_jax/trainer.py).
  config.batch_size = 64  # global, over all devices and hosts.
  config.num_train_steps = 400
  config.log_every_steps = 100
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 3
  # The EMA sample grid written during training (samples/, TensorBoard).
  config.sample_grid = grid = ml_collections.ConfigDict()
  grid.every_steps = 200  # and at the end; 0: never
  # global; split over all devices. As eval.batch_size: one compiled sampler.
  grid.num_images = 96  # a multiple of 8: a TPU v3-8 or 8 CPU devices

  # Sample mode (--mode=sample).
  config.sample = sample = ml_collections.ConfigDict()
  sample.num_images = 600
  sample.batch_size = 200  # global; split over all devices.
  # Sampler for --mode=sample and the grids during training. ddpm process:
  # 'ddpm' (ancestral; respaced when 0 < num_steps < T) or 'ddim'.
  # Continuous processes: 'euler' or 'heun' (probability-flow ODE; rectified
  # flow's sampler), 'euler_maruyama' (reverse SDE) or 'pc' (predictor-
  # corrector with Langevin steps), vp/ve only for the last two.
  # Every process, through the noise levels sigma~ = sigma_t / alpha_t:
  # 'edm' (EDM's Heun sampler, Algorithm 2; 2 num_steps - 1 network calls),
  # 'dpm_solver_pp' (DPM-Solver++ 2M/3M), 'dpm_solver_pp_sde' (its SDE
  # variant), 'unipc' (UniPC); one network call per step.
  sample.sampler = 'ddim'
  sample.num_steps = 50  # 0: all diffusion.num_timesteps steps
  sample.ddim_eta = 0.0  # DDIM only: 0 deterministic, 1 ~ DDPM (beta~)
  sample.snr = 0.16  # pc: Langevin signal-to-noise ratio (score_sde)
  sample.corrector_steps = 1  # pc: Langevin steps per predictor step
  # edm, dpm_solver_pp(_sde), unipc: the noise levels visited, from
  # sigma_max down to sigma_min (0: the process's own range; EDM's models
  # 0.002..80), spaced 'karras' (EDM eq. 5 with rho), 'logsnr' or 'time'
  # (uniform in the process's t, as DDIM); then one last step to the data.
  sample.spacing = 'karras'
  sample.rho = 7.0
  sample.sigma_min = 0.0
  sample.sigma_max = 0.0
  sample.solver_order = 2  # dpm_solver_pp(_sde), unipc: 1, 2 (2M) or 3
  sample.unipc_variant = 'bh2'  # B(h) = e^h - 1 ('bh2') or h ('bh1')
  # edm: stochastic churn (EDM Algorithm 2; 0: deterministic Heun). Noise is
  # added at sigma in [s_tmin, s_tmax] (s_tmax 0: no upper limit).
  sample.s_churn = 0.0
  sample.s_tmin = 0.0
  sample.s_tmax = 0.0
  sample.s_noise = 1.0
  # Continuous processes: sampling integrates from t = 1 down to this t,
  # then (vp/ve) returns the denoised x0_hat there, as score_sde's noise
  # removal. 0 = score_sde's choice: 1e-3 for vp, else diffusion.t_min.
  sample.t_min = 0.0
  # Class-conditional models: guidance weight w of classifier-free guidance,
  # f = (1 + w) f(x, y) - w f(x, null); 0 = plain conditional sampling.
  sample.guidance_scale = 0.0
  sample.class_label = -1  # -1: cycle through the classes; k: only class k
  # Captions: image i of a batch gets captions[i % len]; () = all of them.
  sample.captions = ()
  # 0-based timesteps at which to save x0 predictions of the first batch as
  # progressive.png (DDPM sec. 4.3), e.g. (999, 750, 500, 250, 100, 0).
  sample.progressive_timesteps = ()
  sample.progressive_num_images = 8  # rows of that figure

  # Latent diffusion (Rombach et al. 2022; methods/latent_diffusion.py):
  # config.method='diffusion' with an autoencoder here and
  # config.data.source='latents' trains the network on the autoencoder's
  # latents (H/f, W/f, C) and decodes its samples. config.data.data_dir is
  # then the latent cache, written once, before training, by
  #   python -m diffusion_jax.cache_latents --config=<the same config>
  # from the images of config.latent.images (and config.data's splits,
  # image_size, channels; random_flip also caches the mirror images).
  # config.data.image_size/channels stay those of the images, which sample
  # returns and sample quality scores.
  config.latent = latent = ml_collections.ConfigDict()
  # A diffusers AutoencoderKL directory (e.g. a local copy of
  # stabilityai/sd-vae-ft-ema) or an autoencoder run of this project
  # (config.method='autoencoder'); '' = pixel-space diffusion.
  latent.autoencoder = ''
  latent.autoencoder_step = 0  # a run's checkpoint step; 0: the newest
  # z is multiplied by it (unit variance for the diffusion). 0: the
  # autoencoder's: diffusers' scaling_factor (0.18215 for SD's VAE), for a
  # run 1/std of the cached train latents (LDM's scale_by_std).
  latent.scale_factor = 0.0
  # Train on z ~ q(z|x) drawn afresh each time an image is seen (LDM, DiT);
  # False: on the posterior mean.
  latent.sample_posterior = True
  latent.cache_dtype = 'float16'  # the cached mean and log-variance
  # The images the cache encodes (the source keys of config.data).
  latent.images = ml_collections.ConfigDict()
  latent.images.source = 'digits'
  latent.images.name = ''
  latent.images.data_dir = ''
  latent.images.download = False
  # '' (images already image_size), 'center_crop' (crop and resize, ADM's
  # preprocessing, as DiT) or 'pad' (zeros around smaller images).
  latent.images.resize = ''

  # Distillation (config.method 'progressive_distillation'; methods/
  # distillation.py): the teacher is another run's EMA parameters.
  config.distill = distill = ml_collections.ConfigDict()
  distill.teacher_workdir = ''  # the teacher run's work directory
  distill.teacher_step = 0  # its checkpoint step; 0: the newest
  # Progressive distillation (Salimans & Ho 2022): the student samples in
  # student_steps deterministic DDIM steps, each learnt from two of the
  # teacher's (which samples in 2 student_steps); halve it stage by stage,
  # each stage's teacher_workdir being the previous stage's run.
  distill.student_steps = 0
  # A guidance-conditioned student (config.model.guidance_input = True, a
  # class-conditional teacher; Meng et al. 2023): each example's w is drawn
  # uniformly from [guidance_min, guidance_max]; a plain teacher's two
  # steps use classifier-free guidance at that w, a guidance-conditioned
  # teacher (an earlier stage) gets w as input. It then samples at
  # config.sample.guidance_scale in one network call per step.
  distill.guidance_min = 0.0
  distill.guidance_max = 4.0

  # Device mesh data x fsdp (-1 = the rest; diffusion_jax/sharding.py): the
  # batch splits over both; fsdp > 1 also splits params, EMA and Adam
  # moments (ZeRO-3), (logical axis, mesh axis) rules choosing the dims. A
  # dim fsdp does not divide: replicated with a log line (False: an error).
  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1
  mesh.fsdp = 1
  mesh.logical_axis_rules = (('embed_out', 'fsdp'), ('embed_in', 'fsdp'))
  mesh.replicate_indivisible = True

  # Scale-out throughput knobs (diffusion_jax/trainer.py, methods/base.py).
  # Both leave the trained params unchanged (up to float summation order;
  # see OneOptimizerMethod for the dropout caveat of grad_accum_steps).
  # Train steps per compiled call (one lax.scan over a (k, B, ...) stack):
  # fewer host round trips on TPU. log/checkpoint/sample intervals and
  # num_train_steps must be multiples of it.
  config.steps_per_call = 1
  # Micro-batches per step when the per-device batch does not fit in memory:
  # gradients are averaged over them, then one optimizer update. The
  # per-device batch (batch_size / devices) must be a multiple of it.
  config.grad_accum_steps = 1

  # XLA:CPU only (ignored on TPU/GPU).
  config.cpu = cpu = ml_collections.ConfigDict()
  # The train step's convolutions in YNNPACK (True) or XLA's own (False).
  # Measured per model (BENCHMARKS.md): this 8x8 U-Net trains 1.6x faster
  # with XLA's; the paper's 32x32 U-Net 1.4-1.8x faster with YNNPACK.
  cpu.train_ynn_conv = False

  # Eval mode (--mode=eval): likelihood batches, and the sample and data
  # batches of sample quality (there and during training).
  config.eval = ev = ml_collections.ConfigDict()
  ev.batch_size = 96  # global; split over all devices (a multiple of 8)
  # False: skip bits/dim (DDPM's bound costs T network passes per test
  # image: hours for 10,000 images at 32x32 on a CPU) and score samples.
  ev.likelihood = True

  # Sample quality of EMA samples in --mode=eval and during training
  # (diffusion_jax/metrics/): a Frechet distance, KID and Inception Score
  # in the features of `network`:
  #   'classifier': a small CNN trained (seconds, then cached) on the labelled
  #     training split of config.data; no download; reported as
  #     classifier_fd / classifier_kid / classifier_is.
  #   'inception': FID / IS / KID with pytorch-fid's InceptionV3.
  config.sample_quality = fid = ml_collections.ConfigDict()
  fid.network = 'classifier'
  # Inception only: pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or
  # an .npz of its tensors). '' = a randomly initialised network: the code
  # path runs, the numbers are NOT comparable to published FIDs (logged).
  fid.weights_path = ''
  fid.reference = 'eval'  # 'train' | 'eval' split, or a mu/sigma .npz
  # With reference 'eval': also score this many draws of real training
  # images (as many as the samples) against it: the floor a perfect model
  # reaches at this sample count (mean and std over the draws). 0: skip.
  fid.floor_seeds = 3
  fid.num_samples = 0  # --mode=eval (the paper: 50,000); 0 skips it
  fid.every_steps = 200  # during training; 0 = never
  fid.train_num_samples = 96  # per periodic evaluation during training
  fid.resize_to = 299  # Inception input size (the reference: 299)
  fid.cache_dir = ''  # reference statistics cache; '' = workdir/fid_stats

  # Sections read by one method each: configs/families.py.
  config.glow = families.glow()
  config.vae = families.vae()
  config.gan = families.gan()
  config.pixelcnn = families.pixelcnn()
  config.consistency = families.consistency()
  config.autoencoder = families.autoencoder()

  # Locked: a misspelt key in an experiment file or on the command line is an
  # error, not a silently ignored new field.
  config.lock()
  return config
