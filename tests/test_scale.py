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
