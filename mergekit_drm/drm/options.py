"""Opt-in additions to DRM's joint-space merge, beyond the paper.

Each works on the quantities ``kernel.merge_in_basis`` already has (per-model
coordinates in the shared basis, the singular values, the merged
coordinates), so the dense kernel and the LoRA path get them alike, and each
is off by default (the merge is then the paper's). Plain tensors only.

* ``flatten_spectrum``: the merged matrix's singular values are replaced by
  their mean (Iso-C's isotropic spectrum, applied after DRM's merge).
* ``target_norm``: a data-free scale: the Frobenius norm the merged delta is
  rescaled to, the mean of the task vectors' norms, the norm of their sum, or
  the sum of their norms.

Two more ideas were measured and dropped because they did not win (per-model
rank budgets, whitening the models' rows per joint direction; see
benchmarks/results/drm_options.md).
"""

from __future__ import annotations

import torch

from mergekit_drm.parameters import NORM_TARGET, check
from mergekit_drm.decompose import low_rank_factors
from mergekit_drm.subspace import POLAR_RANK_TOL, truncated_svd


def flatten_spectrum(merged: torch.Tensor) -> torch.Tensor:
    """Replace the singular values of ``merged`` (r, q) by their mean (Iso-C's spectrum).

    Only singular values above the numerical-rank floor take part (as in
    ``iso_c``): the nuclear norm is kept, and null directions stay null.
    Because the basis has orthonormal columns, flattening the merged
    coordinates flattens the merged delta basis @ merged.

    A clearly rectangular matrix (one side at least twice the other: DRM's
    merged gate/up/down and k/v coordinates) is well conditioned, and goes by
    ``decompose``'s cheapest route that resolves singular values down to
    ``POLAR_RANK_TOL`` (the float64 Gram route: about half the full SVD's
    time at 2048 x 8192, measured in the merge). When that finds every
    direction (min(r, q) of them) the full SVD would keep the same ones;
    otherwise, and for near-square matrices (a 1B q_proj's merged 2048 x 2048
    had sigma_min / sigma_max = 1.1e-5, below that reach), the full float64
    SVD decides, as before.
    """
    if merged.numel() == 0:
        return merged
    m64 = merged.to(torch.float64)
    factors = None
    if max(merged.shape) >= 2 * min(merged.shape):
        basis, s, coords = low_rank_factors(m64.unsqueeze(0), rank_tol=POLAR_RANK_TOL, mode="auto", sketch=False)
        if s.numel() == min(merged.shape):
            factors = basis, s, coords[0]
    u, s, vh = factors or truncated_svd(m64, svd="full")
    if s.numel() == 0:
        return merged
    return ((u * s.mean()) @ vh).to(merged.dtype)


def target_norm(
    coords: torch.Tensor,
    sigma: torch.Tensor,
    weights: torch.Tensor,
    active: torch.Tensor,
    kind: str,
) -> torch.Tensor:
    """Frobenius norm the merged delta is scaled to (a 0-d tensor).

    Model t's delta is basis @ diag(sigma) @ coords[t] with an orthonormal
    basis, so norms are taken on sigma-scaled coordinates. ``mean``: the
    mean over active models of ||w_t dW_t||; ``sum``: ||sum_t w_t dW_t||
    (task arithmetic's norm at lambda 1); ``total``: sum_t ||w_t dW_t||, the
    norm the sum would have if the task vectors were aligned (about sqrt(N)
    times ``sum`` for unrelated tasks; measured to be the scale a flattened
    spectrum wants, see the README).
    """
    scaled = coords.to(torch.float64) * sigma.to(torch.float64).view(1, -1, 1)
    w = weights.to(torch.float64)
    if kind in ("mean", "total"):
        norms = torch.linalg.vector_norm(scaled.flatten(1), dim=1) * w.abs()
        if kind == "total":
            return norms[active].sum()
        count = int(active.sum())
        return norms[active].sum() / max(count, 1)
    if kind == "sum":
        return torch.linalg.vector_norm((scaled * w.view(-1, 1, 1)).sum(0))
    check(NORM_TARGET, "norm_target", kind)
    raise AssertionError(f"norm_target {kind!r} admitted but not handled")


def rescale_to(merged: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``merged`` scaled to Frobenius norm ``target`` (zero stays zero)."""
    norm = torch.linalg.vector_norm(merged.to(torch.float64))
    if not bool(norm > 0):
        return merged
    return merged * (target / norm).to(merged.dtype)
