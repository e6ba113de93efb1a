"""Multi-device code on 4 CPU devices, each check in its own subprocess.

`jax_num_cpu_devices` must be set before JAX first touches a backend, and pytest runs every
test file in one process, so the 4-device checks run in `python -c` subprocesses; the
one-device checks run here.
"""

import subprocess
import sys
import textwrap

import numpy as np

from grood_jax import ops, parallel
from grood_jax.ops import knn_search

_PRELUDE = """
import jax
jax.config.update("jax_num_cpu_devices", 4)
import numpy as np
from grood_jax import ops, parallel
from grood_jax.ops import knn_search
assert len(jax.devices()) == 4, jax.devices()


def tree_allclose(a, b, rtol=1e-5, atol=1e-6):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
      np.allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol) for x, y in zip(la, lb))
"""


def _run4(body: str):
  code = _PRELUDE + textwrap.dedent(body)
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  return res.stdout


def test_sharded_search_equals_single_device_on_4_devices():
  out = _run4("""
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    bank = rng.integers(-2, 3, (1003, 8)).astype(np.float32)      # 1003: not a multiple of 4
    bank[[5, 500, 900, 1002]] = bank[3]                           # exact ties across shards
    q = np.concatenate([rng.integers(-2, 3, (50, 8)), bank[[3, 0]], np.zeros((1, 8))])
    q = q.astype(np.float32)
    for k, qb, bb in [(1, 16, 64), (5, 7, 256), (10, 64, 16384), (3, None, None), (7, 5, 3)]:
      d1, i1 = knn_search(q, bank, k, query_block=qb, bank_block=bb)
      d2, i2 = ops.sharded_knn_search(q, bank, k, mesh, query_block=qb, bank_block=bb)
      np.testing.assert_array_equal(i1, i2)
      np.testing.assert_array_equal(d1, d2)
    np.testing.assert_array_equal(i2[-3][:5], [3, 5, 500, 900, 1002])  # ties: lowest index
    # float data, bank smaller than devices x k, bank reused across calls
    bank = rng.normal(size=(6, 16)).astype(np.float32)
    q = rng.normal(size=(9, 16)).astype(np.float32)
    sb = ops.shard_bank(bank, mesh, bank_block=2)
    for k in (1, 6):
      d1, i1 = knn_search(q, bank, k)
      d2, i2 = ops.sharded_knn_search(q, sb, k, mesh)
      np.testing.assert_array_equal(i1, i2)
      np.testing.assert_allclose(d1, d2, rtol=1e-5, atol=1e-5)
    print("OK")
  """)
  assert "OK" in out


def test_dp_train_step_equals_single_device_on_4_devices():
  out = _run4("""
    import optax, jax.numpy as jnp
    from flax import nnx
    from grood_jax.models import build_model
    from grood_jax.training import train_state
    rng = np.random.default_rng(0)
    mesh = parallel.make_mesh()

    # the library's step with BatchNorm, on one device and data-parallel over 4
    def nnx_state():
      model = build_model("cnn", num_classes=4, in_channels=1, seed=0)
      model.train()
      opt2 = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
      return nnx.split((model, opt2))
    def ce(model, xb, yb):
      logits = model(xb)
      return jnp.mean(optax.softmax_cross_entropy(logits, jax.nn.one_hot(yb, 4))), logits
    xi = rng.normal(size=(8, 28, 28, 1)).astype(np.float32); yi = rng.integers(0, 4, 8).astype(np.int32)
    g, st = nnx_state()
    ref = train_state.make_train_step(g, ce)
    for _ in range(2):
      st, l1, a1 = ref(st, xi, yi)
    g, st2 = nnx_state()
    dp = train_state.make_train_step(g, ce, mesh=mesh)
    st2 = parallel.replicate(st2, mesh)
    for _ in range(2):
      st2, l2, a2 = dp(st2, xi, yi)
    assert abs(float(l1) - float(l2)) < 1e-4, (float(l1), float(l2))
    assert tree_allclose(st, st2, rtol=1e-4, atol=1e-5)
    print("OK")
  """)
  assert "OK" in out


def test_one_device_mesh_and_shard_batch():
  mesh = parallel.make_mesh(devices=__import__("jax").devices()[:1])
  rng = np.random.default_rng(3)
  bank = rng.normal(size=(300, 12)).astype(np.float32)
  q = rng.normal(size=(17, 12)).astype(np.float32)
  d1, i1 = knn_search(q, bank, 4)
  d2, i2 = ops.sharded_knn_search(q, bank, 4, mesh)
  np.testing.assert_array_equal(i1, i2)
  np.testing.assert_allclose(d1, d2, rtol=1e-5, atol=1e-5)
  x = parallel.shard_batch(np.ones((8, 3), np.float32), mesh)
  assert x.shape == (8, 3)


def _brute(q, bank, k):
  d = ((q[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1)
  idx = np.argsort(d, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(d, idx, 1), idx


def test_blocked_search_tiny_blocks_and_chunked_path_equal_brute_force():
  rng = np.random.default_rng(4)
  bank = rng.integers(-2, 3, (2100, 6)).astype(np.float32)     # many exact ties
  bank[[7, 1500, 2099]] = bank[0]
  q = np.concatenate([rng.integers(-2, 3, (40, 6)), bank[[0]]]).astype(np.float32)
  # (qb, bb): tiny blocks; 256-multiples that take the two-stage (chunked) top-k path
  for k, qb, bb in [(1, 3, 5), (4, 7, 11), (1, 16, 1024), (3, 41, 2048), (2, 8, None)]:
    d_ref, i_ref = _brute(q, bank, k)
    d, i = knn_search(q, bank, k, query_block=qb, bank_block=bb)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_array_equal(d, d_ref.astype(np.float32))


def test_block_sizes_for_budget():
  from grood_jax.ops import block_sizes_for_budget
  qb, bb = block_sizes_for_budget(10_000, 1_000_000, 512, 1, 512 << 20)
  assert (qb, bb) == (1024, 16384)
  for budget in (1 << 20, 8 << 20, 64 << 20):
    qb, bb = block_sizes_for_budget(10_000, 1_000_000, 512, 10, budget)
    words = qb * (512 + 80) + bb * 512 + 3 * qb * (bb + 10)
    assert words * 4 <= budget and qb >= 1 and bb >= 1
  assert block_sizes_for_budget(5, 100, 8, 1)[0] == 5
  assert block_sizes_for_budget(5, 100, 8, 1)[1] == 100     # small bank: one block, no padding


def test_train_loop_data_parallel_on_4_devices_equals_1_device_and_resumes():
  """train() itself (the loop train.py runs) with config.devices = 1 and 4: same parameters to
  float tolerance; a run pre-empted on 4 devices resumes bit-identically; GReg+ (k-means on
  the sharded pool inside the step) runs; a batch that does not split is a ConfigError."""
  tests_dir = __import__("os").path.dirname(__file__)
  out = _run4(f"""
    import sys, tempfile, os
    sys.path.insert(0, {tests_dir!r})
    from flax import nnx
    from test_training import _synthetic_benchmark, _tiny_config
    from grood_jax.training import loop as loop_lib, train
    from grood_jax.errors import ConfigError
    loop_lib.data_lib.load_benchmark = _synthetic_benchmark
    tmp = tempfile.mkdtemp()
    leaves = lambda m: [np.asarray(a) for a in jax.tree.leaves(nnx.state(m))]
    # SGD: Adam divides by sqrt(v), which turns float-order differences in near-zero
    # gradients into lr-sized steps (measured: 1e-6 for 6 steps, then 3e-4), while SGD keeps
    # the two runs within 1e-6 over all 20 steps
    cfg = lambda n: _tiny_config(devices=n, optimizer="sgd", learning_rate=0.05)
    one = train(cfg(1), tmp + "/one", progress=False, return_model=True)
    four = train(cfg(4), tmp + "/four", progress=False, return_model=True)
    assert four["step"] == one["step"] == 20
    for a, b in zip(leaves(one["model"]), leaves(four["model"])):
      np.testing.assert_allclose(a, b, rtol=0, atol=2e-3 * max(1.0, np.abs(a).max()))  # summation order over 20 steps
    import json
    curve = lambda d: [json.loads(l)["train_loss"] for l in open(tmp + d + "/metrics.jsonl")]
    np.testing.assert_allclose(curve("/one"), curve("/four"), rtol=1e-4)
    assert one["test_accuracy"] == four["test_accuracy"]
    p = next(a for a in jax.tree.leaves(nnx.state(four["model"])) if a.ndim == 4)
    assert len(p.sharding.device_set) == 4 and p.sharding.is_fully_replicated
    train(cfg(4), tmp + "/part", progress=False, stop_at_step=13)
    rest = train(cfg(4), tmp + "/part", progress=False, return_model=True)
    assert rest["resumed_from"] == 13
    for a, b in zip(leaves(four["model"]), leaves(rest["model"])):
      np.testing.assert_array_equal(a, b)
    gp = _tiny_config(devices=4, loss="gregplus", num_epochs=1)
    gp.unlock(); gp.aux.num_samples = 512; gp.aux.clusters = 8; gp.aux.kmeans_iters = 3
    s = train(gp, tmp + "/gp", progress=False)
    assert s["step"] == 10 and np.isfinite(s["test_accuracy"])
    try:
      train(_tiny_config(devices=3), tmp + "/bad", progress=False)
      raise AssertionError("no error for a batch of 32 over 3 devices")
    except ConfigError as e:
      assert "multiple of 3" in str(e), e
    assert not os.path.exists(tmp + "/bad")
    print("OK")
  """)
  assert "OK" in out


def test_every_detector_scores_the_same_inside_data_parallel_on_4_devices():
  """What score.py does with several devices: inside `parallel.data_parallel(mesh)` the
  parameters are replicated, every batch loop (features, prototypes, mix-up, GROOD and
  lowdim gradients, ODIN) splits its batches over the 4 devices and kNN searches a sharded
  bank. Every detector's scores equal the one-device scores (batch 30: not a multiple of 4,
  rounded up; 70 train images: ragged last batch)."""
  out = _run4("""
    from flax import nnx
    from grood_jax import parallel
    from grood_jax.detectors import Context, Split, detector_names, make_detector
    from grood_jax.features import extract
    from grood_jax.modelfns import ModelFns
    from grood_jax.models.cnn import SmallCNN
    rng = np.random.default_rng(0)
    tr_img = rng.integers(0, 256, (70, 28, 28, 1), dtype=np.uint8)
    te_img = rng.integers(0, 256, (26, 28, 28, 1), dtype=np.uint8)
    ov_img = rng.integers(0, 256, (20, 28, 28, 1), dtype=np.uint8)

    def scores(mesh):
      with parallel.data_parallel(mesh):
        fns = ModelFns(SmallCNN(num_classes=3, width=4, feature_dim=8, rngs=nnx.Rngs(0)))
        def split(name, images):
          f = extract(fns, fns.params, images, mean=0.5, std=0.25, batch_size=30)
          return Split(name, f.feats, f.logits, images=images,
                       labels=(np.arange(len(images)) % 3).astype(np.int32))
        train, test = split("train", tr_img), split("test", te_img)
        ctx = Context(fns=fns, params=fns.params, mean=0.5, std=0.25, train=train,
                      ood_val=split("ood_val", ov_img), noise=split("noise", ov_img[::-1]),
                      batch_size=30)
        out = {}
        for name in detector_names():
          params = {"k": 3} if name in ("knn", "lowdim_knn") else {}
          if name == "nnguide":
            params = {"K": 5}
          if name.startswith("lowdim"):
            params.update(K=4, batch_size=16)
          det = make_detector(name, **params)
          out[name] = np.asarray(det.score(ctx, det.fit(ctx), test), np.float64)
        if mesh is not None:
          assert len(fns.params["conv1"]["kernel"].sharding.device_set) == 4
        return out

    one = scores(None)
    four = scores(parallel.make_mesh())
    for name in one:
      np.testing.assert_allclose(four[name], one[name], rtol=2e-4,
                                 atol=2e-4 * max(1.0, np.abs(one[name]).max()), err_msg=name)
    assert len(one) == len(detector_names()) >= 25, sorted(one)
    print("OK", len(one))
  """)
  assert "OK" in out
