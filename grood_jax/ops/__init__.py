"""Shared numerics and exact nearest-neighbour search (pure jnp; no data, detectors or harness).

  numerics  safe_norm, l2_normalize, pairwise_sq_dists, energy_score / free_energy (the sign
            named), max_softmax, affine, as_np32, HIGHEST
  knn       knn_search (blocked, memory budget), block_sizes_for_budget, put_bank /
            DeviceBank (a bank placed once for repeated searches), shard_bank,
            sharded_knn_search, ShardedBank
"""

from grood_jax.ops.knn import (DEFAULT_MEMORY_BUDGET, DeviceBank, ShardedBank,
                               block_sizes_for_budget, knn_search, put_bank, shard_bank,
                               sharded_knn_search)
from grood_jax.ops.numerics import (HIGHEST, affine, as_np32, energy_score, free_energy,
                                    l2_normalize, max_softmax, pairwise_sq_dists, safe_norm)

__all__ = ["DEFAULT_MEMORY_BUDGET", "DeviceBank", "put_bank", "ShardedBank", "block_sizes_for_budget", "knn_search",
           "shard_bank", "sharded_knn_search", "HIGHEST", "affine", "as_np32", "energy_score",
           "free_energy", "l2_normalize", "max_softmax", "pairwise_sq_dists", "safe_norm"]
