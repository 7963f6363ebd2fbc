"""MNIST configs: one per row of the report's Table 1 (learnt sigma) and Table 2 (`_const`: constant sigma),
the 2-D-latent 4-image toy of Figure 4, and the offline `demo`.

  python train.py --config=configs/mnist.py:iaf_d2_w320 --workdir=runs/iaf_d2_w320

Sources: [R] the seed replication report (../shared/seed/iaf-replication-report.txt); [H] the IAF paper's
public code defaults (../shared/reference-hparams.md); [P] the IAF paper's tables as quoted in [H]; [C] the report's own code (github lollcat/Autoencoders-deep-dive,
branch Pytorch, IAF_VAE_mnist/).
"""
import os

import ml_collections

# The offline demo's data: a fixed random subset of binarized MNIST shipped in the repository
# (scripts/make_demo_data.py rebuilds it from ../shared/data/binarized_mnist.npz).
DEMO_DATA = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "iaf_jax", "assets",
                                          "binarized_mnist_demo.npz"))

# name -> (iaf_depth, iaf_width, learnt_sigma); [R] Tables 1 and 2.
ROWS = {
    "diag": (0, 320, True),
    "iaf_d2_w320": (2, 320, True),
    "iaf_d2_w1920": (2, 1920, True),
    "iaf_d4_w1920": (4, 1920, True),
    "iaf_d8_w1920": (8, 1920, True),
}
ROWS.update({f"{k}_const": (d, w, False) for k, (d, w, _) in ROWS.items() if k != "diag"})
NAMES = tuple(ROWS) + ("toy_2d", "demo")
# The report's tables these configs form, read by iaf_jax.experiments (report's grouping, sweep --table):
# table id -> (title, config names in the table's row order). [R] Table 1: the learnt-sigma rows; [R] Table 2:
# each IAF row beside its constant-sigma twin.
_LEARNT = tuple(k for k, (_, _, learnt) in ROWS.items() if learnt)
TABLES = {
    "1": ("Table 1: MNIST models, learnt sigma", _LEARNT),
    "2": ("Table 2: MNIST models, learnt vs constant sigma",
          tuple(n for k in _LEARNT if k != "diag" for n in (k, f"{k}_const"))),
}


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = ""
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "binarized_mnist"   # [R] section 4.2: the fixed binarisation of Salakhutdinov & Murray
  c.data.dir = ""                   # '' = tensorflow-datasets; else a directory of local files
  c.data.validation_size = 5000     # carved from the training set for early stopping / annealing ([R] 4.1)
  c.data.max_train = 0              # 0 = all; else truncate the training set (quick runs)

  c.model = ml_collections.ConfigDict()
  c.model.kind = "mnist_vae"        # [R] Appendix 6.1
  c.model.likelihood = "bernoulli"  # [R] Appendix 6.1
  c.model.latent_dim = 32           # [R] Appendix 6.1 / IAF paper MNIST models
  c.model.iaf_depth = 2
  c.model.iaf_width = 320
  c.model.learnt_sigma = True
  c.model.hidden_dim = 450          # [R] Appendix 6.1: dense layer of 450 units
  c.model.channels = (16, 16, 32, 32, 32)   # [R] Appendix 6.1
  c.model.strides = (2, 1, 2, 1, 2)         # [R] Appendix 6.1
  c.model.weight_norm = True        # [R] Appendix 6.1
  # [R] Appendix 6.1 and [C] its code (IAF_VAE_mnist/Resnet.py): ONE 3x3 conv per ResNet block, elu(conv(x)) +
  # x or + a 1x1 conv where the shape changes. "two_conv" (elu-conv-elu-conv) does twice the arithmetic.
  c.model.block = "report"
  c.model.initial_log_std = 0.0     # [C] IAF_VAE_mnist/Encoder.py: log_std = linear(x) / 10, near 0 at the start
                                    # (-2 collapsed the demo's posterior: iaf_jax/models/mnist_vae.py)
  c.model.context_dim = 200         # [C] IAF_VAE_mnist/VAE.py h_dim=200: the IAF context h, a layer of its own

  c.train = ml_collections.ConfigDict()
  c.train.optimizer = "adamax"      # [H] Adamax
  c.train.learning_rate = 0.002     # [H] learning_rate=0.002 of the openai/iaf run behind the best result
  c.train.b1 = 0.9                  # Adamax defaults (Kingma & Ba 2015)
  c.train.b2 = 0.999
  c.train.batch_size = 64           # the batch the report's throughput figures use; global over all devices
  c.train.num_steps = 200_000
  c.train.time_budget_minutes = 0.0  # 0 = off; else stop once this much training wall-clock is spent (resumable)
  c.train.lr_schedule = "constant"  # [H] constant rate; "cosine": decay to min_learning_rate over the run
                                    # (its steps or time budget, whichever ends it first)
  c.train.num_importance_samples = 1  # [H] k: 1 = the ELBO; k > 1 = Burda et al.'s k-sample bound
  c.train.micro_batches = 2         # the loss as the mean of 2 micro-batches' (the same objective): independent
  #                                   chains XLA:CPU runs on 2 cores side by side (docs/performance.md, eighth round)
  c.train.ema_decay = 0.999         # [H] Polyak (EMA) averaging with decay 0.999, used for evaluation
  c.train.free_bits = 0.0           # lambda of Equation 14; the MNIST models train on the plain ELBO ([R] 4.2)
  c.train.grad_clip_norm = 0.0      # 0 = off
  c.train.log_every = 100
  c.train.eval_every = 1000         # validation ELBO (EMA params); drives best checkpoint, plateau, stopping
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  c.train.early_stopping_patience = 20   # evaluations without improvement; 0 = off ([R] 4.1 adds it)
  c.train.lr_plateau_patience = 5        # evaluations without improvement before lr *= factor; 0 = off ([R] 4.1)
  c.train.lr_plateau_factor = 0.5
  c.train.min_learning_rate = 1e-5
  c.train.max_consecutive_nonfinite = 100  # steps skipped in a row before the run stops with an error
  c.train.distributed = False       # True: jax.distributed.initialize() (multi-host; env or cluster auto-detect)

  c.eval = ml_collections.ConfigDict()
  c.eval.num_samples = 128          # [R] Tables 1-4 and [P]: importance sampling with K=128
  c.eval.chunk_size = 16            # importance samples per pass through flow and decoder: 16 beat 128 by
  #                                   1.25-1.55x on every MNIST config (docs/performance.md, sixth round)
  c.eval.batch_size = 100
  c.eval.importance_batch_size = 0  # examples per importance-sampling pass (0 = eval.batch_size); each pass runs
  #                                   importance_batch_size * chunk_size rows through flow and decoder
  c.eval.valid_examples = 1000      # validation examples used during training (single-sample ELBO)
  return c


def get_config(name: str = "iaf_d2_w320") -> ml_collections.ConfigDict:
  c = base_config()
  c.name = name
  if name in ROWS:
    c.model.iaf_depth, c.model.iaf_width, c.model.learnt_sigma = ROWS[name]
    if c.model.iaf_width >= 1920:
      # Steps dominated by the 1920 x 1920 kernels, whose gradient every micro-batch computes again: IAF 8/1920
      # trained at 0.90x with 2 (docs/performance.md, eighth round).
      c.train.micro_batches = 1
  elif name == "toy_2d":
    # [R] Figure 4: a 2-D latent trained on only 4 MNIST images (IAF paper Figure 3's toy).
    c.data.validation_size = 0
    c.data.max_train = 4
    c.model.latent_dim = 2
    c.model.iaf_depth, c.model.iaf_width = 2, 320
    c.train.batch_size = 4
    c.train.num_steps = 20_000
    c.train.eval_every = 0
    c.train.early_stopping_patience = 0
    c.train.lr_plateau_patience = 0
  elif name == "demo":
    # Offline demo: IAF 2/320 on the binarized-MNIST subset shipped in iaf_jax/assets (10,000 train / 1,000
    # valid / 1,000 test images), under 5 minutes on 2 CPU cores. --config.data.name=digits trains on the 8x8
    # digits inside scikit-learn instead (data.validation_size then carves the validation split).
    c.data.dir = DEMO_DATA
    c.data.validation_size = 200
    c.model.iaf_depth, c.model.iaf_width = 2, 320
    c.train.num_steps = 4000
    c.train.lr_schedule = "cosine"
    c.train.log_every = 100
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
  else:
    raise ValueError(f"unknown config name {name!r} in configs/mnist.py; known: {', '.join(NAMES)}")
  return c
