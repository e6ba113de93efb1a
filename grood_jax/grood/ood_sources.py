"""Where GROOD's OOD prototype p_ood comes from (METHOD.md §1, step 2), chosen by name.

  mixup      targeted mix-up (the paper's own): for n_ood ID training images drawn with the
             seed, c2 = runner-up class (2nd-largest logit), z = lam*e(x) + (1-lam)*q_c2 at the
             early layer (q = early class prototypes), h = from_early(z); p_ood = mean h.
             lam is a real setting (the authors' code fixes 0.5).
  noise      blurred noise images (the Context's noise split, ours: blurred and stretched
             to 0..255, then normalised like ID images): per consecutive batch of 100 keep
             the 10 with the lowest logsumexp of the logits; about n_ood kept
             (ceil(n_ood/10) batches); p_ood = mean of their features.
  noise_ref  the noise as the reference builds it (`noise_ref_images`): ceil(n_ood/100)
             batches of 100 images of uniform [0, 1) noise, NOT normalised (fed to the model
             as they are), blurred with a 5 (wide) x 7 (high) Gaussian kernel with one sigma
             ~ U(0.2, 5) per batch (reflect padding, torchvision's GaussianBlur), generated
             from the seed; per batch keep the 10 with the lowest logsumexp. At n_ood = 100
             that is 10 rows (the reference's count).
  protomean  p_ood = mean_c p_c.
  oodval     mean feature of n_ood images of an OOD *validation* set (drawn with the seed),
             never a test set.

Several sources ("mixup+noise"): their rows are pooled and p_ood is the mean of all of them
(the reference's running mean over every update: sources weigh by their row counts);
`protomean` contributes its C class prototypes as C rows. (In the reference `use_proto_mean`
overwrites the others; we pool instead.)

filter_ood (`filter_far`, the reference's `filter_ood_samples`): within each chunk of rows,
m_i = min_c ||f_i - p_c|| (Euclidean, to every class prototype); keep rows with
m_i > quantile(m, 0.8) (linear interpolation, strict >), and when fewer than 2 pass, the
min(2, n) rows of largest m_i. Chunks follow the reference's update calls: one per noise
batch of 100 (its <= 10 kept rows) for noise / noise_ref, all n_ood rows at once for mixup
and oodval (the reference filters per loader batch, one batch at its n = 100). protomean
rows are not filtered.

The mix-up layer: `layer=None` (or the model's first split point) is `fns.early` /
`fns.from_early`, exactly as before; another named split point (`fns.split_points`) mixes
there with class means of that layer's maps.

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
from grood_jax.features import batches, early_features, map_arrays, map_batched
from grood_jax.ops import l2_normalize

SOURCES = ("mixup", "noise", "noise_ref", "protomean", "oodval")
NOISE_BATCH, NOISE_KEEP = 100, 10
REF_BLUR_KERNEL = (5, 7)             # torchvision (kx, ky): 5 wide, 7 high
REF_BLUR_SIGMA = (0.2, 5.0)
FILTER_QUANTILE, FILTER_MIN_KEEP = 0.8, 2


def parse_sources(source: str) -> tuple:
  """"mixup+noise" -> ("mixup", "noise"); DetectorError on an unknown or repeated name."""
  parts = tuple(source.split("+"))
  bad = [s for s in parts if s not in SOURCES]
  if bad or not parts:
    raise DetectorError(f"unknown grood source {source!r}; choose from {', '.join(SOURCES)} "
                        "or several joined by '+' (e.g. mixup+noise)")
  if len(set(parts)) != len(parts):
    raise DetectorError(f"grood source {source!r} names a source twice")
  return parts


def filter_far(feats_NxD, class_protos_CxD, quantile: float = FILTER_QUANTILE,
               min_keep: int = FILTER_MIN_KEEP) -> np.ndarray:
  """Rows kept by the reference's filter_ood: min distance to every class prototype above its
  `quantile`; at least min(min_keep, N) rows (the farthest). Sorted row indices."""
  f = np.asarray(feats_NxD, np.float64)
  if len(f) == 0:
    return np.zeros((0,), np.int64)
  p = np.asarray(class_protos_CxD, np.float64)
  d = np.sqrt(np.maximum(((f[:, None, :] - p[None]) ** 2).sum(-1), 0.0)).min(axis=1)
  keep = np.flatnonzero(d > np.quantile(d, quantile))
  if len(keep) < min_keep:
    keep = np.argsort(-d, kind="stable")[:min(min_keep, len(d))]
  return np.sort(keep)


def _blur_kernel_1d(size: int, sigma: float) -> np.ndarray:
  x = np.linspace(-(size - 1) / 2.0, (size - 1) / 2.0, size)
  k = np.exp(-0.5 * (x / sigma) ** 2)
  return (k / k.sum()).astype(np.float32)


def gaussian_blur_ref(images_BxHxWxC, sigma: float, kernel=REF_BLUR_KERNEL) -> np.ndarray:
  """torchvision's gaussian_blur: separable kernel (kx wide, ky high), reflect padding."""
  kx, ky = kernel
  x = np.asarray(images_BxHxWxC, np.float32)
  x = np.pad(x, ((0, 0), (ky // 2, ky // 2), (kx // 2, kx // 2), (0, 0)), mode="reflect")
  wx, wy = _blur_kernel_1d(kx, sigma), _blur_kernel_1d(ky, sigma)
  h, w = x.shape[1] - 2 * (ky // 2), x.shape[2] - 2 * (kx // 2)
  x = sum(wy[i] * x[:, i:i + h] for i in range(ky))
  x = sum(wx[j] * x[:, :, j:j + w] for j in range(kx))
  return x.astype(np.float32)


def noise_ref_images(n_ood: int, image_shape: tuple, seed: int = 0):
  """The reference's noise images: ceil(n_ood / 100) batches of 100 uniform [0, 1) images
  (float32, not normalised), each batch blurred with one sigma ~ U(0.2, 5). Returns
  (images (B*100, H, W, C), sigmas (B,))."""
  rng = np.random.default_rng(seed)
  n_batches = -(-int(n_ood) // NOISE_BATCH)
  imgs, sigmas = [], []
  for _ in range(n_batches):
    sigma = float(rng.uniform(*REF_BLUR_SIGMA))
    x = rng.random((NOISE_BATCH,) + tuple(image_shape), dtype=np.float32)
    imgs.append(gaussian_blur_ref(x, sigma))
    sigmas.append(sigma)
  return np.concatenate(imgs), np.asarray(sigmas)


def noise_ref_keep(logits_NxC) -> np.ndarray:
  """Per consecutive batch of 100 rows, the 10 with the lowest logsumexp (sorted indices)."""
  lse = np.asarray(jax.nn.logsumexp(jnp.asarray(logits_NxC, jnp.float32), axis=-1))
  keep = [start + np.argsort(lse[start:stop], kind="stable")[:NOISE_KEEP]
          for start, stop in batches(len(lse), NOISE_BATCH)]
  return np.sort(np.concatenate(keep))


def noise_ref_feats(fns, params, image_shape, *, n_ood: int = 100, seed: int = 0,
                    batch_size: int = 256):
  """Features of the kept reference noise images: (M, D), and details (images' sigmas, idx,
  the logits of all images). The images enter the model unnormalised, as in the reference."""
  images, sigmas = noise_ref_images(n_ood, image_shape, seed)
  bs = parallel.round_batch(min(batch_size, len(images)))
  out = map_arrays(lambda x: fns.jit_forward(params, x)[1:], images, batch_size=bs)
  feats, logits = (np.asarray(a, np.float32) for a in out)
  keep = noise_ref_keep(logits)
  return feats[keep], dict(idx=keep, sigmas=sigmas, logits=logits, all_feats=feats)


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
                early_NxF=None, layer: str | None = None):
  """Penultimate features of the targeted mix-up samples: (M, D) and the details.

  `images_u8` / `logits_NxC` are the ID training images and their logits; `early_NxF` their
  flattened early features when already computed (else the M chosen images are forwarded).
  `layer`: a named split point (fns.split_points) to mix at instead of the early layer; then
  `early_protos_CxF` are that layer's class means and `early_NxF` is ignored.
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
  if layer is not None and fns.resolve_split(layer) == fns.split_points[0]:
    layer = None                             # the early layer: today's path, same numbers
  if layer is not None:
    early_shape = fns.split_shape(params, layer, tuple(images_u8.shape[1:]))
    early_MxF = map_batched(lambda x: fns.jit_features_flat(layer)(params, x), images_u8[idx],
                            mean=mean, std=std, batch_size=bs).astype(np.float32)
    forward = fns.jit_forward_from(layer)
  else:
    early_shape = fns.early_shape(params, tuple(images_u8.shape[1:]))
    forward = fns.jit_from_early
    if early_NxF is not None:                  # early features already cached on the split
      early_MxF = np.asarray(early_NxF, np.float32)[idx]
    else:
      early_MxF = early_features(fns, params, images_u8[idx], mean=mean, std=std,
                                 batch_size=bs).astype(np.float32)

  z_MxF = np.asarray(mixup_early(jnp.asarray(early_MxF), jnp.asarray(early_protos_CxF, jnp.float32),
                                 jnp.asarray(c2), jnp.float32(lam)))
  feats = map_arrays(lambda z: forward(params, z), z_MxF, batch_size=bs,
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
                  seed: int = 0, normalize: bool = False, mixup=None, noise=None, ood_val=None,
                  noise_ref=None, filter_ood: bool = False,
                  filter_quantile: float = FILTER_QUANTILE):
  """p_ood (D,) float32 from the named source(s), and info (the averaged rows and details).

  `source` is one name or several joined by '+' (rows pooled, see the module docstring).
  What each source needs, as keyword arguments:
    mixup      mixup=dict(fns=, params=, images_u8=, logits_NxC=, early_protos_CxF=, mean=,
               std=, batch_size=, early_NxF=None, layer=None)  (the ID train split; `mixup_feats`)
    noise      noise=(feats_NxD, logits_NxC) of the blurred noise images
    noise_ref  noise_ref=dict(fns=, params=, image_shape=, batch_size=)  (`noise_ref_feats`)
    oodval     ood_val=feats_NxD of the OOD validation set
  info: feats (the pooled rows, after normalisation and filtering), and per source its own
  details under info["sources"][name] (with "feats", "chunks" and, filtered, "kept").
  """
  names = parse_sources(source)
  rows, per = [], {}
  for name in names:
    feats, info, chunks = _source_rows(name, class_protos_CxD, lam=lam, n_ood=n_ood, seed=seed,
                                       mixup=mixup, noise=noise, ood_val=ood_val,
                                       noise_ref=noise_ref)
    if normalize and name != "protomean":
      feats = np.asarray(l2_normalize(jnp.asarray(feats)))
    info["chunks"] = chunks
    if filter_ood and name != "protomean":
      kept = np.concatenate([c[filter_far(feats[c], class_protos_CxD, filter_quantile)]
                             for c in chunks])
      info["kept"] = kept
      feats = feats[kept]
    info["feats"] = feats
    per[name] = info
    rows.append(np.asarray(feats, np.float32))
  if len(names) == 1:
    info = dict(per[names[0]])
  else:
    info = dict(sources=per)
  info["sources"] = per
  feats = rows[0] if len(rows) == 1 else np.concatenate(rows, axis=0)
  info["feats"] = feats
  return feats.mean(axis=0).astype(np.float32), info


def _source_rows(name, class_protos_CxD, *, lam, n_ood, seed, mixup, noise, ood_val,
                 noise_ref):
  """One source's rows (M, D), its details and its filter chunks (lists of row indices)."""
  if name == "protomean":
    p = np.asarray(class_protos_CxD, np.float32)
    return p, dict(), [np.arange(len(p))]
  if name == "mixup":
    if mixup is None or mixup.get("early_protos_CxF") is None:
      raise DetectorError("grood source 'mixup' needs the early class prototypes")
    feats, info = mixup_feats(**mixup, lam=lam, n_ood=n_ood, seed=seed)
    return feats, info, [np.arange(len(feats))]
  if name == "noise":
    if noise is None:
      raise DetectorError("grood source 'noise' needs the blurred noise images' features")
    keep = noise_keep(noise[1], n_ood)
    feats = np.asarray(noise[0], np.float32)[keep]
    return feats, dict(idx=keep), _chunks_by_batch(keep)
  if name == "noise_ref":
    if noise_ref is None:
      raise DetectorError("grood source 'noise_ref' needs the model (fns, params) and the image "
                          "shape to generate the reference's noise images")
    feats, info = noise_ref_feats(**noise_ref, n_ood=n_ood, seed=seed)
    return feats, info, _chunks_by_batch(info["idx"])
  if name == "oodval":
    if ood_val is None:
      raise DetectorError("grood source 'oodval' needs an OOD validation set; it never uses a "
                          "test OOD set")
    idx = oodval_rows(len(ood_val), n_ood, seed)
    feats = np.asarray(ood_val, np.float32)[idx]
    return feats, dict(idx=idx), [np.arange(len(feats))]
  raise DetectorError(f"unknown grood source {name!r}; choose from {', '.join(SOURCES)}")


def _chunks_by_batch(idx) -> list:
  """Positions of the kept rows grouped by their noise batch of 100 (the filter's chunks)."""
  b = np.asarray(idx) // NOISE_BATCH
  return [np.flatnonzero(b == v) for v in np.unique(b)]
