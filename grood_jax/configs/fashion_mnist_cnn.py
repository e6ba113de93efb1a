"""Fashion-MNIST, 10 classes, SmallCNN. `:smoke` runs in seconds on CPU.

  python train.py --config configs/fashion_mnist_cnn.py --workdir runs/fmnist_cnn
"""

from grood_jax.training.config import finish, small_cnn_config


def get_config(arg=None):
  c = small_cnn_config("fashion_mnist")
  c.num_epochs = 4
  c.learning_rate = 3e-3
  c.warmup_epochs = 0.3
  return finish(c, arg)
