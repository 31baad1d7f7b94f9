"""Properties the DRM kernel must have, each derived from the method itself.

Every expectation here is worked out by hand (or from an exact-arithmetic
argument written next to it) rather than by re-running the algorithm, so a
test fails if the kernel's behaviour breaks. Helpers from the oracle module are
only used to check that randomly generated data is well posed (no near-ties).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergekit_drm import decompose
from mergekit_drm.drm.kernel import (
    drm_merge_matrix,
    elementwise_merge,
    keep_top_magnitude,
)
try:  # tests/ is a package
    from .test_drm_kernel_oracle import oracle_drm
except ImportError:  # tests/ on sys.path (rootdir-style collection)
    from test_drm_kernel_oracle import oracle_drm

F64 = torch.float64
DIRECTIONS = ["horizontal", "vertical"]
ROUTES = ["full", "gram"]
SHAPES = [(12, 7), (7, 12), (6, 6), (1, 9), (9, 1)]


def _sid(shape):
    return f"{shape[0]}x{shape[1]}"


def randn(seed, *shape, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.to(F64)
    b = b.to(F64)
    denom = b.norm()
    return float((a - b).norm() / denom) if denom > 0 else float(a.norm())


def merge(deltas, weights=None, **kw):
    kw.setdefault("compute_dtype", F64)
    return drm_merge_matrix(deltas, weights, **kw)


# --------------------------------------------------------------------------
# Reconstruction
# --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
@pytest.mark.parametrize("svd", ROUTES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_single_model_density_one_returns_its_delta(direction, svd, shape):
    # N = 1: the coordinate vectors are the singular vectors themselves (unit,
    # nu = 1), sigma~ = sigma, nothing is pruned, a single model always wins
    # its own vote and the disjoint mean divides by 1: U S V^T = D.
    delta = randn(1, *shape)
    out = merge([delta], direction=direction, density=1.0, rank_tol=0.0, svd=svd)
    assert out.shape == shape and out.dtype == F64
    assert rel(out, delta) < 1e-12
    # a weight multiplies the single contribution
    out = merge([delta], [2.5], direction=direction, density=1.0, rank_tol=0.0, svd=svd)
    assert rel(out, 2.5 * delta) < 1e-12


@pytest.mark.parametrize("svd", ROUTES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_single_model_rank_cut_gives_truncated_svd(direction, svd):
    # Same argument with a rank cut: the result is the best rank-r
    # approximation, r = #{sigma_j > 0.3 sigma_max}. Singular values are
    # planted so that r = 2 with a clear margin.
    gen = np.random.default_rng(3)
    u, _ = np.linalg.qr(gen.standard_normal((9, 4)))
    v, _ = np.linalg.qr(gen.standard_normal((6, 4)))
    s = np.array([5.0, 2.0, 1.0, 0.2])
    delta = torch.from_numpy(u @ np.diag(s) @ v.T)
    expected = torch.from_numpy(u[:, :2] @ np.diag(s[:2]) @ v[:, :2].T)
    out = merge([delta], direction=direction, density=1.0, rank_tol=0.3, svd=svd)
    assert rel(out, expected) < 1e-12
    # and the lossy cut really removed something
    assert rel(out, delta) > 0.1


@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
@pytest.mark.parametrize("n_models", [2, 3, 5])
@pytest.mark.parametrize("svd", ROUTES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_identical_finetunes_return_the_delta(direction, svd, n_models, shape):
    # N copies of D: sigma_j(A) = sqrt(N) sigma_j(D), each model's block is
    # V_D^T / sqrt(N) (H) so nu = 1/sqrt(N), the unit coordinates are V_D^T and
    # sigma~ = sigma_j(D). All C_t are equal, all votes agree, the disjoint
    # mean of N equal values is that value: D.
    delta = randn(2, *shape)
    out = merge([delta.clone() for _ in range(n_models)], direction=direction,
                density=1.0, rank_tol=0.0, svd=svd)
    assert rel(out, delta) < 1e-12


# --------------------------------------------------------------------------
# Degenerate inputs
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("density", [1.0, 0.2])
@pytest.mark.parametrize("svd", ROUTES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_all_zero_deltas_give_zeros(direction, svd, density, dtype):
    deltas = [torch.zeros(5, 3) for _ in range(3)]
    out = drm_merge_matrix(deltas, [1.0, 2.0, 0.5], direction=direction, density=density,
                           rank_tol=0.0, svd=svd, compute_dtype=dtype)
    assert out.shape == (5, 3) and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert not out.any()


def test_all_zero_elementwise_gives_zeros():
    out = elementwise_merge([torch.zeros(4), torch.zeros(4)], density=0.5)
    assert torch.isfinite(out).all() and not out.any()


@pytest.mark.parametrize("shape", [(1, 9), (9, 1)], ids=_sid)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_one_row_and_one_column_single_model(direction, shape):
    delta = randn(4, *shape)
    out = merge([delta], direction=direction, density=1.0, rank_tol=0.0)
    assert out.shape == shape
    assert rel(out, delta) < 1e-12


@pytest.mark.parametrize("flags", [{}, {"sign_election": False}, {"disjoint": False}],
                         ids=["ties", "no-election", "plain-mean"])
@pytest.mark.parametrize("case", ["1-row-horizontal", "1-col-vertical"])
def test_vector_shaped_matrices_reduce_to_elementwise_ties(case, flags):
    # 1 x m, horizontal: A = [d_1 | ... | d_N] is one row, U = [+-1], sigma =
    # |A|, model t's coordinate vector is d_t / sigma, so nu_t = |d_t|/sigma,
    # the unit vector is d_t/|d_t| and sigma~_t = |d_t|: C_t = d_t (up to the
    # common sign of U, which U @ M undoes). With density 1 DRM is exactly the
    # elementwise TIES merge of the rows. Same for n x 1, vertical.
    shape = (1, 9) if case.startswith("1-row") else (9, 1)
    direction = "horizontal" if case.startswith("1-row") else "vertical"
    deltas = [randn(10 + t, *shape) for t in range(4)]
    deltas[2] = torch.zeros(shape)
    weights = [1.0, 0.5, 3.0, 0.0]
    drm = merge(deltas, weights, direction=direction, density=1.0, rank_tol=0.0, **flags)
    ew = elementwise_merge(deltas, weights, compute_dtype=F64, **flags)
    assert rel(drm, ew) < 1e-12


# --------------------------------------------------------------------------
# Symmetries
# --------------------------------------------------------------------------


@pytest.mark.parametrize("density", [1.0, 0.3, 0.05])
@pytest.mark.parametrize("svd", ROUTES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_model_order_does_not_matter(direction, svd, density):
    # Permuting the models permutes column (row) blocks of A: same U, sigma
    # (V^T, sigma), the blocks and their weights permute together, and the
    # joint pruning, vote and mean are symmetric. (Holds when no two
    # normalized coordinates tie exactly; with length-1 coordinate vectors,
    # e.g. a 9x1 matrix in the horizontal direction, every normalized
    # coordinate is +-1 and the flat-index tie rule makes the pruning
    # order-dependent; random 10x6 data has no ties.)
    deltas = [randn(20 + t, 10, 6) * (t + 1) for t in range(4)]
    weights = [1.0, 0.5, 2.0, 0.0]
    out = merge(deltas, weights, direction=direction, density=density, rank_tol=0.01, svd=svd)
    perm = [2, 0, 3, 1]
    out_p = merge([deltas[i] for i in perm], [weights[i] for i in perm], direction=direction,
                  density=density, rank_tol=0.01, svd=svd)
    assert rel(out_p, out) < 1e-11


@pytest.mark.parametrize("c", [3.7, 1e-3])
@pytest.mark.parametrize("density", [1.0, 0.3])
@pytest.mark.parametrize("svd", ROUTES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_positive_scaling_is_equivariant(direction, svd, density, c):
    # c > 0: sigma scales by c, the singular vectors (hence the normalized
    # coordinates, the relative rank cut, the pruning mask and all signs) are
    # unchanged, sigma~ scales by c: the result scales by c.
    deltas = [randn(30 + t, 8, 11) for t in range(3)]
    out = merge(deltas, [1.0, 2.0, 0.5], direction=direction, density=density, svd=svd)
    out_c = merge([c * d for d in deltas], [1.0, 2.0, 0.5], direction=direction,
                  density=density, svd=svd)
    assert rel(out_c, c * out) < 1e-11


@pytest.mark.parametrize("density", [1.0, 0.3, 0.05])
@pytest.mark.parametrize("svd", ROUTES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_negation_is_odd_without_exact_vote_ties(direction, svd, density):
    # -A has the singular triplets (u, sigma, -v): every C_t changes sign, the
    # pruning mask (on magnitudes) is unchanged, every vote and every kept
    # entry flips, so f(-D) = -f(D). The only way to break oddness is the
    # global tie rule: an entry whose vote is exactly 0 with non-zero
    # contributions takes sign(sum of elected signs), and when that sum is 0
    # too the rule says +1 for both D and -D. Random data has no exact vote
    # ties among non-zero contributions (entries where every contribution is
    # zero elect a sign that does not matter), so oddness must hold here.
    deltas = [randn(40 + t, 9, 7) for t in range(3)]
    out = merge(deltas, [1.0, 2.0, 0.5], direction=direction, density=density, svd=svd)
    out_neg = merge([-d for d in deltas], [1.0, 2.0, 0.5], direction=direction,
                    density=density, svd=svd)
    assert rel(out_neg, -out) < 1e-11


def test_global_tie_rule_breaks_oddness_only_when_majority_is_zero():
    # Entry 0 is an exact tie (+1 vs -1). Elected signs of the other entries:
    # +, -  => majority 0 => tie goes to +: model 0's +1 survives. Negated, the
    # other entries elect -, + (majority 0 again) and the tie goes to + again:
    # now model 1's +1 survives. So f(-x)[0] = f(x)[0] = +1, not -f(x)[0].
    x = [torch.tensor([1.0, 2.0, -2.0]), torch.tensor([-1.0, 0.0, 0.0])]
    out = elementwise_merge(x, compute_dtype=F64)
    out_neg = elementwise_merge([-t for t in x], compute_dtype=F64)
    assert out.tolist() == [1.0, 2.0, -2.0]
    assert out_neg.tolist() == [1.0, -2.0, 2.0]
    # With a non-zero majority (one more + entry) the tie follows it, and the
    # negated input elects the opposite: oddness holds.
    y = [torch.tensor([1.0, 2.0, -2.0, 3.0]), torch.tensor([-1.0, 0.0, 0.0, 0.0])]
    out = elementwise_merge(y, compute_dtype=F64)
    out_neg = elementwise_merge([-t for t in y], compute_dtype=F64)
    assert out.tolist() == [1.0, 2.0, -2.0, 3.0]
    assert out_neg.tolist() == [-1.0, -2.0, 2.0, -3.0]


def _flip_pairs(which):
    """Index set of singular pairs to flip: every other one, starting at 0."""
    return torch.arange(which) % 2 == 0


@pytest.mark.parametrize("shape", [(10, 8), (14, 2), (2, 14)], ids=_sid)
@pytest.mark.parametrize("density", [1.0, 0.3, 0.05])
@pytest.mark.parametrize("svd", ROUTES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_invariant_to_singular_pair_sign_flips(monkeypatch, direction, svd, density, shape):
    # Flipping (u_j, v_j) -> (-u_j, -v_j) flips row j of every model's
    # coordinates: magnitudes (pruning) unchanged, row j of every C_t and of
    # the vote flips, so row j of M flips and U @ M (M @ V^T) is unchanged.
    # (Exact vote ties with non-zero contributions would make the global tie
    # rule sign-dependent; random data has none.)
    # (shapes chosen so that the Gram route runs both on the left Gram, p x p,
    # and on the right one, N*q x N*q)
    deltas = [randn(50 + t, *shape) * (1 + t) for t in range(3)]
    weights = [1.0, 0.0, 2.0]
    kw = dict(direction=direction, density=density, rank_tol=0.01, svd=svd)
    reference = merge(deltas, weights, **kw)
    stack = torch.stack(deltas)
    if direction == "vertical":  # the kernel's V is H of the transposes
        stack = stack.transpose(1, 2).contiguous()
    basis_plain = decompose.low_rank_factors(stack, rank_tol=0.01, mode=svd)[0]

    calls = {"n": 0}
    if svd == "full":
        original_svd = torch.linalg.svd

        def flipped_svd(a, *args, **kwargs):
            u, s, vh = original_svd(a, *args, **kwargs)
            sign = torch.where(_flip_pairs(s.shape[-1]), -1.0, 1.0).to(u.dtype)
            calls["n"] += 1
            return u * sign, s, vh * sign.unsqueeze(1)

        monkeypatch.setattr(torch.linalg, "svd", flipped_svd)
    else:
        original_eigh = torch.linalg.eigh

        def flipped_eigh(a, *args, **kwargs):
            w, v = original_eigh(a, *args, **kwargs)
            sign = torch.where(_flip_pairs(w.shape[-1]), -1.0, 1.0).to(v.dtype)
            calls["n"] += 1
            return w, v * sign

        monkeypatch.setattr(torch.linalg, "eigh", flipped_eigh)

    # the patch is in the kernel's path: some basis vectors really flip
    basis_flipped = decompose.low_rank_factors(stack, rank_tol=0.01, mode=svd)[0]
    assert calls["n"] == 1
    assert not torch.allclose(basis_flipped, basis_plain)
    assert torch.allclose(basis_flipped.abs(), basis_plain.abs(), atol=1e-12)

    out = merge(deltas, weights, **kw)
    assert calls["n"] == 2
    assert rel(out, reference) < 1e-12


# --------------------------------------------------------------------------
# The joint decomposition
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data,rank_tol",
    [("random", 0.0), ("random", 0.01), ("low-rank", 0.01), ("low-rank", 0.0), ("tall", 0.0)],
)
@pytest.mark.parametrize("svd", ROUTES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_shares_of_each_direction_sum_to_one(direction, svd, data, rank_tol):
    # The stacked per-model blocks are slices of an orthonormal factor (rows of
    # V^T for H, columns of U for V), so for every kept direction j,
    # sum_t nu_{j,t}^2 = 1, and D_t = basis diag(sigma) coords_t.
    if data == "random":
        stack = randn(60, 3, 8, 5)
    elif data == "tall":
        stack = randn(61, 2, 12, 3)  # the shared axis (12) exceeds N*q = 6
    else:
        stack = torch.einsum("tnk,tkm->tnm", randn(62, 3, 8, 2), randn(63, 3, 2, 5))
    if direction == "vertical":  # the kernel's V is H of the transposes
        stack = stack.transpose(1, 2).contiguous()
    basis, sigma, coords = decompose.low_rank_factors(stack, rank_tol=rank_tol, mode=svd)
    shares = (coords**2).sum(dim=(0, 2))
    assert sigma.numel() > 0
    assert torch.allclose(shares, torch.ones_like(shares), atol=1e-10), shares
    # the kept factors are orthonormal
    eye = torch.eye(sigma.numel(), dtype=F64)
    assert torch.allclose(basis.T @ basis, eye, atol=1e-10)
    flat = coords.permute(1, 0, 2).reshape(sigma.numel(), -1)
    assert torch.allclose(flat @ flat.T, eye, atol=1e-10)
    if rank_tol == 0.0:  # nothing lost: exact reconstruction
        recon = torch.einsum("pr,r,trq->tpq", basis, sigma, coords)
        assert rel(recon, stack) < 1e-12


# --------------------------------------------------------------------------
# Planted sign conflicts (TIES semantics in a trivially aligned joint space)
# --------------------------------------------------------------------------

# Diagonal deltas share the standard basis: in A = [D_1 | D_2 | D_3] the rows
# have disjoint supports, so (with distinct row norms) U is a signed
# permutation, sigma_i = |(d_1i, d_2i, d_3i)|, model t's coordinate vector i is
# d_ti e_i / sigma_i: unit coordinate sign(d_ti) e_i, sigma~ = |d_ti|, C_t[i, i]
# = +-d_ti. DRM with density 1 is then TIES on the diagonals.
DIAG = np.array(
    [
        # model 1, model 2, model 3           votes (unweighted)
        [3.0, -1.0, -1.0],  # +1  -> keeps 3 (model 1 alone)
        [1.0, 1.0, -5.0],  # -3  -> keeps -5 (model 3 alone)
        [2.0, 2.0, -1.0],  # +3  -> keeps 2, 2
        [-1.0, -2.0, 0.5],  # -2.5 -> keeps -1, -2
        [0.0, 4.0, -3.0],  # +1  -> keeps 4
        [-0.2, 0.0, 0.0],  # -0.2 -> keeps -0.2
        [2.0, -1.5, 0.0],  # +0.5 -> keeps 2 (weighted first it would be -)
    ]
)
DIAG_WEIGHTS = [1.0, 2.0, 0.5]
# disjoint mean of the weighted survivors
DIAG_EXPECTED = [3.0, -2.5, (2.0 + 4.0) / 2, (-1.0 - 4.0) / 2, 8.0, -0.2, 2.0]
# plain mean over N = 3 (disjoint=False)
DIAG_EXPECTED_PLAIN = [1.0, -2.5 / 3, 2.0, -5.0 / 3, 8.0 / 3, -0.2 / 3, 2.0 / 3]
# no election: disjoint mean of all weighted non-zero values
DIAG_EXPECTED_NOELECT = [
    (3 - 2 - 0.5) / 3, (1 + 2 - 2.5) / 3, (2 + 4 - 0.5) / 3, (-1 - 4 + 0.25) / 3,
    (8 - 1.5) / 2, -0.2, (2 - 3) / 2,
]


def _diag_deltas(shape):
    n, m = shape
    deltas = []
    for t in range(3):
        d = torch.zeros(n, m, dtype=F64)
        d[range(len(DIAG)), range(len(DIAG))] = torch.from_numpy(DIAG[:, t])
        deltas.append(d)
    return deltas


@pytest.mark.parametrize(
    "flags,expected",
    [({}, DIAG_EXPECTED), ({"disjoint": False}, DIAG_EXPECTED_PLAIN),
     ({"sign_election": False}, DIAG_EXPECTED_NOELECT)],
    ids=["ties", "plain-mean", "no-election"],
)
@pytest.mark.parametrize("shape", [(7, 7), (7, 9), (9, 7)], ids=_sid)
@pytest.mark.parametrize("svd", ROUTES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_planted_sign_conflicts_resolved_as_ties(direction, svd, shape, flags, expected):
    row_norms = np.linalg.norm(DIAG, axis=1)
    assert len(set(np.round(row_norms, 6))) == len(row_norms)  # distinct sigmas
    out = merge(_diag_deltas(shape), DIAG_WEIGHTS, direction=direction, density=1.0,
                rank_tol=0.0, svd=svd, **flags)
    want = torch.zeros(shape, dtype=F64)
    want[range(len(DIAG)), range(len(DIAG))] = torch.tensor(expected, dtype=F64)
    assert torch.allclose(out, want, atol=1e-12), (out.diagonal(), expected)


def test_zero_weight_model_still_votes():
    # weights after the election: a zero-weight model's unweighted value still
    # votes (-3 outvotes 1 + 1), then contributes 0 and is not counted.
    deltas = [torch.zeros(3, 3, dtype=F64) for _ in range(3)]
    for d, v in zip(deltas, [1.0, -3.0, 1.0]):
        d[0, 0] = v
    deltas[0][1, 1] = 2.0  # a second direction with a distinct sigma
    out = merge(deltas, [1.0, 0.0, 1.0], direction="horizontal", density=1.0, rank_tol=0.0)
    assert abs(float(out[0, 0])) < 1e-12
    assert abs(float(out[1, 1]) - 2.0) < 1e-12
    ew = elementwise_merge([torch.tensor([1.0]), torch.tensor([-3.0]), torch.tensor([1.0])],
                           [1.0, 0.0, 1.0])
    assert ew.tolist() == [0.0]


# --------------------------------------------------------------------------
# Zero deltas and disjoint supports
# --------------------------------------------------------------------------


@pytest.mark.parametrize("svd", ROUTES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_zero_model_is_not_counted_at_density_one(direction, svd):
    # An all-zero model has zero coordinates (exactly, not ~1e-16 renormalized
    # to unit length), takes no part in the vote and is not counted in the
    # disjoint mean: [D1, 0, D2] merges like [D1, D2].
    d1, d2 = randn(70, 8, 6), randn(71, 8, 6) * 2
    zero = torch.zeros(8, 6, dtype=F64)
    with_zero = merge([d1, zero, d2], [1.5, 3.0, 0.5], direction=direction, density=1.0, svd=svd)
    without = merge([d1, d2], [1.5, 0.5], direction=direction, density=1.0, svd=svd)
    assert rel(with_zero, without) < 1e-12
    # sanity: this is not the trivial mean over 3 (the zero model would dilute it)
    assert rel(with_zero, without * 2 / 3) > 0.1


@pytest.mark.parametrize("svd", ROUTES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_zero_model_changes_only_the_keep_count(direction, svd):
    # With density < 1 the keep count is k = floor(density * K + 0.5) with
    # K = N * r * L counting every model, the zero one included (L = m for H,
    # n for V). The zero model's coordinates are zero, so they never win a
    # slot over a non-zero coordinate. Hence [D1, 0, D2] at density d equals
    # [D1, D2] at the density d2 that keeps the same k out of 2 * r * L, and
    # differs from [D1, D2] at the same d (k differs).
    d1, d2 = randn(72, 8, 6), randn(73, 8, 6) * 2
    zero = torch.zeros(8, 6, dtype=F64)
    density = 0.2
    a = torch.cat([d1, d2], dim=1 if direction == "horizontal" else 0).numpy()
    s = np.linalg.svd(a, compute_uv=False)
    r = int(np.sum(s > 0.01 * s[0]))
    length = 6 if direction == "horizontal" else 8
    k3 = math.floor(density * 3 * r * length + 0.5)
    k2 = math.floor(density * 2 * r * length + 0.5)
    assert k3 != k2
    density2 = k3 / (2 * r * length)
    assert math.floor(density2 * 2 * r * length + 0.5) == k3
    with_zero = merge([d1, zero, d2], [1.5, 3.0, 0.5], direction=direction, density=density, svd=svd)
    same_k = merge([d1, d2], [1.5, 0.5], direction=direction, density=density2, svd=svd)
    same_d = merge([d1, d2], [1.5, 0.5], direction=direction, density=density, svd=svd)
    assert torch.isfinite(with_zero).all()
    assert rel(with_zero, same_k) < 1e-12
    assert rel(with_zero, same_d) > 1e-3


def _disjoint_pair(split):
    d1 = torch.zeros(8, 6, dtype=F64)
    d2 = torch.zeros(8, 6, dtype=F64)
    if split == "rows":
        d1[:4] = randn(80, 4, 6)
        d2[4:] = randn(81, 4, 6) * 1.7
    else:
        d1[:, :3] = randn(82, 8, 3)
        d2[:, 3:] = randn(83, 8, 3) * 1.7
    return d1, d2


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("svd", ROUTES)
def test_row_disjoint_supports_horizontal_merge_to_the_sum(svd, dtype, tol):
    # D1 lives in rows 0-3, D2 in rows 4-7; horizontal stack [D1 | D2]. Every
    # left singular vector u_j is supported on one row block (distinct
    # singular values), so the other model's coordinate vector D_t^T u_j /
    # sigma_j is exactly 0 in exact arithmetic: each direction has one
    # contributor, the vote keeps it, the disjoint mean divides by 1, and
    # U @ M = D1 + D2 exactly (rank_tol 0, full-rank blocks, density 1). This
    # is exact arithmetic's answer. Numerically the "zero" coordinate vectors
    # come out ~1e-16; renormalized to unit length they would be counted in
    # the disjoint mean and roughly halve the result. tol: float64 rounding,
    # or float32 rounding (eps32 = 1.2e-7) times a small condition factor.
    d1, d2 = _disjoint_pair("rows")
    out = drm_merge_matrix([d1, d2], direction="horizontal", density=1.0, rank_tol=0.0,
                           svd=svd, compute_dtype=dtype)
    assert rel(out, d1 + d2) < tol
    out = drm_merge_matrix([d1, d2], [2.0, 0.5], direction="horizontal", density=1.0,
                           rank_tol=0.0, svd=svd, compute_dtype=dtype)
    assert rel(out, 2.0 * d1 + 0.5 * d2) < tol


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("svd", ROUTES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_orthogonal_subspaces_merge_to_the_sum(direction, svd, dtype, tol):
    # The rotated version of the row-disjoint case: for horizontal, D1 and D2
    # have orthogonal column spaces (D_t = Q_t R_t, Q_1 ^ Q_2); for vertical,
    # orthogonal row spaces (D_t = L_t Q_t^T). In exact arithmetic each shared
    # singular vector lies in one model's space, the other model's coordinate
    # vector is exactly 0, and the result is exactly D1 + D2 (rank_tol 0,
    # density 1). Numerically that coordinate vector is ~1e-16 (not 0, on
    # either route, since the basis is not axis-aligned), so this fails unless
    # such negligible shares are treated as zero.
    q, _ = torch.linalg.qr(randn(84, 8, 8))
    if direction == "horizontal":
        d1 = q[:, :4] @ randn(85, 4, 6)
        d2 = q[:, 4:] @ randn(86, 4, 6) * 1.7
    else:
        d1 = randn(85, 6, 4) @ q[:, :4].T
        d2 = randn(86, 6, 4) @ q[:, 4:].T * 1.7
    out = drm_merge_matrix([d1, d2], [2.0, 0.5], direction=direction, density=1.0,
                           rank_tol=0.0, svd=svd, compute_dtype=dtype)
    assert rel(out, 2.0 * d1 + 0.5 * d2) < tol


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "split,direction",
    [("rows", "vertical"), ("cols", "horizontal"), ("cols", "vertical")],
)
@pytest.mark.parametrize("svd", ROUTES)
def test_disjoint_supports_other_layouts_merge_to_the_sum(svd, split, direction, dtype, tol):
    # The same exact-arithmetic argument for the other layouts, where the
    # zeros are individual entries of a shared coordinate vector instead of
    # whole vectors:
    # * rows + vertical: U's row block t is D_t V S^-1, which is exactly 0 on
    #   the rows where D_t is 0; M's row i has one contributor.
    # * cols + horizontal: V^T's column block t is S^-1 U^T D_t, exactly 0 on
    #   the columns where D_t is 0; M's column k has one contributor.
    # * cols + vertical: the right singular vectors split by column block
    #   (whole-vector zeros, as in the horizontal rows case).
    # In each case M = C_1 + C_2 and the result is exactly D1 + D2 (rank_tol
    # 0, density 1). An entry that comes out ~1e-17 instead of 0 and agrees
    # in sign with the other model's entry is counted in the disjoint mean
    # and halves that entry of M, so this fails if rounding noise is counted.
    d1, d2 = _disjoint_pair(split)
    out = drm_merge_matrix([d1, d2], direction=direction, density=1.0, rank_tol=0.0, svd=svd,
                           compute_dtype=dtype)
    assert rel(out, d1 + d2) < tol
    out = drm_merge_matrix([d1, d2], [2.0, 0.5], direction=direction, density=1.0, rank_tol=0.0,
                           svd=svd, compute_dtype=dtype)
    assert rel(out, 2.0 * d1 + 0.5 * d2) < tol


# --------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------


@pytest.mark.parametrize("density", [1.0, 0.3])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_bf16_inputs_are_computed_in_float32(direction, density):
    deltas = [randn(90 + t, 12, 7, dtype=torch.float32).to(torch.bfloat16) for t in range(3)]
    out = drm_merge_matrix(deltas, [1.0, 2.0, 0.5], direction=direction, density=density)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    ref = drm_merge_matrix([d.float() for d in deltas], [1.0, 2.0, 0.5], direction=direction,
                           density=density)
    # same values, same float32 computation
    assert rel(out, ref) < 1e-6
    with pytest.raises(ValueError):
        drm_merge_matrix(deltas, direction=direction, compute_dtype=torch.bfloat16)


@pytest.mark.parametrize("density", [1.0, 0.3])
@pytest.mark.parametrize("svd", ROUTES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_float32_matches_float64_on_well_conditioned_inputs(direction, svd, density):
    # Tolerance: a backward-stable SVD (or the float64 Gram route) in float32
    # is the exact SVD of A + E with |E| ~ c * eps32 * sigma_max (eps32 =
    # 1.2e-7, c a small multiple of sqrt(dims) ~ 5). Singular vectors move by
    # ~|E| / gap (Wedin); the data below is checked to have relative gaps
    # >= 0.02 between kept singular values and to the cut, so coordinates move
    # by <~ 5 * 1.2e-7 / 0.02 = 3e-5 of their scale, and the result (a sum of
    # products of them) by a small multiple of that at most. 2e-4 leaves room
    # for that constant; the measured error is ~1e-6. The data is also checked
    # to have no pruning or vote decision within 1e-3 (relative) of flipping,
    # far more than the perturbation, so float32 makes the same decisions.
    deltas = [randn(100 + t, 12, 7) * (1 + 0.5 * t) for t in range(3)]
    weights = [1.0, 2.0, 0.5]
    info: dict = {}
    oracle_drm([d.numpy() for d in deltas], weights, direction=direction, density=density,
               rank_tol=0.01, info=info)
    s = info["sigma"] / info["sigma"][0]
    assert np.min(-np.diff(s)) > 0.02 and np.min(np.abs(s - 0.01)) > 0.02
    assert info["prune_margin"] > 1e-3 and info["vote_margin"] > 1e-3
    assert info["min_significant_nu"] > 1e-2
    out64 = merge(deltas, weights, direction=direction, density=density, svd=svd)
    out32 = drm_merge_matrix([d.float() for d in deltas], weights, direction=direction,
                             density=density, svd=svd, compute_dtype=torch.float32)
    assert out32.dtype == torch.float32
    assert rel(out32, out64) < 2e-4


@pytest.mark.parametrize("as_tensor", [True, False], ids=["stacked", "list"])
@pytest.mark.parametrize("svd", ["full", "gram", "auto"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_inputs_are_not_modified(direction, svd, as_tensor):
    # The kernel may avoid copying its input stack; it must still never
    # write to the caller's tensors (they are a model's weights in mergekit).
    deltas = [randn(110 + t, 9, 5) for t in range(3)]
    deltas[1] = torch.zeros(9, 5, dtype=F64)
    before = [d.clone() for d in deltas]
    arg = torch.stack(deltas) if as_tensor else deltas
    snapshot = arg.clone() if as_tensor else None
    merge(arg, [1.0, 2.0, 0.5], direction=direction, density=0.3, svd=svd)
    elementwise_merge(arg, [1.0, 2.0, 0.5], density=0.3, compute_dtype=F64)
    if as_tensor:
        assert torch.equal(arg, snapshot)
    for d, b in zip(deltas, before):
        assert torch.equal(d, b)


# --------------------------------------------------------------------------
# keep_top_magnitude and elementwise trim
# --------------------------------------------------------------------------


def test_keep_top_magnitude_exact_count_with_ties():
    x = torch.tensor([1.0, 3.0, -3.0, 3.0, 2.0, 0.0])
    # k = floor(0.5 * 6 + 0.5) = 3: the three |3|s
    assert keep_top_magnitude(x, 0.5).tolist() == [False, True, True, True, False, False]
    # k = floor(0.34 * 6 + 0.5) = 2: two of the three tied |3|s, in flat order
    assert keep_top_magnitude(x, 0.34).tolist() == [False, True, True, False, False, False]
    # k = floor(0.01 * 6 + 0.5) = 0 -> at least one is kept
    assert keep_top_magnitude(x, 0.01).tolist() == [False, True, False, False, False, False]
    # k = 5: everything but the smallest
    assert keep_top_magnitude(x, 0.8).tolist() == [True, True, True, True, True, False]
    assert keep_top_magnitude(x, 1.0).all()
    # all tied: the first k in flat order, shape preserved
    mask = keep_top_magnitude(torch.full((3, 4), -2.0), 0.5)
    assert mask.shape == (3, 4) and mask.dtype == torch.bool
    assert mask.reshape(-1).tolist() == [True] * 6 + [False] * 6
    # half-way counts round up (floor(x + 0.5)): 0.25 * 10 = 2.5 -> 3
    assert int(keep_top_magnitude(torch.arange(10.0), 0.25).sum()) == 3


@pytest.mark.parametrize("numel", [1, 2, 7, 64, 1000])
def test_keep_top_magnitude_counts_on_random_and_integer_data(numel):
    gen = torch.Generator().manual_seed(numel)
    for data in (torch.randn(numel, generator=gen),
                 torch.randint(-3, 4, (numel,), generator=gen).float()):
        for density in (0.05, 0.2, 0.5, 0.9, 1.0):
            mask = keep_top_magnitude(data, density)
            keep = min(max(math.floor(density * numel + 0.5), 1), numel)
            assert int(mask.sum()) == keep
            # every kept magnitude >= every dropped magnitude
            if 0 < keep < numel:
                assert data.abs()[mask].min() >= data.abs()[~mask].max()


def test_elementwise_trim_is_per_model():
    # each model keeps its own top-k: model 0 keeps 5 (not 1), model 1 keeps -4
    x = [torch.tensor([5.0, 1.0, 0.5, 0.1]), torch.tensor([0.01, -4.0, 0.02, 0.03])]
    out = elementwise_merge(x, density=0.25, compute_dtype=F64)
    assert out.tolist() == [5.0, -4.0, 0.0, 0.0]


def _kth_cases():
    gen = torch.Generator().manual_seed(3)
    n = (1 << 20) + 12345  # above the bracketing threshold
    randn = torch.randn(n, generator=gen).abs()
    ties = torch.randint(0, 7, (n,), generator=gen).float()  # heavy ties
    ascending = torch.arange(n, dtype=torch.float32)
    # The strided sample sees only zeros: its bracket is wrong, the counts must
    # reject it and the plain kthvalue must answer.
    fooled = torch.rand(n, generator=gen) + 1.0
    fooled[:: max(1, n // (1 << 16))] = 0.0
    return {"randn": randn, "ties": ties, "ascending": ascending, "fooled": fooled,
            "float64": randn.double()}


@pytest.mark.parametrize("case", ["randn", "ties", "ascending", "fooled", "float64"])
def test_kth_smallest_equals_kthvalue(case):
    from mergekit_drm.drm.kernel import kth_smallest

    flat = _kth_cases()[case]
    n = flat.numel()
    for k in (1, 2, n // 5, n // 2, n - n // 5 + 1, n - 1, n):
        assert kth_smallest(flat, k) == torch.kthvalue(flat, k).values, (case, k)


def test_keep_top_magnitude_keeps_exactly_the_largest_on_large_inputs():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 700, 600, generator=gen)  # 1.26M entries: the bracketed path
    mask = keep_top_magnitude(x, 0.2)
    keep = int(0.2 * x.numel() + 0.5)
    assert int(mask.sum()) == keep
    assert x.abs()[mask].min() >= x.abs()[~mask].max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_right_gram_coordinates_equal_the_projection(dtype):
    """The right Gram route takes coordinates from the eigenvectors (no GEMM):
    they must equal diag(1/sigma) U^T D_t, the projection of the deltas, and be
    exact zeros where a model left a column (or the whole matrix) unchanged."""
    from mergekit_drm import decompose

    g = torch.Generator().manual_seed(7)
    n_models, p, q = 3, 40, 9  # short side N*q = 27 < p: the right route
    deltas = torch.randn(n_models, p, q, generator=g, dtype=torch.float64)
    deltas[0, :, 4] = 0  # model 0 left column 4 unchanged
    deltas[2] = 0  # model 2 left the matrix unchanged
    deltas = deltas.to(dtype)
    basis, sigma, coords = decompose._gram_factors(deltas, 1e-6, torch.float64, left=False)
    projected = decompose.project(deltas, basis, sigma)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(coords, projected, atol=tol, rtol=0)
    assert (coords[0, :, 4] == 0).all() and (coords[2] == 0).all()
    assert coords[1].abs().min() > 0  # no spurious zeros elsewhere
    # side by side the coordinate rows are orthonormal
    side = coords.permute(1, 0, 2).reshape(coords.shape[1], -1).double()
    assert torch.allclose(side @ side.T, torch.eye(side.shape[0], dtype=torch.float64), atol=10 * tol)
    # and they reconstruct every delta
    rebuilt = torch.einsum("pr,r,nrq->npq", basis.double(), sigma.double(), coords.double())
    assert torch.allclose(rebuilt, deltas.double(), atol=1e-4 if dtype == torch.float32 else 1e-10)
