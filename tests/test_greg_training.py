"""GReg / GReg+ training: auxiliary source, refusal on overlap, train steps, GReg+ selection,
fine-tuning, smoke configs and exact resume (CPU, tiny shapes)."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from grood_jax import checkpoint
from grood_jax import data as data_lib
from grood_jax.data import auxiliary, generated
from grood_jax.data.base import Benchmark, DataError, ImageSet, OODSet
from grood_jax.models import build_model
from grood_jax.training import base_config, losses, train
from grood_jax.training import loop as loop_lib
from grood_jax.training.greg import energy, greg_loss, input_grad_norms
from grood_jax.training.train_state import create_optimizer, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(seed=0):
  """A small benchmark with every kind of evaluation set (OOD test incl. textures, OOD val)."""
  rng = np.random.default_rng(seed)

  def imgs(n):
    return rng.integers(0, 256, (n, 28, 28, 1)).astype(np.uint8)

  def labelled(n, name):
    return ImageSet(name, imgs(n), rng.integers(0, 4, n).astype(np.int32))

  tex = generated.textures(seed=seed)
  return Benchmark("tiny", 4, list("abcd"), (28, 28, 1), 0.3, 0.3,
                   labelled(64, "train"), labelled(32, "val"), labelled(32, "test"),
                   [OODSet("near_set", "near", ImageSet("near_set", imgs(40))),
                    OODSet("textures", "far", tex)],
                   ood_val=ImageSet("ood_val", imgs(20)))


# ----------------------------------------------------------------------- auxiliary source


def test_photos_are_deterministic_and_disjoint_from_the_benchmark():
  a = auxiliary.photos(n=300, seed=0)
  b = auxiliary.photos(n=300, seed=0)
  c = auxiliary.photos(n=300, seed=1)
  assert a.images.shape == (300, 28, 28, 1) and a.images.dtype == np.uint8
  np.testing.assert_array_equal(a.images, b.images)
  assert not np.array_equal(a.images, c.images)
  assert set(np.unique(a.labels)) == set(range(len(auxiliary.PHOTO_NAMES)))
  assert not {"brick", "grass", "gravel"} & set(auxiliary.PHOTO_NAMES)
  assert a.images.std() > 20                    # real image content, not flat crops
  rgb = auxiliary.photos(n=8, seed=0, image_shape=(32, 32, 3))
  assert rgb.images.shape == (8, 32, 32, 3)
  bench = _bench()
  aux = data_lib.load_auxiliary("photos", bench, seed=0, num_samples=300)
  np.testing.assert_array_equal(aux.images, a.images)
  # The real benchmark, when its data is present.
  try:
    real = data_lib.load_benchmark("fashion_mnist_6v4")
  except DataError:
    return
  aux = data_lib.load_auxiliary("photos", real, seed=0, num_samples=2000)
  assert aux.images.shape == (2000, 28, 28, 1)


def test_auxiliary_overlapping_an_evaluation_set_is_refused(tmp_path):
  bench = _bench()
  rng = np.random.default_rng(5)
  own = rng.integers(0, 256, (50, 28, 28, 1)).astype(np.uint8)
  np.savez(tmp_path / "clean.npz", images=own)
  assert len(data_lib.load_auxiliary(f"npz:{tmp_path / 'clean.npz'}", bench)) == 50
  leaky = np.concatenate([own, bench.id_test.images[[1, 4, 9]], bench.ood[0].data.images[:2],
                          bench.ood_val.images[[7]]])
  np.savez(tmp_path / "leaky.npz", images=leaky)
  with pytest.raises(DataError) as e:
    data_lib.load_auxiliary(f"npz:{tmp_path / 'leaky.npz'}", bench)
  msg = str(e.value)
  assert "ID test set 'test' (3 of 56" in msg
  assert "OOD test set 'near_set' (2 of 56" in msg
  assert "OOD val set 'ood_val' (1 of 56" in msg
  assert "textures" not in msg
  # A folder of images, and a generated test set used as auxiliary data.
  os.makedirs(tmp_path / "dir")
  from PIL import Image
  Image.fromarray(bench.id_val.images[3, ..., 0]).save(tmp_path / "dir" / "a.png")
  Image.fromarray(own[0, ..., 0]).save(tmp_path / "dir" / "b.png")
  with pytest.raises(DataError, match=r"ID val set 'val' \(1 of 2"):
    data_lib.load_auxiliary(f"folder:{tmp_path / 'dir'}", bench)
  with pytest.raises(DataError, match=r"OOD test set 'textures' \(3000 of 3000"):
    data_lib.load_auxiliary("textures", bench)


# ----------------------------------------------------------------------- loss and steps


class _MLP(nnx.Module):
  """No BatchNorm: samples do not interact, so every input-gradient form must agree."""

  def __init__(self, rngs):
    self.num_classes = 3
    self.l1 = nnx.Linear(8, 16, rngs=rngs)
    self.l2 = nnx.Linear(16, 3, rngs=rngs)

  def early(self, x):
    return x.reshape(x.shape[0], -1)

  def from_early(self, e):
    return jnp.tanh(self.l1(e))

  def head(self, h):
    return self.l2(h) * 6.0

  def __call__(self, x):
    return self.head(self.from_early(self.early(x)))


def test_greg_objective_equals_greg_loss_without_batchnorm():
  model = _MLP(nnx.Rngs(0))
  rng = np.random.default_rng(1)
  x_in = (rng.normal(size=(10, 2, 2, 2)) * np.linspace(0.2, 3, 10)[:, None, None, None]
          ).astype(np.float32)
  x_aux = (rng.normal(size=(8, 2, 2, 2)) * np.linspace(0.1, 2, 8)[:, None, None, None]
           ).astype(np.float32)
  y = rng.integers(0, 3, 10).astype(np.int32)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def model_fn(p, x):
    return nnx.merge(graphdef, p, rest)(x)

  s_all = np.asarray(energy(model_fn(params, np.concatenate([x_in, x_aux]))))
  m_in, m_out = float(np.median(s_all[:10])), float(np.median(s_all[10:]))   # masks mixed
  kw = dict(m_in=m_in, m_out=m_out, lam_s=0.1, lam_grad=1.0)
  ref, ref_aux = jax.jit(lambda p: greg_loss(model_fn, p, x_in, y, x_aux, input_grad="vmap",
                                              **kw))(params)
  assert 0 < float(ref_aux["frac_in"]) < 1 and 0 < float(ref_aux["frac_aux"]) < 1
  ref_g = jax.jit(jax.grad(lambda p: greg_loss(model_fn, p, x_in, y, x_aux, **kw)[0]))(params)
  for mode in ("sum", "eval"):
    objective = lambda m: losses.greg_objective(m, x_in, y, x_aux, input_grad=mode, **kw)
    total, out = nnx.jit(objective)(model)
    np.testing.assert_allclose(total, ref, rtol=1e-5)
    for k in ("ce", "l_s", "l_grad", "frac_in", "frac_aux"):
      np.testing.assert_allclose(out[k], ref_aux[k], rtol=1e-5, atol=1e-7)
    g = nnx.jit(nnx.grad(lambda m: objective(m)[0]))(model)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_greg_input_gradient_with_batchnorm():
  """'sum': the input gradient of the one train-mode forward of [x_in; x_aux] (that forward
  also updates the BatchNorm statistics, once); 'eval': per-sample gradients of the eval model."""
  model = build_model("cnn", 4, 1, seed=0, width=4, feature_dim=8)
  model.train()
  rng = np.random.default_rng(0)
  x_in = rng.normal(size=(6, 28, 28, 1)).astype(np.float32)
  x_aux = rng.normal(size=(5, 28, 28, 1)).astype(np.float32)
  y = rng.integers(0, 4, 6).astype(np.int32)
  x = np.concatenate([x_in, x_aux])
  kw = dict(m_in=100.0, m_out=-100.0, lam_s=0.0, lam_grad=1.0)    # every mask on
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def train_fn(p, x):
    return nnx.merge(graphdef, p, rest, copy=True)(x)

  ce_model = nnx.merge(graphdef, params, rest, copy=True)
  ce_model(x)                                       # a CE step's statistics update
  objective = nnx.jit(lambda m, mode: losses.greg_objective(m, x_in, y, x_aux, input_grad=mode,
                                                            **kw), static_argnums=1)
  m = nnx.merge(graphdef, params, rest, copy=True)
  _, out = objective(m, "sum")
  g = jax.jit(jax.grad(lambda x: jnp.sum(energy(train_fn(params, x)))))(x)
  want = np.linalg.norm(np.asarray(g).reshape(11, -1), axis=1)
  np.testing.assert_allclose(out["l_grad"], want[:6].mean() + want[6:].mean(), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(nnx.state(m, nnx.BatchStat)),
                  jax.tree.leaves(nnx.state(ce_model, nnx.BatchStat))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  m = nnx.merge(graphdef, params, rest, copy=True)
  _, out = objective(m, "eval")
  ev = nnx.merge(graphdef, params, rest, copy=True)
  ev.eval()
  eg, _, er = nnx.split(ev, nnx.Param, ...)
  n = jax.jit(lambda p: input_grad_norms(lambda p, x: nnx.merge(eg, p, er)(x), p, x,
                                          input_grad="vmap"))(params)
  np.testing.assert_allclose(out["l_grad"], n[:6].mean() + n[6:].mean(), rtol=1e-4)
  with pytest.raises(ValueError, match="input_grad"):
    losses.make_loss(ml_collections.ConfigDict({"loss": "greg", "greg": {"input_grad": "vmap"}}))


def _tiny_config(loss, **kw):
  c = base_config()
  c.benchmark = "tiny"
  c.loss = loss
  c.model.kwargs = ml_collections.ConfigDict({"width": 4, "feature_dim": 8})
  c.batch_size = 16
  c.num_epochs = 1
  c.learning_rate = 1e-2
  c.warmup_epochs = 0.0
  c.aux.clusters = 4
  c.aux.pool_factor = 3
  c.update(kw)
  return c


@pytest.mark.parametrize("loss", ["greg", "gregplus"])
def test_greg_steps_are_finite_and_decrease_the_loss(loss):
  config = _tiny_config(loss, learning_rate=3e-2)
  model = build_model("cnn", 4, 1, seed=0, width=4, feature_dim=8)
  model.train()
  opt = nnx.Optimizer(model, create_optimizer(config, 100), wrt=nnx.Param)
  graphdef, state = nnx.split((model, opt))
  step = make_train_step(graphdef, losses.make_loss(config),
                         select_fn=losses.make_aux_selector(config), return_metrics=True)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 28, 28, 1)).astype(np.float32)
  y = rng.integers(0, 4, 16).astype(np.int32)
  n_aux = losses.aux_loader_batch_size(config)
  assert n_aux == (48 if loss == "gregplus" else 16)
  x_aux = rng.uniform(-1, 1, size=(n_aux, 28, 28, 1)).astype(np.float32)
  totals = []
  for _ in range(6):
    state, total, acc, metrics = step(state, x, y, x_aux)
    totals.append(float(total))
    assert np.isfinite(totals[-1]) and all(np.isfinite(float(v)) for v in metrics.values())
  assert set(metrics) == {"ce", "l_s", "l_grad", "s_in", "s_aux", "frac_in", "frac_aux"}
  assert np.all(np.diff(totals) < 0) and totals[-1] < 0.9 * totals[0]
  assert 0.0 <= float(acc) <= 1.0


def test_gregplus_selection_takes_cluster_extremes():
  config = _tiny_config("gregplus", aux=ml_collections.ConfigDict(
      {"batch_size": 12, "clusters": 5, "pool_factor": 4, "kmeans_iters": 10}))
  model = build_model("cnn", 4, 1, seed=3, width=4, feature_dim=8)
  rng = np.random.default_rng(2)
  pool = (rng.normal(size=(48, 28, 28, 1)) * rng.uniform(0.2, 3, (48, 1, 1, 1))
          ).astype(np.float32)
  key = jax.random.key(7)
  idx, assign, s = jax.jit(lambda m, p, k: losses.gregplus_select(
      m, p, k, batch=12, k=5, iters=10, return_all=True))(model, pool, key)
  idx, assign, s = np.asarray(idx), np.asarray(assign), np.asarray(s)
  model.eval()                                     # energies of the eval-mode model
  np.testing.assert_allclose(s, np.asarray(energy(model(pool))), rtol=1e-5, atol=1e-5)
  model.train()
  assert len(set(idx.tolist())) == 12
  clusters = np.unique(assign)
  assert len(clusters) >= 2
  extremes = set()
  for c in clusters:
    members = np.flatnonzero(assign == c)
    extremes |= {members[np.argmin(s[members])], members[np.argmax(s[members])]}
  assert extremes <= set(idx.tolist())
  # The train step's selector is this function applied to the pool.
  select = losses.make_aux_selector(config)
  np.testing.assert_array_equal(np.asarray(select(model, pool, key)), pool[idx])
  with pytest.raises(ValueError, match="clusters"):
    losses.make_aux_selector(_tiny_config("gregplus", aux=ml_collections.ConfigDict(
        {"batch_size": 4, "clusters": 5})))
  assert losses.make_aux_selector(_tiny_config("greg")) is None


def test_init_from_copies_the_model_and_checks_it(tmp_path):
  config = _tiny_config("ce")
  src = build_model("cnn", 4, 1, seed=1, width=4, feature_dim=8)
  checkpoint.save(tmp_path / "ce", 5, src, None, config)
  dst = build_model("cnn", 4, 1, seed=2, width=4, feature_dim=8)
  assert loop_lib.init_model_from(dst, tmp_path / "ce") == 5
  for a, b in zip(jax.tree.leaves(nnx.state(src)), jax.tree.leaves(nnx.state(dst))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  other = build_model("cnn", 6, 1, seed=2, width=4, feature_dim=8)
  with pytest.raises(checkpoint.CheckpointError, match="does not match"):
    loop_lib.init_model_from(other, tmp_path / "ce")


# ----------------------------------------------------------------------- configs end to end


def _load_config_file(name, arg=None):
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "configs", name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.mark.parametrize("name", ["fashion_mnist_6v4_cnn_greg.py",
                                  "fashion_mnist_6v4_cnn_gregplus.py"])
def test_greg_configs_locked(name):
  c = _load_config_file(name)
  s = _load_config_file(name, "smoke")
  assert c.loss in ("greg", "gregplus") and c.aux.source == "photos"
  assert (c.greg.m_in, c.greg.m_out, c.greg.lam_s, c.greg.lam_grad) == (-25.0, -7.0, 0.1, 1.0)
  assert c.greg.input_grad == "sum" and c.aux.clusters == 32 and c.aux.pool_factor == 6
  assert s.num_epochs == 1 and s.max_train_samples > 0 and c.max_train_samples == 0
  with pytest.raises(AttributeError):
    c.aux.foo = 1


def _need_fashion_mnist(config):
  try:
    data_lib.load_fashion_mnist(config.data_dir, download=False)
  except DataError:
    pytest.skip("Fashion-MNIST not available offline")


def _state_leaves(model):
  return [np.asarray(a) for a in jax.tree.leaves(nnx.state(model))]


def test_gregplus_smoke_end_to_end(tmp_path):
  config = _load_config_file("fashion_mnist_6v4_cnn_gregplus.py", "smoke")
  _need_fashion_mnist(config)
  summary = train(config, tmp_path, progress=False)
  assert summary["step"] == 8 and checkpoint.latest_step(tmp_path) == 8
  assert np.isfinite(summary["test_accuracy"])
  model, cfg, _ = checkpoint.load_model(tmp_path)
  assert model.num_classes == 6 and cfg.loss == "gregplus"
  extra = checkpoint.restore_training(tmp_path, model, None)[1]
  assert extra["aux_loader"]["batch_size"] == 6 * 128


def test_greg_smoke_fine_tunes_and_resumes_bit_identically(tmp_path):
  """Fine-tune from a CE checkpoint; a run stopped at step 3 and resumed equals a straight run."""
  base = _load_config_file("fashion_mnist_6v4_cnn_greg.py", "smoke")
  _need_fashion_mnist(base)
  ce = build_model("cnn", 6, 1, seed=9, width=16, feature_dim=128)
  checkpoint.save(tmp_path / "ce", 1, ce, None, _load_config_file("fashion_mnist_6v4_cnn.py"))
  config = base.copy_and_resolve_references()
  config.init_from = str(tmp_path / "ce")
  config.lock()
  straight = train(config, tmp_path / "a", progress=False, return_model=True)
  assert straight["step"] == 8 and np.isfinite(straight["test_accuracy"])
  part = train(config, tmp_path / "b", progress=False, stop_at_step=3)
  assert part["step"] == 3
  rest = train(config, tmp_path / "b", progress=False, return_model=True)
  assert rest["resumed_from"] == 3
  for a, b in zip(_state_leaves(straight["model"]), _state_leaves(rest["model"])):
    np.testing.assert_array_equal(a, b)
  loaded, cfg, step = checkpoint.load_model(tmp_path / "a")
  assert step == 8 and cfg.loss == "greg" and cfg.init_from == str(tmp_path / "ce")
  for a, b in zip(_state_leaves(straight["model"]), _state_leaves(loaded)):
    np.testing.assert_array_equal(a, b)
  assert not any(np.array_equal(a, b) for a, b in zip(_state_leaves(ce), _state_leaves(loaded))
                 if a.size > 100)                  # it trained
