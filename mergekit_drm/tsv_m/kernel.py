"""TSV-M (Gargiulo et al., "Task Singular Vectors", CVPR 2025, arXiv 2412.00081) on plain tensors.

Per matrix, with task deltas D_1..D_T (n x m) and r = min(n, m):

1. keep the top k singular triplets of each w_t * D_t, k = floor(rank_fraction * r)
   (paper: rank_fraction = 1/T, each task gets an equal share of the rank);
2. concatenate U = [U_1 .. U_T] (n x Tk), s = [s_1 .. s_T], Vh = [Vh_1; ..; Vh_T];
3. replace U and Vh^T by their polar factors (nearest orthonormal sets), which
   removes the overlap between the tasks' singular subspaces;
4. merged delta = polar(U) diag(s) polar(Vh^T)^T.

The merge is computed as factors (``tsv_factors``): its rank is at most T*k,
which is what lets a LoRA merge stay a LoRA adapter. Nothing here knows about
mergekit; the adapter is ``method.py``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from mergekit_drm.decompose import SvdMode
from mergekit_drm.parameters import RANK_FRACTION, check, check_weights
from mergekit_drm.subspace import Triplets, orthogonalized_factors, truncated_svd


def kept_rank(shape: Tuple[int, int], n_tasks: int, rank_fraction: Optional[float]) -> int:
    """Singular triplets kept per task: floor(fraction * min(shape)), at least 1.

    The default (None) is the paper's 1/T, computed in integers (r // T).
    """
    r = min(shape)
    if rank_fraction is None:
        return max(1, r // n_tasks)
    check(RANK_FRACTION, "rank_fraction", rank_fraction)
    return max(1, int(math.floor(rank_fraction * r + 1e-9)))


def tsv_factors(triplets: Sequence[Triplets], *, svd: SvdMode = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-4 from each task's kept triplets; returns (L n x c, R c x m), merged = L @ R."""
    us = torch.cat([u for u, _, _ in triplets], dim=1)
    sigma = torch.cat([s for _, s, _ in triplets])
    vhs = torch.cat([vh for _, _, vh in triplets], dim=0)
    return orthogonalized_factors(us, sigma, vhs, svd=svd)


def tsv_merge_matrix(
    deltas: Sequence[torch.Tensor] | torch.Tensor,
    weights: Sequence[float] | None = None,
    *,
    rank_fraction: Optional[float] = None,
    compute_dtype: torch.dtype = torch.float32,
    svd: SvdMode = "auto",
) -> torch.Tensor:
    """Merge T task vectors of one (n, m) matrix with TSV-M; returns the merged delta.

    ``weights`` multiply each task vector before its SVD (default 1: the paper).
    """
    stack = [d.to(compute_dtype) for d in deltas]
    if not stack:
        raise ValueError("at least one delta is needed")
    n_tasks = len(stack)
    weights = [1.0] * n_tasks if weights is None else list(weights)
    check_weights(weights, n_tasks)
    shape = tuple(stack[0].shape)
    if len(shape) != 2:
        raise ValueError(f"TSV-M merges matrices, got a tensor of shape {shape}")
    k = kept_rank(shape, n_tasks, rank_fraction)
    triplets = [
        truncated_svd(delta * weight, k, svd=svd)
        for delta, weight in zip(stack, weights)
        if weight != 0
    ]
    if not triplets or sum(s.numel() for _, s, _ in triplets) == 0:
        return stack[0].new_zeros(shape)
    left, right = tsv_factors(triplets, svd=svd)
    return left @ right
