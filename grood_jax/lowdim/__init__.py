"""Low-dimensional gradient OOD detection (METHOD.md §3).

  grads     per-sample parameter gradients of logsumexp f(x), streaming train statistics
  subspace  matrix-free PCA subspace, class-mean subspace, reduced gradients z = Vᵀ g̃
  probe     BatchNorm + Linear probe on z

The detectors (`lowdim_knn`, `lowdim_msp`, `lowdim_energy`) live in grood_jax.detectors.lowdim.
"""

from grood_jax.lowdim.grads import (GradBatches, flat_params, grad_batches, grad_scale,
                                    grad_stats, normalize_grads, normalized_grads, num_params,
                                    param_grads, split_trainable, merge_trainable)
from grood_jax.lowdim.probe import probe_logits, probe_loss, train_probe
from grood_jax.lowdim.subspace import class_mean_subspace, pca_subspace, reduce_grads
