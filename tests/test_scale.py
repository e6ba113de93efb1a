"""Scale pieces: the generated image source, features streamed into memory maps, GROOD's bank
without a copy of the selected rows, the memory-mapped feature cache, and the accelerator
suite's --tiny run (so the script keeps working; no GPU is needed)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _fns():
  from flax import nnx
  from grood_jax.modelfns import ModelFns
  from grood_jax.models.cnn import SmallCNN
  return ModelFns(SmallCNN(num_classes=3, width=4, feature_dim=8, rngs=nnx.Rngs(0)))


def test_generated_images_are_deterministic_slices_of_one_set():
  from benchmarks.scale import BLOCK, GeneratedImages
  src = GeneratedImages(2 * BLOCK + 100, num_classes=5, seed=3)
  whole = np.concatenate([src[i:i + 1000] for i in range(0, len(src), 1000)])
  assert whole.shape == (len(src), 28, 28, 1) and whole.dtype == np.uint8
  np.testing.assert_array_equal(src[BLOCK - 10:BLOCK + 10], whole[BLOCK - 10:BLOCK + 10])
  np.testing.assert_array_equal(GeneratedImages(len(src), num_classes=5, seed=3)[5:9], whole[5:9])
  assert not np.array_equal(GeneratedImages(len(src), num_classes=5, seed=4)[:50], whole[:50])
  assert src[len(src):].shape[0] == 0 and set(np.unique(src.labels)) == set(range(5))


def test_extract_to_files_equals_extract_from_a_generated_source(tmp_path):
  from benchmarks.scale import GeneratedImages
  from grood_jax import features
  fns = _fns()
  src = GeneratedImages(150, num_classes=3, seed=0)
  ref = features.extract(fns, fns.params, src[0:150], mean=0.3, std=0.3, batch_size=64)
  paths = {k: str(tmp_path / f"x.{k}.npy") for k in ("feats", "logits")}
  got = features.extract_to_files(fns, fns.params, src, paths, mean=0.3, std=0.3, batch_size=64)
  assert isinstance(got.feats, np.memmap) and not got.feats.flags.writeable
  np.testing.assert_array_equal(got.feats, ref.feats)
  np.testing.assert_array_equal(got.logits, ref.logits)
  assert sorted(os.listdir(tmp_path)) == ["x.feats.npy", "x.logits.npy"]   # no temporaries


def test_feature_cache_memory_maps_large_sets(tmp_path, monkeypatch):
  from grood_jax import features
  from grood_jax.data import ImageSet
  from grood_jax.scoring import FeatureCache
  monkeypatch.setattr(features, "MEMMAP_MIN_ROWS", 100)
  fns = _fns()
  rng = np.random.default_rng(0)
  big = ImageSet("big", rng.integers(0, 256, (120, 28, 28, 1), dtype=np.uint8))
  small = ImageSet("small", rng.integers(0, 256, (30, 28, 28, 1), dtype=np.uint8))
  cache = FeatureCache(fns, fns.params, mean=0.3, std=0.3, batch_size=64,
                       cache_dir=str(tmp_path))
  s_big, s_small = cache.split(big), cache.split(small)
  assert isinstance(s_big.feats, np.memmap) and not isinstance(s_small.feats, np.memmap)
  ref = features.extract(fns, fns.params, big.images, mean=0.3, std=0.3, batch_size=64)
  np.testing.assert_array_equal(s_big.feats, ref.feats)
  assert (cache.hits, cache.misses) == (0, 2)
  names = sorted(os.listdir(tmp_path))
  assert sum(n.endswith(".npy") for n in names) == 2 and sum(n.endswith(".npz") for n in names) == 1
  again = FeatureCache(fns, fns.params, mean=0.3, std=0.3, batch_size=64, cache_dir=str(tmp_path))
  np.testing.assert_array_equal(again.split(big).feats, ref.feats)
  assert (again.hits, again.misses) == (1, 0)


def test_grood_bank_reads_the_correct_rows_lazily():
  from grood_jax.features import Rows
  from grood_jax.grood.loss import batched_grads
  rng = np.random.default_rng(1)
  h = rng.normal(size=(50, 6)).astype(np.float32)
  protos = rng.normal(size=(4, 6)).astype(np.float32)
  t = rng.integers(0, 4, 50).astype(np.int32)
  keep = np.flatnonzero(rng.random(50) < 0.6)
  a = batched_grads(h[keep], protos, protos.mean(0), t[keep], batch_size=16)
  b = batched_grads(Rows(h, keep), protos, protos.mean(0), t[keep], batch_size=16)
  np.testing.assert_array_equal(a, b)


def test_accelerator_suite_tiny_runs(tmp_path):
  res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "accelerator_suite.py"),
                        "--tiny", "--out", str(tmp_path)], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
  assert res.returncode == 0, res.stderr[-3000:]
  payload = json.loads((tmp_path / "accelerator_suite_tiny.json").read_text())
  assert payload["tiny"] and payload["device_kind"]
  assert set(payload["stages"]) == {"knn", "grads", "features", "scale"}
  for name, st in payload["stages"].items():
    assert st["seconds"] > 0, name
  assert payload["stages"]["scale"]["peak_rss_bytes"] > 0


# -- the JPEG-folder decode path of benchmarks/scale.py ---------------------------------------

def _ctx_and_sets(fns, train_images, labels, test_sets):
  from grood_jax import features
  from grood_jax.detectors import Context, Split
  f = features.extract(fns, fns.params, train_images, mean=0.3, std=0.3, batch_size=64)
  train = Split("train", f.feats, f.logits, images=None, labels=labels)
  splits = {}
  for name, src in test_sets.items():
    g = features.extract(fns, fns.params, src, mean=0.3, std=0.3, batch_size=64)
    splits[name] = Split(name, g.feats, g.logits, images=None)
  ctx = Context(fns=fns, params=fns.params, mean=0.3, std=0.3, train=train, batch_size=64)
  return ctx, splits


def _all_scores(ctx, splits):
  from benchmarks.scale import DETECTORS
  from grood_jax.detectors import make_detector
  out = {}
  for name, params in DETECTORS.items():
    det = make_detector(name, **params)
    state = det.fit(ctx)
    for s_name, split in splits.items():
      out[name, s_name] = np.asarray(det.score(ctx, state, split))
  return out


def test_jpeg_folder_streamed_scores_equal_the_same_images_in_memory(tmp_path):
  """The benchmark's JPEG folders read through `folder:` streamed (grain, 3 decode threads)
  give the decoded images bit for bit and the same GROOD / KNN / Energy scores as those
  images held in memory; the labels are the class folders."""
  from benchmarks.scale import GeneratedImages, write_jpeg_folder, SHAPE
  from grood_jax.data.sources import load_folder, load_source
  from grood_jax.data.streaming import StreamedImages
  from PIL import Image
  src = GeneratedImages(300, num_classes=3, seed=0)
  ood = GeneratedImages(80, num_classes=3, seed=2, kind="ood")
  write_jpeg_folder(str(tmp_path / "train"), src)
  write_jpeg_folder(str(tmp_path / "ood"), ood, labelled=False)
  assert sorted(os.listdir(tmp_path / "train")) == ["c00", "c01", "c02"]
  lazy = load_folder(str(tmp_path / "train"), image_shape=SHAPE, stream=True, workers=3)
  lazy_ood = load_folder(str(tmp_path / "ood"), image_shape=SHAPE, stream=True, workers=3)
  assert isinstance(lazy.images, StreamedImages) and lazy.images.num_threads == 3
  eager = load_source(f"folder:{tmp_path / 'train'}", image_shape=SHAPE)    # small: decoded
  assert not eager.streamed
  # the in-memory images: every file decoded by PIL directly, in the loader's order
  files = sorted(str(p) for p in (tmp_path / "train").glob("c*/*.jpg"))
  direct = np.stack([np.asarray(Image.open(p).convert("L"))[..., None] for p in files])
  np.testing.assert_array_equal(eager.images, direct)
  np.testing.assert_array_equal(lazy.images[0:300], direct)
  np.testing.assert_array_equal(lazy.labels, [int(os.path.basename(os.path.dirname(p))[1:])
                                              for p in files])
  np.testing.assert_array_equal(np.bincount(lazy.labels), np.bincount(src.labels))
  ood_direct = np.stack([np.asarray(Image.open(p).convert("L"))[..., None]
                         for p in sorted(str(p) for p in (tmp_path / "ood").glob("*.jpg"))])
  fns = _fns()
  got = _all_scores(*_ctx_and_sets(fns, lazy.images, lazy.labels, {"ood": lazy_ood.images}))
  want = _all_scores(*_ctx_and_sets(fns, direct, lazy.labels, {"ood": ood_direct}))
  assert set(got) == {(d, "ood") for d in ("grood", "knn", "energy")}
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=str(key))
  assert lazy.images.stats()["max_ahead"] <= lazy.images.prefetch + 1


def test_scale_benchmark_runs_both_series(tmp_path):
  """A tiny run of benchmarks/scale.py: one generated and one JPEG-folder size, each in its
  own worker process; the JSON holds both series (the JPEG one streamed, with its decode
  statistics and file sizes) and the run conditions, and the plot is written."""
  res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "scale.py"),
                        "--sizes", "600", "--jpeg-sizes", "700", "--n-test", "120",
                        "--batch-size", "256", "--decode-workers", "2", "--out", str(tmp_path),
                        "--tmp", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
  assert res.returncode == 0, res.stderr[-3000:]
  payload = json.loads((tmp_path / "scale.json").read_text())
  (gen,), (jpg,) = payload["rows"], payload["jpeg_rows"]
  assert (gen["source"], gen["n"], jpg["source"], jpg["n"]) == ("generated", 600, "jpeg", 700)
  assert jpg["streamed"] == {"train": True, "id_test": True, "ood": True}
  assert jpg["decode_workers"] == 2 and 1 <= jpg["decode_stats"]["threads"] <= 2
  assert jpg["jpeg_bytes"]["train"] > 0 and jpg["seconds"]["open_s"] > 0
  for row in (gen, jpg):
    assert row["peak_rss_bytes"] > 0 and row["images_per_s"] > 0
    assert set(row["rss_after_detector_bytes"]) == {"grood", "knn", "energy"}
  assert "loaded" in payload and payload["conditions"]["cores"] >= 1
  assert payload["settings"]["stream"] == "on" and (tmp_path / "scale.png").stat().st_size > 0
  assert not [p for p in os.listdir(tmp_path) if p.startswith("grood-scale")]   # cleaned up


# -- nothing held twice: the train logits, the kNN banks ---------------------------------------

def _tiny_prepared():
  from flax import nnx
  from grood_jax import scoring
  from grood_jax.data.base import Benchmark, ImageSet, OODSet
  from grood_jax.models.cnn import SmallCNN
  rng = np.random.default_rng(0)

  def images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)

  labels = lambda n: rng.integers(0, 3, n).astype(np.int32)  # noqa: E731
  ood = [OODSet("o1", "near", ImageSet("o1", images(40, 5))),
         OODSet("o2", "far", ImageSet("o2", images(30, 6)))]
  bench = Benchmark(name="tiny", num_classes=3, class_names=["a", "b", "c"],
                    image_shape=(28, 28, 1), mean=0.3, std=0.3,
                    id_train=ImageSet("train", images(240, 1), labels(240)),
                    id_val=ImageSet("val", images(50, 2), labels(50)),
                    id_test=ImageSet("test", images(60, 3), labels(60)), ood=ood)
  model = SmallCNN(num_classes=3, width=4, feature_dim=8, rngs=nnx.Rngs(0))
  return scoring.Prepared("tiny-ckpt", model, None, 0, bench, list(ood))


def test_harness_drops_the_train_logits_once_no_later_detector_reads_them(monkeypatch):
  """score_prepared with grood, knn, energy, msp: the train logits are alive while GROOD
  fits (it reads them) and gone (weakref dead) by the time KNN fits; the results are those
  of a run that keeps them. With energy first they are still there when GROOD fits."""
  import gc
  import weakref
  from grood_jax import scoring
  from grood_jax.detectors.grood import GROOD
  from grood_jax.detectors.knn import KNN
  seen = {}
  real_grood, real_knn = GROOD.fit, KNN.fit

  def grood_fit(self, ctx):
    seen["ref"] = weakref.ref(ctx.train.logits)
    return real_grood(self, ctx)

  def knn_fit(self, ctx):
    gc.collect()
    seen["alive_at_knn"] = seen["ref"]() is not None
    seen["train_logits_at_knn"] = ctx.train.logits
    return real_knn(self, ctx)

  opts = scoring.ScoreOptions(detectors=["grood", "knn", "energy", "msp"],
                              detector_params={"grood": {"source": "protomean"},
                                               "knn": {"k": 3}}, batch_size=64)
  monkeypatch.setattr(GROOD, "fit", grood_fit)
  monkeypatch.setattr(KNN, "fit", knn_fit)
  got, got_scores = scoring.score_prepared(_tiny_prepared(), opts)
  assert seen["alive_at_knn"] is False and seen["train_logits_at_knn"] is None
  monkeypatch.setattr(scoring, "release_train_logits", lambda cache, ctx: None)
  want, want_scores = scoring.score_prepared(_tiny_prepared(), opts)
  assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)
  for det in want_scores:
    for name in want_scores[det]:
      np.testing.assert_array_equal(got_scores[det][name], want_scores[det][name])
  monkeypatch.undo()
  monkeypatch.setattr(GROOD, "fit", grood_fit)
  opts.detectors = ["energy", "grood"]
  seen.clear()
  scoring.score_prepared(_tiny_prepared(), opts)
  assert "ref" in seen              # weakref.ref(None) raises: the logits were there for GROOD


def _no_host_copy(bank, n, d):
  return not [k for k, v in vars(bank).items()
              if isinstance(v, np.ndarray) and v.size >= n * d]


def test_knn_bank_is_one_copy_on_the_device_with_the_same_scores():
  """KNN's fit leaves one copy of the normalised bank, the device one (a DeviceBank with no
  host array), normalised block by block (the bytes of normalising it whole); its scores
  equal a search of the whole host bank."""
  from grood_jax import ops
  from grood_jax.detectors import Context, Split, make_detector
  rng = np.random.default_rng(0)
  feats = (rng.normal(size=(5000, 12)) * rng.random((5000, 1)) * 4).astype(np.float32)
  train = Split("train", feats, np.zeros((5000, 3), np.float32))
  test = Split("test", rng.normal(size=(300, 12)).astype(np.float32),
               np.zeros((300, 3), np.float32))
  ctx = Context(fns=None, params=None, mean=0.0, std=1.0, train=train)
  det = make_detector("knn", k=7, bank_block=1024)             # 5 blocks, the last partial
  state = det.fit(ctx)
  bank = state["bank_NxD"]
  assert isinstance(bank, ops.DeviceBank) and len(bank.blocks) == 5
  assert _no_host_copy(bank, 5000, 12)
  whole = np.asarray(ops.l2_normalize(feats))
  np.testing.assert_array_equal(np.asarray(bank), whole)
  d, _ = ops.knn_search(np.asarray(ops.l2_normalize(test.feats)), whole, 7, bank_block=1024,
                        query_block=1024)
  np.testing.assert_array_equal(det.score(ctx, state, test), -np.sqrt(d[:, 6]))


def test_grood_bank_is_placed_block_by_block_with_the_same_bytes(monkeypatch):
  """GROOD's fit puts the bank gradients on the device one bank block at a time (no host
  bank): the same bytes as the whole-bank gradient call, including a last block shorter than
  a gradient batch (padded as the whole call pads its last batch), and the same scores as
  searching that host bank."""
  from grood_jax import ops
  from grood_jax.detectors import Context, Split, make_detector
  from grood_jax.detectors.grood import _BankGrads
  from grood_jax.features import Rows
  from grood_jax.grood import search
  rng = np.random.default_rng(2)
  n, d, c = 12000, 6, 4
  feats = rng.normal(size=(n, d)).astype(np.float32)
  labels = rng.integers(0, c, n).astype(np.int32)
  logits = rng.normal(size=(n, c)).astype(np.float32)
  logits[np.arange(n), labels] += 1.0                           # ~half correct
  ctx = Context(fns=None, params=None, mean=0.0, std=1.0,
                train=Split("train", feats, logits, labels=labels))
  det = make_detector("grood", source="protomean", k=2)
  state = det.fit(ctx)
  bank = state["bank"]
  keep = np.flatnonzero(logits.argmax(-1) == labels)
  assert isinstance(bank, ops.DeviceBank) and len(bank) == len(keep) > 4096
  assert _no_host_copy(bank, len(keep), d) and len(bank.blocks) == -(-len(keep) // 4096)
  whole = det._batched_grads(state, Rows(feats, keep), logits.argmax(-1)[keep])
  np.testing.assert_array_equal(np.asarray(bank), whole)
  lazy = _BankGrads(det, state, feats, keep, logits.argmax(-1)[keep])
  assert lazy.batch == 4096 and len(keep) % 4096 != 0         # the last slice gets padded
  np.testing.assert_array_equal(np.concatenate([lazy[a:a + 4096] for a in range(0, len(keep),
                                                                               4096)]), whole)
  test = Split("test", rng.normal(size=(500, d)).astype(np.float32),
               rng.normal(size=(500, c)).astype(np.float32))
  got = det.score(ctx, state, test)
  monkeypatch.setitem(state, "bank", whole)                     # the host bank, as before
  np.testing.assert_array_equal(det.score(ctx, state, test), got)
  assert search.place_bank(bank) is bank                        # placed once, reused
