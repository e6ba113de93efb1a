"""PyTorch -> NNX conversion: numerical equivalence, export paths, errors, checkpoints, CLI,
and the runnable example of docs/own_model.md.

The PyTorch reference networks are written here (OpenOOD's ResNet18_32x32 layout and
torchvision's ResNet-50 layout), so neither OpenOOD nor torchvision is needed.
"""

import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

from grood_jax import convert as conv
from grood_jax.cli import convert as convert_cli
from grood_jax.convert import ConversionError

try:
  import torch
except ImportError:          # torch is a test extra (requirements-test.txt)
  torch = None

needs_torch = pytest.mark.skipif(
    torch is None, reason="torch not importable; the PyTorch equivalence tests need the test "
    "extra torch==2.13.0 (requirements-test.txt)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ PyTorch reference networks

if torch is not None:
  nn = torch.nn
  F = torch.nn.functional

  class OpenOODBlock(nn.Module):
    """OpenOOD's BasicBlock: the projection is called `shortcut`."""

    def __init__(self, cin, planes, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.shortcut = nn.Sequential()
      if stride != 1 or cin != planes:
        self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False),
                                      nn.BatchNorm2d(planes))

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      return F.relu(out + self.shortcut(x))


  class OpenOODResNet18(nn.Module):
    def __init__(self, num_classes=10):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      cin, layers = 64, []
      for i, planes in enumerate((64, 128, 256, 512)):
        blocks = []
        for j in range(2):
          blocks.append(OpenOODBlock(cin, planes, 2 if (i > 0 and j == 0) else 1))
          cin = planes
        layers.append(nn.Sequential(*blocks))
      self.layer1, self.layer2, self.layer3, self.layer4 = layers
      self.fc = nn.Linear(512, num_classes)

    def features(self, x):
      x = F.relu(self.bn1(self.conv1(x)))
      x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x):
      return self.fc(self.features(x))


  class TVBottleneck(nn.Module):
    def __init__(self, cin, planes, stride):
      super().__init__()
      cout = planes * 4
      self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(cout)
      self.relu = nn.ReLU()
      self.downsample = None
      if stride != 1 or cin != cout:
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                        nn.BatchNorm2d(cout))

    def forward(self, x):
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.relu(self.bn2(self.conv2(out)))
      out = self.bn3(self.conv3(out))
      idt = x if self.downsample is None else self.downsample(x)
      return self.relu(out + idt)


  class TVResNet50(nn.Module):
    def __init__(self, num_classes=1000):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      self.relu = nn.ReLU()
      self.maxpool = nn.MaxPool2d(3, 2, 1)
      cin, layers = 64, []
      for i, (planes, n) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
        blocks = []
        for j in range(n):
          blocks.append(TVBottleneck(cin, planes, 2 if (i > 0 and j == 0) else 1))
          cin = planes * 4
        layers.append(nn.Sequential(*blocks))
      self.layer1, self.layer2, self.layer3, self.layer4 = layers
      self.avgpool = nn.AdaptiveAvgPool2d(1)
      self.fc = nn.Linear(2048, num_classes)

    def features(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      return self.avgpool(x).flatten(1)

    def forward(self, x):
      return self.fc(self.features(x))


  def _randomize(net, seed):
    """Random weights and random BatchNorm statistics, scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
      for m in net.modules():
        if isinstance(m, nn.Conv2d):
          fan_in = m.weight[0].numel()
          m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.0 / fan_in) ** 0.5)
        elif isinstance(m, nn.BatchNorm2d):
          c = m.num_features
          m.weight.copy_(0.5 + 0.5 * torch.rand(c, generator=g))
          m.bias.copy_(0.1 * torch.randn(c, generator=g))
          m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
          m.running_var.copy_(0.5 + torch.rand(c, generator=g))
          m.num_batches_tracked.fill_(7)
        elif isinstance(m, nn.Linear):
          m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.0 / m.in_features) ** 0.5)
          m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return net.eval()


  @pytest.fixture(scope="module")
  def r18():
    torch.manual_seed(0)
    return _randomize(OpenOODResNet18(num_classes=10), 1)


  @pytest.fixture(scope="module")
  def r50():
    torch.manual_seed(0)
    return _randomize(TVResNet50(num_classes=7), 2)


def _close(ours, ref, tol=1e-4):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape
  scale = max(1.0, float(np.abs(ref).max()))
  err = float(np.abs(ours - ref).max())
  assert err <= tol * scale, f"max abs error {err:.3g} > {tol} x {scale:.3g}"


def _compare(torch_net, model, x_nchw):
  with torch.no_grad():
    ref_h = torch_net.features(torch.from_numpy(x_nchw)).numpy()
    ref_f = torch_net(torch.from_numpy(x_nchw)).numpy()
  x = jnp.asarray(np.transpose(x_nchw, (0, 2, 3, 1)))
  h = model.from_early(model.early(x))
  _close(h, ref_h)
  _close(model.head(h), ref_f)
  _close(model(x), ref_f)
  assert np.abs(ref_f).max() > 0.1          # not a degenerate all-zero comparison


@needs_torch
def test_openood_resnet18_matches_pytorch(r18):
  model = conv.convert_state_dict(r18.state_dict(), "openood-resnet18-32")
  assert model.num_classes == 10 and model.feature_dim == 512
  x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
  _compare(r18, model, x)


@needs_torch
def test_torchvision_resnet50_matches_pytorch(r50):
  model = conv.convert_state_dict(r50.state_dict(), "torchvision-resnet50")
  assert model.num_classes == 7 and model.feature_dim == 2048
  x = np.random.default_rng(1).normal(size=(1, 3, 64, 64)).astype(np.float32)
  _compare(r50, model, x)


@needs_torch
def test_wrapped_and_prefixed_checkpoints_unwrap(r18, tmp_path):
  sd = {"module." + k: v for k, v in r18.state_dict().items()}
  path = tmp_path / "best.ckpt"
  torch.save({"epoch": 3, "net": sd}, path)
  flat = conv.read_state_dict(path)
  assert "conv1.weight" in flat and "layer2.0.shortcut.0.weight" in flat
  assert not any(k.endswith("num_batches_tracked") for k in flat)
  torch.save({"state_dict": r18.state_dict()}, tmp_path / "b.pth")
  assert set(conv.read_state_dict(tmp_path / "b.pth")) == set(flat)


@needs_torch
def test_npz_export_gives_identical_params(r18, tmp_path):
  from flax import nnx
  pth, npz = tmp_path / "w.pth", tmp_path / "w.npz"
  torch.save(r18.state_dict(), pth)
  conv.save_npz(r18.state_dict(), npz)
  a = conv.convert_state_dict(conv.read_state_dict(pth), "openood-resnet18-32")
  b = conv.convert_state_dict(conv.read_state_dict(npz), "openood-resnet18-32")
  pa, pb = nnx.to_pure_dict(nnx.state(a)), nnx.to_pure_dict(nnx.state(b))
  fa, fb = dict(conv._flatten(pa)), dict(conv._flatten(pb))
  assert fa.keys() == fb.keys() and len(fa) > 100
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]))


@needs_torch
def test_safetensors_path(r18, tmp_path):
  st = pytest.importorskip("safetensors.numpy", reason="safetensors is optional")
  sd = {k: v.numpy() for k, v in r18.state_dict().items()}
  st.save_file(sd, str(tmp_path / "w.safetensors"))
  model = conv.convert_state_dict(conv.read_state_dict(tmp_path / "w.safetensors"),
                                  "openood-resnet18-32")
  x = np.random.default_rng(2).normal(size=(1, 3, 32, 32)).astype(np.float32)
  _compare(r18, model, x)


@needs_torch
def test_mismatched_state_dict_lists_keys(r18):
  sd = {k: v.numpy() for k, v in r18.state_dict().items()}
  del sd["layer3.1.bn2.running_var"]
  sd["extra.head.weight"] = np.zeros((3, 3), np.float32)
  sd["fc.weight"] = np.zeros((100, 512), np.float32)
  with pytest.raises(ConversionError) as ei:
    conv.convert_state_dict(sd, "openood-resnet18-32", num_classes=10)
  msg = str(ei.value)
  assert "\n" not in msg
  assert "1 missing: layer3.1.bn2.running_var" in msg
  assert "1 unexpected: extra.head.weight" in msg
  assert "fc.weight (expected (10, 512), got (100, 512))" in msg


@needs_torch
def test_wrong_architecture_hint_and_truncation(r18):
  with pytest.raises(ConversionError, match=r"missing: .*\.\.\. and \d+ more.*openood-resnet18"):
    conv.convert_state_dict(r18.state_dict(), "torchvision-resnet50", num_classes=10)


@needs_torch
def test_reading_errors(tmp_path):
  with pytest.raises(ConversionError, match="no such file"):
    conv.read_state_dict(tmp_path / "nope.pth")
  (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
  with pytest.raises(ConversionError, match="torch.load"):
    conv.read_state_dict(tmp_path / "junk.pth")
  np.savez(tmp_path / "empty.npz", meta=np.array("x"))
  with pytest.raises(ConversionError):
    conv.convert_state_dict(conv.read_state_dict(tmp_path / "empty.npz"), "openood-resnet18-32")


@needs_torch
def test_checkpoint_round_trip_and_cli(r18, tmp_path, capsys):
  from grood_jax.checkpoint import load_model
  pth = tmp_path / "best.ckpt"
  torch.save({"module." + k: v for k, v in r18.state_dict().items()}, pth)
  out = tmp_path / "ckpt"
  rc = convert_cli.main(["--from", "openood-resnet18-32", "--weights", str(pth), "--out", str(out),
                  "--benchmark", "cifar10"])
  assert rc == 0 and "grood-score --ckpt" in capsys.readouterr().out
  model, config, step = load_model(out)
  assert step == 0 and config.benchmark == "cifar10" and config.model.name == "resnet18"
  assert config.num_classes == 10 and config.image_size == 32
  assert config.converted_from.arch == "openood-resnet18-32"
  x = np.random.default_rng(3).normal(size=(2, 3, 32, 32)).astype(np.float32)
  _compare(r18, model, x)
  # a second conversion into the same directory is refused, not silently merged
  rc = convert_cli.main(["--from", "openood-resnet18-32", "--weights", str(pth), "--out", str(out),
                  "--benchmark", "cifar10"])
  err = capsys.readouterr().err
  assert rc == 2 and "already holds a checkpoint" in err
  # a class-count mismatch is a one-line error naming fc
  rc = convert_cli.main(["--from", "openood-resnet18-32", "--weights", str(pth),
                  "--out", str(tmp_path / "c100"), "--benchmark", "cifar100"])
  err = capsys.readouterr().err
  assert rc == 2 and "fc.weight (expected (100, 512), got (10, 512))" in err
  assert err.count("\n") == 1
  assert not os.path.exists(tmp_path / "c100" / "checkpoints")


@needs_torch
def test_converted_checkpoint_scores_on_openood_layout(r18, tmp_path, monkeypatch):
  """convert -> score_checkpoint (what `score.py --ckpt DIR --data-dir ROOT` runs)."""
  from test_openood_data import _write_tree
  from grood_jax.data import openood
  from grood_jax.scoring import ScoreOptions, score_checkpoint
  monkeypatch.setattr(openood, "NOISE_SIZE", 100)            # keep the CPU test small
  root = str(tmp_path / "openood")
  _write_tree(root)
  pth = tmp_path / "r18.pth"
  torch.save(r18.state_dict(), pth)
  conv.convert(pth, "openood-resnet18-32", tmp_path / "ckpt", "cifar10")
  results, scores = score_checkpoint(str(tmp_path / "ckpt"),
                                     ScoreOptions(detectors=["msp", "energy"], data_dir=root,
                                                  batch_size=64))
  assert results["benchmark"] == "cifar10"
  assert set(results["detectors"]) == {"msp", "energy"}
  assert set(results["detectors"]["msp"]["ood"]) == {"cifar100", "tin", "mnist", "svhn",
                                                     "texture", "places365"}
  # the harness's logits are the PyTorch network's on the same normalised images
  from grood_jax.data import load_benchmark
  b = load_benchmark("cifar10", data_dir=root)
  x = (b.id_test.images / 255.0 - np.asarray(b.mean)) / np.asarray(b.std)
  with torch.no_grad():
    ref = torch.softmax(r18(torch.from_numpy(x.transpose(0, 3, 1, 2)).float()), -1).numpy()
  _close(scores["msp"]["id"], ref.max(-1))


# ------------------------------------------------------------------ without torch


def _params(model):
  from flax import nnx
  return dict(conv._flatten(nnx.to_pure_dict(nnx.state(model))))


def test_npz_round_trip_without_torch(tmp_path):
  """Our ResNet-18 -> PyTorch-named .npz -> convert: identical parameters and logits."""
  from grood_jax.models import build_model
  src = build_model("resnet18", num_classes=10, in_channels=3, seed=5)
  sd = conv.state_dict_of(src, shortcut="shortcut")
  assert sd["conv1.weight"].shape == (64, 3, 3, 3) and sd["fc.weight"].shape == (10, 512)
  assert "layer2.0.shortcut.1.running_var" in sd
  np.savez(tmp_path / "w.npz", **{"module." + k: v for k, v in sd.items()})
  model = conv.convert_state_dict(conv.read_state_dict(tmp_path / "w.npz"),
                                  "openood-resnet18-32")
  a, b = _params(src), _params(model)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
  src.eval()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 32, 32, 3)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(src(x)), np.asarray(model(x)))


def test_errors_without_torch(tmp_path):
  from grood_jax.models import build_model
  sd = conv.state_dict_of(build_model("resnet18", num_classes=10, in_channels=3, seed=0),
                          shortcut="shortcut")
  bad = dict(sd)
  del bad["bn1.running_mean"]
  bad["projector.weight"] = np.zeros((4, 4), np.float32)
  bad["layer1.0.conv1.weight"] = np.zeros((64, 64, 1, 1), np.float32)
  with pytest.raises(ConversionError) as ei:
    conv.convert_state_dict(bad, "openood-resnet18-32")
  msg = str(ei.value)
  assert "1 missing: bn1.running_mean" in msg and "1 unexpected: projector.weight" in msg
  assert "layer1.0.conv1.weight (expected (64, 64, 3, 3), got (64, 64, 1, 1))" in msg
  with pytest.raises(ConversionError, match="unknown architecture"):
    conv.convert_state_dict(sd, "vit-b16")
  with pytest.raises(ConversionError, match="expected a state dict"):
    conv.unwrap_state_dict([1, 2])
  if torch is None:
    (tmp_path / "w.pth").write_bytes(b"x")
    with pytest.raises(ConversionError, match="needs torch"):
      conv.read_state_dict(tmp_path / "w.pth")
  try:
    import safetensors  # noqa: F401
  except ImportError:
    (tmp_path / "w.safetensors").write_bytes(b"x")
    with pytest.raises(ConversionError, match="safetensors"):
      conv.read_state_dict(tmp_path / "w.safetensors")


def _doc_blocks(path):
  text = open(path, encoding="utf-8").read()
  return re.findall(r"```(python(?: torch)?)\n(.*?)```", text, flags=re.S)


def test_own_model_doc(tmp_path, monkeypatch):
  """Runs the python blocks of docs/own_model.md in order (on subsampled data)."""
  from grood_jax import data, scoring
  try:
    data.load_fashion_mnist(None, download=False)
  except Exception:  # noqa: BLE001
    pytest.skip("Fashion-MNIST not available offline")
  real = scoring.load_benchmark

  def small(name, **kw):                       # the doc's scoring on a few hundred images
    b = real(name, **kw)
    cut = lambda s, n: s.subset(slice(0, n))   # noqa: E731
    b.id_train, b.id_test = cut(b.id_train, 600), cut(b.id_test, 200)
    for s in b.ood:
      s.data = cut(s.data, 200)
    return b

  monkeypatch.setattr(scoring, "load_benchmark", small)
  monkeypatch.chdir(tmp_path)
  blocks = _doc_blocks(os.path.join(ROOT, "docs", "own_model.md"))
  assert [k for k, _ in blocks] == ["python", "python", "python torch", "python"]
  ns = {"__name__": "own_model_doc"}
  for kind, code in blocks:
    if kind == "python torch" and torch is None:
      continue
    exec(compile(code, f"docs/own_model.md[{kind}]", "exec"), ns)   # noqa: S102
  assert ns["summary"]["step"] > 0
  results = ns["results"]
  assert set(results["detectors"]) == {"msp", "energy"}
  assert 0.0 <= results["detectors"]["energy"]["near"]["auroc"] <= 1.0
  if torch is not None:
    from grood_jax.checkpoint import load_model
    model, config, _ = load_model(tmp_path / "runs" / "tinynet_from_torch")
    assert type(model).__name__ == "TinyNet" and config.model.kwargs.width == 16
