"""Auxiliary outlier sets for training-time OOD methods (GReg / GReg+, METHOD.md §2).

An auxiliary set is named by `config.aux.source`:

- `photos` (the default): seeded crops of scikit-image's bundled photographs camera, astronaut,
  coffee, chelsea, rocket, moon and coins — natural images, neither the texture photos
  (brick / grass / gravel, the `textures` test set) nor any other test or validation set. Each
  crop covers size·s px with s uniform in [1, 8] at a uniform random position and is resized
  (PIL bilinear, antialiased) to the benchmark's image size; colour photos are converted to
  grey by luminance for one-channel benchmarks (grey photos repeated for RGB ones).
- `npz:PATH`, `folder:DIR` or a generated set's name, read by `load_source`.

`load_auxiliary` REFUSES (DataError) a set that shares an exact image with an evaluation set of
the benchmark — any OOD test set, the OOD validation set, the ID test or ID validation split —
after conversion to the benchmark's image shape: rows are compared by a hash of their bytes.
The message names each overlapping set and how many auxiliary images it shares.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
from PIL import Image

from grood_jax.data.base import Benchmark, DataError, ImageSet
from grood_jax.data.sources import LUMA_WEIGHTS, load_source

PHOTO_NAMES = ("camera", "astronaut", "coffee", "chelsea", "rocket", "moon", "coins")
SCALE_RANGE = (1.0, 8.0)


def _photo(name: str, channels: int) -> np.ndarray:
  import skimage.data   # pylint: disable=import-outside-toplevel
  image = np.asarray(getattr(skimage.data, name)(), np.uint8)
  if image.ndim == 2:
    image = image[..., None]
  image = image[..., :3]
  if channels == 1 and image.shape[-1] == 3:
    gray = image.astype(np.float32) @ LUMA_WEIGHTS
    image = np.clip(np.rint(gray), 0, 255).astype(np.uint8)[..., None]
  elif channels == 3 and image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  elif image.shape[-1] != channels:
    raise DataError(f"photos: cannot make {channels}-channel images")
  return image


@functools.lru_cache(maxsize=4)
def _photo_arrays(n: int, seed: int, height: int, width: int, channels: int):
  photos = [_photo(p, channels) for p in PHOTO_NAMES]
  rng = np.random.default_rng([seed, 0xa0c5])
  which = rng.integers(len(photos), size=n)
  scale = rng.uniform(*SCALE_RANGE, size=n)
  pos = rng.random(size=(n, 2))
  images = np.empty((n, height, width, channels), np.uint8)
  for i in range(n):
    photo = photos[which[i]]
    ch = min(int(round(height * scale[i])), photo.shape[0])
    cw = min(int(round(width * scale[i])), photo.shape[1])
    top = int(pos[i, 0] * (photo.shape[0] - ch + 1))
    left = int(pos[i, 1] * (photo.shape[1] - cw + 1))
    patch = photo[top:top + ch, left:left + cw]
    pil = Image.fromarray(patch[..., 0] if channels == 1 else patch)
    out = np.asarray(pil.resize((width, height), Image.BILINEAR))
    images[i] = out[..., None] if channels == 1 else out
  images.setflags(write=False)
  which = which.astype(np.int32)
  which.setflags(write=False)
  return images, which


def photos(n: int = 20000, seed: int = 0, image_shape=(28, 28, 1)) -> ImageSet:
  """`n` seeded crops of the skimage photographs in PHOTO_NAMES (see the module docstring).
  Labels: the index of the source photo in PHOTO_NAMES."""
  if n <= 0:
    raise DataError(f"photos: n must be positive, got {n}")
  height, width, channels = (int(v) for v in image_shape)
  if channels not in (1, 3):
    raise DataError(f"photos: image_shape needs 1 or 3 channels, got {image_shape}")
  images, which = _photo_arrays(int(n), int(seed), height, width, channels)
  return ImageSet("photos", images, which)


AUXILIARY = {"photos": photos}


def _digests(images_u8: np.ndarray) -> list[bytes]:
  """One 16-byte BLAKE2b digest per image (of its shape and bytes)."""
  shape = repr(images_u8.shape[1:]).encode()
  rows = np.ascontiguousarray(images_u8).reshape(len(images_u8), -1)
  return [hashlib.blake2b(shape + r.tobytes(), digest_size=16).digest() for r in rows]


def evaluation_sets(bench: Benchmark) -> list[tuple[str, ImageSet]]:
  """(description, set) of every set an auxiliary set must not overlap."""
  out = [(f"OOD test set '{o.name}'", o.data) for o in bench.ood]
  if bench.ood_val is not None:
    out.append((f"OOD val set '{bench.ood_val.name}'", bench.ood_val))
  out.append((f"ID test set '{bench.id_test.name}'", bench.id_test))
  out.append((f"ID val set '{bench.id_val.name}'", bench.id_val))
  return out


def check_disjoint(aux: ImageSet, bench: Benchmark) -> None:
  """DataError naming every evaluation set of `bench` that shares an exact image with `aux`."""
  aux_digests = _digests(aux.images)
  found = []
  for what, data in evaluation_sets(bench):
    if len(data) == 0 or data.images.shape[1:] != aux.images.shape[1:]:
      continue
    protected = set(_digests(data.images))
    count = sum(d in protected for d in aux_digests)
    if count:
      found.append(f"{what} ({count} of {len(aux)} auxiliary images)")
  if found:
    raise DataError(f"auxiliary set '{aux.name}' overlaps the benchmark's evaluation data: "
                    + "; ".join(found)
                    + "; an auxiliary outlier set must be disjoint from every test and val set")


def load_auxiliary(spec: str, bench: Benchmark, *, seed: int = 0, num_samples: int = 20000,
                   data_dir=None) -> ImageSet:
  """The auxiliary outlier set `spec` in `bench.image_shape`, checked disjoint from `bench`'s
  evaluation sets (`check_disjoint`). `seed` / `num_samples` apply to generated sets."""
  if not spec:
    raise DataError("no auxiliary source: set config.aux.source (e.g. 'photos' or npz:PATH)")
  name = spec[4:] if spec.startswith("aux:") else spec
  if name in AUXILIARY:
    aux = AUXILIARY[name](n=num_samples, seed=seed, image_shape=bench.image_shape)
  else:
    aux = load_source(spec, image_shape=bench.image_shape, seed=seed, data_dir=data_dir)
  check_disjoint(aux, bench)
  return aux
