"""Iso-C and Iso-CTS (Marczak et al., "No Task Left Behind", ICML 2025, arXiv 2502.04959) on plain tensors.

Per matrix, with task deltas D_1..D_T (n x m), r = min(n, m) and the
task-arithmetic sum S = sum_t w_t D_t:

* Iso-C: SVD S = U diag(s) Vh; replace every singular value by their mean:
  merged = mean(s) * U Vh (an isotropic spectrum; the nuclear norm of S is kept).
* Iso-CTS: the common subspace is S's top k triplets, k ~ common_space_fraction
  * r; each task adds the top s_t triplets of its residual w_t D_t - U_k U_k^T
  w_t D_t (the part outside the common output subspace), with (r - k) split
  equally over the tasks. The concatenated U and Vh are orthogonalised by their
  polar factors and the spectrum made isotropic (the mean of all kept singular
  values). common_space_fraction = 1 is Iso-C.

"Every singular value" means those above the numerical-rank floor (see
``subspace``): for full-rank S this is the paper's definition; for low-rank S
(LoRA adapters) the arbitrary null-space directions are left out instead of
being lifted to the mean. Both return factors (``*_factors``), and take the
summed and per-task deltas dense or as ``subspace.LowRank`` factors, so a LoRA
merge stays low rank (Iso-C: rank <= sum of the adapters' ranks). Nothing here knows about mergekit; the adapter is ``method.py``.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

from mergekit_drm.decompose import SvdMode, rank_floor
from mergekit_drm.parameters import COMMON_SPACE_FRACTION, check, check_weights
from mergekit_drm.subspace import Matrix, Triplets, frobenius, orthogonalized_factors, outside_left, top_triplets

Factors = Tuple[torch.Tensor, torch.Tensor]


def subspace_sizes(r: int, n_tasks: int, common_space_fraction: float) -> Tuple[int, int]:
    """(common k, per-task s) with k + T*s = r, k ~ fraction * r.

    As the authors' code: k0 = floor(fraction * r); s = round((r - k0) / T) so
    the task-specific part divides equally; k = r - T*s. Here s is also capped
    at floor(r / T) so that k is never negative.
    """
    check(COMMON_SPACE_FRACTION, "common_space_fraction", common_space_fraction)
    k0 = int(math.floor(common_space_fraction * r + 1e-9))
    per_task = min(round((r - k0) / n_tasks), r // n_tasks)
    return r - n_tasks * per_task, per_task


def iso_c_factors(total: Matrix, *, svd: SvdMode = "auto") -> Factors:
    """Iso-C of the summed delta ``total`` as factors (mean(s) U, Vh)."""
    u, s, vh = top_triplets(total, svd=svd)
    if s.numel() == 0:
        return u, vh
    return u * s.mean(), vh


def iso_cts_factors(
    total: Matrix,
    deltas: Sequence[Matrix],
    *,
    common_space_fraction: float = 0.8,
    svd: SvdMode = "auto",
) -> Factors:
    """Iso-CTS as factors; ``deltas`` are the weighted task vectors summing to ``total``."""
    n, m = total.shape
    k, per_task = subspace_sizes(min(n, m), len(deltas), common_space_fraction)
    common_u, common_s, common_vh = top_triplets(total, k, svd=svd)
    parts: list[Triplets] = [(common_u, common_s, common_vh)]
    if per_task > 0:
        floor = rank_floor((n, m), total.dtype)
        for delta in deltas:
            u, s, vh = top_triplets(outside_left(delta, common_u), per_task, svd=svd)
            # The residual's rank cut is relative to the task vector itself: a
            # residual that is rounding noise (the task lies inside the common
            # subspace, as low-rank adapters do) must add nothing, while its own
            # largest singular value would let every noise direction through.
            keep = int((s > floor * frobenius(delta)).sum())
            parts.append((u[:, :keep], s[:keep], vh[:keep]))
    sigma = torch.cat([s for _, s, _ in parts])
    if sigma.numel() == 0:
        return common_u, common_vh
    us = torch.cat([u for u, _, _ in parts], dim=1)
    vhs = torch.cat([vh for _, _, vh in parts], dim=0)
    return orthogonalized_factors(us, torch.full_like(sigma, float(sigma.mean())), vhs, svd=svd)


class _Weighted(Sequence):
    """The weighted task vectors w_t * D_t in the compute dtype, made on access.

    Iso-CTS visits them one at a time, so N weighted copies never exist at once.
    """

    def __init__(self, deltas, weights, compute_dtype):
        self.deltas, self.weights, self.dtype = deltas, weights, compute_dtype

    def __len__(self):
        return len(self.deltas)

    def __getitem__(self, index):
        return self.deltas[index].to(self.dtype) * self.weights[index]

    def total(self) -> torch.Tensor:
        """sum_t w_t D_t by row blocks: the same sums as stacking the N weighted
        copies (bit for bit: a sum over the models, block by block), without them."""
        n, m = self.deltas[0].shape
        out = torch.empty((n, m), dtype=self.dtype, device=self.deltas[0].device)
        rows = max(1, _BLOCK // max(m, 1))
        for start in range(0, n, rows):
            out[start:start + rows] = torch.stack([
                d[start:start + rows].to(self.dtype) * w for d, w in zip(self.deltas, self.weights)
            ]).sum(0)
        return out


_BLOCK = 1 << 18  # entries per model in one block of the weighted sum


def _weighted(deltas, weights, compute_dtype) -> _Weighted:
    deltas = list(deltas)
    if not deltas:
        raise ValueError("at least one delta is needed")
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    check_weights(weights, len(deltas))
    if deltas[0].dim() != 2:
        raise ValueError(f"Iso-C/Iso-CTS merge matrices, got a tensor of shape {tuple(deltas[0].shape)}")
    return _Weighted(deltas, weights, compute_dtype)


def iso_c_merge_matrix(
    deltas: Sequence[torch.Tensor] | torch.Tensor,
    weights: Sequence[float] | None = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
    svd: SvdMode = "auto",
) -> torch.Tensor:
    """Merge T task vectors of one matrix with Iso-C; returns the merged delta."""
    weighted = _weighted(deltas, weights, compute_dtype)
    left, right = iso_c_factors(weighted.total(), svd=svd)
    return left @ right


def iso_cts_merge_matrix(
    deltas: Sequence[torch.Tensor] | torch.Tensor,
    weights: Sequence[float] | None = None,
    *,
    common_space_fraction: float = 0.8,
    compute_dtype: torch.dtype = torch.float32,
    svd: SvdMode = "auto",
) -> torch.Tensor:
    """Merge T task vectors of one matrix with Iso-CTS; returns the merged delta."""
    weighted = _weighted(deltas, weights, compute_dtype)
    left, right = iso_cts_factors(
        weighted.total(), weighted,
        common_space_fraction=common_space_fraction, svd=svd,
    )
    return left @ right
