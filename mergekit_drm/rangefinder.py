"""Certified randomized range finder: a stack's joint basis in O(N p q k), not O(width^3).

For a stack of N deltas (p, q), A = [D_1 | ... | D_N] and M = A A^T =
sum_t D_t D_t^T, the left Gram matrix of ``decompose`` (never formed here).
The triplets every route keeps are the eigenpairs of M above ``tol^2 *
lambda_max`` (sigma = sqrt(lambda)). When they are few against the width, as
for N LoRA products B @ A folded into bf16 weights (N * r directions, the
rounding noise below the cut), they are found by subspace iteration:

1. probe: Y = M Omega (Omega: p x k Gaussian, one pass over the deltas); the
   Nystrom eigenvalues of Y say how many directions lie above the cut. If the
   sketch is saturated (more than k - OVERSAMPLE of them: a dense fine-tune's
   decaying full-rank spectrum), give up after this one pass;
2. iterate: Q = orth(Y), Y = M Q (one pass), Ritz pairs (theta_j, u_j) of M on
   span(Q); stop when the kept pairs' residuals ||M u_j - theta_j u_j|| are
   below ``RITZ_TOL * theta_1`` (the basis is then as exact as the dense
   route's in the compute dtype);
3. certify: with P = I - U_r U_r^T (r kept) and X = P M P, every direction the
   route leaves out has lambda <= lambda_max(X) (Courant-Fischer). With b fresh
   Gaussian probes w_i, lambda_max(X) <= (ALPHA sqrt(2/pi) max_i ||X^j w_i||)^(1/j)
   except with probability ALPHA^-b (Halko, Martinsson & Tropp 2011, Lemma
   4.1, applied to the PSD matrix X^j): 1e-8 with ALPHA = 10, b = 8. The basis
   is accepted only if this bound is below the cut (for a top-k request: below
   theta_k) and the kept Ritz values are above the cut computed from an upper
   bound of lambda_max (theta_1 + residual). So, but for that probability, the
   route keeps exactly the triplets the dense route keeps; otherwise the
   sketch grows (a bounded number of times) or the caller falls back.

Every pass runs in float64 (the deltas are cast in column chunks, never as a
whole): M squares A's condition number exactly as the Gram route does, so the
same limit applies (``decompose.choose_route``: tol >= ~1.5e-5). Cost per pass:
4 p (N q) k flops plus one read of the deltas.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from mergekit_drm.linalg_backends import matmul, stage

OVERSAMPLE = 8  # sketch columns beyond the kept directions
# A pass's read and float64 cast of the deltas, in columns of float64 GEMM work
# (measured: a 72-column pass over one 2048 x 8192 float32 delta took 0.70 s,
# the same GEMMs on a float64 copy 0.35 s).
READ_COLUMNS = 64
ALPHA, PROBES = 10.0, 8  # certificate: failure probability ALPHA ** -PROBES
PROBE_POWERS = (3, 10)  # powers of X the certificate tries: first bound, last
RITZ_TOL = {torch.float32: 1e-9, torch.float64: 1e-12}  # kept pairs' residual / theta_1
MAX_ITERATIONS = 12
_CHUNK_BYTES = 1 << 25  # float64 column chunks of 32 MiB


@dataclass
class Attempt:
    """What one call found: the route record tests and benchmarks read."""

    shape: Tuple[int, int]
    outcome: str = ""  # "certified", "saturated", "not converged", "certificate failed", "skipped"
    k: List[int] = field(default_factory=list)
    passes: int = 0
    work: int = 0  # sum over passes of (columns + READ_COLUMNS): cost / (4 p N q) GEMM flops
    rank: int = 0
    bound: float = math.nan  # certified lambda_max(X) / theta_1
    cut: float = math.nan  # the threshold it had to be below, / theta_1


_log: contextvars.ContextVar = contextvars.ContextVar("rangefinder_log", default=None)


@contextlib.contextmanager
def record_attempts():
    """Collect every decomposition's route record (``decompose`` appends) in a list."""
    records: List[Dict] = []
    token = _log.set(records)
    try:
        yield records
    finally:
        _log.reset(token)


def log(record: Dict) -> None:
    records = _log.get()
    if records is not None:
        records.append(record)


def _chunks(delta: torch.Tensor):
    """Column blocks of one (p, q) delta in float64 (a view when already float64)."""
    p, q = delta.shape
    step = max(1, _CHUNK_BYTES // (8 * max(p, 1)))
    for start in range(0, q, step):
        yield start, delta[:, start:start + step].to(torch.float64)


def gram_apply(deltas: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """M x = sum_t D_t (D_t^T x) in float64, x (p, b): one pass over the deltas."""
    out = torch.zeros_like(x)
    for delta in deltas:
        for _, chunk in _chunks(delta):
            out.add_(matmul(chunk, matmul(chunk.T, x)))
    return out


def _orth(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y)[0]


def _nystrom_values(omega: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Descending eigenvalues of the Nystrom approximation Y (Omega^T Y)^+ Y^T of M.

    Lower bounds of M's (M dominates its Nystrom approximation); a shift keeps
    the Cholesky factorization defined when M has rank below k.
    """
    shift = torch.finfo(torch.float64).eps * math.sqrt(y.shape[0]) * float(torch.linalg.matrix_norm(y))
    core = omega.T @ (y + shift * omega)
    core = (core + core.T) / 2
    chol, info = torch.linalg.cholesky_ex(core)
    if int(info) != 0:
        return torch.linalg.eigvalsh(core).flip(0).clamp_min(0)
    f = torch.linalg.solve_triangular(chol, (y + shift * omega).T, upper=False).T
    values = torch.linalg.svdvals(f) ** 2 - shift
    return values.clamp_min(0)


def _ritz(q: torch.Tensor, y: torch.Tensor):
    """Ritz values (descending), vectors and residual norms of M on span(q), y = M q."""
    h = q.T @ y
    h = (h + h.T) / 2
    theta, v = torch.linalg.eigh(h)
    theta, v = theta.flip(0), v.flip(1)
    vectors = q @ v
    mv = y @ v
    residuals = torch.linalg.vector_norm(mv - vectors * theta, dim=0)
    return theta, vectors, mv, residuals


def _kept(theta: torch.Tensor, tol: float, max_rank: Optional[int]) -> Tuple[int, int]:
    """(directions above the cut among the Ritz values, how many of them are kept)."""
    if theta.numel() == 0 or not bool(theta[0] > 0):
        return 0, 0
    above = int((theta > tol ** 2 * theta[0]).sum())
    return above, above if max_rank is None else min(above, max_rank)


def _certificate(deltas, basis: torch.Tensor, scale: float, limit: float, generator, affordable, passed):
    """(upper bound, lower bound) of lambda_max(X) / scale, X = (I - B B^T) M (I - B B^T).

    Powers X^j w of PROBES Gaussian probes, one pass each. After j passes,
    (ALPHA sqrt(2/pi) max_i ||X^j w_i||)^(1/j) bounds lambda_max(X) except with
    probability ALPHA ** -PROBES, and ||X^j w|| / ||X^(j-1) w|| <= lambda_max(X)
    always. Stops as soon as the upper bound is below ``limit`` (certified) or
    the lower bound reaches it (a direction above the cut was missed); the
    factor between them shrinks as 8^(1/j) with more powers.
    """
    p = basis.shape[0]
    z = torch.randn((p, PROBES), generator=generator, dtype=torch.float64).to(basis.device)
    z -= basis @ (basis.T @ z)
    norms = torch.linalg.vector_norm(z, dim=0)
    log_growth = torch.zeros_like(norms)  # log ||X^j w_i|| accumulated without overflow
    upper, lower = math.inf, 0.0
    for power in range(1, PROBE_POWERS[1] + 1):
        if not affordable(PROBES):
            break
        z = gram_apply(deltas, z) / scale
        passed(PROBES)
        z -= basis @ (basis.T @ z)
        new_norms = torch.linalg.vector_norm(z, dim=0)
        lower = max(lower, float((new_norms / norms.clamp_min(1e-300)).max()))
        log_growth += torch.log(new_norms.clamp_min(1e-300))
        z /= new_norms.clamp_min(1e-300)
        norms = torch.ones_like(norms)
        if power >= PROBE_POWERS[0]:
            upper = math.exp((math.log(ALPHA * math.sqrt(2 / math.pi)) + float(log_growth.max())) / power)
            if upper < limit or lower >= limit:
                break
    return upper, lower


def certified_basis(
    deltas: torch.Tensor,
    tol: float,
    *,
    k: int,
    max_rank: Optional[int] = None,
    growths: int = 0,
    max_work: Optional[float] = None,
    probe_work: Optional[float] = None,
    seed: int = 0,
) -> Tuple[Optional[Tuple[torch.Tensor, torch.Tensor]], Attempt]:
    """(basis (p, r), sigma (r,)) in float64 with r as ``decompose``'s cut, or None.

    ``k``: first sketch width; the sketch doubles up to ``growths`` times when
    it is saturated or the certificate finds more above the cut; ``max_work``
    bounds the work (``Attempt.work``: the caller's budget, checked before
    every pass); a saturated sketch grows only while all work so far plus the
    next probe stays within ``probe_work`` (what a dense spectrum may waste). ``max_rank`` asks
    for the top ``max_rank`` triplets only (TSV-M's per-task top-k).
    """
    n_models, p, q = deltas.shape
    short = min(p, n_models * q)
    attempt = Attempt(shape=(p, n_models * q))
    generator = torch.Generator().manual_seed(seed + 7919 * p + q)
    ritz_tol = RITZ_TOL.get(deltas.dtype, RITZ_TOL[torch.float32])
    budget = math.inf if max_work is None else max_work

    def affordable(columns: int, count: int = 1) -> bool:
        return attempt.work + count * (columns + READ_COLUMNS) <= budget

    def passed(columns: int, count: int = 1) -> None:
        attempt.passes += count
        attempt.work += count * (columns + READ_COLUMNS)

    k = min(k, short)
    for growth in range(growths + 1):
        attempt.k.append(k)
        if not affordable(k):
            attempt.outcome = "over budget"
            return None, attempt
        with stage("sketch"):
            omega = torch.randn((p, k), generator=generator, dtype=torch.float64).to(deltas.device)
            y = gram_apply(deltas, omega)
            passed(k)
            values = _nystrom_values(omega, y)
            del omega
            if not bool(values[0] > 0):
                return (deltas.new_zeros((p, 0), dtype=torch.float64),
                        deltas.new_zeros(0, dtype=torch.float64)), _done(attempt, "certified", 0)
            above, kept = _kept(values, tol, max_rank)
            converged = False
            if kept + OVERSAMPLE <= k or k == short:
                for _ in range(MAX_ITERATIONS):
                    if not affordable(k):
                        break
                    basis = _orth(y)
                    y = gram_apply(deltas, basis)
                    passed(k)
                    theta, vectors, mv, residuals = _ritz(basis, y)
                    above, kept = _kept(theta, tol, max_rank)
                    if kept + OVERSAMPLE > k and k < short:
                        break  # saturated after all
                    if kept == 0 or float(residuals[:kept].max()) <= ritz_tol * float(theta[0]):
                        converged = True
                        break
                    y = mv  # span(M Q), ordered by Ritz value
        if not converged:
            saturated = kept + OVERSAMPLE > k and k < short
            attempt.outcome = "saturated" if saturated else "not converged"
            if not saturated or growth == growths or k == short:
                return None, attempt
            k = min(2 * k, short)
            if probe_work is not None and attempt.work + k + READ_COLUMNS > probe_work:
                return None, attempt
            continue
        theta_1 = float(theta[0])
        top = vectors[:, :kept]
        residual = float(torch.linalg.vector_norm(residuals[:kept])) / theta_1
        # Left out: every eigenvalue of M below the bound; kept: above the cut
        # even with lambda_max as large as theta_1 + residual.
        cut = tol ** 2
        truncated = kept < above
        limit = float(theta[kept - 1]) / theta_1 if truncated else cut
        with stage("certify"):
            bound, lower = _certificate(deltas, top, theta_1, limit, generator, affordable, passed)
        attempt.bound, attempt.cut, attempt.rank = bound, limit, kept
        kept_ok = kept == 0 or float(theta[kept - 1]) / theta_1 > cut * (1 + residual)
        if bound < limit and kept_ok:
            sigma = theta[:kept].clamp_min(0).sqrt()
            return (top, sigma), _done(attempt, "certified", kept)
        attempt.outcome = "certificate failed"
        # A larger sketch helps only where a direction above the cut was missed
        # (the lower bound proves one); rounding noise near the cut stays there.
        if lower < limit or growth == growths or k == short:
            return None, attempt
        k = min(2 * k, short)
    return None, attempt


def _done(attempt: Attempt, outcome: str, rank: int) -> Attempt:
    attempt.outcome, attempt.rank = outcome, rank
    return attempt
