"""OpenOOD v1.5 benchmarks: `cifar10`, `cifar100`, `imagenet200`, `imagenet1k`.

Splits (OpenOOD v1.5, `openood/evaluation_api/datasets.py`, DATA_INFO):

  cifar10      ID CIFAR-10;   near cifar100, tin;  far mnist, svhn, texture, places365;
               OOD val tin (OpenOOD's val_tin subset)
  cifar100     ID CIFAR-100;  near cifar10, tin;   far as cifar10;  OOD val tin
  imagenet200  ID ImageNet-200 (a 200-class subset of ImageNet-1K);  near ssb_hard, ninco;
               far inaturalist, textures, openimage_o;  OOD val openimage_o (a subset)
  imagenet1k   ID ImageNet-1K;  near, far and OOD val as imagenet200

Source "openood" (default) reads OpenOOD's data folder (`--data-root`, the folder its
`scripts/download/download.py` fills), exactly the image lists OpenOOD evaluates on:

  DATA_ROOT/benchmark_imglist/<id>/train_<id>.txt, val_<id>.txt, test_<id>.txt   (ID; <id> is
      cifar10, cifar100, imagenet200, or imagenet for imagenet1k)
  DATA_ROOT/benchmark_imglist/<id>/test_<set>.txt                               (near / far OOD)
  DATA_ROOT/benchmark_imglist/<id>/val_tin.txt | val_openimage_o.txt            (OOD val)
  DATA_ROOT/images_classic/...      CIFAR, TIN, MNIST, SVHN, Texture(s), Places365
  DATA_ROOT/images_largescale/...   ImageNet, SSB-hard, NINCO, iNaturalist, OpenImage-O

e.g. benchmark_imglist/cifar10/test_tin.txt, benchmark_imglist/imagenet/test_ssb_hard.txt,
benchmark_imglist/imagenet200/test_textures.txt (textures live in images_classic/ for the
ImageNet benchmarks too). Each line is `relative/path label` (path relative to the images_*
folder; OOD labels are ignored).

Source "tfds" reads the sets tfds has through `tfds.data_source` (see tfds_sources.py:
CIFAR-10/100, MNIST, SVHN, DTD, Places365-small, ImageNet-2012) and the others (TIN, SSB-hard,
NINCO, iNaturalist, OpenImage-O; all of ImageNet-200) from the OpenOOD folder when one is
found. tfds splits approximate OpenOOD's lists (the ID val split is carved from train, MNIST
is its test split, Places365 its full validation split without OpenOOD's filtering), so tfds
numbers are not leaderboard numbers. `allow_missing=True` drops absent OOD sets (and the OOD
val set) with one warning naming them, instead of failing.

Preprocessing is OpenOOD's test transform, applied once when loading: RGB, resize the shorter
side (PIL bilinear, as torchvision does on PIL images) to 32 (CIFAR) or 256 (ImageNet), centre
crop to 32 / 224; images are then stored as uint8 and normalised per channel with the
benchmark's mean/std at feature-extraction time.

Memory: decoded images take 3 KiB per CIFAR image and 147 KiB per ImageNet image (CIFAR-10
in full ≈ 0.5 GB; ImageNet-1K test (45k) ≈ 6.6 GB, its train list (1.28M) ≈ 190 GB). Every
set is read through a grain pipeline (`streaming.StreamedImages`: `workers` decode threads,
prefetch); a set whose decoded size reaches `streaming.STREAM_MIN_BYTES` (1 GiB) is streamed:
kept as the file list and decoded batch by batch on every read, so host memory holds the
prefetch window and one batch, never the set (`Options(stream=True)` streams every set,
`stream=False` decodes every set into memory). Smaller sets are decoded whole into uint8
arrays, as before. Every listed file is checked to exist before any decoding (one DataError
naming the first missing file). `max_train` / `max_per_set` (seeded random subsets chosen
before any decoding) still shorten ImageNet-scale runs, e.g. `Options(max_train=50_000,
max_per_set=10_000)`.

Loading options travel as a frozen `Options` value, never a module-wide setting:

  load_benchmark("cifar10", options=openood.Options(source="tfds", max_per_set=2000))

(score.py builds one from --data, --data-root, --max-per-set and --allow-missing); a
benchmark's `data_dir` is also searched for the OpenOOD folder (itself, or its `openood/`
sub-folder; likewise $GROOD_DATA_DIR and the grood_jax cache).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import warnings

import numpy as np
from PIL import Image

from grood_jax.data import streaming, tfds_sources
from grood_jax.data.base import Benchmark, DataError, ImageSet, OODSet
from grood_jax.data.benchmarks import split_train_val
from grood_jax.data.paths import data_roots

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
SOURCES = ("openood", "tfds")
NOISE_SIZE = 1000


@dataclasses.dataclass(frozen=True)
class Spec:
  openood_id: str                  # folder under benchmark_imglist/
  num_classes: int
  pre_size: int                    # resize the shorter side to this ...
  size: int                        # ... then centre-crop size x size
  mean: tuple[float, ...]
  std: tuple[float, ...]
  images_dir: str                  # images_classic | images_largescale (ID and most OOD sets)
  near: tuple[str, ...]
  far: tuple[str, ...]
  ood_val: str
  tfds_id: str | None              # tfds name of the ID set, None: OpenOOD folder only
  classic_sets: tuple[str, ...] = ()   # OOD sets stored under images_classic/


_IMAGENET_OOD = dict(near=("ssb_hard", "ninco"), far=("inaturalist", "textures", "openimage_o"),
                     ood_val="openimage_o", classic_sets=("textures",))
SPECS = {
    "cifar10": Spec("cifar10", 10, 32, 32, CIFAR10_MEAN, CIFAR10_STD, "images_classic",
                    ("cifar100", "tin"), ("mnist", "svhn", "texture", "places365"), "tin",
                    "cifar10"),
    "cifar100": Spec("cifar100", 100, 32, 32, CIFAR100_MEAN, CIFAR100_STD, "images_classic",
                     ("cifar10", "tin"), ("mnist", "svhn", "texture", "places365"), "tin",
                     "cifar100"),
    "imagenet200": Spec("imagenet200", 200, 256, 224, IMAGENET_MEAN, IMAGENET_STD,
                        "images_largescale", tfds_id=None, **_IMAGENET_OOD),
    "imagenet1k": Spec("imagenet", 1000, 256, 224, IMAGENET_MEAN, IMAGENET_STD,
                       "images_largescale", tfds_id="imagenet", **_IMAGENET_OOD),
}


@dataclasses.dataclass(frozen=True)
class Options:
  """How the OpenOOD benchmarks are loaded (passed in: `load_benchmark(name, options=...)`).
  Checked when made: an unknown source or a cap below 1 is a DataError."""
  source: str = "openood"          # "openood" | "tfds"
  data_root: str | None = None     # OpenOOD's data folder; None: searched (module docstring)
  tfds_data_dir: str | None = None
  max_per_set: int | None = None   # cap on every set (seeded random subset)
  max_train: int | None = None     # cap on the ID training set
  allow_missing: bool = False      # drop absent OOD / OOD-val sets with one warning
  workers: int = 8                 # decoding threads
  stream: bool | None = None       # None: stream sets of >= streaming.STREAM_MIN_BYTES

  def __post_init__(self):
    _check_options(self.source, self.max_per_set, self.max_train)
    if self.stream not in (None, True, False):
      raise DataError(f"stream must be None, True or False, got {self.stream!r}")
    if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
      raise DataError(f"workers must be a positive integer, got {self.workers!r}")


def _check_options(source, max_per_set, max_train):
  if source not in SOURCES:
    raise DataError(f"unknown data source {source!r}; choose one of {SOURCES}")
  for name, v in (("max_per_set", max_per_set), ("max_train", max_train)):
    if v is None:
      continue
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
      raise DataError(f"{name} must be a positive integer, got {v!r}")


# ----------------------------------------------------------------------------- preprocessing


def resize_center_crop(img: Image.Image, pre_size: int, size: int) -> np.ndarray:
  """OpenOOD's test transform on a PIL image -> uint8 (size, size, 3).

  torchvision semantics: Resize(pre_size) scales the shorter side to pre_size (the longer one
  to int(pre_size * long / short)) with PIL bilinear; CenterCrop(size) starts at
  round((dim - size) / 2)."""
  if img.mode != "RGB":
    img = img.convert("RGB")
  w, h = img.size
  if min(w, h) != pre_size:
    if w <= h:
      new_w, new_h = pre_size, int(pre_size * h / w)
    else:
      new_w, new_h = int(pre_size * w / h), pre_size
    img = img.resize((new_w, new_h), Image.BILINEAR)
    w, h = new_w, new_h
  if w < size or h < size:
    raise DataError(f"image of {w}x{h} is smaller than the {size}x{size} crop")
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  if (w, h) != (size, size):
    img = img.crop((left, top, left + size, top + size))
  return np.asarray(img, np.uint8)


def _array_preprocess(pre_size: int, size: int):
  def fn(arr: np.ndarray) -> np.ndarray:
    if arr.shape == (size, size, 3) and pre_size == size:
      return arr.astype(np.uint8, copy=False)
    a = arr[..., 0] if arr.shape[-1] == 1 else arr
    return resize_center_crop(Image.fromarray(np.ascontiguousarray(a)), pre_size, size)
  return fn


# ----------------------------------------------------------------------------- OpenOOD folder


def find_data_root(data_root=None, data_dir=None) -> str | None:
  """An explicit `data_root`, else the first of data_roots(data_dir) (or its `openood/`) that
  holds `benchmark_imglist/`; None when none does."""
  if data_root:
    return os.path.expanduser(os.fspath(data_root))
  for root in data_roots(data_dir):
    for cand in (root, os.path.join(root, "openood")):
      if os.path.isdir(os.path.join(cand, "benchmark_imglist")):
        return cand
  return None


def read_imglist(path: str) -> tuple[list[str], np.ndarray]:
  """OpenOOD image list -> (relative paths, int labels; -1 where a line has none)."""
  paths, labels = [], []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      rel, _, rest = line.partition(" ")
      rest = rest.strip()
      try:
        label = int(rest) if rest else -1
      except ValueError:
        label = -1               # OpenOOD allows extra JSON after the path; not a class label
      paths.append(rel)
      labels.append(label)
  if not paths:
    raise DataError(f"image list {path} is empty")
  return paths, np.asarray(labels, np.int32)


def _subset_idx(n: int, cap: int | None, seed: int, name: str) -> np.ndarray:
  if cap is None or n <= cap:
    return np.arange(n)
  tag = int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little")
  rng = np.random.default_rng([seed, tag, n])
  return np.sort(rng.choice(n, size=int(cap), replace=False))


def _decode_one(path: str, pre_size: int, size: int) -> np.ndarray:
  try:
    with Image.open(path) as img:
      return resize_center_crop(img, pre_size, size)
  except FileNotFoundError:
    raise DataError(f"image {path} is missing (listed in an OpenOOD image list)") from None
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f"image {path} is unreadable ({e})") from e


def check_files_exist(files: list[str], *, workers: int = 8, what: str = "an OpenOOD image "
                      "list") -> None:
  """One DataError naming the first of `files` that is not a file (stat calls in threads)."""
  with concurrent.futures.ThreadPoolExecutor(max(1, int(workers))) as pool:
    for path, ok in zip(files, pool.map(os.path.isfile, files, chunksize=256)):
      if not ok:
        raise DataError(f"image {path} is missing (listed in {what})")


def load_imglist(data_root: str, imglist: str, images_dir: str, *, name: str, pre_size: int,
                 size: int, labels: bool, max_n: int | None = None, seed: int = 0,
                 workers: int = 8, stream: bool | None = None) -> ImageSet:
  """Reads one OpenOOD image list (relative to data_root) into an ImageSet: decoded through a
  grain pipeline of `workers` threads, whole into memory or, when `streaming.should_stream`
  (large sets, or stream=True), kept lazy (`streaming.StreamedImages` over the file list)."""
  list_path = os.path.join(data_root, imglist)
  if not os.path.isfile(list_path):
    raise DataError(f"{name}: OpenOOD image list {list_path} not found (expected OpenOOD "
                    "v1.5's data folder; pass --data-root DIR)")
  rel, y = read_imglist(list_path)
  idx = _subset_idx(len(rel), max_n, seed, name)
  files = [os.path.join(data_root, images_dir, rel[i]) for i in idx]
  check_files_exist(files, workers=workers)
  decode = functools.partial(_decode_one, pre_size=pre_size, size=size)
  images = streaming.StreamedImages(files, decode, (size, size, 3), num_threads=workers,
                                    name=name)
  if not streaming.should_stream(stream, len(files), images.image_shape):
    images = images.materialize()
  return ImageSet(name, images, y[idx] if labels else None)


# ----------------------------------------------------------------------------- benchmarks


@functools.lru_cache(maxsize=2)
def _noise_images(n: int, size: int, seed: int) -> np.ndarray:
  """Colour uniform noise, Gaussian-blurred (sigma ~ U[0.5, 2] * size/32 per image), each image
  stretched to 0..255; GROOD's noise source at the benchmark's resolution."""
  from scipy import ndimage
  rng = np.random.default_rng([seed, 0x9015e, size])
  out = np.empty((n, size, size, 3), np.uint8)
  for i in range(n):
    raw = rng.uniform(0.0, 255.0, size=(size, size, 3))
    sigma = rng.uniform(0.5, 2.0) * size / 32
    blurred = ndimage.gaussian_filter(raw, (sigma, sigma, 0), mode="reflect")
    lo, hi = blurred.min(), blurred.max()
    out[i] = np.rint((blurred - lo) * (255.0 / max(hi - lo, 1e-12)))
  out.setflags(write=False)
  return out


class _Loader:
  """Loads the sets of one benchmark from the OpenOOD folder and/or tfds."""

  def __init__(self, bench: str, spec: Spec, *, source, data_root, tfds_data_dir, max_per_set,
               max_train, seed, workers, stream=None):
    self.bench, self.spec, self.source, self.root = bench, spec, source, data_root
    self.stream = stream
    self.tfds_data_dir, self.max_per_set, self.max_train = tfds_data_dir, max_per_set, max_train
    self.seed, self.workers = seed, workers
    self.preprocess = _array_preprocess(spec.pre_size, spec.size)

  def imglist(self, kind: str, set_name: str) -> str:
    return f"benchmark_imglist/{self.spec.openood_id}/{kind}_{set_name}.txt"

  def _openood(self, kind, set_name, *, name, labels, cap, images_dir=None):
    if self.root is None:
      raise DataError(f"{name}: needs OpenOOD's {self.imglist(kind, set_name)} but no OpenOOD "
                      "data folder was found; pass --data-root DIR")
    return load_imglist(self.root, self.imglist(kind, set_name),
                        images_dir or self.spec.images_dir, name=name,
                        pre_size=self.spec.pre_size, size=self.spec.size, labels=labels,
                        max_n=cap, seed=self.seed, workers=self.workers, stream=self.stream)

  def _cap(self, cap):
    caps = [c for c in (cap, self.max_per_set) if c is not None]
    return min(caps) if caps else None

  def ood(self, kind: str, set_name: str, name: str) -> ImageSet:
    images_dir = "images_classic" if set_name in self.spec.classic_sets else None
    if self.source == "tfds" and set_name in tfds_sources.TFDS_SETS:
      dataset, splits = tfds_sources.TFDS_SETS[set_name]
      return tfds_sources.load_tfds(dataset, splits, name=name, preprocess=self.preprocess,
                                    max_n=self._cap(None), seed=self.seed, labels=False,
                                    data_dir=self.tfds_data_dir, stream=self.stream,
                                    workers=self.workers)
    return self._openood(kind, set_name, name=name, labels=False, cap=self._cap(None),
                         images_dir=images_dir)

  def _check_labels(self, data: ImageSet) -> ImageSet:
    y = data.labels
    bad = (y < 0) | (y >= self.spec.num_classes)
    if bad.any():
      raise DataError(f"{data.name}: {int(bad.sum())} labels outside 0..{self.spec.num_classes - 1}"
                      f" (first: {int(y[bad][0])})")
    return data

  def id_sets(self, val_fraction: float) -> tuple[ImageSet, ImageSet, ImageSet]:
    b, oid = self.bench, self.spec.openood_id
    if self.source == "tfds":
      if self.spec.tfds_id is None:
        raise DataError(f"{b}: its class subset is defined by OpenOOD's image lists; use "
                        "--data openood with --data-root DIR")
      dataset = tfds_sources.TFDS_SETS[self.spec.tfds_id][0]
      train_split = "train"
      test_split = tfds_sources.TFDS_SETS[self.spec.tfds_id][1][0]
      cap_train = self._cap(self.max_train)
      full = tfds_sources.load_tfds(dataset, [train_split], name=b, preprocess=self.preprocess,
                                    max_n=cap_train, seed=self.seed,
                                    data_dir=self.tfds_data_dir, stream=self.stream,
                                    workers=self.workers)
      train, val = split_train_val(self._check_labels(full), val_fraction, self.seed)
      test = tfds_sources.load_tfds(dataset, [test_split], name=f"{b}_test",
                                    preprocess=self.preprocess, max_n=self._cap(None),
                                    seed=self.seed, data_dir=self.tfds_data_dir,
                                    stream=self.stream, workers=self.workers)
      return train, val, self._check_labels(test)
    train = self._openood("train", oid, name=f"{b}_train", labels=True,
                          cap=self._cap(self.max_train))
    val = self._openood("val", oid, name=f"{b}_val", labels=True, cap=self._cap(None))
    test = self._openood("test", oid, name=f"{b}_test", labels=True, cap=self._cap(None))
    return tuple(self._check_labels(s) for s in (train, val, test))


def load_openood_benchmark(name: str, *, source: str = "openood", data_root=None, data_dir=None,
                           tfds_data_dir=None, seed: int = 0, val_fraction: float = 1 / 12,
                           max_per_set: int | None = None, max_train: int | None = None,
                           allow_missing: bool = False, workers: int = 8,
                           stream: bool | None = None) -> Benchmark:
  """Builds an OpenOOD v1.5 benchmark (see the module docstring for sources and layout).

  `val_fraction` only applies to source "tfds" (the ID val split is carved from train); the
  OpenOOD folder has its own val list. A missing set raises DataError naming the image list or
  tfds dataset expected (with `allow_missing`, absent OOD sets are dropped with a warning).
  `stream`: see `Options.stream` (None: sets of >= streaming.STREAM_MIN_BYTES are streamed).
  """
  if name not in SPECS:
    raise DataError(f"unknown OpenOOD benchmark {name!r}; choose from {sorted(SPECS)}")
  _check_options(source, max_per_set, max_train)
  spec = SPECS[name]
  loader = _Loader(name, spec, source=source, data_root=find_data_root(data_root, data_dir),
                   tfds_data_dir=tfds_data_dir, max_per_set=max_per_set, max_train=max_train,
                   seed=seed, workers=workers, stream=stream)
  id_train, id_val, id_test = loader.id_sets(val_fraction)

  dropped: list[tuple[str, str]] = []

  def optional(fn, what):
    try:
      return fn()
    except DataError as e:
      if not allow_missing:
        raise
      dropped.append((what, str(e)))
      return None

  ood = []
  for group, sets in (("near", spec.near), ("far", spec.far)):
    for s in sets:
      data = optional(functools.partial(loader.ood, "test", s, s), f"OOD set {s}")
      if data is not None:
        ood.append(OODSet(s, group, data))
  if not ood:
    raise DataError(f"{name}: none of its OOD sets could be loaded"
                    + (f" (first: {dropped[0][1]})" if dropped else ""))
  ood_val = optional(functools.partial(loader._openood, "val", spec.ood_val,
                                       name=f"{spec.ood_val}_val", labels=False,
                                       cap=loader._cap(None),
                                       images_dir="images_classic"
                                       if spec.ood_val in spec.classic_sets else None),
                     f"OOD val set {spec.ood_val}")
  if dropped:
    warnings.warn(f"{name}: --allow-missing dropped {len(dropped)} absent set(s): "
                  f"{', '.join(w for w, _ in dropped)} (first reason: {dropped[0][1]})",
                  stacklevel=2)
  class_names = (list(CIFAR10_CLASSES) if name == "cifar10"
                 else [str(i) for i in range(spec.num_classes)])
  noise = ImageSet("noise", _noise_images(NOISE_SIZE, spec.size, seed))
  return Benchmark(name=name, num_classes=spec.num_classes, class_names=class_names,
                   image_shape=(spec.size, spec.size, 3), mean=spec.mean, std=spec.std,
                   id_train=id_train, id_val=id_val, id_test=id_test, ood=ood, ood_val=ood_val,
                   noise=noise)


def _build(name: str, *, data_dir=None, seed: int = 0, val_fraction: float = 1 / 12,
           options: Options | None = None) -> Benchmark:
  """The registry's builder (`load_benchmark(name, options=...)`)."""
  o = options if options is not None else Options()
  if not isinstance(o, Options):
    raise DataError(f"options for the OpenOOD benchmarks must be openood.Options, got "
                    f"{type(o).__name__}")
  return load_openood_benchmark(name, source=o.source, data_root=o.data_root, data_dir=data_dir,
                                tfds_data_dir=o.tfds_data_dir, seed=seed,
                                val_fraction=val_fraction, max_per_set=o.max_per_set,
                                max_train=o.max_train, allow_missing=o.allow_missing,
                                workers=o.workers, stream=o.stream)


# the builders benchmarks.LAZY names ("grood_jax.data.openood:cifar10", ...)
cifar10 = functools.partial(_build, "cifar10")
cifar100 = functools.partial(_build, "cifar100")
imagenet200 = functools.partial(_build, "imagenet200")
imagenet1k = functools.partial(_build, "imagenet1k")
