"""GROOD's maths over arrays (METHOD.md §1): no detector, data or harness imports.

  prototypes.py   class means by true label (streamed early-layer means too), NCP prediction
  ood_sources.py  where the OOD prototype comes from: mixup (paper), noise, protomean, oodval
  loss.py         nearest-class-prototype (NCP) loss, per-sample gradients w.r.t. a prototype
                  (`prototype_grads`: one jitted vmap(grad); closed forms; `batched_grads`)
  search.py       gradient-bank nearest-neighbour scores (exact blocked search, ops.knn)

The `grood` detector (the adapter to the detector protocol) is grood_jax.detectors.grood.
"""

from grood_jax.grood.loss import (batched_grads, closed_form_grad_class, closed_form_grad_ood,
                                  ncp_logits, ncp_loss, pairwise_dists, prototype_grads)
from grood_jax.grood.ood_sources import (SOURCES, mixup_feats, noise_keep, ood_prototype,
                                         runner_up)
from grood_jax.grood.prototypes import class_means, early_class_means, nearest_prototype
from grood_jax.grood.search import bank_scores, gradient_scores, l1_scores

__all__ = ["batched_grads", "closed_form_grad_class", "closed_form_grad_ood", "ncp_logits",
           "ncp_loss", "pairwise_dists", "prototype_grads", "SOURCES", "mixup_feats",
           "noise_keep", "ood_prototype", "runner_up", "class_means", "early_class_means",
           "nearest_prototype", "bank_scores", "gradient_scores", "l1_scores"]
