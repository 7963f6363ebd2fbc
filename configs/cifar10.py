"""CIFAR-10 configs: the MNIST-architecture baselines of the report's Table 3 and the ResNet VAEs (bidirectional
inference, 4/8/20 rungs, Gaussian or IAF rungs) of its Table 4.

  python train.py --config=configs/cifar10.py:rungs20_iaf --workdir=runs/rungs20_iaf

Sources: [R] the seed replication report (../shared/seed/iaf-replication-report.txt); [H] the IAF paper's
public code, openai/iaf `tf_train.py` `get_default_hparams` and README (../shared/reference-hparams.md).

Every name yields the same field structure: configs/mnist.py's `base_config()` plus the ResNet VAE fields
under `config.model` (unused by kind 'mnist_vae', as the MNIST fields are unused by kind 'resnet_vae').
"""
import os

import ml_collections

from iaf_jax import config_lib

# configs/mnist.py, from the file beside this one, through the loader every tool uses (config files are loaded
# by path, not imported as a package): one module object per process, whoever loads it first.
_mnist = config_lib.load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist.py"))

# Table 3 ([R] 4.3 Experiment #1): the MNIST model of [R] Appendix 6.1 with a discretized logistic likelihood.
# name -> configs/mnist.py ROWS key (iaf_depth, iaf_width, learnt_sigma).
BASELINES = {
    "baseline_diag": "diag",
    "baseline_iaf_d2_w320": "iaf_d2_w320",
    "baseline_iaf_d2_w1920": "iaf_d2_w1920",
    "baseline_iaf_d4_w1920": "iaf_d4_w1920",
    "baseline_iaf_d8_w1920": "iaf_d8_w1920",
}
# Table 4 ([R] 4.3 Experiment #2): name -> (depth, num_blocks, iaf). Rungs = depth * num_blocks.
# 4 rungs: [H] tf_train defaults depth=2, num_blocks=2; 8 rungs: depth 2 x 4; 20 rungs: [H] the run behind the
# best result, depth=1, num_blocks=20.
RESNETS = {
    "rungs4_gauss": (2, 2, False),
    "rungs4_iaf": (2, 2, True),
    "rungs8_gauss": (2, 4, False),
    "rungs8_iaf": (2, 4, True),
    "rungs20_gauss": (1, 20, False),
    "rungs20_iaf": (1, 20, True),
}
NAMES = tuple(BASELINES) + tuple(RESNETS)
# The report's tables these configs form (as configs/mnist.py TABLES): id -> (title, names in row order).
TABLES = {
    "3": ("Table 3: CIFAR-10 baselines (MNIST architecture, discretized logistic)", tuple(BASELINES)),
    "4": ("Table 4: ResNet VAE, bidirectional inference (CIFAR-10 models)", tuple(RESNETS)),
}
# The configs whose prior sampling iaf_jax.experiments.bench times: the paper reports the ResNet VAE's sampling speed.
SAMPLING_TIMED = tuple(RESNETS)


def base_config() -> ml_collections.ConfigDict:
  """configs/mnist.py's base config on CIFAR-10, with the ResNet VAE fields (at [H] defaults) added."""
  c = _mnist.base_config()
  c.data.name = "cifar10"
  c.data.validation_size = 5000       # carved from the 50k training images ([R] 4.1: early stopping, annealing)
  c.model.likelihood = "logistic"     # [R] 4.3 / [H]: discretized logistic over the 256 pixel values

  m = c.model
  m.h_size = 160                      # [H] h_size=160 (ResNet feature channels)
  m.z_size = 32                       # [H] z_size=32 (latent channels per rung)
  m.depth = 2                         # [H] depth=2 (resolution levels; levels > 0 start by downsampling x2)
  m.num_blocks = 2                    # [H] num_blocks=2 (rungs per level)
  m.iaf = True                        # [H] one PixelCNN-masked IAF step per rung; False = Gaussian rungs
  m.input_stride = 2                  # [H] first layer conv 5x5 stride 2 (32x32 -> 16x16)
  m.shared_log_scale = True           # [H] ONE learned scalar log-scale `dec_log_stdv` for all sub-pixels
  m.mixture_components = 0            # 0 = single discretized logistic ([H]); > 0 = per-sub-pixel mixture
  m.scan_rungs = True                 # scan runs of identical rungs (one compiled body, stacked parameters).
  #                                     20 rungs, h_size 160, batch 16, one CPU core: compiles in 17 s (unrolled
  #                                     27 s), 1.09x the unrolled CPU time per step; 4 rungs, h_size 32: 1.04x
  #                                     (docs/cifar10.md). Runs saved unrolled keep their layout on resume.
  m.head_data_init = False            # True only to reproduce the early-KL blowup (docs/cifar10.md): the prior /
  #                                     posterior heads start without data-dependent init ([H] gives them one)
  m.kl_groups = "rung"                # free-bits groups: one per rung ([R] Eq. 14); 'channel' = [H] tf_train
  #                                     (max(kl, kl_min) per latent channel of each rung). 20 rungs, h_size 32,
  #                                     2 hours on one core: 'rung' left rungs 12-18 unused (5.171 bits/dim),
  #                                     'channel' used all 20 (4.962); one seed each (docs/cifar10.md)
  return c


def get_config(name: str = "rungs4_iaf") -> ml_collections.ConfigDict:
  c = base_config()
  c.name = name
  if name in BASELINES:
    # [R] 4.3 Experiment #1: "the same models and training regime as used in the MNIST experiments".
    c.model.kind = "mnist_vae"
    c.model.iaf_depth, c.model.iaf_width, c.model.learnt_sigma = _mnist.ROWS[BASELINES[name]]
    c.train.micro_batches = _mnist.get_config(BASELINES[name]).train.micro_batches
  elif name in RESNETS:
    c.model.kind = "resnet_vae"
    c.model.depth, c.model.num_blocks, c.model.iaf = RESNETS[name]
    c.model.learnt_sigma = True
    # The MNIST-model IAF fields, kept consistent for reports: one IAF step per rung or none.
    c.model.iaf_depth = 1 if c.model.iaf else 0
    c.model.iaf_width = c.model.h_size
    c.train.optimizer = "adamax"        # [H] Adamax
    c.train.learning_rate = 0.01        # [H] tf_train default (the best run used 0.002, with kl_min 0.1)
    c.train.batch_size = 128            # [H] 16 per GPU x 8 GPUs = 128 global
    c.train.ema_decay = 0.999           # [H] EMA of parameters, decay 0.999, used for evaluation
    c.train.free_bits = 0.25            # [H] kl_min=0.25 free nats
    c.train.micro_batches = 1           # free bits act on the whole batch's mean KL
    # Importance sampling in passes of 10 images x 32 samples (320 rows of 16x16 feature maps): the MNIST
    # default (100 x 128 = 12,800 rows, 2 GB per h_size-160 activation) took 1.9x as long at h_size 32,
    # compilation included (docs/cifar10.md).
    c.eval.importance_batch_size = 10
    c.eval.chunk_size = 32
  else:
    raise ValueError(f"unknown config name {name!r} in configs/cifar10.py; known: {', '.join(NAMES)}")
  c.eval.num_samples = 128              # [R] Tables 3 and 4: importance sampling with K=128
  return c
