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
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from mergekit_drm.decompose import SvdMode, low_rank_factors

Triplets = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # U (p, r), s (r,), Vh (r, q)


def truncated_svd(matrix: torch.Tensor, k: Optional[int] = None, *, svd: SvdMode = "auto") -> Triplets:
    """Top-``k`` singular triplets of ``matrix`` (all above the rank floor if k is None).

    Returns fewer than ``k`` when the numerical rank is smaller.
    """
    basis, sigma, coords = low_rank_factors(matrix.unsqueeze(0), rank_tol=0.0, mode=svd)
    if k is not None:
        basis, sigma, coords = basis[:, :k], sigma[:k], coords[:, :k]
    return basis, sigma, coords[0]


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
    basis, _, coords = low_rank_factors(x64, rank_tol=POLAR_RANK_TOL, mode=svd)
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
