"""DRM computed from LoRA factors, without materialising any n x m delta.

A LoRA adapter changes a matrix by dW_t = s_t * B_t @ A_t (B_t: n x r_t,
A_t: r_t x m, s_t = alpha/r_t or alpha/sqrt(r_t) with rsLoRA). The kernel in
``mergekit_drm.drm.kernel`` needs the joint SVD of the stack of the dW_t; for
low-rank dW_t that SVD is cheap:

DRM-H (shared output basis). Write dW_t = L_t @ R_t with L_t = s_t B_t
(p x r_t) and R_t = A_t (r_t x q). A thin QR R_t^T = Q_t T_t (Q_t: q x k_t with
orthonormal columns) gives

    [dW_1 | ... | dW_N] = [L_1 T_1^T | ... | L_N T_N^T] @ blockdiag(Q_1^T, ..., Q_N^T)

and since blockdiag(Q_t^T) has orthonormal rows, an SVD K = U diag(sigma) W^T of
the small p x sum(k_t) matrix K = [L_1 T_1^T | ...] is an SVD of the stack:
same U and sigma, and model t's coordinates V_t^T = W_t^T Q_t^T (r x q), W_t
being row block t of W. Like the kernel (``decompose.project``), the
coordinates are taken by projection, diag(1/sigma) U^T dW_t, here in factored
form ((U^T L_t) R_t)/sigma; the Q_t are never formed (``qr(mode="r")``).
Cost: N small QRs, one SVD of p x sum(r_t) and N GEMMs of r x r_t x q,
instead of an SVD of the p x N*q stack.

DRM-V (shared input basis) is DRM-H of the transposes (exactly as in the
kernel): L_t = A_t^T (m x r_t), R_t = s_t B_t^T (r_t x n).

After the factorisation every step is the kernel's, with the kernel's own
functions: the rank cut (the rule of ``decompose.low_rank_factors``, with
``decompose.rank_floor`` of the *dense* stack shape and the compute dtype, so
the cut is identical; see ``decompose.rank_cut``), the negligible-share rule,
renormalisation, ``keep_top_magnitude`` over all N*r*q coordinates (a model
without this module has zero coordinates that still count in K, exactly like
an all-zero delta in the dense route), ``elect_and_mean``. The result is a
pair of factors (basis p x r, merged coordinates r x q) whose product is the
kernel's merged delta; nothing n x m is ever formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from mergekit_drm.decompose import rank_cut
from mergekit_drm.checks import check_finite
from mergekit_drm.parameters import check_weights
from mergekit_drm.drm.kernel import (
    Direction,
    check_joint_options,
    check_matrix_options,
    resolve_compute_dtype,
    merge_in_basis,
)

Factors = Tuple[torch.Tensor, torch.Tensor]  # (B: n x r, A: r x m), delta = B @ A


@dataclass(frozen=True)
class LoraFactors:
    """One adapter's change to one matrix: delta = scale * B @ A (Linear layout)."""

    B: torch.Tensor  # (n, r)
    A: torch.Tensor  # (r, m)
    scale: float = 1.0


def _joint_left_svd(
    lefts: Sequence[Optional[torch.Tensor]], rights: Sequence[Optional[torch.Tensor]], device
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    """(U, sigma, active) of the stack [D_1 | ... | D_N], D_t = lefts[t] @ rights[t].

    ``active[t]`` says whether model t has a non-zero delta; (None, None, active)
    when none has. The factorization (QRs and the small SVD) always runs in
    float64: it is tiny (p x sum(r_t)), and float32 basis noise, eps *
    sigma_max / gap, would be amplified by DRM's discrete pruning and election
    (measured on 4096-wide rank-16 adapters: ~1e-2 relative change of the
    merged delta). Like the kernel's Gram route, the caller casts basis and
    sigma to the compute dtype and projects the coordinates in that dtype.
    """
    blocks: List[torch.Tensor] = []
    active = torch.zeros(len(lefts), dtype=torch.bool, device=device)
    for index, (left, right) in enumerate(zip(lefts, rights)):
        if left is None or right is None or left.shape[1] == 0:
            continue
        left = left.to(device=device, dtype=torch.float64)
        right = right.to(device=device, dtype=torch.float64)
        # right^T = Q T, Q: q x k with orthonormal columns; D = (left T^T) Q^T.
        # Only T is needed: Q never has to be formed.
        _, tri = torch.linalg.qr(right.T, mode="r")
        block = left @ tri.T
        # An exactly-zero delta (e.g. a LoRA B never trained) takes no part.
        if not bool(block.ne(0).any()):
            continue
        active[index] = True
        blocks.append(block)
    if not blocks:
        return None, None, active
    u, s, _ = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
    return u, s, active


def _shared_left_lowrank(
    lefts: Sequence[Optional[torch.Tensor]],
    rights: Sequence[Optional[torch.Tensor]],
    weights: torch.Tensor,
    shape: Tuple[int, int],
    *,
    density: float,
    rank_tol: float,
    renorm: bool,
    sign_election: bool,
    disjoint: bool,
    dtype: torch.dtype,
    **options,
) -> Factors:
    """DRM-H of deltas D_t = lefts[t] @ rights[t] (p x q); None = zero delta.

    Returns (basis p x r, merged r x q). ``options`` are the kernel's opt-in
    additions (``merge_in_basis``), which act in the joint space only.
    """
    p, q = shape
    n_models = len(lefts)
    device = weights.device
    u, s, active = _joint_left_svd(lefts, rights, device)
    if s is None:
        return weights.new_zeros(p, 0), weights.new_zeros(0, q)
    # The kernel's cut: its floor is for the compute dtype and the dense shape.
    r = rank_cut(s, rank_tol, (p, n_models * q), dtype)
    if r == 0:
        return weights.new_zeros(p, 0), weights.new_zeros(0, q)
    basis, sigma = u[:, :r].to(dtype), s[:r].to(dtype)
    # Coordinates diag(1/sigma) basis^T D_t, as the kernel's ``project`` takes
    # them, in factored form: ((basis^T L_t) R_t) / sigma, r x q per model.
    # (Equal to W_t^T Q_t^T from the small SVD in exact arithmetic; the
    # projection gives exact zeros where D_t has zero columns, as in the kernel.)
    coords = weights.new_zeros((n_models, r, q))
    inv = (1.0 / sigma).unsqueeze(1)
    for index, (left, right) in enumerate(zip(lefts, rights)):
        if not bool(active[index]):
            continue
        left = left.to(device=device, dtype=dtype)
        right = right.to(device=device, dtype=dtype)
        torch.mm(basis.T @ left, right, out=coords[index])
        coords[index].mul_(inv)
    merged = merge_in_basis(  # the joint-space merge is the dense kernel's own
        coords,
        sigma,
        active,
        weights,
        density=density,
        renorm=renorm,
        sign_election=sign_election,
        disjoint=disjoint,
        **options,
    )
    return basis, merged


def prepare_lowrank(
    adapters: Sequence[Optional[LoraFactors]],
    weights: Sequence[float] | torch.Tensor | None,
    shape: Tuple[int, int],
    compute_dtype: torch.dtype | None,
    device: torch.device | str | None,
    *,
    method: str,
) -> Tuple[torch.dtype, torch.Tensor, torch.device | str]:
    """Check N adapters' factors of one (n, m) matrix; resolve dtype, weights, device.

    The compute dtype defaults to the factors' precision, at least float32
    (as the dense kernels); weights default to 1; the device to the first
    adapter's. Every low-rank merge (``drm``, ``lowrank_subspace``) starts here.
    """
    factor_dtype = torch.float32
    for adapter in adapters:
        if adapter is not None:
            factor_dtype = torch.promote_types(factor_dtype, adapter.B.dtype)
            factor_dtype = torch.promote_types(factor_dtype, adapter.A.dtype)
    compute_dtype = resolve_compute_dtype(compute_dtype, factor_dtype)
    n, m = shape
    n_models = len(adapters)
    if n_models == 0:
        raise ValueError("at least one adapter is needed")
    if device is None:
        present = [a for a in adapters if a is not None]
        device = present[0].B.device if present else torch.device("cpu")
    if weights is None:
        weights_t = torch.ones(n_models, dtype=compute_dtype, device=device)
    else:
        weights_t = torch.as_tensor(weights, dtype=compute_dtype, device=device)
        check_weights(weights_t, n_models)
    for index, adapter in enumerate(adapters):
        if adapter is not None:
            _check_factors(adapter, index, n, m, method)
    return compute_dtype, weights_t, device


def _check_factors(adapter: LoraFactors, index: int, n: int, m: int, method: str) -> None:
    if adapter.B.dim() != 2 or adapter.A.dim() != 2:
        raise ValueError(f"adapter {index}: B and A must be matrices")
    if adapter.B.shape[0] != n or adapter.A.shape[1] != m:
        raise ValueError(
            f"adapter {index}: B {tuple(adapter.B.shape)} @ A "
            f"{tuple(adapter.A.shape)} is not {n} x {m}"
        )
    if adapter.B.shape[1] != adapter.A.shape[0]:
        raise ValueError(
            f"adapter {index}: inner dimensions of B {tuple(adapter.B.shape)} "
            f"and A {tuple(adapter.A.shape)} differ"
        )
    for which, factor in (("B", adapter.B), ("A", adapter.A)):
        check_finite(
            factor, method=method, tensor_name=f"{which} of adapter {index} (0-based)",
            fix="Pass finite factors.",
        )


def drm_merge_lowrank(
    adapters: Sequence[Optional[LoraFactors]],
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    shape: Tuple[int, int],
    direction: Direction = "vertical",
    density: float = 0.2,
    rank_tol: float = 0.01,
    renorm: bool = True,
    sign_election: bool = True,
    disjoint: bool = True,
    scale: float = 1.0,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    isotropic: bool = False,
    norm_target: str = "none",
) -> Factors:
    """DRM of N LoRA deltas of one (n, m) matrix, returned as factors.

    ``adapters[t]`` is model t's factors, or None when adapter t does not
    target this matrix (an exactly-zero delta: no part in the SVD, election or
    mean, but its zero coordinates count in the joint keep count, as in the
    dense route). Returns (B', A') with B' @ A' equal to
    ``drm_merge_matrix(folded deltas, weights, ...) * scale`` up to rounding;
    B' is n x r', A' is r' x m with r' the number of singular values kept
    (possibly 0). ``isotropic`` and ``norm_target`` are the kernel's opt-in
    additions, exact here too: they act on the joint-space coordinates, which
    the factors give exactly.
    """
    compute_dtype, weights_t, device = prepare_lowrank(
        adapters, weights, shape, compute_dtype, device, method="drm_merge_lowrank"
    )
    check_matrix_options(direction, density, rank_tol, compute_dtype)
    check_joint_options(norm_target)
    n, m = shape

    lefts, rights = _oriented(adapters, direction, device, compute_dtype)
    kwargs = dict(
        density=density, rank_tol=rank_tol, renorm=renorm, sign_election=sign_election,
        disjoint=disjoint, dtype=compute_dtype, isotropic=isotropic, norm_target=norm_target,
    )
    if direction == "horizontal":
        basis, merged = _shared_left_lowrank(lefts, rights, weights_t, (n, m), **kwargs)
        out_b, out_a = basis, merged
        if scale != 1.0:
            out_a = out_a * scale
    else:
        basis, merged = _shared_left_lowrank(lefts, rights, weights_t, (m, n), **kwargs)
        # merged delta^T = basis @ merged, so delta = merged^T @ basis^T.
        out_b, out_a = merged.T, basis.T
        if scale != 1.0:
            out_b = out_b * scale
    return out_b.contiguous(), out_a.contiguous()


def _oriented(
    adapters: Sequence[Optional[LoraFactors]], direction: Direction, device, dtype: torch.dtype
) -> Tuple[List[Optional[torch.Tensor]], List[Optional[torch.Tensor]]]:
    """(lefts, rights) with delta_t = lefts[t] @ rights[t] for DRM-H, delta_t^T for DRM-V."""
    lefts: List[Optional[torch.Tensor]] = []
    rights: List[Optional[torch.Tensor]] = []
    for adapter in adapters:
        if adapter is None:
            lefts.append(None)
            rights.append(None)
            continue
        B = adapter.B.to(device=device, dtype=dtype)
        A = adapter.A.to(device=device, dtype=dtype)
        if direction == "horizontal":
            lefts.append(B * adapter.scale)
            rights.append(A)
        else:
            lefts.append(A.T)
            rights.append(B.T * adapter.scale)
    return lefts, rights


def drm_merge_lowrank_parts(
    adapters: Sequence[Optional[LoraFactors]],
    weights: Sequence[float] | torch.Tensor | None,
    *,
    shape: Tuple[int, int],
    parts: Optional[Sequence[torch.Tensor]] = None,
    **kwargs,
) -> Factors:
    """``drm_merge_lowrank`` on a fused projection, one part (row set) at a time."""
    return merge_lowrank_parts(drm_merge_lowrank, adapters, weights, shape=shape, parts=parts, **kwargs)


def merge_lowrank_parts(
    merge: Callable[..., Factors],
    adapters: Sequence[Optional[LoraFactors]],
    weights: Sequence[float] | torch.Tensor | None,
    *,
    shape: Tuple[int, int],
    parts: Optional[Sequence[torch.Tensor]] = None,
    **kwargs,
) -> Factors:
    """A low-rank ``merge`` on a fused projection, one part (row set) at a time.

    A part's delta is B[rows] @ A, so splitting is slicing B. The parts' factors
    are packed block-diagonally: B' = blockdiag over rows, A' stacked, so that
    (B' @ A')[rows_p] = B'_p @ A'_p for every part.
    """
    if parts is None:
        return merge(adapters, weights, shape=shape, **kwargs)
    n, m = shape
    results = []
    for rows in parts:
        rows = rows.to(torch.long)
        sliced = [
            None
            if adapter is None
            else LoraFactors(adapter.B.index_select(0, rows.to(adapter.B.device)), adapter.A, adapter.scale)
            for adapter in adapters
        ]
        results.append((rows, merge(sliced, weights, shape=(len(rows), m), **kwargs)))
    total = sum(b.shape[1] for _, (b, _) in results)
    first = results[0][1][0]
    out_b = first.new_zeros(n, total)
    out_a = first.new_zeros(total, m)
    offset = 0
    for rows, (b, a) in results:
        width = b.shape[1]
        out_b[rows.to(out_b.device), offset : offset + width] = b
        out_a[offset : offset + width] = a
        offset += width
    return out_b, out_a


def truncate_factors(
    B: torch.Tensor, A: torch.Tensor, rank: int
) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` approximation of B @ A, computed from the factors.

    QR of B and of A^T, SVD of the small core R_B R_A^T. Returns (B'', A'',
    relative Frobenius error ||B@A - B''@A''|| / ||B@A||; 0 when nothing was cut
    or the product is zero). B'' carries the singular values; A'' has
    orthonormal rows.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    k = B.shape[1]
    if k <= rank:
        return B, A, 0.0
    q_b, r_b = torch.linalg.qr(B, mode="reduced")
    q_a, r_a = torch.linalg.qr(A.T, mode="reduced")
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    total = float(torch.linalg.vector_norm(s))
    dropped = float(torch.linalg.vector_norm(s[rank:]))
    error = dropped / total if total > 0 else 0.0
    new_b = (q_b @ u[:, :rank]) * s[:rank]
    new_a = vh[:rank] @ q_a.T
    return new_b.contiguous(), new_a.contiguous(), error


def pad_rank(B: torch.Tensor, A: torch.Tensor, rank: int) -> Factors:
    """Zero-pad factors to exactly ``rank`` (the product is unchanged)."""
    k = B.shape[1]
    if k >= rank:
        return B, A
    out_b = B.new_zeros(B.shape[0], rank)
    out_a = A.new_zeros(rank, A.shape[1])
    out_b[:, :k] = B
    out_a[:k] = A
    return out_b, out_a


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling for one module: alpha/r, or alpha/sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank
