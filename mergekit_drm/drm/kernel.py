"""DRM (Decom-Renorm-Merge, arXiv 2505.23117) on plain tensors.

Nothing here knows about mergekit: every function takes task vectors (deltas
from one base) and returns the merged delta. The mergekit adapter lives in
``method.py``.

Semantics, per matrix (``n`` = output axis, ``m`` = input axis):

* ``horizontal`` (DRM-H): SVD of ``[dW_1 | ... | dW_N]`` (n x N*m). The shared
  factor is U (output-space basis); model t's coordinates are column block t of
  V^T, r x m.
* ``vertical`` (DRM-V): SVD of ``[dW_1; ...; dW_N]`` (N*n x m). The shared factor
  is V^T (input-space basis); model t's coordinates are row block t of U, n x r.
  DRM-V of {dW_t} is exactly DRM-H of {dW_t^T}, transposed back, so one code
  path (``_merge_shared_left_basis``) serves both.

Then: keep singular values above ``rank_tol * sigma_max``; renormalize each
model's coordinate vectors to unit length (sigma~ = sigma * norm); prune the
normalized coordinates jointly over all models keeping an exact count; scale
by sigma~; elect signs by mass (TIES) on these unweighted coordinates;
multiply by the per-model weights; take the disjoint mean; map back.

Where this differs from the reference code (see README "Deviations"):
exact keep count (the reference keeps one extra), density 1 still runs the
SVD path (the reference bypasses it), zero/noise blocks are guarded (the
reference divides by ~0), and ``sign_election`` also applies to matrices.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch

from mergekit_drm.checks import _all_finite, check_finite, check_finite_stack
from mergekit_drm.decompose import SvdMode, low_rank_factors
from mergekit_drm.linalg_backends import matmul, stage
from mergekit_drm.parameters import DENSITY, DIRECTION, NORM_TARGET, RANK_TOL, check, check_weights
from mergekit_drm.drm.options import flatten_spectrum, rescale_to, target_norm

Direction = Literal["vertical", "horizontal"]


_BRACKET_MIN = 1 << 20  # below this many entries one kthvalue is as fast
_BRACKET_SAMPLE = 1 << 16


def kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry (1-based) of a 1-D tensor, exactly as ``kthvalue``.

    ``kthvalue`` is one single-threaded pass that dominated DRM's merge stage
    on large matrices. For large inputs a strided sample brackets the answer,
    two vectorized comparisons count what lies below and inside the bracket,
    and ``kthvalue`` runs only on the few entries inside; if the sample's
    bracket misses (its counts prove it), the plain ``kthvalue`` runs instead.
    """
    total = flat.numel()
    if total < _BRACKET_MIN or flat.device.type != "cpu":
        return torch.kthvalue(flat, k).values
    sample = flat[:: max(1, total // _BRACKET_SAMPLE)]
    m = sample.numel()
    fraction = k / total
    spread = 6.0 * math.sqrt(max(fraction * (1.0 - fraction), 1.0 / m) / m) + 2.0 / m
    lo_rank = min(max(int((fraction - spread) * m), 1), m)
    hi_rank = min(max(int(math.ceil((fraction + spread) * m)), 1), m)
    lo = torch.kthvalue(sample, lo_rank).values
    hi = torch.kthvalue(sample, hi_rank).values
    below = int((flat < lo).sum())
    candidates = flat[(flat >= lo) & (flat <= hi)]
    if below < k <= below + candidates.numel():
        return torch.kthvalue(candidates, k - below).values
    return torch.kthvalue(flat, k).values


def keep_top_magnitude(x: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask keeping exactly ``round(density * numel)`` largest |x|.

    At least one entry is kept. Entries tied at the threshold are kept in
    flat-index order so the count is exact (the reference keeps one extra
    plus all ties). Selection is by ``kth_smallest`` (linear time), not a sort.
    """
    total = x.numel()
    keep = min(max(int(math.floor(density * total + 0.5)), 1), total)
    if keep >= total:
        return torch.ones_like(x, dtype=torch.bool)
    flat = x.abs().reshape(-1)
    threshold = kth_smallest(flat, total - keep + 1)
    mask = flat > threshold
    missing = keep - int(mask.sum())
    if missing > 0:
        tied = torch.nonzero(flat == threshold).reshape(-1)[:missing]
        mask[tied] = True
    return mask.reshape(x.shape)


def elect_and_mean(
    contributions: torch.Tensor,
    weights: torch.Tensor,
    *,
    sign_election: bool = True,
    disjoint: bool = True,
) -> torch.Tensor:
    """TIES-style sign election, then weights, then the (disjoint) mean.

    ``contributions`` is (N, ...) and is overwritten. The election uses the *unweighted* values
    (sign of the sum, i.e. "mass"); an exact tie takes the tensor-wide
    majority of elected signs, and a tie there too takes +. Weights multiply
    after the election; the disjoint mean divides by the number of models
    whose weighted value is non-zero, the plain mean by N.
    """
    n_models = contributions.shape[0]
    if sign_election:
        elected = torch.sign(contributions.sum(dim=0))
        majority = torch.sign(elected.sum())
        if majority == 0:
            majority = torch.ones_like(majority)
        elected = torch.where(elected == 0, majority, elected)
        # Keep entries agreeing with the elected sign (zeros stay zero). One
        # N-sized temporary instead of sign/compare/multiply copies.
        agree = torch.mul(contributions, elected).gt_(0)
        contributions = contributions.mul_(agree)
        del agree
    shape = (n_models,) + (1,) * (contributions.dim() - 1)
    weighted = contributions.mul_(weights.to(contributions).reshape(shape))
    total = weighted.sum(dim=0)
    if disjoint:
        count = (weighted != 0).sum(dim=0).clamp_min(1)
        return total.div_(count)
    return total.div_(n_models)


def negligible_share(dtype: torch.dtype) -> float:
    """Below this, a model's share of a singular direction is rounding noise.

    Each singular direction's energy splits over the models as sum_t nu_t^2 = 1.
    A share nu_t^2 under machine epsilon cannot be told from rounding (an
    exactly-zero block comes back from the SVD as ~1e-16, not 0), and
    renormalizing it to unit length would let noise win keep slots and count
    in the disjoint mean. Such coordinates are set to zero, as in exact
    arithmetic.
    """
    return math.sqrt(torch.finfo(dtype).eps)


def merge_in_basis(
    coords: torch.Tensor,
    sigma: torch.Tensor,
    active: torch.Tensor,
    weights: torch.Tensor,
    *,
    density: float,
    renorm: bool,
    sign_election: bool,
    disjoint: bool,
    isotropic: bool = False,
    norm_target: str = "none",
) -> torch.Tensor:
    """DRM's merge in the joint space; returns M (r, q).

    ``coords`` (N, r, q) and ``sigma`` (r,) factor each model's delta as
    basis @ diag(sigma) @ coords[t]; ``active`` (N,) marks models whose delta
    is not exactly zero. Renormalize, prune jointly, scale by sigma~, elect,
    weight, disjoint mean. Shared by the dense kernel and the LoRA path.
    The last two arguments are the opt-in additions of ``options.py``; their
    defaults are the paper's merge.
    """
    n_models = coords.shape[0]
    norms = torch.linalg.vector_norm(coords, dim=2)  # (N, r)
    significant = (norms > negligible_share(coords.dtype)) & active[:, None]
    target = None
    if norm_target != "none":
        target = target_norm(coords, sigma, weights, active, norm_target)
    if renorm:
        safe = torch.where(significant, norms, torch.ones_like(norms))
        # Divide (not multiply by a reciprocal): a length-1 coordinate vector
        # must normalize to exactly +-1 so ties stay ties.
        coords = torch.where(significant.unsqueeze(2), coords / safe.unsqueeze(2), 0)
        scales = sigma.unsqueeze(0) * norms * significant
    else:
        coords = coords * significant.unsqueeze(2)
        scales = sigma.unsqueeze(0).expand(n_models, -1)
    mask = keep_top_magnitude(coords, density)
    contributions = coords.mul_(mask).mul_(scales.unsqueeze(2))
    del mask
    merged = elect_and_mean(
        contributions, weights, sign_election=sign_election, disjoint=disjoint
    )
    if isotropic:
        merged = flatten_spectrum(merged)
    if target is not None:
        merged = rescale_to(merged, target)
    return merged


def _merge_shared_left_basis(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    *,
    density: float,
    rank_tol: float,
    renorm: bool,
    sign_election: bool,
    disjoint: bool,
    svd: SvdMode,
    **options,
) -> torch.Tensor:
    """DRM-H on a stack (N, p, q): shared basis on axis p, merge in R^{r x q}.

    ``options`` are ``merge_in_basis``' opt-in additions.
    """
    n_models, p, q = deltas.shape
    dtype = deltas.dtype
    # A model whose delta is exactly zero must not take part at all.
    active = deltas.reshape(n_models, -1).ne(0).any(dim=1)
    basis, sigma, coords = low_rank_factors(deltas, rank_tol=rank_tol, mode=svd)
    if sigma.numel() == 0:
        return deltas.new_zeros(p, q)
    with stage("merge"):
        merged = merge_in_basis(
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
        del coords
        return matmul(basis, merged)


def check_joint_options(norm_target: str) -> None:
    """Range checks of the opt-in additions (``options.py``)."""
    check(NORM_TARGET, "norm_target", norm_target)


def resolve_compute_dtype(compute_dtype, input_dtype: torch.dtype) -> torch.dtype:
    """``compute_dtype`` if given, else the inputs' precision, at least float32.

    float64 checkpoints then compute in float64 (a float32 decomposition
    would move their merge by ~5e-3); bf16/fp16/float32 compute in float32.
    """
    if compute_dtype is not None:
        return compute_dtype
    return torch.float64 if input_dtype == torch.float64 else torch.float32


def compute_dtype_for(asked: str, tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype a method parameter ``compute_dtype`` ("auto" or a torch dtype
    name) gives for these input tensors (the adapters' shared rule)."""
    input_dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        input_dtype = torch.promote_types(input_dtype, tensor.dtype)
    return resolve_compute_dtype(None if asked == "auto" else getattr(torch, asked), input_dtype)


def _input_dtype(deltas) -> torch.dtype:
    if isinstance(deltas, torch.Tensor):
        return deltas.dtype
    dtype = torch.float32
    for delta in deltas:
        dtype = torch.promote_types(dtype, delta.dtype)
    return dtype


def check_matrix_options(direction, density, rank_tol, compute_dtype) -> None:
    """Range checks shared by the dense and the LoRA entry points (``parameters.py``'s rules)."""
    check(DIRECTION, "direction", direction)
    check(DENSITY, "density", density)
    check(RANK_TOL, "rank_tol", rank_tol)
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError("compute_dtype must be torch.float32 or torch.float64")


def drm_merge_matrix(
    deltas: Sequence[torch.Tensor] | torch.Tensor,
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    direction: Direction = "vertical",
    density: float = 0.2,
    rank_tol: float = 0.01,
    renorm: bool = True,
    sign_election: bool = True,
    disjoint: bool = True,
    scale: float = 1.0,
    compute_dtype: torch.dtype | None = None,
    svd: SvdMode = "auto",
    isotropic: bool = False,
    norm_target: str = "none",
) -> torch.Tensor:
    """Merge N task vectors of one (n, m) matrix with DRM; return the merged delta.

    ``deltas`` are in ``nn.Linear`` layout (output, input); the result is in
    ``compute_dtype`` (default: the inputs' precision, at least float32: SVDs
    of bf16/fp16 are unsafe; ``resolve_compute_dtype``).
    ``isotropic`` and ``norm_target`` are the opt-in additions of
    ``options.py`` (defaults: the paper).
    """
    compute_dtype = resolve_compute_dtype(compute_dtype, _input_dtype(deltas))
    check_matrix_options(direction, density, rank_tol, compute_dtype)
    check_joint_options(norm_target)
    # Read-only below: the factorization never writes to the stack.
    stack = _stack(deltas, compute_dtype, writable=False)
    if stack.dim() != 3:
        raise ValueError(f"expected N matrices, got a stack of shape {tuple(stack.shape)}")
    check_finite_stack(stack, method="drm_merge_matrix", what="delta")
    n_models = stack.shape[0]
    weights_t = _weights(weights, n_models, stack)
    if direction == "vertical":
        stack = stack.transpose(1, 2)
    merged = _merge_shared_left_basis(
        stack,
        weights_t,
        density=density,
        rank_tol=rank_tol,
        renorm=renorm,
        sign_election=sign_election,
        disjoint=disjoint,
        svd=svd,
        isotropic=isotropic,
        norm_target=norm_target,
    )
    if direction == "vertical":
        merged = merged.T
    if scale != 1.0:
        merged = merged * scale
    return merged


def elementwise_merge(
    deltas: Sequence[torch.Tensor] | torch.Tensor,
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    density: float | Sequence[float] = 1.0,
    sign_election: bool = True,
    disjoint: bool = True,
    scale: float = 1.0,
    compute_dtype: torch.dtype | None = None,
    norm_target: str = "none",
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """DRM's path for tensors outside the SVD: trim, elect, weight, disjoint mean.

    The trim keeps ``density`` (one value, or one per model) of each model's
    entries of *this tensor* by magnitude. The reference trims over all of a
    model's non-matrix tensors at once, which a per-tensor merge cannot see;
    its default, no trim, is reproduced exactly. ``norm_target`` rescales the
    result as on the SVD path (``options.target_norm``, on the untrimmed deltas).

    With ``base``, ``deltas`` are the fine-tuned tensors and the task vectors
    are ``deltas[t] - base``. Either way the N task vectors are never held in
    ``compute_dtype`` at once: these tensors include embeddings and output
    heads (128256 x 4096 at 8B), so the merge runs over slices of all models
    (``_CHUNK`` entries each; sums over models in the same order as on the
    whole stack, so results are bit-identical to it), and a trim's threshold
    is found on one model's whole delta at a time. Extra memory: the merged
    delta, one int8 sign per entry, and per-model transients.
    """
    check_joint_options(norm_target)
    source = _ChunkedDeltas(deltas, base, compute_dtype)
    n_models, dtype = source.n_models, source.dtype
    weights_t = _weights(weights, n_models, torch.empty(0, dtype=dtype, device=source.device))
    densities = [density] * n_models if isinstance(density, (int, float)) else list(density)
    if len(densities) != n_models:
        raise ValueError(f"expected {n_models} densities, got {len(densities)}")
    for value in densities:
        if not 0 < value <= 1:
            raise ValueError(f"density must be in (0, 1], got {value}")
    cuts = [_MagnitudeCut.of(source.whole(t), d) if d < 1 else None for t, d in enumerate(densities)]

    elected, majority = None, None
    if sign_election:
        # Pass 1: the sign of the trimmed, unweighted mass, one int8 per entry.
        elected = torch.empty(source.numel, dtype=torch.int8, device=source.device)
        balance = 0
        for start, stop, stack in source.chunks(cuts):
            signs = torch.sign(stack.sum(dim=0))
            elected[start:stop] = signs
            balance += int(signs.sum())
        # An exact tie takes the tensor-wide majority of elected signs; a tie there too takes +.
        majority = -1 if balance < 0 else 1

    merged = torch.empty(source.numel, dtype=dtype, device=source.device)
    squares = torch.zeros(n_models, dtype=torch.float64, device=source.device)
    active = torch.zeros(n_models, dtype=torch.bool, device=source.device)
    sum_squares = torch.zeros((), dtype=torch.float64, device=source.device)
    shape = (n_models, 1)
    for start, stop, stack in source.chunks(cuts, before_trim=lambda s: _norm_pass(
            s, norm_target, weights_t, squares, active, sum_squares)):
        if sign_election:
            sign = elected[start:stop].to(dtype)
            sign.masked_fill_(sign == 0, majority)
            # Keep entries agreeing with the elected sign (zeros stay zero).
            stack.mul_(torch.mul(stack, sign).gt_(0))
        weighted = stack.mul_(weights_t.reshape(shape))
        total = weighted.sum(dim=0)
        if disjoint:
            total.div_((weighted != 0).sum(dim=0).clamp_min(1))
        else:
            total.div_(n_models)
        merged[start:stop] = total
    del elected
    merged = merged.reshape(source.shape)
    if norm_target != "none":
        target = _target_from_sums(norm_target, squares, active, sum_squares, weights_t)
        norm = _norm64(merged)
        if bool(norm > 0):
            merged.mul_((target / norm).to(dtype))
    if scale != 1.0:
        merged.mul_(scale)
    return merged


_CHUNK = 1 << 16  # entries per model per slice: (N, chunk) temporaries of about a MiB


class _ChunkedDeltas:
    """N task vectors of one tensor, read slice by slice in the compute dtype.

    Reads the callers' tensors (never writes them): ``tensors[t]`` itself, or
    ``tensors[t] - base`` with both cast exactly as a whole-tensor subtraction
    would. Checks finiteness up front, naming the model.
    """

    def __init__(self, tensors, base, compute_dtype):
        tensors = list(tensors) if not isinstance(tensors, torch.Tensor) else list(tensors.unbind(0))
        if not tensors:
            raise ValueError("at least one delta is needed")
        shape = tuple(tensors[0].shape)
        for index, tensor in enumerate(tensors):
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"delta {index} (0-based) has shape {tuple(tensor.shape)}, delta 0 {shape}; "
                    "every model's tensor must have the same shape"
                )
            check_finite(tensor, method="elementwise_merge", tensor_name=f"delta {index} (0-based)",
                         fix="Pass finite tensors.")
        inputs = tensors if base is None else tensors + [base]
        if base is not None:
            if tuple(base.shape) != shape:
                raise ValueError(f"base has shape {tuple(base.shape)}, the deltas {shape}")
            check_finite(base, method="elementwise_merge", tensor_name="base", fix="Pass finite tensors.")
        self.dtype = resolve_compute_dtype(compute_dtype, _input_dtype(inputs))
        self.shape = shape
        self.device = tensors[0].device
        self.n_models = len(tensors)
        self.flat = [t.reshape(-1) for t in tensors]
        self.base = None if base is None else base.reshape(-1)
        self.numel = self.flat[0].numel()

    def _fill(self, out: torch.Tensor, index: int, start: int, stop: int) -> torch.Tensor:
        out.copy_(self.flat[index][start:stop])
        if self.base is not None:
            base = self.base[start:stop]
            # Round a wider base first, as a cast-then-subtract would.
            wider = torch.promote_types(base.dtype, self.dtype) != self.dtype
            out.sub_(base.to(self.dtype) if wider else base)
        return out

    def whole(self, index: int) -> torch.Tensor:
        """Model ``index``'s whole task vector (flat) in the compute dtype."""
        out = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        return self._fill(out, index, 0, self.numel)

    def chunks(self, cuts, before_trim=None):
        """(start, stop, trimmed (N, stop - start) stack) over the flat tensor."""
        taken = [0] * self.n_models  # tied entries kept so far, per model
        for start in range(0, self.numel, _CHUNK):
            stop = min(start + _CHUNK, self.numel)
            stack = torch.empty((self.n_models, stop - start), dtype=self.dtype, device=self.device)
            for index in range(self.n_models):
                self._fill(stack[index], index, start, stop)
            if not _all_finite(stack):  # finite inputs whose difference overflows
                for index in range(self.n_models):
                    check_finite(self.whole(index), method="elementwise_merge",
                                 tensor_name=f"delta {index} (0-based)", fix="Pass finite tensors.")
            if before_trim is not None:
                before_trim(stack)
            for index, cut in enumerate(cuts):
                if cut is not None:
                    taken[index] += cut.apply(stack[index], taken[index])
            yield start, stop, stack


class _MagnitudeCut:
    """``keep_top_magnitude`` as a threshold plus the count of tied entries kept
    (the first ones in flat order), so the same mask can be applied slice by slice."""

    def __init__(self, threshold, tied_kept):
        self.threshold, self.tied_kept = threshold, tied_kept

    @classmethod
    def of(cls, flat: torch.Tensor, density: float) -> "_MagnitudeCut | None":
        total = flat.numel()
        keep = min(max(int(math.floor(density * total + 0.5)), 1), total)
        if keep >= total:
            return None
        magnitude = flat.abs_()  # the caller's temporary: no second copy
        threshold = kth_smallest(magnitude, total - keep + 1)
        return cls(threshold, keep - int((magnitude > threshold).sum()))

    def apply(self, x: torch.Tensor, taken: int) -> int:
        """Zero what the cut drops from the slice ``x`` (in place); return tied entries kept."""
        magnitude = x.abs()
        mask = magnitude > self.threshold
        kept = 0
        if self.tied_kept > taken:
            tied = torch.nonzero(magnitude == self.threshold).reshape(-1)[: self.tied_kept - taken]
            mask[tied] = True
            kept = tied.numel()
        x.mul_(mask)
        return kept


def _norm_pass(stack, norm_target, weights, squares, active, sum_squares) -> None:
    """Accumulate what ``options.target_norm`` needs from an untrimmed slice."""
    active |= stack.ne(0).any(dim=1)
    if norm_target in ("mean", "total"):
        squares += stack.to(torch.float64).square().sum(dim=1)
    elif norm_target == "sum":
        summed = (stack.to(torch.float64) * weights.to(torch.float64).reshape(-1, 1)).sum(dim=0)
        sum_squares += summed.square().sum()


def _target_from_sums(kind, squares, active, sum_squares, weights) -> torch.Tensor:
    """``options.target_norm`` from accumulated squares (same definitions)."""
    if kind == "sum":
        return sum_squares.sqrt()
    norms = squares.sqrt() * weights.to(torch.float64).abs()
    if kind == "total":
        return norms[active].sum()
    return norms[active].sum() / max(int(active.sum()), 1)


def _norm64(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm accumulated in float64 without a float64 copy of ``x``."""
    flat = x.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, flat.numel(), _CHUNK):
        total += flat[start:start + _CHUNK].to(torch.float64).square().sum()
    return total.sqrt()


def _stack(deltas, compute_dtype: torch.dtype, *, writable: bool) -> torch.Tensor:
    """One (N, ...) tensor in ``compute_dtype``; copies only when needed."""
    if isinstance(deltas, torch.Tensor):
        if writable or deltas.dtype != compute_dtype:
            return deltas.to(compute_dtype, copy=True)
        return deltas
    deltas = list(deltas)
    if not deltas:
        raise ValueError("at least one delta is needed")
    out = torch.empty(
        (len(deltas),) + tuple(deltas[0].shape),
        dtype=compute_dtype,
        device=deltas[0].device,
    )
    for index, delta in enumerate(deltas):
        out[index].copy_(delta)
    return out


def _weights(weights, n_models: int, like: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return like.new_ones(n_models)
    weights_t = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    check_weights(weights_t, n_models)
    return weights_t
