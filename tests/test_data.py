"""Data: IDX parser, Fashion-MNIST (local + mocked download), npz / folder sources, generated
OOD sets, benchmarks and the grain training loader."""

import gzip
import hashlib
import io
import json
import os
import struct
import urllib.error

import numpy as np
import pytest
from PIL import Image

from grood_jax.data import (DataError, ImageSet, TrainLoader, benchmark_names, fashion_mnist,
                            generated, load_benchmark, load_fashion_mnist, load_source,
                            parse_ood_spec, register_benchmark)
from grood_jax.data.benchmarks import split_train_val
from grood_jax.data.idx import parse_idx, read_idx, write_idx
from grood_jax.data.pipeline import steps_per_epoch

DEBIAN_FMNIST = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(DEBIAN_FMNIST),
    reason=f"{DEBIAN_FMNIST} absent (apt-get install dataset-fashion-mnist)")


@pytest.fixture(autouse=True, scope="module")
def _isolated_cache(tmp_path_factory):
  """Caches go to a temporary folder; no user data folder leaks into the tests."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("GROOD_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    mp.delenv("GROOD_DATA_DIR", raising=False)
    yield


def sha(array):
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


# -- IDX -------------------------------------------------------------------------------------

def test_idx_handwritten(tmp_path):
  raw = bytes([0, 0, 0x08, 2]) + struct.pack(">II", 2, 3) + bytes([0, 1, 2, 250, 251, 255])
  expected = np.array([[0, 1, 2], [250, 251, 255]], np.uint8)
  np.testing.assert_array_equal(parse_idx(raw), expected)
  (tmp_path / "a-idx2-ubyte").write_bytes(raw)
  (tmp_path / "a-idx2-ubyte.gz").write_bytes(gzip.compress(raw))
  for name in ("a-idx2-ubyte", "a-idx2-ubyte.gz"):
    got = read_idx(tmp_path / name)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)
  # big-endian int32, via the writer
  values = np.array([-5, 0, 70000], np.int32)
  write_idx(tmp_path / "v.gz", values)
  assert (gzip.decompress((tmp_path / "v.gz").read_bytes())
          == bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 3) + struct.pack(">3i", *values))
  np.testing.assert_array_equal(read_idx(tmp_path / "v.gz"), values)


@pytest.mark.parametrize("raw, message", [
    (bytes([0, 0, 0x08, 2]) + struct.pack(">II", 2, 3) + bytes(5), "truncated"),
    (bytes([0, 0, 0x08, 2]) + struct.pack(">I", 2), "truncated IDX header"),
    (bytes([0, 0, 0x08, 1]) + struct.pack(">I", 2) + bytes(3), "trailing"),
    (b"garbage file", "magic"),
    (b"", "magic"),
    (bytes([0, 0, 0x42, 1]) + struct.pack(">I", 1) + bytes(1), "data type"),
])
def test_idx_bad_files_name_the_file(tmp_path, raw, message):
  path = tmp_path / "bad-idx"
  path.write_bytes(raw)
  with pytest.raises(DataError, match=message) as err:
    read_idx(path)
  assert str(path) in str(err.value)


def test_idx_truncated_gzip(tmp_path):
  raw = gzip.compress(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 500) + bytes(500))
  path = tmp_path / "cut.gz"
  path.write_bytes(raw[:len(raw) // 2])
  with pytest.raises(DataError, match="cut.gz"):
    read_idx(path)


# -- Fashion-MNIST -----------------------------------------------------------------------------

@needs_fmnist
def test_fashion_mnist_debian_copy_verifies():
  train, test = load_fashion_mnist()   # verify=True: the sha256 of every array is checked
  assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
  assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
  assert sha(train.images[..., 0]) == fashion_mnist.SHA256["train_images"]
  assert abs(train.images.mean() / 255 - fashion_mnist.MEAN) < 1e-4
  assert abs(train.images.std() / 255 - fashion_mnist.STD) < 1e-4
  again, _ = load_fashion_mnist()
  assert np.shares_memory(again.images, train.images)           # decoded once per process


def _tiny_fmnist(seed=0):
  rng = np.random.default_rng(seed)
  arrays = {"train_images": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
            "train_labels": np.arange(12, dtype=np.uint8) % 10,
            "test_images": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
            "test_labels": np.arange(5, dtype=np.uint8)}
  payload = {}
  for key, array in arrays.items():
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload[fashion_mnist.FILES[key] + ".gz"] = gzip.compress(header + array.tobytes())
  return arrays, payload


@pytest.fixture
def fake_download(tmp_path, monkeypatch):
  """No local copy anywhere; urlopen serves tiny gz IDX files and records the URLs."""
  arrays, payload = _tiny_fmnist()
  calls = []

  def urlopen(url, timeout=None):
    calls.append(url)
    return io.BytesIO(payload[url.rsplit("/", 1)[1]])

  monkeypatch.setattr(fashion_mnist, "urlopen", urlopen)
  monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", ())
  monkeypatch.setenv("GROOD_CACHE_DIR", str(tmp_path / "cache"))
  fashion_mnist.clear_cache()
  yield arrays, calls, tmp_path / "cache" / "fashion_mnist"
  fashion_mnist.clear_cache()


def test_download_once_then_cached(fake_download, monkeypatch):
  arrays, calls, folder = fake_download
  monkeypatch.setattr(fashion_mnist, "SHA256", {k: sha(v) for k, v in arrays.items()})
  train, test = load_fashion_mnist()
  assert len(calls) == 4 and calls[0].startswith(fashion_mnist.MIRRORS[0])
  assert sorted(os.listdir(folder)) == sorted(f + ".gz" for f in fashion_mnist.FILES.values())
  np.testing.assert_array_equal(train.images[..., 0], arrays["train_images"])
  np.testing.assert_array_equal(test.labels, arrays["test_labels"])
  fashion_mnist.clear_cache()
  load_fashion_mnist()                  # read from the cache folder: no new download
  assert len(calls) == 4


def test_download_checksum_mismatch(fake_download, monkeypatch):
  arrays, _, folder = fake_download
  bad = {k: sha(v) for k, v in arrays.items()}
  bad["test_images"] = "0" * 64
  monkeypatch.setattr(fashion_mnist, "SHA256", bad)
  with pytest.raises(DataError, match="checksum mismatch"):
    load_fashion_mnist()
  assert not os.listdir(folder)         # a bad download is deleted, so the next call refetches


def test_download_failure_says_what_to_do(fake_download, monkeypatch):
  def offline(url, timeout=None):
    raise urllib.error.URLError("no network")
  monkeypatch.setattr(fashion_mnist, "urlopen", offline)
  with pytest.raises(DataError, match="dataset-fashion-mnist"):
    load_fashion_mnist()


def test_data_dir_first(tmp_path, fake_download, monkeypatch):
  arrays, calls, _ = fake_download
  monkeypatch.setattr(fashion_mnist, "SHA256", {k: sha(v) for k, v in arrays.items()})
  local = tmp_path / "mydata" / "fashion_mnist"
  local.mkdir(parents=True)
  for key, array in arrays.items():     # uncompressed files are accepted too
    write_idx(local / fashion_mnist.FILES[key], array)
  train, _ = load_fashion_mnist(tmp_path / "mydata")
  assert len(train) == 12 and not calls


# -- npz sources ----------------------------------------------------------------------------

def test_npz_gray_uint8(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
  np.savez(tmp_path / "a.npz", images=images, labels=np.arange(7))
  data = load_source(f"npz:{tmp_path / 'a.npz'}")
  assert data.name == "a" and data.images.shape == (7, 28, 28, 1)
  np.testing.assert_array_equal(data.images[..., 0], images)
  assert data.labels.dtype == np.int32 and list(data.labels) == list(range(7))


def test_npz_float_rgb_to_gray_and_resize(tmp_path):
  rgb = np.random.default_rng(1).random((4, 28, 28, 3)).astype(np.float32)
  np.savez(tmp_path / "rgb.npz", images=rgb)
  data = load_source(f"npz:{tmp_path / 'rgb.npz'}", name="col")
  assert data.name == "col" and data.labels is None and data.images.shape == (4, 28, 28, 1)
  rgb_u8 = np.rint(rgb * 255).astype(np.float64)
  luma = np.rint(0.299 * rgb_u8[..., 0] + 0.587 * rgb_u8[..., 1] + 0.114 * rgb_u8[..., 2])
  assert np.abs(data.images[..., 0].astype(int) - luma).max() <= 1

  big = load_source(f"npz:{tmp_path / 'rgb.npz'}", image_shape=(32, 32, 3))
  assert big.images.shape == (4, 32, 32, 3)
  const = np.full((2, 40, 30), 0.5, np.float64)     # a flat image stays flat when resized
  np.savez(tmp_path / "c.npz", images=const)
  small = load_source(f"npz:{tmp_path / 'c.npz'}", image_shape=(28, 28, 3))
  assert small.images.shape == (2, 28, 28, 3) and (small.images == 128).all()


@pytest.mark.parametrize("arrays, message", [
    (None, "no such file"),
    ({"pixels": np.zeros((2, 28, 28), np.uint8)}, "no array named 'images'"),
    ({"images": np.zeros((28, 28), np.uint8)}, "shape"),
    ({"images": np.zeros((2, 1, 28, 28, 1), np.uint8)}, "shape"),
    ({"images": np.full((2, 28, 28), np.nan, np.float32)}, "NaN"),
    ({"images": np.full((2, 28, 28), np.inf)}, "NaN or Inf"),
    ({"images": np.zeros((0, 28, 28), np.uint8)}, "empty"),
    ({"images": np.full((2, 28, 28), 255.0)}, r"\[0, 1\]"),
    ({"images": np.zeros((2, 28, 28), np.int16)}, "dtype"),
    ({"images": np.zeros((2, 28, 28), np.uint8), "labels": np.zeros(3)}, "labels"),
])
def test_npz_errors(tmp_path, arrays, message):
  path = tmp_path / "bad.npz"
  if arrays is not None:
    np.savez(path, **arrays)
  with pytest.raises(DataError, match=message):
    load_source(f"npz:{path}")


def test_unknown_source():
  with pytest.raises(DataError, match="npz:PATH"):
    load_source("hdf5:x.h5")


# -- folder sources ---------------------------------------------------------------------------

def test_folder_source(tmp_path):
  root = tmp_path / "faces"
  for cls, value in (("b_cats", 200), ("a_dogs", 50)):
    (root / cls).mkdir(parents=True)
    for i in range(2):
      Image.fromarray(np.full((40, 40), value + i, np.uint8)).save(root / cls / f"{i}.png")
  Image.fromarray(np.full((10, 20, 3), (255, 0, 0), np.uint8)).save(root / "a_dogs" / "rgb.png")
  (root / "b_cats" / "broken.png").write_bytes(b"not a png")
  with pytest.warns(UserWarning, match=r"skipped 1 unreadable file.*broken\.png"):
    data = load_source(f"folder:{root}")
  assert data.name == "faces" and data.images.shape == (5, 28, 28, 1)
  np.testing.assert_array_equal(data.labels, [0, 0, 0, 1, 1])       # sorted: a_dogs=0, b_cats=1
  np.testing.assert_array_equal(data.images[:, 0, 0, 0], [50, 51, 76, 200, 201])  # red -> 76


def test_folder_errors(tmp_path):
  (tmp_path / "empty" / "cls").mkdir(parents=True)
  with pytest.raises(DataError, match="no readable images"):
    load_source(f"folder:{tmp_path / 'empty'}")
  with pytest.raises(DataError, match="no such folder"):
    load_source(f"folder:{tmp_path / 'missing'}")


# -- generated sets ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["textures", "noise"])
def test_generated_deterministic(name):
  fn = generated.GENERATED[name]
  a, b, c = fn(n=50, seed=0), fn(n=50, seed=0), fn(n=50, seed=1)
  assert a.images.shape == (50, 28, 28, 1) and a.images.dtype == np.uint8
  np.testing.assert_array_equal(a.images, b.images)
  assert not np.array_equal(a.images, c.images)
  assert a.images.std() > 10                  # not blank


def test_noise_full_range():
  images = generated.noise(n=20, seed=3).images
  assert (images.min(axis=(1, 2, 3)) == 0).all() and (images.max(axis=(1, 2, 3)) == 255).all()


def test_mnist():
  data = generated.mnist()
  assert data.images.shape == (5000, 28, 28, 1) and data.images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(data.labels), [500] * 10)
  assert 0.08 < data.images.mean() / 255 < 0.2          # dark background, white strokes
  assert len(generated.mnist(n=10)) == 10


def centre_of_mass(images_u8):
  img = images_u8[..., 0].astype(np.float64)
  yy, xx = np.mgrid[:28, :28]
  mass = img.sum(axis=(1, 2))
  return (img * yy).sum(axis=(1, 2)) / mass, (img * xx).sum(axis=(1, 2)) / mass


def test_letters():
  data = generated.letters()
  fonts = generated.letter_fonts()
  assert len(fonts) >= 150, f"only {len(fonts)} usable fonts"
  assert data.images.shape[1:] == (28, 28, 1) and data.images.dtype == np.uint8
  assert len(data) >= 10 * 150 * 0.9
  np.testing.assert_array_less(np.bincount(data.labels, minlength=10), 1000)
  cy, cx = centre_of_mass(data.images)
  assert np.hypot(cy - 13.5, cx - 13.5).max() < 3.0
  ink_rows = (data.images[..., 0] > 0).any(axis=2)
  height = 28 - np.argmax(ink_rows, 1) - np.argmax(ink_rows[:, ::-1], 1)
  ink_cols = (data.images[..., 0] > 0).any(axis=1)
  width = 28 - np.argmax(ink_cols, 1) - np.argmax(ink_cols[:, ::-1], 1)
  assert (np.maximum(height, width) >= 21).all() and (np.maximum(height, width) <= 26).all()
  assert len({img.tobytes() for img in data.images}) == len(data)    # de-duplicated

  val = generated.letters_val()
  assert len(val) >= 1000
  assert not {img.tobytes() for img in data.images} & {img.tobytes() for img in val.images}


def test_letters_deterministic_and_disk_cached(tmp_path, monkeypatch):
  first = generated.letters(seed=0, letters="AB").images
  other_seed = generated.letters(seed=1, letters="AB").images
  assert first.shape == other_seed.shape and not np.array_equal(first, other_seed)
  monkeypatch.setenv("GROOD_CACHE_DIR", str(tmp_path))     # fresh disk cache: render again
  generated._letters_arrays.cache_clear()
  np.testing.assert_array_equal(generated.letters(seed=0, letters="AB").images, first)
  assert [f for f in os.listdir(tmp_path / "generated") if f.startswith("letters-")]
  generated._letters_arrays.cache_clear()                  # from the disk cache
  np.testing.assert_array_equal(generated.letters(seed=0, letters="AB").images, first)


def test_letters_too_few_fonts(tmp_path, monkeypatch):
  few = generated.find_font_files()[:3]
  monkeypatch.setattr(generated, "find_font_files", lambda: few)
  monkeypatch.setenv("GROOD_CACHE_DIR", str(tmp_path))
  generated._letters_arrays.cache_clear()
  with pytest.raises(DataError, match="install Debian packages: fonts-dejavu-core"):
    generated.letters(seed=0, letters="AB")
  generated._letters_arrays.cache_clear()


def test_generated_by_name_and_channels():
  data = load_source("gen:noise", image_shape=(28, 28, 3), seed=2)
  assert data.images.shape == (1000, 28, 28, 3)
  np.testing.assert_array_equal(data.images[..., 0], data.images[..., 2])
  np.testing.assert_array_equal(data.images[..., :1], generated.noise(seed=2).images)
  assert load_source("textures", name="tex").name == "tex"


# -- OOD specs --------------------------------------------------------------------------------

def test_parse_ood_spec():
  assert parse_ood_spec("far:faces=npz:faces.npz") == ("far", "faces", "npz:faces.npz")
  assert parse_ood_spec("near:letters") == ("near", "letters", "letters")
  assert parse_ood_spec("far:npz:/d/my_set.npz") == ("far", "my_set", "npz:/d/my_set.npz")
  assert parse_ood_spec("far:folder:/d/faces/") == ("far", "faces", "folder:/d/faces/")
  for bad in ("mid:x=npz:a.npz", "faces", "far:", "near:=npz:a.npz", "far:x="):
    with pytest.raises(DataError, match="OOD spec"):
      parse_ood_spec(bad)


# -- benchmarks -------------------------------------------------------------------------------

def test_split_train_val_stratified_disjoint():
  labels = np.repeat(np.arange(3), 24).astype(np.int32)
  images = np.arange(72, dtype=np.uint8).reshape(72, 1, 1, 1)      # each image unique
  train, val = split_train_val(ImageSet("s", images, labels), 1 / 12, seed=0)
  assert len(val) == 6 and len(train) == 66
  np.testing.assert_array_equal(np.bincount(val.labels), [2, 2, 2])
  assert not set(train.images.ravel()) & set(val.images.ravel())
  again, _ = split_train_val(ImageSet("s", images, labels), 1 / 12, seed=0)
  np.testing.assert_array_equal(again.images, train.images)


@needs_fmnist
def test_benchmark_6v4():
  bench = load_benchmark("fashion_mnist_6v4")
  _, test = load_fashion_mnist()
  assert bench.num_classes == 6 and bench.class_names[0] == "T-shirt/top"
  assert (len(bench.id_train), len(bench.id_val), len(bench.id_test)) == (33000, 3000, 6000)
  for split in (bench.id_train, bench.id_val, bench.id_test):
    assert set(np.unique(split.labels)) == set(range(6))
  np.testing.assert_array_equal(np.bincount(bench.id_val.labels), [500] * 6)
  near = [o for o in bench.ood if o.group == "near"]
  assert [o.name for o in near] == ["fmnist_6to9"]
  np.testing.assert_array_equal(near[0].data.images, test.images[test.labels >= 6])
  assert {o.name for o in bench.ood if o.group == "far"} == {"letters", "mnist", "textures"}
  assert bench.ood_val.name == "letters_val" and bench.noise.name == "noise"
  assert (bench.mean, bench.std) == (0.2860, 0.3530)


@needs_fmnist
def test_benchmark_fashion_mnist():
  bench = load_benchmark("fashion_mnist", seed=0)
  assert bench.num_classes == 10 and len(bench.class_names) == 10
  assert (len(bench.id_train), len(bench.id_val), len(bench.id_test)) == (55000, 5000, 10000)
  assert [(o.name, o.group) for o in bench.ood] == [
      ("letters", "near"), ("mnist", "far"), ("textures", "far")]
  assert bench.image_shape == (28, 28, 1)


def test_benchmark_registry():
  with pytest.raises(DataError, match="fashion_mnist_6v4"):
    load_benchmark("cifar11")
  with pytest.raises(DataError, match="already registered"):
    register_benchmark("fashion_mnist", lambda **_: None)
  assert {"fashion_mnist", "fashion_mnist_6v4"} <= set(benchmark_names())


# -- training loader --------------------------------------------------------------------------

def _loader(seed=0, augment=False, n=50, batch_size=8):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
  images[:, 0, 0, 0] = np.arange(n)                # pixel (0,0) identifies the image
  labels = np.arange(n) % 10
  return TrainLoader(images, labels, batch_size=batch_size, seed=seed, mean=0.5, std=0.25,
                     augment=augment)


def _ids(x):
  return np.rint((x[:, 0, 0, 0] * 0.25 + 0.5) * 255).astype(int)


def test_loader_batches_and_epochs():
  loader = _loader()
  assert steps_per_epoch(50, 8) == 6 and loader.steps_per_epoch == 6
  x, y = next(loader)
  assert x.shape == (8, 28, 28, 1) and x.dtype == np.float32 and y.dtype == np.int32
  np.testing.assert_array_equal(y, _ids(x) % 10)
  epoch = np.concatenate([_ids(x)] + [_ids(next(loader)[0]) for _ in range(5)])
  assert len(set(epoch)) == 48                     # each image at most once per epoch
  second = np.concatenate([_ids(next(loader)[0]) for _ in range(6)])
  assert not np.array_equal(epoch, second)         # reshuffled each epoch
  with pytest.raises(DataError, match="batch size"):
    steps_per_epoch(5, 8)


@pytest.mark.parametrize("augment", [False, True])
def test_loader_deterministic_and_resumable(augment):
  a, b, c = _loader(0, augment), _loader(0, augment), _loader(1, augment)
  batches_a = [next(a) for _ in range(4)]
  batches_b = [next(b) for _ in range(4)]
  for (xa, ya), (xb, yb) in zip(batches_a, batches_b):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
  assert not np.array_equal(batches_a[0][0], next(c)[0])

  state = json.loads(json.dumps(a.get_state()))    # survives JSON
  uninterrupted = [next(a) for _ in range(10)]     # crosses an epoch boundary
  resumed = _loader(0, augment)
  resumed.set_state(state)
  assert resumed.step == 4
  for (xu, yu), (xr, yr) in zip(uninterrupted, [next(resumed) for _ in range(10)]):
    np.testing.assert_array_equal(xu, xr)
    np.testing.assert_array_equal(yu, yr)
  with pytest.raises(DataError, match="different loader"):
    _loader(2, augment).set_state(state)


def test_augment_flips_and_shifts():
  x_plain, _ = next(_loader(0, augment=False, n=64, batch_size=64))
  x_aug, _ = next(_loader(0, augment=True, n=64, batch_size=64))
  assert x_aug.shape == x_plain.shape and not np.array_equal(x_aug, x_plain)
  background = (0 - 0.5) / 0.25
  assert (x_aug == background).any()               # zero padding came in from the shift
