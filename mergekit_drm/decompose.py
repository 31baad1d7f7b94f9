"""Joint decompositions of stacked task vectors, by one of several exact routes (shared by every SVD method).

DRM only uses the singular triplets above ``rank_tol * sigma_max``. For a stack
of N deltas (p, q) sharing the left basis, the matrix is A = [D_1 | ... | D_N]
(p x N*q). Routes:

* ``full``: ``torch.linalg.svd`` of A (the reference's route).
* ``left`` Gram: ``eigh`` of sum_t D_t D_t^T (p x p), built by N GEMMs without
  forming A; its eigenvectors are the basis.
* ``right`` Gram: ``eigh`` of A^T A (N*q x N*q, blocks D_s^T D_t); the basis is
  A V / sigma.

Gram matrices are accumulated and decomposed in float64 (see
``choose_route`` for why not float32). Squaring A squares its condition
number: over the kept spectrum the relative error of sigma_j^2 is about
eps / rank_tol^2, 2e-12 at the default cut; below rank_tol ~1e-5 (e.g. 0 =
numerical rank) float64 cannot resolve the cut and the full SVD is used.

``auto`` (default) picks the cheapest of full / left / right by a flop-count
cost model whose constants are measured on the machine it runs on
(``route_costs``, ``linalg_backends.route_constants``); ``gram`` forces a Gram
route on the short side. The eigensolver (torch/MKL, numpy/OpenBLAS, scipy
drivers) and the GEMM library are also the ones measured fastest here
(``linalg_backends``). Whatever the route, the per-model coordinates are
computed by projecting the deltas on the basis (``project``), which keeps
exact zeros exact.
"""

from __future__ import annotations

import threading
from typing import Literal, Optional, Tuple

import torch

from mergekit_drm.linalg_backends import add_gram, eigh, matmul, new_gram, route_constants, stage

SvdMode = Literal["auto", "full", "gram", "lowrank"]

# Largest tolerated bound on the relative error of the smallest kept sigma^2.
_GRAM_ERROR_BUDGET = {torch.float32: 2e-3, torch.float64: 1e-6}


def rank_floor(shape: Tuple[int, int], dtype: torch.dtype) -> float:
    """Smallest meaningful relative singular value for a matrix of this shape."""
    return max(shape) * torch.finfo(dtype).eps


def _rank(sigma: torch.Tensor, tol: float) -> int:
    if sigma.numel() == 0 or not bool(sigma[0] > 0):
        return 0
    return int((sigma > tol * sigma[0]).sum())


def rank_cut(sigma: torch.Tensor, rank_tol: float, shape: Tuple[int, int], dtype: torch.dtype) -> int:
    """How many of the descending ``sigma`` every route keeps for a dense ``shape``.

    sigma_j > max(rank_tol, rank_floor(shape, dtype)) * sigma_max, with the
    floor of the *dense* matrix (p x N*q for a stack) and the compute dtype,
    so that routes computing sigma another way (in float64 from LoRA factors,
    ``lora.lowrank``, ``subspace.factored_svd``) cut at the same place.
    """
    return _rank(sigma, max(rank_tol, rank_floor(shape, dtype)))


def _gram_error(dtype: torch.dtype, tol: float) -> float:
    return torch.finfo(dtype).eps / max(tol, 1e-300) ** 2


def route_costs(p: int, width: int, dtype: torch.dtype, device=None) -> dict:
    """Estimated seconds of each route for A = p x width (width = N*q).

    Flop counts times seconds-per-flop measured on this machine (or fixed
    fallbacks with ``MERGEKIT_DRM_CALIBRATION=off``).
    """
    c = route_constants(device)  # measured on ``device`` (a GPU's float64 rate)
    a, b = max(p, width), min(p, width)
    svd = c["svd64"] if dtype == torch.float64 else c["svd32"]
    gemm = c["gemm64"] if dtype == torch.float64 else c["gemm32"]
    project = 2 * p * b * width  # coordinates, in the compute dtype
    gram_left = p * p * width  # one triangle (syrk) where the BLAS has it
    gram_right = p * width * width  # N(N+1)/2 blocks of q x q
    return {
        "full": svd * (a * b * b + b ** 3) + gemm * project,
        "left64": c["eigh64"] * p ** 3 + c["gemm64"] * 2 * gram_left + gemm * project,
        "right64": c["eigh64"] * width ** 3 + c["gemm64"] * gram_right + gemm * 2 * project,
    }


def choose_route(
    shape: Tuple[int, int], dtype: torch.dtype, tol: float, mode: SvdMode, device=None
) -> Tuple[str, Optional[torch.dtype]]:
    """(route, Gram dtype): ``full`` SVD, ``left`` or ``right`` Gram (float64).

    Gram matrices are always accumulated and decomposed in float64. A float32
    Gram route was measured and rejected: an eigenvector of A A^T is
    sigma_max / (2 sigma_j) times less accurate than the singular vector of A
    (gap in lambda = 2 sigma gap in sigma), i.e. ~50x at DRM's 1% cut, and on
    fine-tune-like 3584 x 3072 stacks it moved the merged delta 3.8e-2 from the
    float64 result against 7e-3 for a float32 SVD. In float64 both Gram routes
    agree with the SVD route to ~1e-12, and for float32 inputs they are closer
    to the float64 answer than a float32 SVD is.
    """
    if mode == "full":
        return "full", None
    if mode == "lowrank":  # the range finder fell back: the exact route auto picks
        mode = "auto"
    if mode not in ("auto", "gram"):
        raise ValueError(f"svd must be 'auto', 'full', 'gram' or 'lowrank', got {mode!r}")
    p, width = shape
    f64_ok = _gram_error(torch.float64, tol) <= _GRAM_ERROR_BUDGET[torch.float64]
    if mode == "gram":
        # Asked for: the Gram route in float64 on the short side, if it can
        # resolve the cut at all.
        if not f64_ok:
            return "full", None
        return ("left", torch.float64) if p <= width else ("right", torch.float64)
    costs = route_costs(p, width, dtype, device)
    options = {"full": ("full", None)}
    if f64_ok:
        options["left64"] = ("left", torch.float64)
        options["right64"] = ("right", torch.float64)
    best = min(options, key=lambda name: costs[name])
    return options[best]


def low_rank_factors(
    deltas: torch.Tensor,
    *,
    rank_tol: float,
    mode: SvdMode = "auto",
    max_rank: Optional[int] = None,
    sketch: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factor a stack (N, p, q) as D_t = basis @ diag(sigma) @ coords[t].

    Returns ``basis`` (p, r) with orthonormal columns, ``sigma`` (r,) in
    descending order and ``coords`` (N, r, q), where the r singular values are
    those above ``max(rank_tol, max(p, N*q) * eps) * sigma_max`` (at most the
    top ``max_rank``). ``coords`` side by side have orthonormal rows. All in
    ``deltas.dtype``. ``auto`` and ``lowrank`` first try the certified range
    finder (``_lowrank_factors``) unless ``sketch`` is False (a matrix known
    to have full rank).
    """
    n_models, p, q = deltas.shape
    tol = max(rank_tol, rank_floor((p, n_models * q), deltas.dtype))
    if sketch and mode in ("auto", "lowrank"):
        found = _lowrank_factors(deltas, tol, forced=mode == "lowrank", max_rank=max_rank)
        if found is not None:
            return found
    route, gram_dtype = choose_route((p, n_models * q), deltas.dtype, tol, mode, deltas.device)
    _log_route(route, (p, n_models * q), mode)
    if route == "full":
        return _svd_factors(deltas, tol, max_rank)
    return _gram_factors(deltas, tol, gram_dtype, left=route == "left", max_rank=max_rank)


def _svd_factors(deltas: torch.Tensor, tol: float, max_rank: Optional[int] = None):
    n_models, p, q = deltas.shape
    with stage("svd"):
        stacked = deltas.permute(1, 0, 2).reshape(p, n_models * q)
        if p >= n_models * q:
            u, s, _ = torch.linalg.svd(stacked, full_matrices=False)
        else:
            # LAPACK's SVD of a wide matrix was measured several times slower
            # than of its (tall) transpose: decompose A^T = V S U^T instead.
            _, s, uh = torch.linalg.svd(stacked.T, full_matrices=False)
            u = uh.T
        del stacked
    r = _rank(s, tol) if max_rank is None else min(_rank(s, tol), max_rank)
    basis, sigma = u[:, :r], s[:r]
    return basis, sigma, project(deltas, basis, sigma)


def project(deltas: torch.Tensor, basis: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Coordinates diag(1/sigma) basis^T D_t of every model, one GEMM each.

    Taken from the deltas rather than from the SVD's right factor: where D_t
    is exactly zero (a column a model left unchanged) the GEMM gives exact
    zeros, where the SVD's factor holds rounding noise that DRM's
    renormalization would blow up and its disjoint mean would count.
    The GEMMs run in the deltas' dtype (float32 for float32 inputs: the
    basis is exact to float64 already, the product needs no more).
    """
    n_models, _, q = deltas.shape
    with stage("project"):
        coords = torch.empty((n_models, basis.shape[1], q), dtype=deltas.dtype, device=deltas.device)
        basis_t = basis.to(deltas.dtype).T.contiguous()
        inv = (1.0 / sigma).to(deltas.dtype).unsqueeze(1)
        for index, delta in enumerate(deltas):
            matmul(basis_t, delta, out=coords[index])
            coords[index].mul_(inv)
    return coords


def _gram_factors(
    deltas: torch.Tensor, tol: float, gram_dtype: torch.dtype, left: bool, max_rank: Optional[int] = None
):
    """Gram route: eigendecomposition of sum_t D_t D_t^T (left) or A^T A (right).

    The Gram matrix is float64 (see ``choose_route``), built one model at a
    time (never a float64 copy of the stack); only its upper triangle is
    needed, so the left Gram uses a rank-k update (syrk) where that is faster.
    """
    n_models, p, q = deltas.shape
    dtype = deltas.dtype
    with stage("gram"):
        if left:
            gram = new_gram(p, deltas.device)
            for delta in deltas:
                add_gram(gram, delta)
        else:
            gram = torch.zeros((n_models * q, n_models * q), dtype=gram_dtype, device=deltas.device)
            for s in range(n_models):
                d_s = deltas[s].to(gram_dtype)
                for t in range(s, n_models):
                    d_t = d_s if t == s else deltas[t].to(gram_dtype)
                    # Upper triangle of blocks only: eigh reads the upper triangle.
                    matmul(d_s.T, d_t, out=gram[s * q:(s + 1) * q, t * q:(t + 1) * q])
                    del d_t
                del d_s
    # A column of D_t that is exactly zero has a zero Gram diagonal entry (a sum
    # of squares): the right route gives it exact-zero coordinates below.
    zero_columns = None if left else (gram.diagonal() == 0).view(n_models, q)
    evals, evecs = eigh(gram)
    del gram
    evals = evals.flip(0)
    if evals.numel() == 0 or not bool(evals[0] > 0):
        empty = deltas.new_zeros
        return empty(p, 0), empty(0), empty(n_models, 0, q)
    r = int((evals > (tol ** 2) * evals[0]).sum())
    if max_rank is not None:
        r = min(r, max_rank)
    sigma = evals[:r].sqrt()
    vecs = evecs[:, evecs.shape[1] - r:].flip(1)
    del evecs
    if left:
        basis = vecs.to(dtype)
    else:
        with stage("basis"):
            # U = A V diag(1/sigma), accumulated model by model.
            right = vecs.to(dtype)
            basis = torch.zeros((p, r), dtype=dtype, device=deltas.device)
            for index, delta in enumerate(deltas):
                basis.add_(matmul(delta, right[index * q:(index + 1) * q]))
            basis.mul_((1.0 / sigma).to(dtype).unsqueeze(0))
        with stage("project"):
            # The coordinates are the eigenvectors' blocks: diag(1/sigma) U^T D_t
            # = V_t^T exactly, so the GEMMs of ``project`` are not needed (and
            # V from the float64 eigensolver is the more accurate of the two).
            # Columns a model left unchanged get exact zeros, as the GEMM gives.
            coords = vecs.T.reshape(r, n_models, q).permute(1, 0, 2).to(dtype).contiguous()
            coords.masked_fill_(zero_columns.unsqueeze(1), 0)
        return basis, sigma.to(dtype), coords
    sigma = sigma.to(dtype)
    return basis, sigma, project(deltas, basis, sigma)


# The certified range finder (``rangefinder``): when few triplets lie above the
# cut (LoRA products folded into full weights), O(N p q k) instead of
# O(width^3). ``auto`` probes it only where one probe costs at most
# PROBE_BUDGET of the exact route (a dense spectrum then falls through after
# that one pass) and gives it at most ROUTE_BUDGET of the exact route's time.
SKETCH_MIN_WIDTH = 256  # short side below which the exact routes are cheap anyway
PROBE_BUDGET, ROUTE_BUDGET = 0.05, 0.5
SKETCH_K_MAX_FIRST, SKETCH_K_FORCED = 64, 64
# Stacks of one shape come in series (every layer's down_proj), and fine-tunes
# are dense or low rank throughout. After FAILED_STREAK probes of a shape in a
# row that found no certified basis, ``auto`` probes only every RECHECK_EVERY-th
# stack of that shape; one success resets the count. A skipped probe costs
# nothing but the chance of the faster route: the exact route gives the same factors.
FAILED_STREAK, RECHECK_EVERY = 2, 8
_probe_history: dict = {}  # (p, width, dtype, device type) -> [failures in a row, skipped since]
_probe_lock = threading.Lock()


def reset_probe_history() -> None:
    """Forget which shapes were dense (tests; a new merge in the same process)."""
    with _probe_lock:
        _probe_history.clear()


def _skip_probe(key) -> bool:
    with _probe_lock:
        record = _probe_history.setdefault(key, [0, 0])
        if record[0] >= FAILED_STREAK and record[1] + 1 < RECHECK_EVERY:
            record[1] += 1
            return True
        record[1] = 0
        return False


def _probe_outcome(key, certified: bool) -> None:
    with _probe_lock:
        record = _probe_history.setdefault(key, [0, 0])
        record[0] = 0 if certified else record[0] + 1


def _log_route(route: str, shape: Tuple[int, int], mode: str, **extra) -> None:
    from mergekit_drm import rangefinder

    rangefinder.log({"route": route, "shape": shape, "mode": mode, **extra})


def lowrank_plan(shape: Tuple[int, int], dtype: torch.dtype, tol: float) -> Optional[dict]:
    """Sketch width and budgets (in ``rangefinder`` work units) for ``auto``, or None."""
    p, width = shape
    short = min(p, width)
    if short < SKETCH_MIN_WIDTH or _gram_error(torch.float64, tol) > _GRAM_ERROR_BUDGET[torch.float64]:
        return None
    costs = route_costs(p, width, dtype)
    dense = min(costs.values())
    unit = route_constants()["gemm64"] * 4 * p * width  # one column of one pass
    from mergekit_drm.rangefinder import OVERSAMPLE, READ_COLUMNS

    from mergekit_drm.rangefinder import PROBE_POWERS, PROBES

    probe = PROBE_BUDGET * dense / unit
    k = min(int(probe) - READ_COLUMNS, SKETCH_K_MAX_FIRST, short // 4)
    # a typical success: the probe, three iterations, the first certificate bound
    typical = 4 * (k + READ_COLUMNS) + PROBE_POWERS[0] * (PROBES + READ_COLUMNS)
    if k < 2 * OVERSAMPLE + 8 or typical > ROUTE_BUDGET * dense / unit:
        return None
    return {"k": k, "probe_work": probe, "max_work": ROUTE_BUDGET * dense / unit}


def _lowrank_factors(deltas: torch.Tensor, tol: float, *, forced: bool, max_rank: Optional[int]):
    """The range finder's factors, or None (not worth trying, or not certified)."""
    import warnings

    from mergekit_drm import rangefinder

    n_models, p, q = deltas.shape
    if forced:
        plan = {"k": SKETCH_K_FORCED, "growths": 3}
        if _gram_error(torch.float64, tol) > _GRAM_ERROR_BUDGET[torch.float64]:
            plan = None
    else:
        plan = lowrank_plan((p, n_models * q), deltas.dtype, tol)
        if plan is not None:
            plan["growths"] = 2
    if plan is None:
        if forced:
            warnings.warn(
                f"svd: lowrank cannot resolve a rank cut of {tol:.1e} in float64 (needs "
                f"rank_tol >= 1.5e-5); using the exact route for this {p} x {n_models * q} stack",
                stacklevel=3,
            )
        return None
    key = (p, n_models * q, deltas.dtype, deltas.device.type)
    if not forced and _skip_probe(key):
        _log_route("lowrank-skipped", (p, n_models * q), "auto")
        return None
    found, attempt = rangefinder.certified_basis(deltas, tol, max_rank=max_rank, **plan)
    if not forced:
        _probe_outcome(key, found is not None)
    _log_route("lowrank" if found is not None else "lowrank-fallback", attempt.shape,
               "lowrank" if forced else "auto", attempt=attempt)
    if found is None:
        if forced:
            warnings.warn(
                f"svd: lowrank found no certified low-rank basis for this {p} x {n_models * q} "
                f"stack ({attempt.outcome} at k = {attempt.k}); using the exact route",
                stacklevel=3,
            )
        return None
    basis, sigma = found
    if sigma.numel() == 0:
        empty = deltas.new_zeros
        return empty(p, 0), empty(0), empty(n_models, 0, q)
    basis, sigma = basis.to(deltas.dtype), sigma.to(deltas.dtype)
    return basis, sigma, project(deltas, basis, sigma)
