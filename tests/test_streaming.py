"""Streamed image sets (grood_jax/data/streaming.py): lazy reads through grain equal the eager
decode bit for bit, the read-ahead runs ahead within its stated window, features over a lazy
source equal those over the array, and missing files are one DataError naming the file."""

import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from grood_jax import features
from grood_jax.data import DataError, ImageSet, openood, streaming
from grood_jax.data.sources import load_folder, load_source
from grood_jax.data.streaming import StreamedImages

N_FILES = 40
SHAPE = (16, 16, 3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """Two class folders of PNG and JPEG files of assorted sizes and modes (40 files)."""
  root = str(tmp_path_factory.mktemp("stream_folder"))
  rng = np.random.default_rng(0)
  for i in range(N_FILES):
    cls = os.path.join(root, f"c{i % 2}")
    os.makedirs(cls, exist_ok=True)
    h, w = int(rng.integers(12, 30)), int(rng.integers(12, 30))
    if i % 3 == 0:
      img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    else:
      img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    ext = "jpg" if i % 4 == 1 else "png"
    img.save(os.path.join(cls, f"{i:03d}.{ext}"))
  return root


def _streamed_and_eager(root):
  lazy = load_folder(root, image_shape=SHAPE, stream=True, workers=3)
  eager = load_folder(root, image_shape=SHAPE, stream=False)
  return lazy, eager


def test_streamed_folder_equals_eager_decode(folder):
  lazy, eager = _streamed_and_eager(folder)
  assert lazy.streamed and not eager.streamed
  assert isinstance(lazy.images, StreamedImages) and isinstance(eager.images, np.ndarray)
  x = eager.images
  assert lazy.images.shape == x.shape == (N_FILES,) + SHAPE and lazy.images.dtype == np.uint8
  assert lazy.images.ndim == 4 and len(lazy) == N_FILES
  np.testing.assert_array_equal(lazy.labels, eager.labels)
  # batch by batch as map_arrays reads (the last batch partial: 40 = 2 x 16 + 8)
  parts = [lazy.images[a:min(a + 16, N_FILES)] for a in range(0, N_FILES, 16)]
  assert [len(p) for p in parts] == [16, 16, 8]
  assert all(p.dtype == np.uint8 and isinstance(p, np.ndarray) for p in parts)
  np.testing.assert_array_equal(np.concatenate(parts), x)
  # random access: ints, index arrays, strided and out-of-order slices, masks
  idx = np.array([39, 0, 17, 17, 5])
  np.testing.assert_array_equal(lazy.images[idx], x[idx])
  np.testing.assert_array_equal(lazy.images[[3]], x[[3]])
  np.testing.assert_array_equal(lazy.images[-1], x[-1])
  np.testing.assert_array_equal(lazy.images[7], x[7])
  np.testing.assert_array_equal(lazy.images[30:35], x[30:35])
  np.testing.assert_array_equal(lazy.images[::7], x[::7])
  np.testing.assert_array_equal(lazy.images[38:100], x[38:100])
  np.testing.assert_array_equal(lazy.images[5:5], x[5:5])
  mask = lazy.labels == 1
  np.testing.assert_array_equal(lazy.images[mask], x[mask])
  np.testing.assert_array_equal(lazy.images[2:9, 3, :, 0], x[2:9, 3, :, 0])
  np.testing.assert_array_equal(np.asarray(lazy.images), x)
  with pytest.raises(IndexError):
    lazy.images[N_FILES]


def test_subset_of_subset_stays_lazy_and_equal(folder):
  lazy, eager = _streamed_and_eager(folder)
  a, b = np.array([1, 4, 9, 16, 25, 30, 31, 39]), np.array([7, 0, 3])
  sub_l, sub_e = lazy.subset(a, "a"), eager.subset(a, "a")
  assert isinstance(sub_l.images, StreamedImages) and sub_l.name == "a"
  subsub_l, subsub_e = sub_l.subset(b), sub_e.subset(b)
  assert isinstance(subsub_l.images, StreamedImages)
  assert subsub_l.images.shape == (3,) + SHAPE
  np.testing.assert_array_equal(subsub_l.images[:], subsub_e.images)
  np.testing.assert_array_equal(subsub_l.labels, subsub_e.labels)
  np.testing.assert_array_equal(sub_l.images[2:6], sub_e.images[2:6])
  mask_sub = sub_l.images.subset(np.arange(8) % 2 == 0)
  np.testing.assert_array_equal(mask_sub[:], sub_e.images[::2])


def test_imageset_checks_shape_and_dtype_without_reading():
  def never(_):
    raise AssertionError("decoded while only validating")

  src = StreamedImages(list(range(5)), never, (4, 4, 1))
  data = ImageSet("lazy", src, np.arange(5, dtype=np.int32))
  sub = data.subset(np.array([4, 1]))
  assert sub.images.shape == (2, 4, 4, 1) and sub.streamed
  with pytest.raises(DataError, match="3 labels for 5 images"):
    ImageSet("lazy", src, np.arange(3, dtype=np.int32))

  class Wrong:
    shape, dtype = (5, 4, 4), np.dtype(np.uint8)
    def __len__(self):
      return 5
    def __getitem__(self, k):
      raise AssertionError("read")

  with pytest.raises(DataError, match=r"uint8 \(N,H,W,C\)"):
    ImageSet("wrong", Wrong())
  with pytest.raises(DataError, match="lazy source"):
    ImageSet("list", [1, 2, 3])


def test_read_ahead_runs_in_threads_within_the_window():
  """Sequential batch reads: the next batches are decoded in several grain threads before they
  are asked for, and decoded-but-not-yet-returned images never exceed batch + prefetch + 1
  (between reads: prefetch + 1), the bound streaming.py states."""
  n, batch, prefetch = 60, 4, 6
  data = np.random.default_rng(1).integers(0, 256, (n, 3, 3, 1), dtype=np.uint8)
  lock = threading.Condition()
  calls, consumed, violations = [], [0], []

  def decode(i):
    with lock:
      calls.append((i, threading.current_thread().name))
      if i >= consumed[0] + batch + prefetch + 1:
        violations.append((i, consumed[0]))
      lock.notify_all()
    time.sleep(0.002)
    return data[i]

  src = StreamedImages(list(range(n)), decode, (3, 3, 1), num_threads=3, prefetch=prefetch)
  out = []
  for start in range(0, n, batch):
    got = src[start:start + batch]
    with lock:
      consumed[0] += len(got)
    out.append(got)
    if start == 0:                     # the caller "computes": the pipeline reads ahead
      with lock:                       # (waits for the decodes themselves; 120 s: hang guard)
        lock.wait_for(lambda: len(calls) - consumed[0] >= prefetch - 1, timeout=120)
        ahead = len(calls) - consumed[0]
      assert ahead >= prefetch - 1, (ahead, calls)       # batches 2.. were decoded already
      assert ahead <= prefetch + 1, ahead                # ... but only the window
  np.testing.assert_array_equal(np.concatenate(out), data)
  assert not violations, violations
  assert sorted(i for i, _ in calls) == list(range(n))   # each image decoded once
  threads = {t for _, t in calls}
  assert len(threads) >= 2 and all(t.startswith("grain") for t in threads), threads
  st = src.stats()
  assert st["taken"] == n and 2 <= st["max_ahead"] <= prefetch + 1, st


def test_features_over_lazy_source_equal_eager(folder):
  lazy, eager = _streamed_and_eager(folder)
  w = jax.random.normal(jax.random.PRNGKey(0), (int(np.prod(SHAPE)), 5))

  @jax.jit
  def fn(x):
    flat = x.reshape(x.shape[0], -1)
    return {"f": flat @ w, "m": jnp.max(flat, axis=1)}

  for bs in (16, 40, 7):
    a = features.map_batched(fn, lazy.images, mean=0.5, std=0.25, batch_size=bs)
    b = features.map_batched(fn, eager.images, mean=0.5, std=0.25, batch_size=bs)
    for k in ("f", "m"):
      assert a[k].shape[0] == N_FILES
      np.testing.assert_array_equal(a[k], b[k])
  # two lazy inputs side by side (images and a subset view of them), one batch at a time
  sub = lazy.images.subset(np.arange(N_FILES)[::-1])
  c = features.map_arrays(lambda x, y: {"d": x.astype(jnp.int32) - y}, lazy.images, sub,
                          batch_size=16)
  np.testing.assert_array_equal(c["d"], eager.images.astype(np.int32) - eager.images[::-1])


def _imglist_root(tmp_path, n=12):
  root = tmp_path / "oo"
  d = root / "images_classic" / "set"
  d.mkdir(parents=True)
  rng = np.random.default_rng(2)
  lines = []
  for i in range(n):
    h, w = int(rng.integers(32, 48)), int(rng.integers(32, 48))
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i:02d}.png")
    lines.append(f"set/{i:02d}.png {i % 3}\n")
  (root / "benchmark_imglist").mkdir()
  (root / "benchmark_imglist" / "test_set.txt").write_text("".join(lines))
  return str(root)


def _imglist(root, stream):
  return openood.load_imglist(root, "benchmark_imglist/test_set.txt", "images_classic",
                              name="set", pre_size=32, size=32, labels=True, workers=3,
                              stream=stream)


def test_openood_imglist_streamed_equals_eager(tmp_path):
  root = _imglist_root(tmp_path)
  lazy, eager = _imglist(root, True), _imglist(root, False)
  assert lazy.streamed and not eager.streamed and not _imglist(root, None).streamed
  np.testing.assert_array_equal(lazy.labels, eager.labels)
  np.testing.assert_array_equal(np.concatenate([lazy.images[a:a + 5] for a in (0, 5, 10)]),
                                eager.images)
  np.testing.assert_array_equal(lazy.images[[11, 2]], eager.images[[11, 2]])


def test_threshold_streams_large_sets_only(folder, monkeypatch):
  assert not load_folder(folder, image_shape=SHAPE).streamed       # 40 x 768 B: in memory
  assert not load_source(f"folder:{folder}", image_shape=SHAPE).streamed
  monkeypatch.setattr(streaming, "STREAM_MIN_BYTES", N_FILES * int(np.prod(SHAPE)))
  assert load_folder(folder, image_shape=SHAPE).streamed
  assert load_source(f"folder:{folder}", image_shape=SHAPE).streamed
  assert not load_folder(folder, image_shape=SHAPE, stream=False).streamed
  assert streaming.should_stream(None, 10, (1 << 20, 1, 1 << 10))
  assert not streaming.should_stream(None, 10, (4, 4, 3))


def test_missing_file_is_one_data_error(tmp_path):
  root = _imglist_root(tmp_path)
  os.remove(os.path.join(root, "images_classic", "set", "07.png"))
  for stream in (True, False):    # checked up front, before any decoding
    with pytest.raises(DataError, match=r"images_classic/set/07\.png is missing"):
      _imglist(root, stream)


def test_file_gone_after_opening_fails_when_its_batch_is_read(folder, tmp_path):
  import shutil
  root = str(tmp_path / "copy")
  shutil.copytree(folder, root)
  lazy = load_folder(root, image_shape=SHAPE, stream=True, workers=2)
  eager = load_folder(folder, image_shape=SHAPE, stream=False)
  victim = sorted(os.listdir(os.path.join(root, "c1")))[-1]      # the last file of class 1
  os.remove(os.path.join(root, "c1", victim))
  np.testing.assert_array_equal(lazy.images[:16], eager.images[:16])   # earlier batches read
  with pytest.raises(DataError, match=rf"c1/{victim} is missing") as err:
    lazy.images[16:40]
  assert "\n" not in str(err.value)
  np.testing.assert_array_equal(lazy.images[:8], eager.images[:8])     # usable afterwards
  with open(os.path.join(root, "c0", "000.png"), "wb") as f:
    f.write(b"not a png")
  with pytest.raises(DataError, match=r"c0/000\.png is unreadable"):
    lazy.images[[0, 1]]


def test_tfds_streamed_equals_eager():
  tfds = pytest.importorskip("tensorflow_datasets")
  from grood_jax.data import tfds_sources
  pre = lambda a: np.asarray(a, np.uint8)   # noqa: E731 - mock images are 32x32x3 already
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    kw = dict(name="c10", preprocess=pre, max_n=13, seed=3)
    lazy = tfds_sources.load_tfds("cifar10", ["test"], stream=True, workers=2, **kw)
    eager = tfds_sources.load_tfds("cifar10", ["test"], stream=False, **kw)
    two = dict(name="dtd", preprocess=lambda a: openood.resize_center_crop(
        Image.fromarray(a), 32, 32), labels=False)
    lazy2 = tfds_sources.load_tfds("dtd", ["train", "test"], stream=True, **two)
    eager2 = tfds_sources.load_tfds("dtd", ["train", "test"], stream=False, **two)
    assert lazy.streamed and not eager.streamed
    np.testing.assert_array_equal(lazy.labels, eager.labels)
    np.testing.assert_array_equal(np.concatenate([lazy.images[:8], lazy.images[8:]]),
                                  eager.images)
    np.testing.assert_array_equal(lazy.images[[12, 0]], eager.images[[12, 0]])
    assert lazy2.labels is None and len(lazy2) == len(eager2)
    np.testing.assert_array_equal(lazy2.images[:], eager2.images)


def test_streamed_folder_checks_headers_in_chunks(tmp_path, monkeypatch):
  """The header checks of a streamed folder run in chunks of files (not one Future per file:
  ~0.8 KB each, 80 MB of peak memory at 100k files), with the same outcome: unreadable files
  skipped with one warning, the rest in order with their labels."""
  from grood_jax.data import sources
  rng = np.random.default_rng(3)
  for i in range(23):
    d = tmp_path / f"c{i % 2}"
    d.mkdir(exist_ok=True)
    if i in (4, 11, 17):
      (d / f"{i:03d}.png").write_bytes(b"not an image")
    else:
      Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
  calls = []
  real = sources._readable_headers
  monkeypatch.setattr(sources, "_HEADER_CHUNK", 4)
  monkeypatch.setattr(sources, "_readable_headers", lambda ps: calls.append(len(ps)) or real(ps))
  with pytest.warns(UserWarning, match="skipped 3 unreadable"):
    lazy = load_folder(str(tmp_path), image_shape=SHAPE, stream=True, workers=3)
  assert sorted(calls) == sorted([4] * 5 + [3]) and len(lazy) == 20
  with pytest.warns(UserWarning, match="skipped 3 unreadable"):
    eager = load_folder(str(tmp_path), image_shape=SHAPE, stream=False)
  np.testing.assert_array_equal(lazy.images[0:20], eager.images)
  np.testing.assert_array_equal(lazy.labels, eager.labels)
