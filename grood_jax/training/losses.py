"""Training losses, selected by `config.loss`.

A loss factory takes the config and returns `loss_fn(model, x_BxHxWxC, y_B) -> (loss, logits)`;
the train step differentiates it w.r.t. the model's parameters (BatchNorm statistics update
as a side effect). Register more with `register_loss(name, factory)`. The second output may
also be a dict with "logits" and scalar metrics (logged per epoch as train_<name>).

Losses that need auxiliary outliers carry an attribute `loss_fn.aux_mode`:
  "batch": `loss_fn(model, x, y, x_aux)`; the loop feeds one auxiliary batch per step.
  "pool":  the same signature, but the loop feeds a candidate pool and the train step picks the
           auxiliary batch from it first with `make_aux_selector(config)` (GReg+).

"ce"       cross-entropy (optional label smoothing).
"greg"     GReg (METHOD.md §2): CE + λ_S·L_S + λ_∇·L_∇ on an ID batch and an auxiliary batch,
           `greg_objective` with config.greg.{m_in, m_out, lam_s, lam_grad, input_grad}.
"gregplus" GReg+: the GReg loss on an auxiliary batch chosen by energy-based sampling
           (`gregplus_select`) from a pool of config.aux.pool_factor × aux batch candidates.

BatchNorm and the input gradient (config.greg.input_grad):
  "sum" (default): one train-mode forward of the concatenated batch [x_in; x_aux] gives the
    logits (CE, energies, L_S, the masks, the BatchNorm statistics update) AND, through its
    VJP, the input gradient of Σ_i S(x_i): the gradient term regularises the very function
    whose energies it is masked with. With train-mode BatchNorm this carries the O(1/2B) paths
    through the batch statistics (the per-sample `vmap` form would normalise each sample by its
    own statistics — degenerate). Without BatchNorm (or any sample interaction) it equals
    `greg.greg_loss(..., input_grad="vmap")` exactly. One forward, one VJP, then the double
    backprop for the parameter gradient.
  "eval": logits as above (train mode), input gradients of the eval-mode model (running
    statistics, samples independent: the exact per-sample gradient of the deployed scorer),
    computed as one backward pass of Σ_i S(x_i) (`greg.input_grad_norms(..., "sum")`, equal
    to "vmap" there). Costs one more forward; the running statistics lag while training from
    scratch, so "sum" is the default.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from grood_jax.training import greg as greg_lib
from grood_jax.training.kmeans import energy_based_sample

LossFn = Callable[..., tuple[jax.Array, jax.Array]]


def cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Mean softmax cross-entropy with integer labels (optional label smoothing)."""
  num_classes = logits_BxC.shape[-1]
  onehot = jax.nn.one_hot(labels_B, num_classes, dtype=logits_BxC.dtype)
  if label_smoothing:
    onehot = optax.smooth_labels(onehot, label_smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits_BxC, onehot))


def _ce_factory(config) -> LossFn:
  smoothing = float(config.get("label_smoothing", 0.0))

  def loss_fn(model, x, y):
    logits = model(x)
    return cross_entropy(logits, y, smoothing), logits
  return loss_fn


def _split_state(model):
  """(graphdef, params, rest): parameters apart from BatchNorm statistics and the rest."""
  return nnx.split(model, nnx.Param, ...)


def greg_objective(model, x_in, y_in, x_aux, *, m_in: float = -25.0, m_out: float = -7.0,
                   lam_s: float = 0.1, lam_grad: float = 1.0, input_grad: str = "sum"
                   ) -> tuple[jax.Array, dict]:
  """GReg loss of an nnx model in train mode (see the module docstring for `input_grad`).

  Returns (total, {"logits": logits_in, "ce", "l_s", "l_grad", "s_in", "s_aux", "frac_in",
  "frac_aux"}). The input gradient is w.r.t. the (normalised) model input. Updates the model's
  BatchNorm statistics from the one train-mode forward of [x_in; x_aux].
  """
  b = x_in.shape[0]
  x = jnp.concatenate([x_in, x_aux], axis=0)
  if input_grad == "sum":
    graphdef, params, rest = _split_state(model)

    def forward(x):
      m = nnx.merge(graphdef, params, rest, copy=True)   # fresh Variables in this trace
      logits = m(x)
      return logits, _split_state(m)[2]

    logits, vjp_fn, new_rest = jax.vjp(forward, x, has_aux=True)
    g = vjp_fn(-jax.nn.softmax(logits, axis=-1))[0]      # ∂(Σ_i S_i)/∂x, S = −lse(f)
    nnx.update(model, new_rest)
    norms = greg_lib.safe_norm(g.reshape(g.shape[0], -1))
  elif input_grad == "eval":
    graphdef, params, rest = _split_state(model)
    eval_model = nnx.merge(graphdef, params, rest, copy=True)   # statistics before this step
    eval_model.eval()
    eval_def, _, eval_rest = _split_state(eval_model)

    def eval_fn(p, x):
      return nnx.merge(eval_def, p, eval_rest)(x)

    logits = model(x)
    norms = greg_lib.input_grad_norms(eval_fn, params, x, input_grad="sum")
  else:
    raise ValueError(f"config.greg.input_grad must be 'sum' or 'eval', got {input_grad!r}")
  logits_in, logits_aux = logits[:b], logits[b:]
  ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_in, y_in))
  s_in, s_aux = greg_lib.energy(logits_in), greg_lib.energy(logits_aux)
  l_s = greg_lib.energy_margin_loss(s_in, s_aux, m_in, m_out)
  mask_in = jax.lax.stop_gradient((s_in <= m_in).astype(s_in.dtype))
  mask_aux = jax.lax.stop_gradient((s_aux >= m_out).astype(s_aux.dtype))
  l_grad = jnp.mean(mask_in * norms[:b]) + jnp.mean(mask_aux * norms[b:])
  total = ce + lam_s * l_s + lam_grad * l_grad
  return total, {"logits": logits_in, "ce": ce, "l_s": l_s, "l_grad": l_grad,
                 "s_in": jnp.mean(s_in), "s_aux": jnp.mean(s_aux),
                 "frac_in": jnp.mean(mask_in), "frac_aux": jnp.mean(mask_aux)}


def greg_settings(config) -> dict:
  """greg_objective's keyword arguments from config.greg (defaults: METHOD.md §2)."""
  g = config.get("greg", None) or {}
  return {"m_in": float(g.get("m_in", -25.0)), "m_out": float(g.get("m_out", -7.0)),
          "lam_s": float(g.get("lam_s", 0.1)), "lam_grad": float(g.get("lam_grad", 1.0)),
          "input_grad": str(g.get("input_grad", "sum"))}


def _greg_factory(config) -> LossFn:
  kw = greg_settings(config)
  if kw["input_grad"] not in ("sum", "eval"):
    raise ValueError(f"config.greg.input_grad must be 'sum' or 'eval', got {kw['input_grad']!r}")

  def loss_fn(model, x, y, x_aux):
    return greg_objective(model, x, y, x_aux, **kw)
  loss_fn.aux_mode = "batch"
  return loss_fn


def _gregplus_factory(config) -> LossFn:
  greg_fn = _greg_factory(config)

  def loss_fn(model, x, y, x_aux):
    return greg_fn(model, x, y, x_aux)
  loss_fn.aux_mode = "pool"
  return loss_fn


def penultimate_and_energy(model, x):
  """(L2-normalised penultimate features, energies) of the eval-mode copy of `model`, without
  gradients (stop_gradient). Does not change `model`."""
  graphdef, state = nnx.split(model)
  m = nnx.merge(graphdef, state, copy=True)
  m.eval()
  h = m.from_early(m.early(x))
  s = greg_lib.energy(m.head(h))
  h = h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-12)
  return jax.lax.stop_gradient(h), jax.lax.stop_gradient(s)


def gregplus_select(model, pool_x, key, *, batch: int, k: int, iters: int = 20,
                    return_all: bool = False):
  """GReg+ energy-based sampling: indices (batch,) into `pool_x` — per k-means cluster of the
  normalised penultimate features its lowest- and highest-energy member, then a random fill
  (`kmeans.energy_based_sample`). Traceable (used inside the jitted train step).
  With return_all=True: (idx, cluster assignment (N,), energies (N,))."""
  feats, s = penultimate_and_energy(model, pool_x)
  idx, assign = energy_based_sample(feats, s, batch, k, key, iters, with_assign=True)
  return (idx, assign, s) if return_all else idx


def aux_batch_size(config) -> int:
  aux = config.get("aux", None) or {}
  return int(aux.get("batch_size", 0) or 0) or int(config.batch_size)


def make_aux_selector(config) -> Callable | None:
  """For aux_mode "pool" losses: `select(model, pool_x, key) -> x_aux` (traceable); else None."""
  if getattr(make_loss(config), "aux_mode", None) != "pool":
    return None
  aux = config.get("aux", None) or {}
  batch = aux_batch_size(config)
  k = int(aux.get("clusters", 32))
  iters = int(aux.get("kmeans_iters", 20))
  pool = batch * int(aux.get("pool_factor", 6))
  if not 1 <= k <= batch:
    raise ValueError(f"config.aux.clusters={k} must be in [1, aux batch size {batch}]")
  if pool < batch:
    raise ValueError(f"config.aux.pool_factor must be >= 1, got {aux.get('pool_factor')}")

  def select(model, pool_x, key):
    return pool_x[gregplus_select(model, pool_x, key, batch=batch, k=k, iters=iters)]
  return select


def uses_outlier_data(config) -> bool:
  """Whether training with this config sees real (auxiliary) outlier data: GReg and GReg+ do,
  so every detector scored on such a checkpoint belongs to the outlier-data group."""
  return getattr(make_loss(config), "aux_mode", None) is not None


def aux_loader_batch_size(config) -> int:
  """Images per step the auxiliary loader yields: the aux batch, or the pool for "pool"."""
  mode = getattr(make_loss(config), "aux_mode", None)
  if mode is None:
    return 0
  aux = config.get("aux", None) or {}
  factor = int(aux.get("pool_factor", 6)) if mode == "pool" else 1
  return aux_batch_size(config) * factor


_LOSSES: dict[str, Callable[..., LossFn]] = {"ce": _ce_factory, "greg": _greg_factory,
                                              "gregplus": _gregplus_factory}


def register_loss(name: str, factory: Callable[..., LossFn]) -> None:
  _LOSSES[name] = factory


def make_loss(config) -> LossFn:
  if config.loss not in _LOSSES:
    raise ValueError(f"unknown loss {config.loss!r}; choose one of {sorted(_LOSSES)}")
  return _LOSSES[config.loss](config)
