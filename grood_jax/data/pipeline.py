"""Training input pipeline on grain's MapDataset, in-process (no worker processes).

Index pipeline: range(N) -> shuffle(seed) -> batch(B, drop_remainder) -> repeat() (each epoch
reshuffled) -> gather images/labels -> optional augmentation -> normalise. Every batch is a
pure function of (seed, batch position), so `get_state()` is just the position and a resumed
loader yields exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import numpy as np

from grood_jax.data.base import DataError, normalize

_SHIFT_PX = 2


def steps_per_epoch(n: int, batch_size: int) -> int:
  """Full batches per epoch (the remainder is dropped)."""
  if batch_size <= 0:
    raise DataError(f"batch_size must be positive, got {batch_size}")
  if n < batch_size:
    raise DataError(f"only {n} training images for batch_size {batch_size}; lower the batch size")
  return n // batch_size


def augment_batch(images_u8: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Random horizontal flip (p=0.5) and a random shift of up to 2 px (zero padding), per image."""
  b, h, w, _ = images_u8.shape
  padded = np.pad(images_u8, ((0, 0), (_SHIFT_PX, _SHIFT_PX), (_SHIFT_PX, _SHIFT_PX), (0, 0)))
  dy = rng.integers(0, 2 * _SHIFT_PX + 1, size=b)
  dx = rng.integers(0, 2 * _SHIFT_PX + 1, size=b)
  flip = rng.random(b) < 0.5
  cols_BxW = dx[:, None] + np.where(flip[:, None], np.arange(w)[::-1], np.arange(w))
  rows_BxH = dy[:, None] + np.arange(h)
  return padded[np.arange(b)[:, None, None], rows_BxH[:, :, None], cols_BxW[:, None, :]]


class TrainLoader:
  """Infinite shuffled batches `(x float32 (B,H,W,C) normalised, y int32 (B,))`.

  Deterministic for `seed`; `get_state()` returns a JSON-serialisable dict and `set_state`
  restores the exact position (it must come from a loader with the same data size, batch size,
  seed and augmentation).
  """

  def __init__(self, images_u8: np.ndarray, labels: np.ndarray, *, batch_size: int, seed: int,
               mean, std, augment: bool = False):
    if images_u8.ndim != 4 or images_u8.dtype != np.uint8:
      raise DataError(f"TrainLoader needs uint8 (N,H,W,C) images, got {images_u8.dtype} "
                      f"{images_u8.shape}")
    labels = np.asarray(labels)
    if labels.shape != (len(images_u8),):
      raise DataError(f"TrainLoader: labels shape {labels.shape} does not match "
                      f"{len(images_u8)} images")
    self.num_examples = len(images_u8)
    self.batch_size = int(batch_size)
    self.steps_per_epoch = steps_per_epoch(self.num_examples, self.batch_size)
    self.seed = int(seed)
    self.augment = bool(augment)
    self._images, self._labels = images_u8, labels.astype(np.int32)
    self._mean = np.asarray(mean, np.float32)
    self._std = np.asarray(std, np.float32)

    import grain   # pylint: disable=import-outside-toplevel  (heavy; only training needs it)
    ds = (grain.MapDataset.range(self.num_examples)
          .shuffle(seed=self.seed)
          .batch(self.batch_size, drop_remainder=True)
          .repeat())
    ds = ds.map(self._gather)
    if self.augment:
      ds = ds.random_map(self._augment, seed=self.seed + 1)
    ds = ds.map(self._normalize)
    self._dataset = ds
    self._iter = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0,
                                                           prefetch_buffer_size=0)))

  def _gather(self, idx_B):
    return self._images[idx_B], self._labels[idx_B]

  @staticmethod
  def _augment(batch, rng):
    images_u8, labels = batch
    return augment_batch(images_u8, rng), labels

  def _normalize(self, batch):
    images_u8, labels = batch
    return normalize(images_u8, self._mean, self._std), labels

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._iter)

  def _config(self) -> dict:
    return {"num_examples": self.num_examples, "batch_size": self.batch_size,
            "seed": self.seed, "augment": self.augment}

  def get_state(self) -> dict:
    """JSON-serialisable position: the loader's settings and grain's iterator state."""
    return {**self._config(), "iterator": dict(self._iter.get_state())}

  def set_state(self, state: dict) -> None:
    """Resume at a position saved by `get_state` of a loader with the same settings."""
    if not isinstance(state, dict) or "iterator" not in state:
      raise DataError("TrainLoader.set_state needs the dict returned by get_state()")
    mismatched = {k: (state.get(k), v) for k, v in self._config().items() if state.get(k) != v}
    if mismatched:
      raise DataError(f"TrainLoader state is from a different loader (saved, current): "
                      f"{mismatched}; build the loader with the saved settings")
    self._iter.set_state(dict(state["iterator"]))

  @property
  def step(self) -> int:
    """Number of batches produced so far."""
    return int(self._iter.get_state().get("next_index", 0))
