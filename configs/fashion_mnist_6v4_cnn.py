"""Fashion-MNIST classes 0-5 (ID; 6-9 are near-OOD), SmallCNN. `:smoke` runs in seconds on CPU.

  python train.py --config configs/fashion_mnist_6v4_cnn.py --workdir runs/fmnist6v4_cnn
"""

from grood_jax.training.config import base_config, smoke


def get_config(arg=None):
  c = base_config()
  c.benchmark = "fashion_mnist_6v4"
  c.model.name = "cnn"
  c.model.kwargs.width = 16
  c.model.kwargs.feature_dim = 128
  c.batch_size = 128
  c.num_epochs = 4
  c.optimizer = "adamw"
  c.learning_rate = 3e-3
  c.weight_decay = 5e-4
  c.warmup_epochs = 0.3
  if arg == "smoke":
    smoke(c)
  elif arg:
    raise ValueError(f"unknown config variant {arg!r}; use ':smoke' or nothing")
  c.lock()
  return c
