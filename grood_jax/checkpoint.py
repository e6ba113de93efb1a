"""Checkpoints: the one place in grood_jax that talks to orbax.

Layout of a training work directory::

  workdir/
    checkpoints/<step>/     one orbax CheckpointManager step (the last 3 are kept; atomic)
      model/                NNX model state: parameters and BatchNorm statistics
      opt_state/            optimizer state (optax state + step counter); absent if None
      config/               the training config, JSON of `config.to_dict()`
      extra/                JSON: data-iterator state, anything the trainer needs to resume
      meta/                 JSON: format marker, step, model name / kwargs / classes / channels
    metrics.jsonl

`save` writes a step, `restore_training` resumes a model and optimizer in place, `load_model`
rebuilds a model (eval mode) from the saved config alone. Arrays are restored onto the
shardings of the target (the current model's arrays, by default the current default device),
so a checkpoint written on N devices restores on any other device count.

Every failure is a `CheckpointError` (a ValueError) with a one-line message. When the newest
step cannot be read, restoring falls back to the previous readable step with a warning.
"""

from __future__ import annotations

import errno
import json
import os
import warnings
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

FORMAT = "grood_jax"
VERSION = 1
MAX_TO_KEEP = 3
_SUBDIR = "checkpoints"


from grood_jax.errors import CheckpointError, OutputError  # noqa: E402  (the errors leaf)


# ----------------------------------------------------------------------------- helpers


def _ckpt_root(path) -> str:
  """workdir -> workdir/checkpoints (a path that already is the checkpoints dir is kept)."""
  path = os.path.abspath(os.fspath(path))      # orbax needs absolute paths
  sub = os.path.join(path, _SUBDIR)
  return sub if os.path.isdir(sub) else path


def _manager(root: str, read_only: bool) -> ocp.CheckpointManager:
  # Readers open the manager without `create` (orbax's read_only mode only logs warnings).
  # A step is written into `<step>.orbax-checkpoint-tmp` and renamed when complete, so a
  # process killed mid-save leaves that directory behind (never a half step; readers ignore
  # it): the writer removes such leftovers when it opens the directory.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else MAX_TO_KEEP, create=not read_only,
      cleanup_tmp_directories=not read_only, enable_async_checkpointing=False)
  return ocp.CheckpointManager(root, options=options)


def _str_keys(tree):
  """Pure dict with int keys (nnx.List indices) -> str keys (orbax/JSON friendly)."""
  if isinstance(tree, dict):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


def _pure(state) -> dict:
  return _str_keys(nnx.to_pure_dict(state))


def _default_device():
  """The device new arrays land on: `jax.default_device` when set, else this process's first
  device (on several processes jax.devices()[0] belongs to process 0, not addressable here)."""
  d = jax.config.jax_default_device
  if d is None:
    return jax.local_devices()[0]
  return jax.local_devices(backend=d)[0] if isinstance(d, str) else d


def _abstract(tree):
  """Arrays or ShapeDtypeStructs -> ShapeDtypeStructs carrying the same sharding (the restore
  target); a leaf without one (an abstract model's) gets the current default device."""
  default = []

  def one(x):
    sharding = getattr(x, "sharding", None)
    if sharding is None:
      if not default:
        default.append(jax.sharding.SingleDeviceSharding(_default_device()))
      sharding = default[0]
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(one, tree)


def jsonable(obj):
  """A JSON-round-tripped copy (tuples -> lists, numpy scalars -> Python numbers)."""
  def default(o):
    if hasattr(o, "tolist"):
      return o.tolist()
    if isinstance(o, ml_collections.ConfigDict):
      return o.to_dict()
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")
  return json.loads(json.dumps(obj, default=default))


def _optimizer_state(optimizer):
  if optimizer is None:
    return None
  if isinstance(optimizer, nnx.Optimizer):
    return nnx.state(optimizer)
  return optimizer


def _list_steps(root: str) -> list[int]:
  """Finalised steps in `root`, oldest first; CheckpointError for a missing/empty directory."""
  if not os.path.exists(root):
    raise CheckpointError(f"checkpoint path {root} does not exist")
  if not os.path.isdir(root):
    raise CheckpointError(f"checkpoint path {root} is not a directory")
  steps = sorted(int(d) for d in os.listdir(root)
                 if d.isdigit() and os.path.isdir(os.path.join(root, d)))
  if not steps:
    raise CheckpointError(f"no checkpoint in {root} (the directory holds no saved step)")
  return steps


def _first_line(e: BaseException) -> str:
  msg = str(e).strip().splitlines()
  msg = msg[0].split(" See full TensorStore details")[0][:200] if msg else ""
  return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _os_error(e: BaseException) -> OSError | None:
  """The first OSError in `e`'s cause/context chain (orbax wraps tensorstore/file errors)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno is not None:
      return e
    e = e.__cause__ or e.__context__
  return None


def _not_ours(step_dir: str, why: str) -> CheckpointError:
  return CheckpointError(f"{step_dir} is not a grood_jax checkpoint or is unreadable: {why}")


def _positive_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check_item(step_dir: str, name: str, value) -> None:
  """CheckpointError unless a restored JSON item has the shape grood_jax writes."""
  if name in ("config", "extra"):
    if not isinstance(value, dict):
      raise _not_ours(step_dir, f"its '{name}' is a JSON {type(value).__name__}, not an object")
    return
  if name != "meta":
    return
  if not isinstance(value, dict) or value.get("format") != FORMAT:
    raise _not_ours(step_dir, "bad 'meta' (no grood_jax format marker)")
  m = value.get("model")
  if not isinstance(m, dict):
    raise _not_ours(step_dir, "'meta' has no model description")
  if not isinstance(m.get("name"), str) or not m["name"]:
    raise _not_ours(step_dir, "'meta' does not name its model")
  for key in ("num_classes", "in_channels"):
    if not _positive_int(m.get(key)):
      raise _not_ours(step_dir, f"'meta' has no valid model.{key} ({m.get(key)!r})")
  if not isinstance(m.get("kwargs", {}) or {}, dict):
    raise _not_ours(step_dir, "'meta' model.kwargs is not an object")


def _read_step(root: str, step: int, items: dict[str, Any]) -> dict[str, Any]:
  """Restore `items` (name -> ocp.args restore arg) of one step; CheckpointError on failure."""
  step_dir = os.path.join(root, str(step))
  if not os.path.isdir(os.path.join(step_dir, "meta")):
    raise CheckpointError(f"{step_dir} is not a grood_jax checkpoint (no 'meta' item)")
  for name in items:
    if not os.path.isdir(os.path.join(step_dir, name)):
      raise CheckpointError(f"checkpoint step {step} in {root} lacks the '{name}' item")
  mngr = _manager(root, read_only=True)
  result = {}
  try:
    # One item at a time, so that an error names the damaged item.
    for name, arg in [("meta", ocp.args.JsonRestore()), *items.items()]:
      try:
        result[name] = mngr.restore(step, args=ocp.args.Composite(**{name: arg}))[name]
      except Exception as e:   # orbax / tensorstore / json raise many types for damaged files
        raise CheckpointError(
            f"checkpoint step {step} in {root}: item '{name}' ({os.path.join(step_dir, name)}) "
            f"is unreadable: {_first_line(e)}") from e
      if isinstance(arg, ocp.args.JsonRestore):
        _check_item(step_dir, name, result[name])
    return result
  finally:
    mngr.close()


def _set_aside(root: str, step: int) -> str:
  """Renames an unreadable step directory to `<step>.unreadable[-N]` (ignored as a step), so
  that a resumed run can write that step again; returns the new path."""
  src = os.path.join(root, str(step))
  dst = src + ".unreadable"
  n = 1
  while os.path.exists(dst):
    n += 1
    dst = f"{src}.unreadable-{n}"
  os.rename(src, dst)
  return dst


def _read_latest_good(root: str, items_fn, set_aside: bool = False
                      ) -> tuple[int, dict[str, Any]]:
  """Newest readable step; warns for each newer step that could not be read (and, with
  `set_aside`, renames it out of the way so that training can save that step again)."""
  steps = _list_steps(root)
  errors = []
  for step in reversed(steps):
    try:
      result = _read_step(root, step, items_fn())
    except CheckpointError as e:
      errors.append((step, e))
      continue
    for bad, e in errors:
      moved = f" (moved to {_set_aside(root, bad)})" if set_aside else ""
      warnings.warn(f"{e}; falling back to step {step}{moved}", stacklevel=3)
    return step, result
  errors = [e for _, e in errors]
  if len(errors) == 1:
    raise errors[0]
  raise CheckpointError(f"none of the {len(steps)} checkpoint steps in {root} is readable; "
                        f"newest: {errors[0]}")


# ----------------------------------------------------------------------------- public API


def save(workdir, step: int, model: nnx.Module, optimizer_state, config, extra: dict | None = None
         ) -> bool:
  """Saves one step in `workdir/checkpoints` (keeps the last 3). Returns False if `step` exists.

  `optimizer_state` may be an `nnx.Optimizer`, any pytree of arrays, or None. `extra` must be
  JSON-serialisable (numpy scalars/arrays are converted).
  """
  root = os.path.join(os.path.abspath(os.fspath(workdir)), _SUBDIR)
  model_cfg = config.get("model", {}) if config is not None else {}
  meta = {
      "format": FORMAT, "version": VERSION, "step": int(step),
      "model": {
          "name": model_cfg.get("name"),
          "kwargs": jsonable(dict(model_cfg.get("kwargs", {}) or {})),
          "num_classes": int(model.num_classes),
          "in_channels": int(getattr(model, "in_channels", 1)),
      },
  }
  items = dict(
      model=ocp.args.StandardSave(_pure(nnx.state(model))),
      config=ocp.args.JsonSave(jsonable(config.to_dict() if config is not None else {})),
      extra=ocp.args.JsonSave(jsonable(dict(extra or {}))),
      meta=ocp.args.JsonSave(meta),
  )
  opt_state = _optimizer_state(optimizer_state)
  if opt_state is not None:
    items["opt_state"] = ocp.args.StandardSave(_pure(opt_state))
  mngr = _manager(root, read_only=False)
  try:
    if int(step) in mngr.all_steps():
      return False
    try:
      saved = mngr.save(int(step), args=ocp.args.Composite(**items), force=True)
      mngr.wait_until_finished()
    except Exception as e:
      os_err = _os_error(e)
      if os_err is not None:
        what = ("no space left on device: free some space on that disk" if os_err.errno ==
                errno.ENOSPC else f"{os_err.strerror or os_err} (errno {os_err.errno})")
        raise OutputError(f"could not save step {step} to {root}: {what}") from e
      raise CheckpointError(f"could not save step {step} to {root}: {_first_line(e)}") from e
    return bool(saved)
  finally:
    try:
      mngr.close()
    except Exception:  # noqa: BLE001 - closing after a failed save must not mask its error
      pass


def latest_step(workdir) -> int | None:
  """Newest saved step in `workdir` (or a checkpoints directory); None when there is none."""
  root = _ckpt_root(workdir)
  try:
    return _list_steps(root)[-1]
  except CheckpointError:
    return None


def restore_training(workdir, model: nnx.Module, optimizer=None) -> tuple[int, dict]:
  """Restores model and optimizer state in place from the newest readable step.

  `optimizer` is an `nnx.Optimizer` (updated in place) or None. Returns (step, extra).
  Newer unreadable steps are renamed to `<step>.unreadable` with a warning, so that training
  resumed from an older step saves those steps again instead of keeping the damaged ones.
  """
  root = _ckpt_root(workdir)
  model_state = nnx.state(model)
  opt_state = _optimizer_state(optimizer)

  def items():
    d = dict(model=ocp.args.StandardRestore(_abstract(_pure(model_state))),
             extra=ocp.args.JsonRestore())
    if opt_state is not None:
      d["opt_state"] = ocp.args.StandardRestore(_abstract(_pure(opt_state)))
    return d

  step, out = _read_latest_good(root, items, set_aside=True)
  try:
    nnx.replace_by_pure_dict(model_state, out["model"])
    nnx.update(model, model_state)
    if opt_state is not None:
      nnx.replace_by_pure_dict(opt_state, out["opt_state"])
      nnx.update(optimizer, opt_state)
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"checkpoint step {step} in {root} does not match the model/optimizer:"
                          f" {_first_line(e)}") from e
  return step, dict(out["extra"] or {})


def load_config(ckpt_dir, step: int | None = None) -> ml_collections.ConfigDict:
  """The training config saved with a checkpoint (newest step unless `step` is given)."""
  root = _ckpt_root(ckpt_dir)
  steps = _list_steps(root)
  step = steps[-1] if step is None else step
  out = _read_step(root, step, {"config": ocp.args.JsonRestore()})
  return _config_dict(out["config"], os.path.join(root, str(step)))


def _config_dict(tree: dict, step_dir: str) -> ml_collections.ConfigDict:
  try:
    return ml_collections.ConfigDict(tree)
  except Exception as e:  # noqa: BLE001 - ml_collections raises several types for odd trees
    raise _not_ours(step_dir, f"its 'config' cannot be read ({_first_line(e)})") from e


# jax's errors for a constructor that needs concrete values (all TypeErrors)
_UNTRACEABLE = (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError)


def abstract_model(make) -> nnx.Module:
  """`make()` (a function building an NNX module) run abstractly (`nnx.eval_shape`): the
  module with ShapeDtypeStructs for its arrays, nothing initialised or compiled; the target
  a checkpoint is restored into."""
  return nnx.eval_shape(make)


def load_model(ckpt_dir, step: int | None = None
               ) -> tuple[nnx.Module, ml_collections.ConfigDict, int]:
  """Rebuilds the model from a checkpoint: (model in eval mode, config, step).

  `ckpt_dir` is a training work directory or its `checkpoints` directory. The newest readable
  step is used unless `step` is given. Arrays land on the current default device. The model
  is built abstractly (`nnx.eval_shape`: no random initialisation, nothing compiled) and the
  saved arrays are restored into it.
  """
  from grood_jax.models import build_model   # local import: models do not depend on us

  root = _ckpt_root(ckpt_dir)
  steps = _list_steps(root)
  if step is not None and step not in steps:
    raise CheckpointError(f"no step {step} in {root} (steps: {steps})")

  def build(meta):
    m = meta.get("model") or {}
    if not m.get("name"):
      raise CheckpointError(f"checkpoint in {root} does not name its model")

    def make():
      return build_model(m["name"], num_classes=int(m["num_classes"]),
                         in_channels=int(m["in_channels"]), seed=0, **(m.get("kwargs") or {}))
    try:
      try:
        return abstract_model(make)
      except _UNTRACEABLE:
        return make()          # a model whose constructor needs concrete values: build it
    except (ValueError, TypeError, KeyError) as e:
      raise CheckpointError(f"cannot rebuild model {m['name']!r} from {root}: "
                            f"{_first_line(e)}") from e

  def read(s):
    # Two reads: the meta says which model to build, the model is the restore target.
    meta = _read_step(root, s, {})["meta"]
    graphdef, state = nnx.split(build(meta))
    out = _read_step(root, s, {"model": ocp.args.StandardRestore(_abstract(_pure(state))),
                               "config": ocp.args.JsonRestore()})
    try:
      nnx.replace_by_pure_dict(state, out["model"])
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"checkpoint step {s} in {root} does not match model "
                            f"{meta['model']['name']!r}: {_first_line(e)}") from e
    missing = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
               if isinstance(x, jax.ShapeDtypeStruct)]
    if missing:
      raise CheckpointError(f"checkpoint step {s} in {root} does not match model "
                            f"{meta['model']['name']!r}: no saved value for {missing[0]}")
    model = nnx.merge(graphdef, state)
    model.eval()
    return model, _config_dict(out["config"], os.path.join(root, str(s)))

  if step is not None:
    model, config = read(step)
    return model, config, step
  errors = []
  for s in reversed(steps):
    try:
      model, config = read(s)
    except CheckpointError as e:
      errors.append(e)
      continue
    for e in errors:
      warnings.warn(f"{e}; falling back to step {s}", stacklevel=2)
    return model, config, s
  if len(errors) == 1:
    raise errors[0]
  raise CheckpointError(f"none of the {len(steps)} checkpoint steps in {root} is readable; "
                        f"newest: {errors[0]}")
