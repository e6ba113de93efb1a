"""Training: optimizer, train step, losses, the training loop."""

from grood_jax.training.config import base_config
from grood_jax.training.loop import train
from grood_jax.training.losses import cross_entropy, make_loss, register_loss
from grood_jax.training.train_state import create_optimizer, evaluate, make_train_step

__all__ = ["base_config", "train", "cross_entropy", "make_loss", "register_loss",
           "create_optimizer", "evaluate", "make_train_step"]
