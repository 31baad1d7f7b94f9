"""Opt-in additions to DRM's joint-space merge, beyond the paper.

Each works on the quantities ``kernel.merge_in_basis`` already has (per-model
coordinates in the shared basis, the singular values, the merged
coordinates), so the dense kernel and the LoRA path get them alike, and each
is off by default (the merge is then the paper's). Plain tensors only.

* ``rank_budget_mask``: each model keeps only its own top fraction of the
  joint directions, ranked by its energy sigma~ there (TSV-M's "each task
  gets its share of the rank", inside DRM's shared basis).
* ``whiten_directions``: per joint direction, the models' coordinate rows
  are replaced by the nearest set of orthonormal rows (TSV-M's polar-factor
  decorrelation, applied where DRM's models meet: on a shared direction).
* ``flatten_spectrum``: the merged matrix's singular values are replaced by
  their mean (Iso-C's isotropic spectrum, applied after DRM's merge).
* ``target_norm``: a data-free scale: the Frobenius norm the merged delta is
  rescaled to, the mean of the task vectors' norms, the norm of their sum, or
  the sum of their norms.
"""

from __future__ import annotations

import math

import torch

from mergekit_drm.parameters import NORM_TARGET, check
from mergekit_drm.subspace import POLAR_RANK_TOL, truncated_svd


def rank_budget_mask(energy: torch.Tensor, fraction: float) -> torch.Tensor:
    """(N, r) mask keeping, per model, its ceil(fraction * r) directions of largest energy.

    ``energy`` (N, r) is sigma~ (sigma_j times the model's share of direction
    j); directions where a model has zero energy stay out even inside its
    budget. Ties are broken by direction index (lower first).
    """
    n_models, rank = energy.shape
    keep = min(rank, max(1, math.ceil(fraction * rank - 1e-9)))
    if keep >= rank:
        return energy > 0
    # Stable descending sort: equal energies keep their direction order.
    order = torch.sort(energy, dim=1, descending=True, stable=True).indices[:, :keep]
    mask = torch.zeros_like(energy, dtype=torch.bool)
    mask.scatter_(1, order, True)
    return mask & (energy > 0)


def whiten_directions(coords: torch.Tensor) -> torch.Tensor:
    """Per direction j, the N x q block of the models' rows -> its polar factor (float64).

    Row block X_j = coords[:, j, :] = P S Q^T becomes P Q^T: the orthonormal
    rows nearest to X_j. Directions of X_j with a singular value below
    ``POLAR_RANK_TOL`` of its largest are linear dependences (two models with
    the same row) and are left out, as in the TSV-M/Iso-CTS polar factor, so
    a zero row (a model absent from direction j) stays zero and identical rows
    share one unit of length instead of counting twice.
    """
    n_models, rank, q = coords.shape
    if rank == 0:
        return coords
    blocks = coords.to(torch.float64).permute(1, 0, 2)  # (r, N, q)
    u, s, vh = torch.linalg.svd(blocks, full_matrices=False)
    keep = s > POLAR_RANK_TOL * s[:, :1]
    polar = (u * keep.unsqueeze(1).to(u.dtype)) @ vh
    return polar.permute(1, 0, 2).to(coords.dtype).contiguous()


def flatten_spectrum(merged: torch.Tensor) -> torch.Tensor:
    """Replace the singular values of ``merged`` (r, q) by their mean (Iso-C's spectrum).

    Only singular values above the numerical-rank floor take part (as in
    ``iso_c``): the nuclear norm is kept, and null directions stay null.
    Because the basis has orthonormal columns, flattening the merged
    coordinates flattens the merged delta basis @ merged.
    """
    if merged.numel() == 0:
        return merged
    u, s, vh = truncated_svd(merged.to(torch.float64), svd="full")
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
