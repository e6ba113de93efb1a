"""Image sets named by a string: `npz:PATH`, `folder:DIR`, or a generated set's name.

Every set is returned as uint8 (N, H, W, C) in the requested `image_shape`. Images of another
size or channel count are converted explicitly, never broadcast:

- channels: RGB -> grey by luminance (0.299 R + 0.587 G + 0.114 B, ITU-R BT.601, rounded);
  grey -> RGB by repeating the channel; RGBA / grey+alpha drop the alpha channel first;
- size: PIL bilinear resize to (H, W), which low-pass filters (antialiases) when shrinking.

Image folders of at least `streaming.STREAM_MIN_BYTES` decoded bytes (or any with stream=True)
are streamed: `streaming.StreamedImages` over the file list, each file read and converted on
every read in grain threads, never held whole (see streaming.py for the memory bound).
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import warnings
import zipfile
import zlib

import numpy as np
from PIL import Image

from grood_jax.data import streaming
from grood_jax.data.base import DataError, ImageSet

LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)
GROUPS = ("near", "far")


def _convert_channels(images_u8: np.ndarray, channels: int, name: str) -> np.ndarray:
  """(N,H,W,C) uint8 -> (N,H,W,channels) uint8 (see the module docstring)."""
  have = images_u8.shape[-1]
  if have in (2, 4):                      # grey+alpha, RGBA: drop alpha
    images_u8, have = images_u8[..., :have - 1], have - 1
  if have == channels:
    return images_u8
  if have == 3 and channels == 1:
    gray = images_u8.astype(np.float32) @ LUMA_WEIGHTS
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)[..., None]
  if have == 1 and channels == 3:
    return np.repeat(images_u8, 3, axis=-1)
  raise DataError(f"{name}: cannot convert {images_u8.shape[-1]} channels to {channels}; "
                  "supply grey (1), RGB (3) or RGBA (4) images")


def _resize(images_u8: np.ndarray, height: int, width: int) -> np.ndarray:
  """(N,h,w,C) uint8 -> (N,height,width,C) with PIL bilinear (antialiased when shrinking)."""
  if images_u8.shape[1:3] == (height, width):
    return images_u8
  out = np.empty((len(images_u8), height, width, images_u8.shape[-1]), np.uint8)
  for i, image in enumerate(images_u8):
    for c in range(image.shape[-1]):
      pil = Image.fromarray(np.ascontiguousarray(image[..., c]), mode="L")
      out[i, ..., c] = np.asarray(pil.resize((width, height), Image.BILINEAR))
  return out


def conform(images_u8: np.ndarray, image_shape, name: str) -> np.ndarray:
  """Convert uint8 (N,H,W,C) images to `image_shape` (H,W,C): channels first, then size."""
  if len(image_shape) != 3 or min(image_shape) <= 0:
    raise DataError(f"{name}: image_shape must be (H, W, C) with positive sizes, got "
                    f"{image_shape}")
  height, width, channels = (int(v) for v in image_shape)
  if channels == 1:          # fewer channels to resize
    return _resize(_convert_channels(images_u8, channels, name), height, width)
  return _convert_channels(_resize(images_u8, height, width), channels, name)


def _to_uint8(images: np.ndarray, name: str) -> np.ndarray:
  if images.dtype == np.uint8:
    return images
  if np.issubdtype(images.dtype, np.floating):
    if not np.isfinite(images).all():
      raise DataError(f"{name}: images contain NaN or Inf; clean them before saving")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
      raise DataError(f"{name}: float images must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]; "
                      "divide by 255 or save them as uint8")
    return np.rint(images * 255.0).astype(np.uint8)
  raise DataError(f"{name}: images have dtype {images.dtype}; save them as uint8 (0..255) or "
                  "float in [0, 1]")


def _check_labels(labels, n: int, name: str) -> np.ndarray | None:
  if labels is None:
    return None
  labels = np.asarray(labels)
  if labels.ndim != 1 or len(labels) != n:
    raise DataError(f"{name}: labels must have shape ({n},), got {labels.shape}")
  if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
    raise DataError(f"{name}: labels must be integers, got {labels.dtype}")
  return labels.astype(np.int32)


def from_array(images, labels=None, *, name: str, image_shape=(28, 28, 1)) -> ImageSet:
  """Validate and convert in-memory images ((N,H,W) or (N,H,W,C); uint8 or float in [0,1])."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise DataError(f"{name}: images must have shape (N,H,W) or (N,H,W,C), got {images.shape}")
  if len(images) == 0:
    raise DataError(f"{name}: the set is empty")
  if min(images.shape[1:]) == 0:
    raise DataError(f"{name}: images have an empty axis, shape {images.shape}")
  if images.shape[-1] not in (1, 2, 3, 4):
    raise DataError(f"{name}: last axis has {images.shape[-1]} channels; expected 1, 3 or 4 "
                    "(channels-last layout)")
  labels = _check_labels(labels, len(images), name)
  images_u8 = conform(_to_uint8(images, name), tuple(image_shape), name)
  return ImageSet(name, np.ascontiguousarray(images_u8), labels)


def load_npz(path: str, *, name: str | None = None, image_shape=(28, 28, 1)) -> ImageSet:
  """npz with `images` (N,H,W) or (N,H,W,C) uint8 or float in [0,1] and optional `labels`."""
  name = name or os.path.splitext(os.path.basename(path))[0]
  if not os.path.isfile(path):
    raise DataError(f"{name}: no such file {path}")
  try:
    loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):   # a bare .npy array
      raise DataError(f"{path}: a single .npy array, not an .npz archive; save with "
                      "np.savez(path, images=..., labels=...)")
    with loaded as npz:
      if "images" not in npz.files:
        raise DataError(f"{path}: no array named 'images' (found {sorted(npz.files)}); save "
                        "with np.savez(path, images=..., labels=...)")
      images = npz["images"]
      labels = npz["labels"] if "labels" in npz.files else None
  except DataError:
    raise
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
  return from_array(images, labels, name=name, image_shape=image_shape)


def _read_image(path: str) -> np.ndarray:
  """One image file -> uint8 (H,W,C): grey modes give C=1 (16-bit keeps the high byte), grey with
  alpha C=2, palette and colour modes RGB (C=3) or RGBA (C=4)."""
  with Image.open(path) as pil:
    pil.load()
    if pil.mode.startswith("I;16"):
      return (np.asarray(pil).astype(np.uint16) >> 8).astype(np.uint8)[..., None]
    if pil.mode == "P":
      pil = pil.convert("RGBA" if "transparency" in pil.info else "RGB")
    if pil.mode in ("1", "L", "I", "F"):
      target = "L"
    elif pil.mode in ("LA", "La", "PA"):
      target = "LA"
    elif pil.mode in ("RGBA", "RGBa"):
      target = "RGBA"
    else:
      target = "RGB"
    array = np.asarray(pil.convert(target))
  return array[..., None] if array.ndim == 2 else array


def _readable_header(path: str) -> bool:
  """True when PIL recognises the file's header (nothing decoded)."""
  try:
    with Image.open(path):
      return True
  except (OSError, ValueError, Image.DecompressionBombError):
    return False


def _decode_file(path: str, *, image_shape, name: str) -> np.ndarray:
  """One file of a streamed folder -> uint8 `image_shape` (a DataError naming it if it fails)."""
  try:
    image = _read_image(path)
  except FileNotFoundError:
    raise DataError(f"{name}: image {path} is missing (it was listed when the folder was "
                    "opened)") from None
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f"{name}: image {path} is unreadable ({e})") from e
  return conform(image[None], image_shape, name)[0]


def load_folder(root: str, *, name: str | None = None, image_shape=(28, 28, 1),
                stream: bool | None = None, workers: int = 8) -> ImageSet:
  """One sub-folder per class (label = index in sorted order), or image files directly in
  `root` (then unlabelled). Each image is read with PIL and converted to `image_shape` on its
  own, so sizes may differ. Unreadable files are skipped with a warning (a streamed folder,
  `stream` / `streaming.should_stream`, skips files whose header PIL does not recognise, checked
  up front in `workers` threads; a file that fails later to decode is a DataError naming it)."""
  name = name or os.path.basename(os.path.normpath(root))
  if not os.path.isdir(root):
    raise DataError(f"{name}: no such folder {root}")
  visible = sorted(e for e in os.listdir(root) if not e.startswith("."))
  classes = [e for e in visible if os.path.isdir(os.path.join(root, e))]
  if classes:
    entries = [(os.path.join(root, c, f), label) for label, c in enumerate(classes)
               for f in sorted(os.listdir(os.path.join(root, c)))
               if not f.startswith(".") and os.path.isfile(os.path.join(root, c, f))]
  else:
    entries = [(os.path.join(root, f), -1) for f in visible
               if os.path.isfile(os.path.join(root, f))]
  if streaming.should_stream(stream, len(entries), tuple(image_shape)):
    return _streamed_folder(entries, root=root, name=name, image_shape=tuple(image_shape),
                            labelled=bool(classes), workers=workers)
  images, labels, skipped = [], [], []
  for path, label in entries:
    try:
      image = _read_image(path)
    except (OSError, ValueError, Image.DecompressionBombError):
      skipped.append(path)
      continue
    images.append(conform(image[None], image_shape, name)[0])
    labels.append(label)
  _check_readable(name, root, skipped, len(images), stacklevel=3)
  labels_arr = np.asarray(labels, np.int32) if classes else None
  return ImageSet(name, np.stack(images), labels_arr)


def _check_readable(name, root, skipped: list, n_readable: int, stacklevel: int) -> None:
  """One warning naming the unreadable files of a folder; DataError when none is readable."""
  if skipped:
    warnings.warn(f"{name}: skipped {len(skipped)} unreadable file(s), first {skipped[0]}",
                  stacklevel=stacklevel)
  if not n_readable:
    raise DataError(f"{name}: no readable images in {root}; expected one sub-folder of images "
                    "per class")


_HEADER_CHUNK = 1024   # files per header-check task (one Future per file: ~0.8 KB each)


def _readable_headers(paths: list) -> list:
  return [_readable_header(p) for p in paths]


def _streamed_folder(entries, *, root, name, image_shape, labelled, workers) -> ImageSet:
  # Header checks in chunks: ThreadPoolExecutor.map ignores chunksize and makes one Future per
  # item up front, which at 100k files was ~80 MB of peak memory.
  paths = [p for p, _ in entries]
  chunks = [paths[i:i + _HEADER_CHUNK] for i in range(0, len(paths), _HEADER_CHUNK)]
  with concurrent.futures.ThreadPoolExecutor(max(1, int(workers))) as pool:
    ok = [good for part in pool.map(_readable_headers, chunks) for good in part]
  del paths, chunks
  skipped = [p for (p, _), good in zip(entries, ok) if not good]
  entries = [e for e, good in zip(entries, ok) if good]
  _check_readable(name, root, skipped, len(entries), stacklevel=4)
  decode = functools.partial(_decode_file, image_shape=image_shape, name=name)
  images = streaming.StreamedImages([p for p, _ in entries], decode, image_shape,
                                    num_threads=workers, name=name)
  labels = np.asarray([lab for _, lab in entries], np.int32) if labelled else None
  return ImageSet(name, images, labels)


def load_source(spec: str, *, name: str | None = None, image_shape=(28, 28, 1), seed: int = 0,
                data_dir=None, stream: bool | None = None) -> ImageSet:
  """`npz:PATH`, `folder:DIR`, or a generated name (`letters`, `textures`, ...; also `gen:NAME`).

  `seed` is passed to generated sets. See the module docstring for the conversion to
  `image_shape`; `stream` is passed to image folders (None: streamed when large).
  """
  from grood_jax.data import generated   # generated sets import this module's helpers
  kind, sep, rest = spec.partition(":")
  if sep and kind == "npz":
    return load_npz(os.path.expanduser(rest), name=name, image_shape=image_shape)
  if sep and kind == "folder":
    return load_folder(os.path.expanduser(rest), name=name, image_shape=image_shape,
                       stream=stream)
  gen_name = rest if (sep and kind == "gen") else spec
  if gen_name in generated.GENERATED:
    data = generated.make(gen_name, seed=seed, data_dir=data_dir)
    images = conform(data.images, tuple(image_shape), gen_name)
    return ImageSet(name or data.name, images, data.labels)
  raise DataError(f"unknown data source {spec!r}; use npz:PATH, folder:DIR or one of "
                  f"{sorted(generated.GENERATED)}")


def parse_ood_spec(spec: str) -> tuple[str, str, str]:
  """'far:faces=npz:faces.npz' -> ('far', 'faces', 'npz:faces.npz'); 'near:letters' ->
  ('near', 'letters', 'letters'). Without `NAME=` the name is the generated name or file stem."""
  group, sep, rest = spec.partition(":")
  if not sep or group not in GROUPS or not rest:
    raise DataError(f"bad OOD spec {spec!r}; write GROUP:NAME=SOURCE with GROUP near or far, "
                    "e.g. far:faces=npz:faces.npz")
  head, eq, tail = rest.partition("=")
  if eq and ":" not in head:
    name, source = head, tail
    if not name or not source:
      raise DataError(f"bad OOD spec {spec!r}; NAME and SOURCE must both be non-empty")
  else:
    source = rest
    kind, colon, target = source.partition(":")
    if colon and kind in ("npz", "folder"):
      name = os.path.splitext(os.path.basename(os.path.normpath(target)))[0]
    else:
      name = target if (colon and kind == "gen") else source
  if not name:
    raise DataError(f"bad OOD spec {spec!r}; cannot derive a name, write GROUP:NAME=SOURCE")
  return group, name, source
