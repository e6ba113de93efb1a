"""Every backbone follows one interface: early / from_early / head / __call__."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grood_jax.models import build_model, model_names


@pytest.mark.parametrize("name,num_classes,in_channels,shape,feature_dim", [
    ("cnn", 10, 1, (3, 28, 28, 1), 128),
    ("resnet18", 10, 3, (2, 32, 32, 3), 512),
    ("resnet50", 7, 3, (1, 64, 64, 3), 2048),
])
def test_interface(name, num_classes, in_channels, shape, feature_dim):
  model = build_model(name, num_classes=num_classes, in_channels=in_channels, seed=0)
  model.eval()
  assert model.num_classes == num_classes
  assert model.feature_dim == feature_dim
  assert model.in_channels == in_channels
  x = jax.random.normal(jax.random.key(1), shape)

  @nnx.jit
  def both(m, x):
    e = m.early(x)
    h = m.from_early(e)
    return e, h, m.head(h), m(x)

  e, h, f, logits = both(model, x)
  assert e.ndim == 4 and e.shape[0] == shape[0]
  assert h.shape == (shape[0], feature_dim)
  assert f.shape == logits.shape == (shape[0], num_classes)
  assert bool(jnp.all(h >= 0))                       # post-ReLU features
  np.testing.assert_allclose(np.asarray(f), np.asarray(logits), rtol=1e-5, atol=1e-5)


def test_resnet_shapes_and_names():
  r18 = build_model("resnet18", num_classes=10, in_channels=3, seed=0)
  r18.eval()
  e = r18.early(jnp.zeros((1, 32, 32, 3)))
  assert e.shape == (1, 32, 32, 64)                  # 3x3 stem, no max-pool
  state = nnx.to_pure_dict(nnx.state(r18, nnx.Param))
  assert state["conv1"]["kernel"].shape == (3, 3, 3, 64)
  assert state["layer2"][0]["downsample"][0]["kernel"].shape == (1, 1, 64, 128)
  assert state["fc"]["kernel"].shape == (512, 10)
  r50 = build_model("resnet50", num_classes=5, in_channels=3, seed=0)
  r50.eval()
  assert r50.early(jnp.zeros((1, 64, 64, 3))).shape == (1, 16, 16, 256)   # 7x7/2 + pool
  s50 = nnx.to_pure_dict(nnx.state(r50, nnx.Param))
  assert s50["conv1"]["kernel"].shape == (7, 7, 3, 64)
  assert len(s50["layer3"]) == 6 and s50["layer4"][2]["conv3"]["kernel"].shape == (1, 1, 512, 2048)


def test_registry_and_seed():
  assert {"cnn", "resnet18", "resnet50"} <= set(model_names())
  a = nnx.state(build_model("cnn", 10, 1, seed=3), nnx.Param)
  b = nnx.state(build_model("cnn", 10, 1, seed=3), nnx.Param)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  with pytest.raises(ValueError, match="unknown model"):
    build_model("nope", 10)


def test_dense_cnn_interface_and_features():
  import numpy as np
  from flax import nnx
  from grood_jax.models.cnn import DenseCNN
  m = DenseCNN(num_classes=6, width=4, feature_dim=16, rngs=nnx.Rngs(0))
  m.eval()
  x = np.random.default_rng(0).normal(size=(3, 28, 28, 1)).astype(np.float32)
  h = m.from_early(m.early(x))
  assert h.shape == (3, 16) and float(h.min()) >= 0.0          # post-ReLU penultimate
  np.testing.assert_allclose(np.asarray(m.head(h)), np.asarray(m(x)), rtol=1e-6, atol=1e-6)
  # the head is the affine map h -> h W + b
  np.testing.assert_allclose(np.asarray(m.head(h)),
                             np.asarray(h) @ np.asarray(m.fc.kernel[...]) + np.asarray(m.fc.bias[...]),
                             rtol=1e-5, atol=1e-5)
