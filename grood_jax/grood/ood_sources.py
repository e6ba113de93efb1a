"""Where GROOD's OOD prototype p_ood comes from (METHOD.md §1, step 2), chosen by name.

  mixup      targeted mix-up (the paper's own): for n_ood ID training images drawn with the
             seed, c2 = runner-up class (2nd-largest logit), z = lam*e(x) + (1-lam)*q_c2 at the
             early layer (q = early class prototypes), h = from_early(z); p_ood = mean h.
             lam is a real setting (the authors' code fixes 0.5).
  noise      blurred noise images: per consecutive batch of 100 keep the 10 with the
             lowest logsumexp of the logits; about n_ood kept (ceil(n_ood/10) batches);
             p_ood = mean of their features.
  protomean  p_ood = mean_c p_c.
  oodval     mean feature of n_ood images of an OOD *validation* set (drawn with the seed),
             never a test set.

Pure array maths over a model's pure functions (`ModelFns`): no harness objects. The `grood`
detector (grood_jax.detectors.grood) picks the arrays out of its Context and calls
`ood_prototype`. Every source returns the OOD feature rows it averaged (`info["feats"]`), so
tests and users can check them; `normalize=True` L2-normalises those rows before the mean,
like every other feature GROOD sees.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from grood_jax import parallel
from grood_jax.errors import DetectorError
from grood_jax.features import batches, early_features, map_arrays
from grood_jax.ops import l2_normalize

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


def mixup_feats(fns, params, images_u8, logits_NxC, early_protos_CxF, *, mean, std,
                lam: float = 0.5, n_ood: int = 100, seed: int = 0, batch_size: int = 256,
                early_NxF=None):
  """Penultimate features of the targeted mix-up samples: (M, D) and the details.

  `images_u8` / `logits_NxC` are the ID training images and their logits; `early_NxF` their
  flattened early features when already computed (else the M chosen images are forwarded).
  details: idx (the chosen train rows), c2 (their runner-up classes), z (M, F) the mixed
  early features that were forwarded.
  """
  if images_u8 is None:
    raise DetectorError("grood source 'mixup' needs the images of the train split (the early "
                        "map shape and the forward pass from the early layer)")
  n = len(images_u8)
  rng = np.random.default_rng(seed)
  idx = np.sort(rng.choice(n, size=min(n_ood, n), replace=False))
  c2 = runner_up(np.asarray(logits_NxC)[idx])
  bs = parallel.round_batch(min(batch_size, len(idx)))
  early_shape = fns.early_shape(params, tuple(images_u8.shape[1:]))
  if early_NxF is not None:                  # early features already cached on the split
    early_MxF = np.asarray(early_NxF, np.float32)[idx]
  else:
    early_MxF = early_features(fns, params, images_u8[idx], mean=mean, std=std,
                               batch_size=bs).astype(np.float32)

  z_MxF = np.asarray(mixup_early(jnp.asarray(early_MxF), jnp.asarray(early_protos_CxF, jnp.float32),
                                 jnp.asarray(c2), jnp.float32(lam)))
  feats = map_arrays(lambda z: fns.jit_from_early(params, z), z_MxF, batch_size=bs,
                     prepare=lambda z: z.reshape((len(z),) + early_shape))
  return feats.astype(np.float32), dict(idx=idx, c2=c2, z=z_MxF)


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


def oodval_rows(n: int, n_ood: int = 100, seed: int = 0) -> np.ndarray:
  """The rows of an OOD validation set of n images the `oodval` source averages (seeded)."""
  return np.sort(np.random.default_rng(seed).choice(n, size=min(n_ood, n), replace=False))


def ood_prototype(source: str, class_protos_CxD, *, lam: float = 0.5, n_ood: int = 100,
                  seed: int = 0, normalize: bool = False, mixup=None, noise=None, ood_val=None):
  """p_ood (D,) float32 from the named source, and info (the averaged rows and details).

  What each source needs, as keyword arguments:
    mixup    mixup=dict(fns=, params=, images_u8=, logits_NxC=, early_protos_CxF=, mean=, std=,
             batch_size=, early_NxF=None)  (the ID train split; see `mixup_feats`)
    noise    noise=(feats_NxD, logits_NxC) of the blurred noise images
    oodval   ood_val=feats_NxD of the OOD validation set
  """
  if source == "protomean":
    p = np.asarray(class_protos_CxD, np.float32).mean(axis=0)
    return p, dict(feats=None)
  if source == "mixup":
    if mixup is None or mixup.get("early_protos_CxF") is None:
      raise DetectorError("grood source 'mixup' needs the early class prototypes")
    feats, info = mixup_feats(**mixup, lam=lam, n_ood=n_ood, seed=seed)
  elif source == "noise":
    if noise is None:
      raise DetectorError("grood source 'noise' needs the blurred noise images' features")
    keep = noise_keep(noise[1], n_ood)
    feats, info = np.asarray(noise[0], np.float32)[keep], dict(idx=keep)
  elif source == "oodval":
    if ood_val is None:
      raise DetectorError("grood source 'oodval' needs an OOD validation set; it never uses a "
                          "test OOD set")
    idx = oodval_rows(len(ood_val), n_ood, seed)
    feats, info = np.asarray(ood_val, np.float32)[idx], dict(idx=idx)
  else:
    raise DetectorError(f"unknown grood source {source!r}; choose from {', '.join(SOURCES)}")
  if normalize:
    feats = np.asarray(l2_normalize(jnp.asarray(feats)))
  info["feats"] = feats
  return feats.mean(axis=0).astype(np.float32), info
