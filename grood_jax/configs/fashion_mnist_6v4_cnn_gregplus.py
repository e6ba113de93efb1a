"""GReg+ (METHOD.md §2) on Fashion-MNIST 6-vs-4, SmallCNN, trained from scratch (as in the
paper): the GReg loss (CE + 0.1·L_S + 1·L_∇, see configs/fashion_mnist_6v4_cnn_greg.py for the
BatchNorm choice) with energy-based outlier sampling — per step a pool of 6 × 128 auxiliary
`photos` crops, their energies and L2-normalised penultimate features from the eval-mode model
without gradients, k-means into 32 clusters, each cluster's lowest- and highest-energy member
plus a random fill make the 128-image auxiliary batch (all inside the jitted step).

  python train.py --config configs/fashion_mnist_6v4_cnn_gregplus.py --workdir runs/gregplus
  python score.py --ckpt runs/gregplus --detectors grood,msp,energy,knn

The paper trains 60 epochs; three epochs (771 steps) take 8-9 minutes on 2 CPU cores.
`:smoke` runs end to end in well under a minute on CPU.
"""

from grood_jax.training.config import finish, small_cnn_config


def _smoke(c):
  c.max_train_samples = 1024
  c.checkpoint_every_steps = 4
  c.aux.num_samples = 2048


def get_config(arg=None):
  c = small_cnn_config("fashion_mnist_6v4")
  c.loss = "gregplus"
  c.learning_rate = 3e-3
  c.warmup_epochs = 0.2
  c.num_epochs = 3
  c.checkpoint_every_steps = 100
  c.aux.source = "photos"
  c.aux.num_samples = 20000
  c.aux.batch_size = 0            # = batch_size
  c.greg.m_in = -25.0
  c.greg.m_out = -7.0
  c.greg.lam_s = 0.1
  c.greg.lam_grad = 1.0
  c.greg.input_grad = "sum"
  c.aux.pool_factor = 6
  c.aux.clusters = 32
  c.aux.kmeans_iters = 20
  return finish(c, arg, _smoke)
