"""GReg (METHOD.md §2) on Fashion-MNIST 6-vs-4, SmallCNN: fine-tunes a cross-entropy checkpoint
with CE + 0.1·L_S + 1·L_∇ on ID batches and auxiliary outliers (`photos`: crops of skimage's
camera/astronaut/coffee/chelsea/rocket/moon/coins, refused if they overlap any test/val set).

  python train.py --config configs/fashion_mnist_6v4_cnn.py --workdir runs/fmnist6v4_cnn
  python train.py --config configs/fashion_mnist_6v4_cnn_greg.py --workdir runs/greg \\
      --config.init_from=runs/fmnist6v4_cnn
  python score.py --ckpt runs/greg --detectors grood,msp,energy,knn

Without --config.init_from it trains from scratch. The paper fine-tunes ~20 epochs; two
epochs (514 steps of 128 ID + 128 auxiliary images; a GReg step costs ~4 CE steps — double
backprop) take 5-6 minutes on 2 CPU cores. Fresh AdamW at a lower peak rate than the CE run.
The margins are the paper's (m_in = -25, m_out = -7); this CNN's ID energies start near -7, see
the README for what that costs and for m_in = -12, m_out = -4.

BatchNorm: config.greg.input_grad = "sum" — one train-mode forward of [x_in; x_aux] gives the
logits (CE, energies, L_S, the margin masks, the BatchNorm statistics) and, through its VJP,
the input gradient ∇_x Σ_i S(x_i) whose per-sample norms form L_∇; i.e. the gradient term
regularises the same (train-mode) function its masks come from, and it carries the O(1/2B)
paths through the batch statistics. (A per-sample `vmap` forward would normalise each sample by
itself in train mode — degenerate.) "eval" instead takes the exact per-sample gradients of the
eval-mode model (running statistics). See grood_jax.training.losses.

`:smoke` runs end to end in well under a minute on CPU (8 steps, 2,048 auxiliary images).
"""

from grood_jax.training.config import finish, small_cnn_config


def _smoke(c):
  c.max_train_samples = 1024
  c.checkpoint_every_steps = 4
  c.aux.num_samples = 2048


def get_config(arg=None):
  c = small_cnn_config("fashion_mnist_6v4")
  c.loss = "greg"
  c.learning_rate = 1e-3
  c.warmup_epochs = 0.1
  c.num_epochs = 2
  c.checkpoint_every_steps = 100
  c.aux.source = "photos"
  c.aux.num_samples = 20000
  c.aux.batch_size = 0            # = batch_size
  c.greg.m_in = -25.0
  c.greg.m_out = -7.0
  c.greg.lam_s = 0.1
  c.greg.lam_grad = 1.0
  c.greg.input_grad = "sum"
  return finish(c, arg, _smoke)
