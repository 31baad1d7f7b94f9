"""The joint decomposition DRM needs, by one of several exact routes.

DRM only uses the singular triplets above ``rank_tol * sigma_max``. For a stack
of N deltas (p, q) sharing the left basis, the matrix is A = [D_1 | ... | D_N]
(p x N*q). Routes:

* ``full``: ``torch.linalg.svd`` of A (the reference's route).
* ``gram``: eigendecomposition of the p x p Gram matrix sum_t D_t D_t^T,
  accumulated in float64, then the coordinates by one GEMM per model. Squaring
  the matrix squares its condition number, which float64 absorbs for the
  singular values DRM keeps (>= 1% of the largest by default).
"""

from __future__ import annotations

from typing import Literal, Tuple

import torch

SvdMode = Literal["auto", "full", "gram"]


def rank_floor(shape: Tuple[int, int], dtype: torch.dtype) -> float:
    """Smallest meaningful relative singular value for a matrix of this shape."""
    return max(shape) * torch.finfo(dtype).eps


def _rank(sigma: torch.Tensor, rank_tol: float, floor: float) -> int:
    if sigma.numel() == 0 or not bool(sigma[0] > 0):
        return 0
    cut = max(rank_tol, floor) * sigma[0]
    return int((sigma > cut).sum())


def low_rank_factors(
    deltas: torch.Tensor, *, rank_tol: float, mode: SvdMode = "full"
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factor a stack (N, p, q) as D_t = basis @ diag(sigma) @ coords[t].

    Returns ``basis`` (p, r) with orthonormal columns, ``sigma`` (r,) in
    descending order and ``coords`` (N, r, q), where the r singular values are
    those above ``max(rank_tol, max(p, N*q) * eps) * sigma_max``. ``coords``
    stacked side by side have orthonormal rows.
    """
    n_models, p, q = deltas.shape
    floor = rank_floor((p, n_models * q), deltas.dtype)
    if mode == "auto":
        mode = "full"
    if mode == "gram":
        return _gram_factors(deltas, rank_tol, floor)
    if mode != "full":
        raise ValueError(f"svd must be 'auto', 'full' or 'gram', got {mode!r}")
    stacked = deltas.permute(1, 0, 2).reshape(p, n_models * q)
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    del stacked
    r = _rank(s, rank_tol, floor)
    coords = vh[:r].reshape(r, n_models, q).permute(1, 0, 2)
    return u[:, :r], s[:r], coords


def _gram_factors(
    deltas: torch.Tensor, rank_tol: float, floor: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_models, p, q = deltas.shape
    gram = torch.zeros((p, p), dtype=torch.float64, device=deltas.device)
    for delta in deltas:
        d64 = delta.to(torch.float64)
        gram.addmm_(d64, d64.T)
    del d64
    evals, evecs = torch.linalg.eigh(gram)
    del gram
    sigma = evals.flip(0).clamp_min(0).sqrt()
    r = _rank(sigma, rank_tol, floor)
    basis = evecs.flip(1)[:, :r].to(deltas.dtype)
    sigma = sigma[:r]
    coords = torch.empty((n_models, r, q), dtype=deltas.dtype, device=deltas.device)
    inv = (1.0 / sigma).to(deltas.dtype).unsqueeze(1)
    for index, delta in enumerate(deltas):
        torch.mm(basis.T, delta, out=coords[index])
        coords[index].mul_(inv)
    return basis, sigma.to(deltas.dtype), coords
