"""What several detector adapters need from the harness's `Context` / `Split`:

- `head_affine(ctx)`: the final layer of any backbone as (W_CxD, b_C), read off `fns.head`.
- `require_labels(split, who)`: the true labels of a split, or a DetectorError naming who needs them.

The numerics (energy, softmax, L2 normalisation, kNN search) live in `grood_jax.ops`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from grood_jax.detectors.base import Context, DetectorError, Split


def require_labels(split: Split, who: str) -> np.ndarray:
  if split.labels is None:
    raise DetectorError(f"{who} needs the true labels of {split.name!r}")
  return np.asarray(split.labels, np.int32)


def head_affine(ctx: Context, who: str = "detector") -> tuple[np.ndarray, np.ndarray]:
  """The final layer as numpy float32 (W_CxD, b_C), so that f = W h + b.

  Read off `ctx.fns.head` (b = head(0), rows of W from head(e_i) - b), so it works for any
  backbone whose head is affine, whatever its parameter layout (a flax kernel is (D, C)).
  Checked on a few training features; a non-affine head raises DetectorError.
  """
  d = int(ctx.train.feats.shape[1])
  with jax.default_matmul_precision("highest"):
    b_C = np.asarray(ctx.fns.head(ctx.params, jnp.zeros((1, d), jnp.float32)), np.float64)[0]
    w_DxC = np.asarray(ctx.fns.head(ctx.params, jnp.eye(d, dtype=jnp.float32)),
                       np.float64) - b_C
    h = jnp.asarray(ctx.train.feats[:8], jnp.float32)
    f = np.asarray(ctx.fns.head(ctx.params, h), np.float64)
  f_lin = np.asarray(h, np.float64) @ w_DxC + b_C
  scale = max(1.0, float(np.abs(f).max()))
  if not np.allclose(f, f_lin, rtol=1e-3, atol=1e-3 * scale):
    raise DetectorError(f"{who} needs an affine final layer f = W h + b; this model's head is "
                        "not affine")
  return w_DxC.T.astype(np.float32), b_C.astype(np.float32)
