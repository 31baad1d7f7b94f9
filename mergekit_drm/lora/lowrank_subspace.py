"""TSV-M, Iso-C and Iso-CTS computed from LoRA factors, without any n x m delta.

Each adapter's change to a matrix, w_t * s_t * B_t @ A_t, is handed to the
methods' own kernels (``tsv_m.kernel``, ``iso.kernel``) as ``subspace.LowRank``
factors; the kernels' SVDs then run on the factors (``subspace.factored_svd``)
with the dense route's rank cut, so the result equals the dense merge of the
folded deltas up to rounding. The merged delta comes back as factors:

* TSV-M: rank <= sum_t min(k, r_t), k the per-task kept rank of the dense matrix;
* Iso-C: rank <= sum_t r_t (the rank of the summed delta);
* Iso-CTS: rank <= min(k, sum_t r_t) + sum_t min(s, r_t), k the common and s
  the per-task subspace size (each task's residual outside the common
  subspace has rank <= r_t); at the default fraction 0.8, k >= sum_t r_t for
  most matrices and the merge is Iso-C's.

A None adapter (it does not target this matrix) is an exactly-zero delta: it
counts as a task (the per-task rank shares divide by T, as in the dense
route) but adds no direction.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from mergekit_drm.decompose import SvdMode
from mergekit_drm.iso.kernel import iso_c_factors, iso_cts_factors
from mergekit_drm.lora.lowrank import Factors, LoraFactors, prepare_lowrank
from mergekit_drm.subspace import LowRank, top_triplets
from mergekit_drm.tsv_m.kernel import kept_rank, tsv_factors


def weighted_tasks(
    adapters: Sequence[Optional[LoraFactors]],
    weights: Sequence[float] | torch.Tensor | None,
    shape: Tuple[int, int],
    compute_dtype: torch.dtype | None,
    device: torch.device | str | None,
    method: str,
) -> List[LowRank]:
    """w_t * s_t * B_t @ A_t as ``LowRank`` factors (width 0 for a None adapter)."""
    dtype, weights_t, device = prepare_lowrank(adapters, weights, shape, compute_dtype, device, method=method)
    n, m = shape
    tasks = []
    for adapter, weight in zip(adapters, weights_t):
        if adapter is None:
            tasks.append(LowRank(weights_t.new_zeros(n, 0), weights_t.new_zeros(0, m)))
            continue
        left = adapter.B.to(device=device, dtype=dtype) * (adapter.scale * weight)
        tasks.append(LowRank(left, adapter.A.to(device=device, dtype=dtype)))
    return tasks


def _summed(tasks: Sequence[LowRank]) -> LowRank:
    return LowRank(torch.cat([t.left for t in tasks], dim=1), torch.cat([t.right for t in tasks], dim=0))


def _scaled(factors: Factors, scale: float) -> Factors:
    left, right = factors
    return (left * scale).contiguous(), right.contiguous()


def tsv_merge_lowrank(
    adapters: Sequence[Optional[LoraFactors]],
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    shape: Tuple[int, int],
    rank_fraction: Optional[float] = None,
    scale: float = 1.0,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    svd: SvdMode = "auto",
) -> Factors:
    """``scale`` * TSV-M of the adapters' deltas of one (n, m) matrix, as (B', A')."""
    tasks = weighted_tasks(adapters, weights, shape, compute_dtype, device, "tsv_merge_lowrank")
    k = kept_rank(shape, len(tasks), rank_fraction)
    triplets = [top_triplets(task, k) for task in tasks]
    if sum(s.numel() for _, s, _ in triplets) == 0:
        return triplets[0][0], triplets[0][2]
    return _scaled(tsv_factors(triplets, svd=svd), scale)


def iso_c_merge_lowrank(
    adapters: Sequence[Optional[LoraFactors]],
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    shape: Tuple[int, int],
    scale: float = 1.0,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    svd: SvdMode = "auto",
) -> Factors:
    """``scale`` * Iso-C of the adapters' deltas of one (n, m) matrix, as (B', A')."""
    tasks = weighted_tasks(adapters, weights, shape, compute_dtype, device, "iso_c_merge_lowrank")
    return _scaled(iso_c_factors(_summed(tasks), svd=svd), scale)


def iso_cts_merge_lowrank(
    adapters: Sequence[Optional[LoraFactors]],
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    shape: Tuple[int, int],
    common_space_fraction: float = 0.8,
    scale: float = 1.0,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    svd: SvdMode = "auto",
) -> Factors:
    """``scale`` * Iso-CTS of the adapters' deltas of one (n, m) matrix, as (B', A')."""
    tasks = weighted_tasks(adapters, weights, shape, compute_dtype, device, "iso_cts_merge_lowrank")
    factors = iso_cts_factors(_summed(tasks), tasks, common_space_fraction=common_space_fraction, svd=svd)
    return _scaled(factors, scale)
