"""Where GROOD's OOD prototype p_ood comes from (METHOD.md §1, step 2), chosen by name.

  mixup      targeted mix-up (the paper's own): for n_ood ID training images drawn with the
             seed, c2 = runner-up class (2nd-largest logit), z = lam*e(x) + (1-lam)*q_c2 at the
             early layer (q = early class prototypes), h = from_early(z); p_ood = mean h.
             lam is a real setting (the authors' code fixes 0.5).
  noise      ctx.noise (blurred noise): per consecutive batch of 100 keep the 10 with the
             lowest logsumexp of the logits; about n_ood kept (ceil(n_ood/10) batches);
             p_ood = mean of their features.
  protomean  p_ood = mean_c p_c.
  oodval     mean feature of n_ood images of ctx.ood_val (drawn with the seed); ctx.ood_val is
             the OOD *validation* set, never a test set.

Every source returns the OOD feature rows it averaged (`info["feats"]`), so tests and users can
check them; `normalize=True` L2-normalises those rows before the mean, like every other
feature GROOD sees.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from grood_jax.detectors.base import DetectorError
from grood_jax import parallel
from grood_jax.features import batches, pad_batch
from grood_jax.grood.loss import normalize_feats

SOURCES = ("mixup", "noise", "protomean", "oodval")
NOISE_BATCH, NOISE_KEEP = 100, 10


@jax.jit
def mixup_early(early_MxF, early_protos_CxF, c2_M, lam):
  """z = lam * e(x) + (1 - lam) * q_{c2}: (M, F)."""
  return lam * early_MxF + (1.0 - lam) * early_protos_CxF[c2_M]


def runner_up(logits_NxC) -> np.ndarray:
  """Index of the 2nd-largest logit of each row: (N,) int32."""
  _, top2 = jax.lax.top_k(jnp.asarray(logits_NxC, jnp.float32), 2)
  return np.asarray(top2[:, 1], np.int32)


def mixup_feats(ctx, early_protos_CxF, *, lam: float = 0.5, n_ood: int = 100, seed: int = 0):
  """Penultimate features of the targeted mix-up samples: (M, D) and the details.

  details: idx (the chosen train rows), c2 (their runner-up classes), z (M, F) the mixed
  early features that were forwarded.
  """
  train = ctx.train
  n = len(train)
  rng = np.random.default_rng(seed)
  idx = np.sort(rng.choice(n, size=min(n_ood, n), replace=False))
  c2 = runner_up(np.asarray(train.logits)[idx])
  params, fns = ctx.params, ctx.fns
  bs = parallel.round_batch(min(ctx.batch_size, len(idx)))

  if train.images is None:
    raise DetectorError("grood source 'mixup' needs the images of the train split (the early "
                        "map shape and the forward pass from the early layer)")
  x0 = jax.ShapeDtypeStruct((1,) + tuple(train.images.shape[1:]), jnp.float32)
  early_shape = tuple(jax.eval_shape(lambda x: fns.early(params, x), x0).shape[1:])
  if train.early is not None:                # early features already cached on the split
    early_MxF = np.asarray(train.early, np.float32)[idx]
  else:
    from grood_jax.data.base import normalize
    early_fn = jax.jit(lambda x: fns.early(params, x).reshape(x.shape[0], -1))
    parts = []
    for start, stop in batches(len(idx), bs):
      xb = normalize(pad_batch(train.images[idx[start:stop]], bs), ctx.mean, ctx.std)
      parts.append(np.asarray(early_fn(parallel.put_batch(xb)))[:stop - start])
    early_MxF = np.concatenate(parts).astype(np.float32)

  z_MxF = np.asarray(mixup_early(jnp.asarray(early_MxF), jnp.asarray(early_protos_CxF, jnp.float32),
                                 jnp.asarray(c2), jnp.float32(lam)))
  feats = []
  for start, stop in batches(len(idx), bs):
    zb = pad_batch(z_MxF[start:stop], bs).reshape((bs,) + early_shape)
    feats.append(np.asarray(fns.jit_from_early(params, parallel.put_batch(zb)))[:stop - start])
  return np.concatenate(feats).astype(np.float32), dict(idx=idx, c2=c2, z=z_MxF)


def noise_keep(logits_NxC, n_ood: int = 100) -> np.ndarray:
  """Rows of the noise set GROOD keeps: per consecutive batch of 100, the 10 with the lowest
  logsumexp (least ID-like); ceil(n_ood / 10) batches (fewer if the set is smaller). A last
  partial batch of m rows keeps ceil(m / 10). Returns sorted row indices."""
  logits_NxC = np.asarray(logits_NxC, np.float32)
  n_use = min(len(logits_NxC), -(-n_ood // NOISE_KEEP) * NOISE_BATCH)
  lse = np.asarray(jax.nn.logsumexp(jnp.asarray(logits_NxC[:n_use]), axis=-1))
  keep = []
  for start, stop in batches(n_use, NOISE_BATCH):
    m = -(-(stop - start) * NOISE_KEEP // NOISE_BATCH)
    keep.append(start + np.argsort(lse[start:stop], kind="stable")[:m])
  return np.sort(np.concatenate(keep))


def ood_prototype(source: str, ctx, class_protos_CxD, early_protos_CxF=None, *, lam: float = 0.5,
                  n_ood: int = 100, seed: int = 0, normalize: bool = False):
  """p_ood (D,) float32 from the named source, and info (the averaged rows and details)."""
  if source == "protomean":
    p = np.asarray(class_protos_CxD, np.float32).mean(axis=0)
    return p, dict(feats=None)
  if source == "mixup":
    if early_protos_CxF is None:
      raise DetectorError("grood source 'mixup' needs the early class prototypes")
    feats, info = mixup_feats(ctx, early_protos_CxF, lam=lam, n_ood=n_ood, seed=seed)
  elif source == "noise":
    if ctx.noise is None:
      raise DetectorError("grood source 'noise' needs ctx.noise (blurred noise images' features)")
    keep = noise_keep(ctx.noise.logits, n_ood)
    feats, info = np.asarray(ctx.noise.feats, np.float32)[keep], dict(idx=keep)
  elif source == "oodval":
    if ctx.ood_val is None:
      raise DetectorError("grood source 'oodval' needs an OOD validation set (ctx.ood_val); "
                          "it never uses a test OOD set")
    n = len(ctx.ood_val)
    idx = np.sort(np.random.default_rng(seed).choice(n, size=min(n_ood, n), replace=False))
    feats, info = np.asarray(ctx.ood_val.feats, np.float32)[idx], dict(idx=idx)
  else:
    raise DetectorError(f"unknown grood source {source!r}; choose from {', '.join(SOURCES)}")
  if normalize:
    feats = np.asarray(normalize_feats(jnp.asarray(feats)))
  info["feats"] = feats
  return feats.mean(axis=0).astype(np.float32), info
