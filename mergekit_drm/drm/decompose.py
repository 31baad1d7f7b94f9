"""The joint decomposition DRM needs, by one of several exact routes.

DRM only uses the singular triplets above ``rank_tol * sigma_max``. For a stack
of N deltas (p, q) sharing the left basis, the matrix is A = [D_1 | ... | D_N]
(p x N*q). Routes:

* ``full``: ``torch.linalg.svd`` of A (the reference's route).
* ``gram``: symmetric eigendecomposition of the Gram matrix of A's short side,
  built by GEMMs without ever forming A: sum_t D_t D_t^T (p x p) when
  p <= N*q, else the N*q x N*q matrix of blocks D_s^T D_t. The other factor
  costs one GEMM per model. An SVD of an a x b matrix (a >= b) costs several
  times a*b^2 flops plus b^3-sized bidiagonal work; the Gram route costs
  N GEMMs (a*b^2) plus one b x b ``eigh``, measured 2-4x cheaper on CPU.
* ``auto``: the Gram route in the cheapest dtype that resolves the kept
  spectrum, else the full SVD.

Accuracy of the Gram route: squaring A squares its condition number. Over the
kept spectrum (sigma_j >= rank_tol * sigma_max) the relative error of sigma_j^2
is about eps * (sigma_max / sigma_j)^2 <= eps / rank_tol^2. ``auto`` builds the
Gram matrix in float32 only when that bound is small (float32 compute and
rank_tol >= ~0.01: <= 1.2e-3 on sigma^2 of the smallest kept direction, the
same order as a float32 SVD's own basis noise inside near-degenerate singular
subspaces, which dominates DRM's float32 error), in float64 when it is not,
and falls back to the full SVD when even float64 cannot resolve the cut
(rank_tol < ~1e-5, e.g. 0 = numerical rank).

No per-matrix "near the cut" retry: with dense fine-tune spectra some
singular value always lies within float32's error of the cut (measured: a
retry band of a few eps * lambda_max caught nearly every large matrix and
doubled the cost), and whether that one direction (worth rank_tol of the
largest) is kept moves the merged delta less than float32's own basis noise,
which a float32 SVD has too (see benchmarks/results/perf.md: both float32
routes differ from float64 by ~1e-3..1e-2, DRM's pruning and election being
discrete decisions).
"""

from __future__ import annotations

from typing import Literal, Optional, Tuple

import torch

SvdMode = Literal["auto", "full", "gram"]

# Largest tolerated bound on the relative error of the smallest kept sigma^2.
_GRAM_ERROR_BUDGET = {torch.float32: 2e-3, torch.float64: 1e-6}


def rank_floor(shape: Tuple[int, int], dtype: torch.dtype) -> float:
    """Smallest meaningful relative singular value for a matrix of this shape."""
    return max(shape) * torch.finfo(dtype).eps


def _rank(sigma: torch.Tensor, tol: float) -> int:
    if sigma.numel() == 0 or not bool(sigma[0] > 0):
        return 0
    return int((sigma > tol * sigma[0]).sum())


def _gram_error(dtype: torch.dtype, tol: float) -> float:
    return torch.finfo(dtype).eps / max(tol, 1e-300) ** 2


def choose_route(
    dtype: torch.dtype, tol: float, mode: SvdMode
) -> Tuple[str, Optional[torch.dtype]]:
    """(route, Gram dtype) for a compute ``dtype`` and effective relative cut."""
    if mode == "full":
        return "full", None
    if mode not in ("auto", "gram"):
        raise ValueError(f"svd must be 'auto', 'full' or 'gram', got {mode!r}")
    # `gram` asks for the Gram route accumulated in float64; `auto` may also
    # use float32. Neither is used where it cannot resolve the cut.
    if mode == "gram" or dtype == torch.float64:
        gram_dtypes = [torch.float64]
    else:
        gram_dtypes = [torch.float32, torch.float64]
    for gram_dtype in gram_dtypes:
        if _gram_error(gram_dtype, tol) <= _GRAM_ERROR_BUDGET[gram_dtype]:
            return "gram", gram_dtype
    return "full", None


def low_rank_factors(
    deltas: torch.Tensor, *, rank_tol: float, mode: SvdMode = "auto"
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factor a stack (N, p, q) as D_t = basis @ diag(sigma) @ coords[t].

    Returns ``basis`` (p, r) with orthonormal columns, ``sigma`` (r,) in
    descending order and ``coords`` (N, r, q), where the r singular values are
    those above ``max(rank_tol, max(p, N*q) * eps) * sigma_max``. ``coords``
    side by side have orthonormal rows. All in ``deltas.dtype``.
    """
    n_models, p, q = deltas.shape
    tol = max(rank_tol, rank_floor((p, n_models * q), deltas.dtype))
    route, gram_dtype = choose_route(deltas.dtype, tol, mode)
    if route == "gram":
        return _gram_factors(deltas, tol, gram_dtype)
    return _svd_factors(deltas, tol)


def _svd_factors(deltas: torch.Tensor, tol: float):
    n_models, p, q = deltas.shape
    stacked = deltas.permute(1, 0, 2).reshape(p, n_models * q)
    u, s, _ = torch.linalg.svd(stacked, full_matrices=False)
    del stacked
    r = _rank(s, tol)
    basis, sigma = u[:, :r], s[:r]
    return basis, sigma, project(deltas, basis, sigma)


def project(deltas: torch.Tensor, basis: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Coordinates diag(1/sigma) basis^T D_t of every model, one GEMM each.

    Taken from the deltas rather than from the SVD's right factor: where D_t
    is exactly zero (a column a model left unchanged) the GEMM gives exact
    zeros, where the SVD's factor holds rounding noise that DRM's
    renormalization would blow up and its disjoint mean would count.
    """
    n_models, _, q = deltas.shape
    coords = torch.empty((n_models, basis.shape[1], q), dtype=deltas.dtype, device=deltas.device)
    inv = (1.0 / sigma).to(deltas.dtype).unsqueeze(1)
    for index, delta in enumerate(deltas):
        torch.mm(basis.T, delta, out=coords[index])
        coords[index].mul_(inv)
    return coords


def _gram_factors(deltas: torch.Tensor, tol: float, gram_dtype: torch.dtype):
    """Gram route: eigendecomposition of the short side's Gram matrix."""
    n_models, p, q = deltas.shape
    dtype = deltas.dtype
    left = p <= n_models * q
    size = p if left else n_models * q
    gram = torch.zeros((size, size), dtype=gram_dtype, device=deltas.device)
    cast = [d if d.dtype == gram_dtype else d.to(gram_dtype) for d in deltas] if gram_dtype != dtype else list(deltas)
    if left:
        for d in cast:
            gram.addmm_(d, d.T)
    else:
        for s in range(n_models):
            for t in range(s, n_models):
                block = cast[s].T @ cast[t]
                gram[s * q:(s + 1) * q, t * q:(t + 1) * q] = block
                if s != t:
                    gram[t * q:(t + 1) * q, s * q:(s + 1) * q] = block.T
    del cast
    evals, evecs = torch.linalg.eigh(gram)
    del gram
    evals = evals.flip(0)
    if evals.numel() == 0 or not bool(evals[0] > 0):
        empty = deltas.new_zeros
        return empty(p, 0), empty(0), empty(n_models, 0, q)
    r = int((evals > (tol ** 2) * evals[0]).sum())
    sigma = evals[:r].sqrt()
    vecs = evecs[:, evecs.shape[1] - r:].flip(1)
    del evecs
    if left:
        basis = vecs.to(dtype)
    else:
        # U = A V diag(1/sigma), accumulated model by model.
        right = vecs.to(dtype).T.reshape(r, n_models, q)
        basis = torch.zeros((p, r), dtype=dtype, device=deltas.device)
        for index, delta in enumerate(deltas):
            basis.addmm_(delta, right[:, index, :].T)
        basis.mul_((1.0 / sigma).to(dtype).unsqueeze(0))
    sigma = sigma.to(dtype)
    return basis, sigma, project(deltas, basis, sigma)
