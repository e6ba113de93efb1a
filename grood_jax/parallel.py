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
`round_batch`, `put_batch`, `put_params`, `put_global`, `to_host`, `settle`, and the
multi-process start `initialize_distributed` (`is_main_process`). The data-parallel train step
is `training.train_state.make_train_step(..., mesh=mesh)`.

Multi-process (after `initialize_distributed`, i.e. `jax.distributed.initialize`): every
process runs the same program on the same data (same seed, same order). The mesh spans every
process's devices; a global batch is assembled from the rows of each process's own devices
(`jax.make_array_from_process_local_data`), replicated values from each process's own copy
(`put_global`: `jax.make_array_from_callback`, no cross-host transfer), and results that
span other processes' devices come back to every host through `to_host` (an all-gather,
`multihost_utils.process_allgather`). On one process every one of these is the plain
single-process call (no branch taken), so one-process numbers do not move.
"""

from __future__ import annotations

import contextlib
import os

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
  """Every leaf fully copied on every device of the mesh (parameters, optimiser state).

  On several processes each leaf is built from this process's own copy of the value (every
  process holds the same one): `put_global`, never a cross-host device transfer."""
  sharding = NamedSharding(mesh, P())
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda leaf: put_global(leaf, sharding), tree)


def _host_value(x) -> np.ndarray:
  """A numpy copy of `x` read on this process (a jax array spanning other processes' devices
  must be fully replicated: its local copy is read)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not x.is_fully_replicated:
      raise ValueError("put_global: a jax.Array split over other processes' devices; pass "
                       "the host value (or parallel.to_host(x))")
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def put_global(x, sharding) -> jax.Array:
  """`x` (the same value on every process: numpy, a scalar or a jax array) laid out as
  `sharding`, which may span every process's devices.

  One process: `jax.device_put`. Several: `jax.make_array_from_callback`, each process
  placing the pieces of its own devices from its own copy (no cross-host transfer, no
  equality check over the network)."""
  if jax.process_count() == 1 or sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and not x.is_fully_addressable and x.sharding == sharding:
    return x
  value = _host_value(x)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def to_host(tree):
  """Every leaf as numpy on this process. A jax array split over other processes' devices
  is all-gathered first (`multihost_utils.process_allgather`), so every process gets the
  whole value; anything else is `np.asarray` (one process: exactly that)."""
  def one(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable and not a.is_fully_replicated:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)
  return jax.tree.map(one, tree)


# ------------------------------------------------------------------ several processes


def all_processes(flag: bool) -> bool:
  """True when `flag` is True on every process (one tiny all-gather; one process: `flag`).
  For decisions every process must take alike, e.g. a cache hit that skips collectives."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray([bool(flag)], np.int32))))


def is_main_process() -> bool:
  """True on process 0 (the one that logs and writes reports, metrics and event files)."""
  return jax.process_index() == 0


def _distributed_error(text: str):
  from grood_jax.errors import ConfigError
  return ConfigError(text)


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> dict:
  """Starts JAX's multi-process runtime (`jax.distributed.initialize`); call it before any
  other JAX work. Returns {"process_id", "num_processes", "devices", "local_devices"}.

  Explicit: `coordinator` ("HOST:PORT" of process 0, which listens there), `num_processes`
  and `process_id` (0 .. N-1, a different one per process) — give all three (the coordinator
  may also come from $JAX_COORDINATOR_ADDRESS, which jax reads). With none of them, jax
  detects the cluster: Cloud TPU pods, SLURM (srun), Open MPI (mpirun; mpi4py), Kubernetes
  (JobSet/indexed jobs), or $JAX_COORDINATOR_ADDRESS plus a cluster that supplies the rest.
  Anything that cannot work (a missing value, process_id out of range, a malformed address,
  no cluster detected) is a ConfigError (a UserError) of one line naming what is missing.
  On CPU, collectives between processes go through gloo (jax's default).
  """
  given = {"--coordinator": coordinator, "--num-processes": num_processes,
           "--process-id": process_id}
  if coordinator is None:
    coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  explicit = num_processes is not None or process_id is not None
  if explicit:
    missing = [k for k, v in (("--coordinator HOST:PORT", coordinator),
                              ("--num-processes N", num_processes),
                              ("--process-id I", process_id)) if v is None]
    if missing:
      named = ", ".join(k for k, v in given.items() if v is not None)
      raise _distributed_error(
          f"--distributed: {named} given without {' and '.join(missing)}; give all three "
          "(the same --coordinator and --num-processes on every process, --process-id 0..N-1), "
          "or none of them on a cluster jax detects (TPU pod, SLURM, Open MPI, Kubernetes)")
    if int(num_processes) < 1:
      raise _distributed_error(f"--num-processes {num_processes}: must be at least 1")
    if not 0 <= int(process_id) < int(num_processes):
      raise _distributed_error(f"--process-id {process_id}: must be in 0..{int(num_processes) - 1}"
                               f" (--num-processes {num_processes})")
  if coordinator is not None:
    host, sep, port = str(coordinator).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise _distributed_error(f"--coordinator {coordinator!r}: expected HOST:PORT (process 0's "
                               "address and a free port, e.g. 10.0.0.1:1234)")
  kwargs = {}
  if coordinator is not None:
    kwargs["coordinator_address"] = str(coordinator)
  if explicit:
    kwargs.update(num_processes=int(num_processes), process_id=int(process_id))
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, TypeError) as e:          # jax: "... must be defined", no cluster found
    text = " ".join(str(e).split())
    what = ("--coordinator HOST:PORT" if "coordinator" in text.lower()
            else "--num-processes N and --process-id I" if "process" in text.lower()
            else "the cluster settings")
    raise _distributed_error(
        f"--distributed: no cluster detected and {what} not given ({text}); pass "
        "--coordinator HOST:PORT --num-processes N --process-id I, or run under a TPU pod, "
        "SLURM, Open MPI or Kubernetes job that jax detects") from None
  except RuntimeError as e:
    text = " ".join(str(e).split())
    if "already" in text.lower():
      raise _distributed_error("--distributed: jax.distributed is already initialised in this "
                               "process") from None
    raise _distributed_error(f"--distributed: cannot connect to the coordinator "
                             f"{coordinator or '(auto-detected)'}: {text[:300]}") from None
  return {"process_id": jax.process_index(), "num_processes": jax.process_count(),
          "devices": jax.device_count(), "local_devices": jax.local_device_count()}


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


def local_rows(batch_size: int) -> tuple[int, int] | None:
  """(first row, rows) of a global batch of `batch_size` that THIS process places on the
  active mesh, when several processes share it (the mesh lists devices process by process);
  None on one process or without a mesh (then the whole batch is placed by `put_batch`)."""
  m = active_mesh()
  n_proc = jax.process_count()
  if m is None or n_proc == 1:
    return None
  per = int(batch_size) // n_proc
  return jax.process_index() * per, per


def put_local_batch(x_local, batch_size: int, dtype=None) -> jax.Array:
  """This process's rows (`local_rows`) of a global batch of `batch_size` rows, placed on the
  active mesh as that global batch: each process reads and sends only its own rows."""
  x_local = np.asarray(x_local) if dtype is None else np.asarray(x_local, dtype)
  m = active_mesh()
  sharding = NamedSharding(m, P(mesh_axis(m, None)))
  return jax.make_array_from_process_local_data(sharding, x_local,
                                                (int(batch_size),) + x_local.shape[1:])


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
  """Parameters replicated over the active mesh (unchanged without one; `replicate`)."""
  m = active_mesh()
  return tree if m is None else replicate(tree, m)
