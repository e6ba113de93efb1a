"""Fashion-MNIST classes 0-5 (ID; 6-9 are near-OOD), SmallCNN. `:smoke` runs in seconds on CPU.

  python train.py --config configs/fashion_mnist_6v4_cnn.py --workdir runs/fmnist6v4_cnn
"""

from grood_jax.training.config import finish, small_cnn_config


def get_config(arg=None):
  c = small_cnn_config("fashion_mnist_6v4")
  c.num_epochs = 4
  c.learning_rate = 3e-3
  c.warmup_epochs = 0.3
  return finish(c, arg)
