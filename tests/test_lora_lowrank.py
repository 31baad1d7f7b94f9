"""DRM on LoRA factors against the dense kernel on the folded deltas.

``drm_merge_lowrank`` never forms an n x m delta; the reference here is
``drm_merge_matrix`` (itself checked against an independent oracle in
test_drm_kernel_oracle.py) applied to scale_t * B_t @ A_t, with an all-zero
delta for an adapter that does not target the matrix. Random Gaussian factors
with fixed seeds give well-separated singular values and no near-ties at the
pruning threshold, so any disagreement beyond rounding is a bug.
"""

from __future__ import annotations


import pytest
import torch

from mergekit_drm.drm.kernel import drm_merge_matrix
from mergekit_drm.lora.lowrank import (
    LoraFactors,
    drm_merge_lowrank,
    drm_merge_lowrank_parts,
    pad_rank,
    truncate_factors,
)

@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices gain nothing from BLAS threads, and on a busy 2-core
    machine two threads stall each other (10x and more); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TOL64 = 1e-8
TOL32 = 1e-5


def _adapters(shape, ranks, scales, seed, dtype=torch.float64):
    """Factors per model; a rank of None means "does not target this matrix"."""
    gen = torch.Generator().manual_seed(seed)
    n, m = shape
    out = []
    for rank, scale in zip(ranks, scales):
        if rank is None:
            out.append(None)
            continue
        B = torch.randn(n, rank, generator=gen, dtype=torch.float64)
        A = torch.randn(rank, m, generator=gen, dtype=torch.float64) / m**0.5
        out.append(LoraFactors(B.to(dtype), A.to(dtype), scale))
    return out


def _folded(adapters, shape):
    return [
        torch.zeros(shape, dtype=torch.float64)
        if a is None
        else a.scale * a.B.double() @ a.A.double()
        for a in adapters
    ]


def _rel(x, ref):
    return float((x.double() - ref.double()).norm() / ref.double().norm())


CASES = [
    # shape, ranks (None = untargeted), scales, weights
    ((48, 40), (4, 8, 2), (2.0, 1.0, 0.5), (1.0, 0.7, 1.5)),
    ((40, 56), (16, None, 4), (0.5, 1.0, 2.0 / 4**0.5), (1.0, 2.0, 0.3)),
    ((32, 32), (8, 8, 8, 8, 8), (1.0, 1.0, 1.0, 1.0, 1.0), (1.0, 1.0, 1.0, 1.0, 1.0)),
    # sum of ranks above min(n, m): the joint stack is rank deficient
    ((12, 20), (8, 8, None), (1.0, 3.0, 1.0), (0.5, 1.0, 1.0)),
    ((24, 16), (3,), (1.0,), (2.0,)),
]


@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_lowrank_matches_kernel_float64(direction, density, case):
    shape, ranks, scales, weights = CASES[case]
    adapters = _adapters(shape, ranks, scales, seed=case)
    B, A = drm_merge_lowrank(
        adapters, weights, shape=shape, direction=direction, density=density,
        compute_dtype=torch.float64,
    )
    ref = drm_merge_matrix(
        _folded(adapters, shape), weights, direction=direction, density=density,
        compute_dtype=torch.float64,
    )
    assert B.shape[0] == shape[0] and A.shape[1] == shape[1]
    assert B.shape[1] == A.shape[0] <= sum(r for r in ranks if r)
    assert _rel(B @ A, ref) < TOL64


@pytest.mark.parametrize(
    "options",
    [
        dict(renorm=False),
        dict(sign_election=False),
        dict(disjoint=False),
        dict(rank_tol=0.0),
        dict(rank_tol=0.3),
        dict(scale=1.7),
        dict(renorm=False, sign_election=False, disjoint=False, scale=0.5),
    ],
)
@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
def test_lowrank_options_match_kernel(direction, options):
    shape, ranks, scales, weights = CASES[1]
    adapters = _adapters(shape, ranks, scales, seed=11)
    kwargs = dict(direction=direction, density=0.3, compute_dtype=torch.float64, **options)
    B, A = drm_merge_lowrank(adapters, weights, shape=shape, **kwargs)
    ref = drm_merge_matrix(_folded(adapters, shape), weights, **kwargs)
    assert _rel(B @ A, ref) < TOL64


@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
@pytest.mark.parametrize("density", [0.1, 0.3, 1.0])
def test_lowrank_float32(direction, density):
    """float32 factors and compute: agreement to rounding (1e-5) on these data."""
    shape, ranks, scales, weights = CASES[0]
    adapters = _adapters(shape, ranks, scales, seed=5, dtype=torch.float32)
    B, A = drm_merge_lowrank(
        adapters, weights, shape=shape, direction=direction, density=density,
        compute_dtype=torch.float32,
    )
    assert B.dtype == torch.float32
    ref = drm_merge_matrix(
        _folded(adapters, shape), weights, direction=direction, density=density,
        compute_dtype=torch.float64,
    )
    assert _rel(B @ A, ref) < TOL32


def test_untargeted_adapter_counts_in_keep_count_but_not_in_mean():
    """An adapter without this matrix is an all-zero delta: it takes no part in
    the SVD, election or disjoint mean, but its N*r*m zero coordinates count in
    the joint keep count, so dropping it from the list changes the result."""
    shape = (30, 24)
    adapters = _adapters(shape, (4, None, 6), (1.0, 1.0, 1.0), seed=3)
    with_zero = drm_merge_lowrank(adapters, [1.0, 5.0, 1.0], shape=shape, density=0.2, compute_dtype=torch.float64)
    without = drm_merge_lowrank(
        [adapters[0], adapters[2]], [1.0, 1.0], shape=shape, density=0.2, compute_dtype=torch.float64
    )
    product = with_zero[0] @ with_zero[1]
    assert _rel(without[0] @ without[1], product) > 1e-3
    # An adapter whose B is exactly zero (untrained) behaves like an absent one.
    zero_b = LoraFactors(torch.zeros(30, 5, dtype=torch.float64), torch.randn(5, 24, dtype=torch.float64))
    again = drm_merge_lowrank(
        [adapters[0], zero_b, adapters[2]], [1.0, 5.0, 1.0], shape=shape, density=0.2,
        compute_dtype=torch.float64,
    )
    assert _rel(again[0] @ again[1], product) < TOL64


def test_all_untargeted_gives_rank_zero():
    B, A = drm_merge_lowrank([None, None], shape=(8, 6), compute_dtype=torch.float64)
    assert B.shape == (8, 0) and A.shape == (0, 6)
    B, A = pad_rank(B, A, 1)
    assert B.shape == (8, 1) and float((B @ A).abs().max()) == 0.0


@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
def test_fused_parts_match_kernel_per_part(direction):
    """A fused projection (e.g. q, k, v rows of one matrix) is merged part by
    part: slicing B's rows, packed block-diagonally."""
    shape = (36, 20)
    parts = [torch.arange(0, 16), torch.arange(16, 24), torch.arange(24, 36)]
    adapters = _adapters(shape, (4, None, 6), (1.0, 1.0, 0.5), seed=9)
    weights = (1.0, 1.0, 0.8)
    B, A = drm_merge_lowrank_parts(
        adapters, weights, shape=shape, parts=parts, direction=direction, density=0.3,
        compute_dtype=torch.float64,
    )
    folded = _folded(adapters, shape)
    ref = torch.zeros(shape, dtype=torch.float64)
    for rows in parts:
        ref[rows] = drm_merge_matrix(
            [d[rows] for d in folded], weights, direction=direction, density=0.3,
            compute_dtype=torch.float64,
        )
    assert _rel(B @ A, ref) < TOL64
    whole = drm_merge_matrix(folded, weights, direction=direction, density=0.3, compute_dtype=torch.float64)
    assert _rel(whole, ref) > 1e-3  # the split really matters


@pytest.mark.parametrize("rank", [1, 3, 7, 40])
def test_truncation_is_the_best_rank_r_approximation(rank):
    gen = torch.Generator().manual_seed(4)
    B = torch.randn(50, 12, generator=gen, dtype=torch.float64)
    A = torch.randn(12, 30, generator=gen, dtype=torch.float64)
    dense = B @ A
    Bt, At, error = truncate_factors(B, A, rank)
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    k = min(rank, 12)
    best = (u[:, :k] * s[:k]) @ vh[:k]
    assert Bt.shape[1] == k
    assert _rel(Bt @ At, best) < TOL64
    expected = float(s[k:].norm() / s.norm())
    assert abs(error - expected) < 1e-12
    if k < 12:
        assert abs(_rel(Bt @ At, dense) - expected) < 1e-10
    else:
        assert error == 0.0 and Bt is B


def test_lowrank_validates_inputs():
    good = LoraFactors(torch.randn(5, 2), torch.randn(2, 4))
    with pytest.raises(ValueError, match="direction"):
        drm_merge_lowrank([good], shape=(5, 4), direction="diagonal")
    with pytest.raises(ValueError, match="density"):
        drm_merge_lowrank([good], shape=(5, 4), density=0.0)
    with pytest.raises(ValueError, match="is not 6 x 4"):
        drm_merge_lowrank([good], shape=(6, 4))
    with pytest.raises(ValueError, match="weights"):
        drm_merge_lowrank([good], [1.0, 2.0], shape=(5, 4))


def test_no_dense_delta_is_formed(monkeypatch):
    """The low-rank path never multiplies an n x r by an r x m factor pair into
    an n x m matrix: record every matmul's output size on a 512 x 384 problem."""
    shape = (512, 384)
    adapters = _adapters(shape, (4, 8, None), (1.0, 1.0, 1.0), seed=2)
    biggest = []
    real_matmul, real_mm = torch.Tensor.__matmul__, torch.mm

    def spy_matmul(a, b):
        out = real_matmul(a, b)
        biggest.append(out.numel())
        return out

    def spy_mm(a, b, *args, **kwargs):
        out = real_mm(a, b, *args, **kwargs)
        biggest.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy_matmul)
    monkeypatch.setattr(torch, "mm", spy_mm)
    for direction in ("vertical", "horizontal"):
        drm_merge_lowrank(adapters, shape=shape, direction=direction, compute_dtype=torch.float64)
    assert biggest and max(biggest) < shape[0] * shape[1] // 8


@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
def test_float32_result_tracks_float64_at_scale(direction):
    """5 rank-16 adapters on a 1024 x 1024 matrix: 409,600 jointly pruned
    coordinates, so float32 basis noise would flip pruning and election
    decisions (a float32 SVD of the factors gave 9e-3 and 1.2e-2 here). The
    factorization runs in float64, leaving only float32 rounding of the
    projection."""
    shape = (1024, 1024)
    adapters = _adapters(shape, (16,) * 5, (2.0,) * 5, seed=21, dtype=torch.float32)
    b32, a32 = drm_merge_lowrank(adapters, shape=shape, direction=direction, compute_dtype=torch.float32)
    b64, a64 = drm_merge_lowrank(adapters, shape=shape, direction=direction, compute_dtype=torch.float64)
    assert _rel(b32.double() @ a32.double(), b64 @ a64) < TOL32


# ---------------------------------------------------------------------------
# TSV-M, Iso-C, Iso-CTS on factors against their dense kernels
# ---------------------------------------------------------------------------

from mergekit_drm.iso.kernel import iso_c_merge_matrix, iso_cts_merge_matrix  # noqa: E402
from mergekit_drm.lora.lowrank_subspace import (  # noqa: E402
    iso_c_merge_lowrank,
    iso_cts_merge_lowrank,
    tsv_merge_lowrank,
)
from mergekit_drm.subspace import LowRank, factored_svd  # noqa: E402
from mergekit_drm.tsv_m.kernel import tsv_merge_matrix  # noqa: E402

SUBSPACE_CASES = [
    ("tsv", {}, tsv_merge_lowrank, tsv_merge_matrix),
    ("tsv", {"rank_fraction": 0.05}, tsv_merge_lowrank, tsv_merge_matrix),
    ("iso_c", {}, iso_c_merge_lowrank, iso_c_merge_matrix),
    ("iso_cts", {"common_space_fraction": 0.8}, iso_cts_merge_lowrank, iso_cts_merge_matrix),
    ("iso_cts", {"common_space_fraction": 0.1}, iso_cts_merge_lowrank, iso_cts_merge_matrix),
    ("iso_cts", {"common_space_fraction": 0.0}, iso_cts_merge_lowrank, iso_cts_merge_matrix),
]


@pytest.mark.parametrize("case", range(len(SUBSPACE_CASES)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_subspace_lowrank_equals_dense_kernel(case, dtype):
    """Same merge as the dense kernel on the folded deltas (a None adapter and a
    zero weight included), with rank <= sum of the adapters' ranks for TSV-M
    (k >= r_t here) and Iso-C."""
    name, params, lowrank, dense = SUBSPACE_CASES[case]
    shape = (48, 40)
    adapters = _adapters(shape, [4, 8, None, 3, 2], [2.0, 0.5, 1.0, 1.0, 1.5], seed=case, dtype=dtype)
    weights = [1.0, 0.7, 1.0, 1.6, 0.0]
    folded = [d.to(dtype) for d in _folded(adapters, shape)]
    B, A = lowrank(adapters, weights, shape=shape, compute_dtype=dtype, scale=1.3, **params)
    ref = 1.3 * dense(folded, weights, compute_dtype=dtype, **params).double()
    err = float((B.double() @ A.double() - ref).norm() / ref.norm())
    assert err < (TOL64 if dtype == torch.float64 else TOL32 * 10), err
    if name != "iso_cts" and "rank_fraction" not in params:
        assert B.shape[1] <= 4 + 8 + 3 + 2


def test_factored_svd_matches_dense_svd():
    """Triplets of L @ R from the factors: the dense SVD's values, a valid SVD,
    and the dense rank cut (nothing below max(p, q) * eps * sigma_max)."""
    gen = torch.Generator().manual_seed(5)
    left = torch.randn(30, 6, generator=gen, dtype=torch.float64)
    right = torch.randn(6, 20, generator=gen, dtype=torch.float64)
    left[:, 5] = left[:, 0]  # rank 5
    u, s, vh = factored_svd(LowRank(left, right))
    dense = left @ right
    assert s.numel() == 5
    torch.testing.assert_close(s, torch.linalg.svdvals(dense)[:5])
    torch.testing.assert_close(u * s @ vh, dense)
    torch.testing.assert_close(u.T @ u, torch.eye(5, dtype=torch.float64))
    u2, s2, _ = factored_svd(LowRank(left, right), 2)
    assert s2.numel() == 2 and u2.shape == (30, 2)
