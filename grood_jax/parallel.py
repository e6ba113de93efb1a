"""The device mesh that batched work runs on: training steps, feature extraction, gradients
and nearest-neighbour search.

A 1-D mesh over the devices (`make_mesh`) carries one axis, "data". Batches are split over it
on their leading axis (`put_batch`), parameters are copied to every device (`replicate`), and
XLA partitions each jitted batch function accordingly: the same code runs on 1 CPU, 8 GPUs or
a TPU slice, and on one device it is exactly the single-device computation (no branch).

Scoring code does not take a mesh argument: `score.py` enters `data_parallel(mesh)`, and
inside it `ModelFns` replicates the parameters, every batch loop rounds its batch size to a
multiple of the device count (`round_batch`) and places batches with `put_batch`, and
`ops.knn_search` searches a bank sharded over the mesh (`ops.sharded_knn_search`). Outside
such a block everything stays on the default device.

This module is the one home of the device mesh and placement: `make_mesh`, `mesh_for`,
`mesh_axis`, `replicate`, `global_batch`, `shard_batch`, `data_parallel`, `active_mesh`,
`round_batch`, `put_batch`, `put_params`, `settle`. The data-parallel train step is
`training.train_state.make_train_step(..., mesh=mesh)`.

Multi-host (after `jax.distributed.initialize()`): every process computes the same global
batch (same seed, same order) and contributes the rows of its own devices
(`jax.make_array_from_process_local_data`); the mesh spans every process's devices.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

AXIS = "data"


def make_mesh(axis: str = AXIS, devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh over `devices` (default: all of `jax.devices()`, every process) named `axis`."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("make_mesh: no devices")
  return jax.make_mesh((len(devices),), (axis,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def mesh_for(num_devices: int = 0) -> jax.sharding.Mesh:
  """The first `num_devices` devices (0: all of them) as a mesh; ValueError if too many."""
  devices = jax.devices()
  n = int(num_devices) or len(devices)
  if not 1 <= n <= len(devices):
    raise ValueError(f"{num_devices} devices asked for, {len(devices)} available "
                     f"({devices[0].platform}); use 0 for all of them")
  return make_mesh(devices=devices[:n])


def mesh_axis(mesh, axis: str | None = None) -> str:
  """`axis`, or the mesh's first axis when None; ValueError if the mesh has no such axis."""
  axis = mesh.axis_names[0] if axis is None else axis
  if axis not in mesh.axis_names:
    raise ValueError(f"mesh has no axis {axis!r} (axes: {mesh.axis_names})")
  return axis


def axis_size(mesh, axis: str | None = None) -> int:
  """Number of devices along `axis` (default: the first)."""
  return int(mesh.shape[mesh_axis(mesh, axis)])


def replicate(tree, mesh):
  """Every leaf fully copied on every device of the mesh (parameters, optimiser state)."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def global_batch(x, mesh, axis: str | None = None) -> jax.Array:
  """The global batch `x` (the same on every process) split over the mesh's leading axis.

  Its length must be a multiple of the mesh size. On several processes each one contributes
  the rows that belong to its devices (the mesh lists devices process by process).
  """
  axis = mesh_axis(mesh, axis)
  n_dev = axis_size(mesh, axis)
  n = np.shape(x)[0]
  if n % n_dev:
    raise ValueError(f"batch of {n} rows cannot be split over {n_dev} devices; use a batch "
                     f"size that is a multiple of {n_dev}")
  sharding = NamedSharding(mesh, P(axis))
  n_proc = jax.process_count()
  if n_proc == 1:
    return jax.device_put(x, sharding)
  per = n // n_proc
  i = jax.process_index()
  x = np.asarray(x)
  return jax.make_array_from_process_local_data(sharding, x[i * per:(i + 1) * per], x.shape)


def shard_batch(tree, mesh, axis: str | None = None):
  """Every leaf's leading axis split over the mesh axis (`global_batch` per leaf; it must
  divide by the device count). Pad the batch first (`features.pad_batch`) if needed."""
  axis = mesh_axis(mesh, axis)
  n_dev = mesh.shape[axis]
  for leaf in jax.tree.leaves(tree):
    if np.ndim(leaf) == 0 or np.shape(leaf)[0] % n_dev:
      raise ValueError(f"shard_batch: leading axis of shape {np.shape(leaf)} is not a multiple "
                       f"of the {n_dev} devices on mesh axis {axis!r}; pad the batch first")
  return jax.tree.map(lambda leaf: global_batch(leaf, mesh, axis), tree)


# ------------------------------------------------------------------ the active scoring mesh

_ACTIVE: list = []


@contextlib.contextmanager
def data_parallel(mesh):
  """Inside this block batched scoring work spreads over `mesh` (None: the default device)."""
  _ACTIVE.append(mesh)
  try:
    yield mesh
  finally:
    _ACTIVE.pop()


def active_mesh():
  """The mesh of the innermost `data_parallel` block if it has several devices, else None."""
  if _ACTIVE and _ACTIVE[-1] is not None and _ACTIVE[-1].size > 1:
    return _ACTIVE[-1]
  return None


def round_batch(batch_size: int) -> int:
  """`batch_size` rounded up to a multiple of the active mesh's device count."""
  m = active_mesh()
  n_dev = 1 if m is None else m.size
  return max(n_dev, -(-int(batch_size) // n_dev) * n_dev)


def put_batch(x, dtype=None) -> jax.Array:
  """A batch on the active mesh (split on its leading axis), or on the default device."""
  x = np.asarray(x) if dtype is None else np.asarray(x, dtype)
  m = active_mesh()
  return jnp.asarray(x) if m is None else global_batch(x, m)


def settle(tree):
  """Waits for `tree` when the active mesh is several CPU devices; otherwise returns at once.

  Loops that chain device programs with collectives (a reduction over a split batch) call it
  once per batch. XLA's CPU client runs the per-device parts of every queued program on one
  shared thread pool; with more virtual devices than cores, parts of two queued programs can
  each hold threads while waiting at a rendezvous for the other's (measured: 4 virtual devices
  on 2 cores stall in `lowdim` and the prototype sums). GPUs and TPUs keep async dispatch.
  """
  m = active_mesh()
  if m is not None and m.devices.flat[0].platform == "cpu":
    jax.block_until_ready(tree)
  return tree


def put_params(tree):
  """Parameters replicated over the active mesh (unchanged without one)."""
  m = active_mesh()
  return tree if m is None else replicate(tree, m)
