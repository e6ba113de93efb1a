"""grood_jax: gradient-based out-of-distribution detection in JAX/Flax.

  import grood_jax as gj
  ctx = gj.Context.from_arrays(model, x_train, y_train)      # any NNX backbone, your arrays
  det = gj.make_detector("grood")                            # or "knn", "energy", ... (gj.detector_names())
  state = det.fit(ctx)                                       # a pytree (dict of arrays)
  auroc = gj.metrics.auroc(det.score(ctx, state, ctx.split(x_test)),
                           det.score(ctx, state, ctx.split(x_ood)))

Everything is imported on first use (`import grood_jax` itself loads no JAX), so the maths
(`gj.prototype_grads`, `gj.param_grads`, `gj.knn_search`, ...) pulls in no data loaders,
detectors or plotting. The names:

  models    SmallCNN, DenseCNN, ResNet18, ResNet50, build_model, register_model, ModelFns
  features  extract_features, early_features, normalize
  detectors Context, Split, Detector, Param, make_detector, detector_names, register
  GROOD     class_means, early_class_means, ood_prototype, mixup_feats, ncp_loss,
            prototype_grads (per-sample dL/dp, one jitted vmap(grad)), batched_grads,
            closed_form_grad_ood, closed_form_grad_class, gradient_scores
  low-dim   param_grads (per-sample d logsumexp f / d theta), pca_subspace, reduce_grads
  search    knn_search, shard_bank, sharded_knn_search, block_sizes_for_budget
  devices   make_mesh, data_parallel, replicate, shard_batch
  modules   metrics, ops, parallel, grood, lowdim
  harness   score_checkpoint, ScoreOptions, train, load_model
  errors    UserError, DataError, DetectorError, CheckpointError, ConfigError, ScoringError
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_NAMES = {
    # models
    "SmallCNN": "grood_jax.models.cnn", "DenseCNN": "grood_jax.models.cnn",
    "ResNet18": "grood_jax.models.resnet", "ResNet50": "grood_jax.models.resnet",
    "build_model": "grood_jax.models", "register_model": "grood_jax.models",
    "ModelFns": "grood_jax.modelfns",
    # features
    "extract_features": ("grood_jax.features", "extract"), "early_features": "grood_jax.features",
    "normalize": "grood_jax.features",
    # detectors
    "Context": "grood_jax.detectors.base", "Split": "grood_jax.detectors.base",
    "Detector": "grood_jax.detectors.base", "Param": "grood_jax.detectors.base",
    "make_detector": "grood_jax.detectors.registry",
    "detector_names": "grood_jax.detectors.registry", "register": "grood_jax.detectors.registry",
    # GROOD
    "class_means": "grood_jax.grood.prototypes", "early_class_means": "grood_jax.grood.prototypes",
    "ood_prototype": "grood_jax.grood.ood_sources", "mixup_feats": "grood_jax.grood.ood_sources",
    "ncp_loss": "grood_jax.grood.loss", "prototype_grads": "grood_jax.grood.loss",
    "batched_grads": "grood_jax.grood.loss", "closed_form_grad_ood": "grood_jax.grood.loss",
    "closed_form_grad_class": "grood_jax.grood.loss", "gradient_scores": "grood_jax.grood.search",
    # low-dimensional gradients
    "param_grads": "grood_jax.lowdim.grads", "pca_subspace": "grood_jax.lowdim.subspace",
    "reduce_grads": "grood_jax.lowdim.subspace",
    # search
    "knn_search": "grood_jax.ops.knn", "shard_bank": "grood_jax.ops.knn",
    "sharded_knn_search": "grood_jax.ops.knn", "block_sizes_for_budget": "grood_jax.ops.knn",
    # devices
    "make_mesh": "grood_jax.parallel", "data_parallel": "grood_jax.parallel",
    "replicate": "grood_jax.parallel", "shard_batch": "grood_jax.parallel",
    # harness
    "score_checkpoint": "grood_jax.scoring", "ScoreOptions": "grood_jax.scoring",
    "train": "grood_jax.training.loop", "load_model": "grood_jax.checkpoint",
    # errors
    "UserError": "grood_jax.errors", "DataError": "grood_jax.errors",
    "DetectorError": "grood_jax.errors", "CheckpointError": "grood_jax.errors",
    "ConfigError": "grood_jax.errors", "ScoringError": "grood_jax.errors",
}
_MODULES = ("metrics", "ops", "parallel", "grood", "lowdim", "detectors", "models", "features")

__all__ = sorted([*_NAMES, *_MODULES, "__version__"])


def __getattr__(name: str):
  if name in _MODULES:
    return importlib.import_module(f"grood_jax.{name}")
  if name in _NAMES:
    where = _NAMES[name]
    module, attr = where if isinstance(where, tuple) else (where, name)
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'grood_jax' has no attribute {name!r}")


def __dir__():
  return __all__
