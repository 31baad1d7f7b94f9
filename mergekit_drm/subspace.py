"""Truncated SVDs and polar factors for the subspace methods (TSV-M, Iso-C/CTS).

Plain tensors only. Both operations go through the shared decomposition
routes of ``decompose.low_rank_factors`` (float64 Gram on either side, or the
full SVD, picked by cost), applied to a stack of one matrix.

Singular values at or below the numerical-rank floor of the compute dtype
(``decompose.rank_floor``: max(shape) * eps relative to the largest) are
treated as zero and their singular vectors are not returned: for a low-rank
delta (a LoRA adapter, a sum of a few of them) the SVD's vectors for zero
singular values are arbitrary, and both methods would otherwise give them
full weight (TSV-M in its orthogonalisation, Iso-C by lifting them to the
mean singular value).

A matrix may also be given as ``LowRank`` factors (a LoRA adapter's delta, a
sum of them): its SVD then comes from the factors (QRs and a small core SVD),
cut by the same rule, and the n x m product is never formed. The methods'
kernels call ``top_triplets``, ``frobenius`` and ``outside_left`` so one code
path serves dense and factored task vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from mergekit_drm.decompose import SvdMode, low_rank_factors, rank_cut

Triplets = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # U (p, r), s (r,), Vh (r, q)


def truncated_svd(matrix: torch.Tensor, k: Optional[int] = None, *, svd: SvdMode = "auto") -> Triplets:
    """Top-``k`` singular triplets of ``matrix`` (all above the rank floor if k is None).

    Returns fewer than ``k`` when the numerical rank is smaller. Under ``auto``
    a matrix whose numerical rank (or ``k``) is small against its width takes
    the certified range finder (``decompose``, ``rangefinder``), O(p q k).
    """
    basis, sigma, coords = low_rank_factors(matrix.unsqueeze(0), rank_tol=0.0, mode=svd, max_rank=k)
    return basis, sigma, coords[0]


@dataclass(frozen=True)
class LowRank:
    """The p x q matrix ``left @ right`` (p x c, c x q), kept as its factors."""

    left: torch.Tensor
    right: torch.Tensor

    @property
    def shape(self) -> Tuple[int, int]:
        return self.left.shape[0], self.right.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.left.dtype


Matrix = Union[torch.Tensor, LowRank]


def factored_svd(matrix: LowRank, k: Optional[int] = None) -> Triplets:
    """``truncated_svd`` of ``left @ right`` from the factors.

    QRs of left and right^T and an SVD of the c x c core, in float64 (tiny,
    and float32 basis noise would move the polar factors downstream), cast
    back to the factors' dtype. Same cut as the dense route: sigma above
    ``rank_floor`` of the *dense* shape and dtype, relative to sigma_max.
    """
    dtype, (p, q) = matrix.dtype, matrix.shape
    q_left, r_left = torch.linalg.qr(matrix.left.to(torch.float64))
    q_right, r_right = torch.linalg.qr(matrix.right.to(torch.float64).T)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T)
    keep = rank_cut(s, 0.0, (p, q), dtype)
    if k is not None:
        keep = min(keep, k)
    return (q_left @ u[:, :keep]).to(dtype), s[:keep].to(dtype), (vh[:keep] @ q_right.T).to(dtype)


def top_triplets(matrix: Matrix, k: Optional[int] = None, *, svd: SvdMode = "auto") -> Triplets:
    """Top-``k`` singular triplets of a dense or ``LowRank`` matrix."""
    if isinstance(matrix, LowRank):
        return factored_svd(matrix, k)
    return truncated_svd(matrix, k, svd=svd)


def frobenius(matrix: Matrix) -> torch.Tensor:
    """||matrix||_F; for factors, sqrt(trace((L^T L)(R R^T))) without the product."""
    if isinstance(matrix, LowRank):
        gram = (matrix.left.T @ matrix.left) * (matrix.right @ matrix.right.T)
        return gram.sum().clamp_min(0).sqrt()
    return torch.linalg.matrix_norm(matrix)


def outside_left(matrix: Matrix, basis: torch.Tensor) -> Matrix:
    """(I - basis basis^T) matrix: the part outside ``basis``' column space."""
    if isinstance(matrix, LowRank):
        return LowRank(matrix.left - basis @ (basis.T @ matrix.left), matrix.right)
    return matrix - basis @ (basis.T @ matrix)


# Relative singular value of a concatenation below which its direction counts
# as a linear dependence (see ``polar_factor``): the smallest cut at which the
# float64 Gram route still resolves sigma^2 within decompose's error budget.
POLAR_RANK_TOL = 2e-5


def polar_factor(x: torch.Tensor, *, svd: SvdMode = "auto") -> torch.Tensor:
    """P Q^T for x = P S Q^T: the matrix with orthonormal columns nearest to x.

    Always computed in float64: x holds T tasks' singular vectors side by side,
    nearly square, and its smallest singular values are small (~1e-3 of the
    largest for unrelated subspaces), so P Q^T amplifies rounding in x's
    factors by ~1/sigma_min; in float32 that moved TSV-M's merge by ~2e-4
    against ~1e-5 from the float32 per-task SVDs. Directions with sigma below
    ``POLAR_RANK_TOL`` * sigma_max are linear dependences between the columns
    (e.g. two tasks sharing a singular vector); their P Q^T term is decided by
    rounding (and arbitrary at exact dependence), so it is left out: the
    result is the partial isometry on x's column space.
    """
    if x.shape[1] == 0:
        return x
    x64 = x.to(torch.float64).unsqueeze(0)
    # x's columns are independent by construction: no low-rank sketch.
    basis, _, coords = low_rank_factors(x64, rank_tol=POLAR_RANK_TOL, mode=svd, sketch=False)
    return (basis @ coords[0]).to(x.dtype)


def orthogonalized_factors(
    us: torch.Tensor, sigma: torch.Tensor, vhs: torch.Tensor, *, svd: SvdMode = "auto"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Factors (L, R) of polar(U) diag(sigma) polar(Vh^T)^T, L = polar(U) * sigma.

    ``us`` (p, c) and ``vhs`` (c, q) hold c concatenated singular vectors; the
    polar factors replace each side by the nearest orthonormal set, which is
    how TSV-M and Iso-CTS decorrelate the tasks' subspaces.
    """
    left = polar_factor(us, svd=svd) * sigma.unsqueeze(0)
    right = polar_factor(vhs.T, svd=svd).T
    return left, right
