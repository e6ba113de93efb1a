"""Fashion-MNIST (Xiao et al. 2017): 60,000 train and 10,000 test images, 28×28 grey, 10 classes.

Read from the first folder that holds the four IDX files (gzip or plain):
`data_dir`, `$GROOD_DATA_DIR`, the cache `~/.cache/grood_jax` (each either directly or in a
`fashion_mnist/` sub-folder), then the Debian package `dataset-fashion-mnist`
(`/usr/share/datasets/fashion-mnist`). Otherwise the files are downloaded once from the public
Zalando source into `~/.cache/grood_jax/fashion_mnist`. Every copy is checked against the sha256
of the decoded arrays; decoded arrays are kept in memory for the rest of the process.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from urllib.request import urlopen

import numpy as np

from grood_jax.data import paths
from grood_jax.data.base import DataError, ImageSet
from grood_jax.data.idx import read_idx
from grood_jax.fileio import atomic_write

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot"]
MEAN, STD = 0.2860, 0.3530          # of train images / 255

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# sha256 of the decoded arrays' bytes (uint8, C order), computed from the Debian copy.
SHA256 = {
    "train_images": "2e487a6c89124f78f2d7521542223cafe96f7123c3ca13d447772ac6ecbb3012",
    "train_labels": "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7",
    "test_images": "c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a",
    "test_labels": "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9",
}
MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
SYSTEM_DIRS = ("/usr/share/datasets/fashion-mnist",)
_SUBDIRS = ("fashion_mnist", "fashion-mnist", "")


def _find_file(folder: str, stem: str) -> str | None:
  for name in (stem + ".gz", stem):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return path
  return None


def _find_local(data_dir) -> dict[str, str] | None:
  """The first folder holding all four files -> {key: path}, or None."""
  candidates = [os.path.join(root, sub) for root in paths.data_roots(data_dir)
                for sub in _SUBDIRS]
  for folder in candidates + list(SYSTEM_DIRS):
    found = {key: _find_file(folder, stem) for key, stem in FILES.items()}
    if all(found.values()):
      return found
  return None


def _download(folder: str) -> dict[str, str]:
  """Fetch the four gz files into `folder` (atomic rename, so a failed run leaves nothing)."""
  os.makedirs(folder, exist_ok=True)
  out = {}
  for key, stem in FILES.items():
    dest = os.path.join(folder, stem + ".gz")
    if not os.path.isfile(dest):
      errors = []
      for mirror in MIRRORS:
        url = mirror + stem + ".gz"
        try:
          with urlopen(url, timeout=60) as response:
            atomic_write(dest, lambda f: shutil.copyfileobj(response, f), suffix=".part")
          break
        except OSError as e:
          errors.append(f"{url}: {e}")
      else:
        raise DataError(f"could not download Fashion-MNIST ({'; '.join(errors)}); install the "
                        "Debian package dataset-fashion-mnist or put the four IDX files in "
                        f"{folder}")
    out[key] = dest
  return out


def _decode(files: dict[str, str], verify: bool) -> dict[str, np.ndarray]:
  arrays = {key: read_idx(path) for key, path in files.items()}
  for key, array in arrays.items():
    expected_ndim = 3 if key.endswith("images") else 1
    if array.dtype != np.uint8 or array.ndim != expected_ndim:
      raise DataError(f"{files[key]}: expected uint8 with {expected_ndim} dims, got "
                      f"{array.dtype} {array.shape}")
    if verify:
      digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
      if digest != SHA256[key]:
        raise DataError(f"{files[key]}: checksum mismatch (sha256 of the decoded array is "
                        f"{digest[:12]}…, expected {SHA256[key][:12]}…); delete the file and "
                        "load again")
  for split in ("train", "test"):
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if len(images) != len(labels) or images.shape[1:] != (28, 28):
      raise DataError(f"{files[split + '_images']}: {images.shape} images for {labels.shape} "
                      "labels; expected (N,28,28) and (N,)")
    if labels.size and labels.max() >= len(CLASS_NAMES):
      raise DataError(f"{files[split + '_labels']}: label {labels.max()} out of range 0..9")
  for array in arrays.values():
    array.setflags(write=False)   # shared by every caller through the in-memory cache
  return arrays


@functools.lru_cache(maxsize=4)
def _load_cached(files_key: tuple[tuple[str, str], ...], verify: bool):
  return _decode(dict(files_key), verify)


def load_fashion_mnist(data_dir: str | os.PathLike | None = None, *, verify: bool = True,
                       download: bool = True) -> tuple[ImageSet, ImageSet]:
  """-> (train, test) ImageSets, images uint8 (N,28,28,1), labels int32 (N,).

  Looks for a local copy (see the module docstring), else downloads into the cache when
  `download`. `verify` checks the sha256 of every decoded array; a mismatch is a DataError, and a
  freshly downloaded file that fails it is deleted so the next call fetches it again.
  """
  files = _find_local(data_dir)
  fetched = False
  if files is None:
    if not download:
      raise DataError("Fashion-MNIST not found; pass data_dir, set GROOD_DATA_DIR or install "
                      "the Debian package dataset-fashion-mnist")
    files = _download(os.path.join(paths.cache_root(), "fashion_mnist"))
    fetched = True
  try:
    arrays = _load_cached(tuple(sorted(files.items())), verify)
  except DataError:
    if fetched:
      for path in files.values():
        if os.path.exists(path):
          os.remove(path)
    raise
  def make(split):
    labels = arrays[f"{split}_labels"].astype(np.int32)
    return ImageSet(f"fashion_mnist_{split}", arrays[f"{split}_images"][..., None], labels)
  return make("train"), make("test")


def clear_cache() -> None:
  """Forget the decoded arrays kept in memory."""
  _load_cached.cache_clear()
