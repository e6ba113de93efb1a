"""Convert PyTorch ResNet weights into a grood_jax checkpoint that `score.py --ckpt` restores.

  python -m grood_jax.convert --from openood-resnet18-32 --weights cifar10_res18/s0/best.ckpt \\
      --out runs/openood_c10 --benchmark cifar10
  python -m grood_jax.convert --from torchvision-resnet50 --weights resnet50-11ad3fa6.pth \\
      --out runs/tv_r50 --benchmark imagenet1k
  python score.py --ckpt runs/openood_c10 --data-dir ~/openood/data

Architectures (`--from`):
  openood-resnet18-32   OpenOOD's ResNet18_32x32 (3x3 stem, no max-pool); the projection
                        shortcut is named `layerK.J.shortcut.{0,1}` -> our `downsample`
  torchvision-resnet50  torchvision's resnet50 (`layerK.J.downsample.{0,1}`)

Weights are read from
  *.npz                 np.savez(path, **{k: v.numpy() for k, v in state_dict.items()})
  *.safetensors         when the `safetensors` package is installed
  anything else         torch.load(path, map_location="cpu", weights_only=True) (needs torch)
so PyTorch is only needed for .pth/.ckpt files. Wrappers are removed: a dict holding the
weights under `state_dict` / `model_state_dict` / `net` / `model`, and a prefix shared by every
key (`module.`, `model.`, `net.`, `backbone.`). `num_batches_tracked` entries are ignored.

Layouts: conv weight OIHW -> kernel HWIO, linear weight (out, in) -> kernel (in, out),
BatchNorm weight / bias / running_mean / running_var -> scale / bias / mean / var. Our
BatchNorm uses PyTorch's epsilon 1e-5, so eval-mode outputs match PyTorch's.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

import numpy as np

ARCHS = {
    # --from name: (our model name, PyTorch name of the projection shortcut)
    "openood-resnet18-32": ("resnet18", "shortcut"),
    "torchvision-resnet50": ("resnet50", "downsample"),
}
BENCHMARK_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet200": 200, "imagenet1k": 1000}
BENCHMARK_IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "imagenet200": 224, "imagenet1k": 224}

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "net", "model")
_PREFIXES = ("module.", "model.", "net.", "backbone.")
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}
_SHOW = 10


from grood_jax.errors import ConversionError  # noqa: E402  (defined in the errors leaf)


# ----------------------------------------------------------------------------- reading


def _to_numpy(value, key: str) -> np.ndarray:
  if hasattr(value, "detach"):                   # a torch.Tensor
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()                      # bf16/fp16 -> fp32 (numpy has no bfloat16)
    return value.numpy()
  try:
    return np.asarray(value)
  except (TypeError, ValueError) as e:
    raise ConversionError(f"entry {key!r} is not an array ({type(value).__name__})") from e


def _is_array(v) -> bool:
  return hasattr(v, "shape") and hasattr(v, "dtype")


def unwrap_state_dict(obj) -> dict[str, np.ndarray]:
  """Checkpoint object -> flat {name: numpy array}: unwraps containers, strips shared prefixes."""
  for _ in range(4):                             # nested wrappers, e.g. {"net": {"state_dict"}}
    if not isinstance(obj, Mapping):
      raise ConversionError(f"expected a state dict (a mapping of names to tensors), got "
                            f"{type(obj).__name__}")
    if obj and all(_is_array(v) for v in obj.values()):
      break
    inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if inner is None:
      arrays = {k: v for k, v in obj.items() if _is_array(v)}
      if not arrays:
        raise ConversionError(f"no tensors found; top-level keys: {sorted(map(str, obj))[:_SHOW]}")
      obj = arrays                               # e.g. {"epoch": 3, "conv1.weight": ...}
      break
    obj = inner
  sd = {str(k): _to_numpy(v, str(k)) for k, v in obj.items()
        if not str(k).endswith("num_batches_tracked")}
  changed = True
  while changed and sd:
    changed = False
    for prefix in _PREFIXES:
      if all(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items()}
        changed = True
  return sd


def read_state_dict(path) -> dict[str, np.ndarray]:
  """Reads a .npz, .safetensors or PyTorch file (see the module docstring)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConversionError(f"--weights {path}: no such file")
  lower = path.lower()
  if lower.endswith(".npz"):
    try:
      with np.load(path, allow_pickle=False) as z:
        obj = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
      raise ConversionError(f"{path}: not a readable .npz file ({e})") from e
  elif lower.endswith(".safetensors"):
    try:
      from safetensors.numpy import load_file
    except ImportError:
      raise ConversionError(f"{path}: reading .safetensors needs the `safetensors` package "
                            "(pip install safetensors), or export the weights to .npz") from None
    try:
      obj = load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
      raise ConversionError(f"{path}: not a readable .safetensors file ({e})") from e
  else:
    try:
      import torch
    except ImportError:
      raise ConversionError(
          f"{path}: reading a PyTorch checkpoint needs torch (pip install torch); or export it "
          "elsewhere with np.savez('w.npz', **{k: v.numpy() for k, v in sd.items()}) and pass "
          "the .npz") from None
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for foreign files
      msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
      raise ConversionError(f"{path}: torch.load(weights_only=True) failed: {msg}") from e
  return unwrap_state_dict(obj)


def save_npz(state_dict: Mapping, path) -> None:
  """Writes a (torch or numpy) state dict as .npz, readable without torch by `convert`."""
  np.savez(path, **{k: _to_numpy(v, k) for k, v in unwrap_state_dict(dict(state_dict)).items()})


# ----------------------------------------------------------------------------- mapping


def _flatten(tree, prefix=()):
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (k,))
  else:
    yield prefix, tree


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree[k]
  tree[path[-1]] = value


def torch_name(path, shortcut: str = "downsample") -> str:
  """Our pure-dict path, e.g. ('layer2', 0, 'downsample', 1, 'mean') -> PyTorch key
  'layer2.0.shortcut.1.running_mean' (with shortcut='shortcut')."""
  parts = [shortcut if p == "downsample" else str(p) for p in path[:-1]]
  leaf = path[-1]
  if leaf not in _LEAF_NAMES:
    raise ConversionError(f"no PyTorch name for parameter {'.'.join(map(str, path))}")
  return ".".join(parts + [_LEAF_NAMES[leaf]])


def _torch_shape(ours_shape: tuple) -> tuple:
  if len(ours_shape) == 4:                       # HWIO -> OIHW
    h, w, i, o = ours_shape
    return (o, i, h, w)
  if len(ours_shape) == 2:                       # (in, out) -> (out, in)
    return (ours_shape[1], ours_shape[0])
  return tuple(ours_shape)


def _from_torch(a: np.ndarray) -> np.ndarray:
  if a.ndim == 4:
    return np.transpose(a, (2, 3, 1, 0))
  if a.ndim == 2:
    return a.T
  return a


def _listing(items: list[str]) -> str:
  shown = ", ".join(items[:_SHOW])
  return shown + (f", ... and {len(items) - _SHOW} more" if len(items) > _SHOW else "")


def load_into(model, state_dict: Mapping[str, np.ndarray], *, shortcut: str = "downsample",
              arch: str = "model") -> None:
  """Copies a PyTorch-named state dict into an NNX ResNet in place (all or nothing).

  Raises ConversionError listing missing, unexpected and misshapen keys when the state dict
  does not fit the model exactly.
  """
  from flax import nnx
  import jax.numpy as jnp

  state = nnx.state(model)
  pure = nnx.to_pure_dict(state)
  wanted = {}
  for path, leaf in _flatten(pure):
    wanted[torch_name(path, shortcut)] = (path, tuple(leaf.shape), leaf.dtype)
  missing = [k for k in wanted if k not in state_dict]
  unexpected = sorted(k for k in state_dict if k not in wanted)
  misshapen = [f"{k} (expected {_torch_shape(shape)}, got {tuple(np.shape(state_dict[k]))})"
               for k, (_, shape, _) in wanted.items()
               if k in state_dict and tuple(np.shape(state_dict[k])) != _torch_shape(shape)]
  if missing or unexpected or misshapen:
    parts = []
    if missing:
      parts.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
      parts.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    if misshapen:
      parts.append(f"{len(misshapen)} misshapen: {_listing(misshapen)}")
    hint = ""
    if shortcut == "shortcut" and any(".downsample." in k for k in unexpected):
      hint = " (the keys look like torchvision's; try --from torchvision-resnet50)"
    elif shortcut == "downsample" and any(".shortcut." in k for k in unexpected):
      hint = " (the keys look like OpenOOD's ResNet18_32x32; try --from openood-resnet18-32)"
    elif any(k.startswith("fc.") for k in misshapen):
      hint = " (fc has another class count: check --benchmark / --num-classes)"
    raise ConversionError(f"the weights do not fit {arch}: " + "; ".join(parts) + hint)
  for name, (path, _, dtype) in wanted.items():
    value = np.asarray(state_dict[name])
    if not np.all(np.isfinite(value)):
      raise ConversionError(f"{name} contains NaN or Inf")
    _set(pure, path, jnp.asarray(_from_torch(value), dtype=dtype))
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)


def state_dict_of(model, *, shortcut: str = "downsample") -> dict[str, np.ndarray]:
  """The inverse of `load_into`: our model's parameters under PyTorch names and layouts."""
  from flax import nnx

  out = {}
  for path, leaf in _flatten(nnx.to_pure_dict(nnx.state(model))):
    a = np.asarray(leaf)
    if a.ndim == 4:
      a = np.transpose(a, (3, 2, 0, 1))
    elif a.ndim == 2:
      a = a.T
    out[torch_name(path, shortcut)] = np.ascontiguousarray(a)
  return out


def convert_state_dict(state_dict: Mapping, arch: str, *, num_classes: int | None = None):
  """A PyTorch state dict (torch tensors or numpy arrays, wrapped or not) -> our NNX model in
  eval mode. `num_classes` defaults to the rows of fc.weight."""
  from grood_jax.models import build_model

  if arch not in ARCHS:
    raise ConversionError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHS)}")
  model_name, shortcut = ARCHS[arch]
  state_dict = unwrap_state_dict(state_dict)   # torch tensors, wrappers, prefixes
  fc = state_dict.get("fc.weight")
  if num_classes is None:
    if fc is None or np.ndim(fc) != 2:
      raise ConversionError("cannot infer the class count (no 2-d fc.weight); pass --num-classes")
    num_classes = int(np.shape(fc)[0])
  conv1 = state_dict.get("conv1.weight")
  in_channels = int(np.shape(conv1)[1]) if conv1 is not None and np.ndim(conv1) == 4 else 3
  model = build_model(model_name, num_classes=int(num_classes), in_channels=in_channels, seed=0)
  load_into(model, state_dict, shortcut=shortcut, arch=f"{arch} ({num_classes} classes)")
  model.eval()
  return model


def make_config(benchmark: str, model_name: str, num_classes: int, image_size: int | None,
                source: dict | None = None):
  """The config saved with a converted checkpoint (the training config's fields + provenance)."""
  import ml_collections
  from grood_jax.training.config import base_config

  c = base_config()
  c.benchmark = benchmark
  c.model.name = model_name
  c.num_classes = int(num_classes)
  c.image_size = int(image_size) if image_size else ml_collections.config_dict.placeholder(int)
  c.converted_from = ml_collections.ConfigDict(dict(source or {}))
  return c


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def convert(weights, arch: str, out, benchmark: str, *, num_classes: int | None = None,
            image_size: int | None = None):
  """Reads `weights`, converts them to `arch`, saves a step-0 checkpoint in `out`.

  Returns the model (eval mode). Raises ConversionError (or CheckpointError) on failure.
  """
  from grood_jax import checkpoint

  if num_classes is None:
    num_classes = BENCHMARK_CLASSES.get(benchmark)   # None: inferred from fc.weight
  if image_size is None:
    image_size = BENCHMARK_IMAGE_SIZE.get(benchmark)
  root = os.path.join(os.fspath(out), "checkpoints")
  if os.path.isdir(root) and any(d.isdigit() for d in os.listdir(root)):
    raise ConversionError(f"--out {out} already holds a checkpoint; choose a new directory")
  sd = read_state_dict(weights)
  model = convert_state_dict(sd, arch, num_classes=num_classes)
  source = {"arch": arch, "weights": os.path.abspath(os.fspath(weights)),
            "sha256": _sha256(os.fspath(weights))}
  config = make_config(benchmark, ARCHS[arch][0], model.num_classes, image_size, source)
  checkpoint.save(out, 0, model, None, config, extra={"converted_from": source})
  return model


if __name__ == "__main__":          # python -m grood_jax.convert: the grood-convert command
  from grood_jax.cli.convert import entry
  entry()
