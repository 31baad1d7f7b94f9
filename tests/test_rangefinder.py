"""The certified range finder (``rangefinder``, ``svd: lowrank`` / ``auto``) against the exact routes.

Inputs are what the route is for: N LoRA products B @ A folded into
bf16-rounded full weights (rank N*r plus rounding noise below the rank cut),
and, as the case it must refuse, dense deltas with a decaying full-rank
spectrum. The generators assert that the planted problem is well posed (the
exact route keeps exactly the N*r planted directions, none near the cut).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from mergekit_drm import decompose, rangefinder
from mergekit_drm.decompose import low_rank_factors
from mergekit_drm.drm.kernel import drm_merge_matrix, keep_top_magnitude, negligible_share
from mergekit_drm.iso.kernel import iso_c_merge_matrix, iso_cts_merge_matrix
from mergekit_drm.tsv_m.kernel import tsv_merge_matrix


def lora_in_bf16(n_models, n, m, rank, strength, seed, dtype=torch.float64):
    """Deltas bf16(W + B_t A_t) - W for a bf16 base W: LoRA products plus rounding noise."""
    gen = torch.Generator().manual_seed(seed)
    base = (0.02 * torch.randn(n, m, generator=gen)).to(torch.bfloat16).double()
    out = []
    for _ in range(n_models):
        product = torch.randn(n, rank, generator=gen, dtype=torch.float64) @ torch.randn(
            rank, m, generator=gen, dtype=torch.float64)
        product *= strength * base.norm() / product.norm()
        out.append((base + product).to(torch.bfloat16).double() - base)
    return torch.stack(out).to(dtype)


def decaying(n_models, n, m, seed, dtype=torch.float64):
    """Full fine-tune-like deltas: a decaying full-rank spectrum."""
    gen = torch.Generator().manual_seed(seed)
    k = min(n, m)
    spectrum = torch.exp(-torch.arange(k, dtype=torch.float64) / (k / 8))
    return torch.stack([
        (torch.randn(n, k, generator=gen, dtype=torch.float64) * spectrum)
        @ torch.randn(k, m, generator=gen, dtype=torch.float64)
        for _ in range(n_models)
    ]).to(dtype)


def routes(records):
    return [record["route"] for record in records]


def factors(stack, mode, rank_tol=0.01, **kwargs):
    with rangefinder.record_attempts() as records, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = low_rank_factors(stack, rank_tol=rank_tol, mode=mode, **kwargs)
    return found, records, caught


def aligned(got, want):
    """got's basis/coords with each column's sign matched to want's."""
    basis, sigma, coords = got
    sign = torch.sign((basis * want[0]).sum(0))
    return basis * sign, sigma, coords * sign[None, :, None]


@pytest.mark.parametrize("n_models", [2, 3])
def test_lora_stack_takes_the_route_and_matches_the_exact_basis(n_models):
    stack = lora_in_bf16(n_models, 240, 320, rank=4, strength=0.3, seed=n_models)
    exact, records, _ = factors(stack, "gram")
    assert routes(records) == ["left"]
    # well posed: the exact route keeps the planted N*r directions, far from the cut
    assert exact[1].numel() == 4 * n_models
    s_all = torch.linalg.svdvals(stack.permute(1, 0, 2).reshape(240, -1))
    assert s_all[4 * n_models] < 0.5 * 0.01 * s_all[0] < s_all[4 * n_models - 1] / 4
    got, records, caught = factors(stack, "lowrank")
    assert routes(records) == ["lowrank"] and not caught
    attempt = records[0]["attempt"]
    assert attempt.outcome == "certified" and attempt.rank == 4 * n_models
    assert attempt.bound < attempt.cut
    basis, sigma, coords = aligned(got, exact)
    torch.testing.assert_close(sigma, exact[1], rtol=1e-12, atol=0)
    torch.testing.assert_close(basis, exact[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(coords, exact[2], rtol=0, atol=1e-9)


@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_drm_merge_and_pruning_agree_with_the_exact_route(direction, dtype):
    stack = lora_in_bf16(3, 260, 200, rank=4, strength=0.3, seed=11, dtype=dtype)
    weights = [1.0, 0.7, 1.3]
    kwargs = dict(direction=direction, density=0.2, rank_tol=0.01, compute_dtype=dtype)
    with rangefinder.record_attempts() as records:
        got = drm_merge_matrix(stack, weights, svd="lowrank", **kwargs)
    assert routes(records) == ["lowrank"]
    want = drm_merge_matrix(stack, weights, svd="gram", **kwargs)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert float((got - want).norm() / want.norm()) < tol
    # the pruning decision itself: normalized coordinates, top 20 % jointly
    shared = stack if direction == "horizontal" else stack.transpose(1, 2)
    masks = []
    for mode in ("lowrank", "gram"):
        _, _, coords = low_rank_factors(shared, rank_tol=0.01, mode=mode)
        norms = torch.linalg.vector_norm(coords, dim=2, keepdim=True)
        unit = torch.where(norms > negligible_share(dtype), coords / norms, 0)
        masks.append(keep_top_magnitude(unit, 0.2))
    assert torch.equal(masks[0], masks[1])


def test_auto_takes_the_route_on_a_lora_stack_and_falls_through_on_a_dense_one(monkeypatch):
    # Fixed cost constants: the plan (sketch width, budgets) must not depend on this
    # machine. At this test size the exact route is cheap, so the budgets are
    # raised until the plan admits a 64-column probe; what is tested is the route
    # taken and that a dense stack falls through after that one probe pass.
    monkeypatch.setenv("MERGEKIT_DRM_CALIBRATION", "off")
    monkeypatch.setattr(decompose, "PROBE_BUDGET", 0.5)
    monkeypatch.setattr(decompose, "ROUTE_BUDGET", 5.0)
    plan = decompose.lowrank_plan((768, 3072), torch.float32, 0.01)
    assert plan["k"] == 64
    lora = lora_in_bf16(3, 768, 1024, rank=4, strength=0.3, seed=5, dtype=torch.float32)
    got, records, _ = factors(lora, "auto")
    assert routes(records) == ["lowrank"]
    exact, _, _ = factors(lora, "gram")
    basis, sigma, coords = aligned(got, exact)
    assert sigma.numel() == exact[1].numel() == 12
    torch.testing.assert_close(sigma, exact[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(coords, exact[2], rtol=0, atol=1e-5)

    dense = decaying(3, 768, 1024, seed=6, dtype=torch.float32)
    got, records, caught = factors(dense, "auto")
    assert routes(records)[0] == "lowrank-fallback" and routes(records)[1] in ("left", "right", "full")
    attempt = records[0]["attempt"]
    # probe passes only (one per sketch width), then the exact route: the waste
    # stays within the probe budget
    assert attempt.outcome == "saturated" and attempt.passes == len(attempt.k) and not caught
    assert attempt.work <= plan["probe_work"]
    exact, _, _ = factors(dense, "gram")
    assert got[1].numel() == exact[1].numel() > 200


def test_forced_lowrank_falls_back_with_a_warning_when_uncertified():
    # A flat noise floor just below the cut: every direction the sketch leaves
    # out is below the cut, but too close to it for the probes' bound.
    gen = torch.Generator().manual_seed(3)
    n, m = 200, 300
    low = torch.randn(n, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, m, generator=gen, dtype=torch.float64)
    noise = torch.randn(n, m, generator=gen, dtype=torch.float64)
    smax = torch.linalg.matrix_norm(low, 2)
    noise *= 0.0095 * smax / torch.linalg.matrix_norm(noise, 2)
    stack = (low + noise).unsqueeze(0)
    s = torch.linalg.svdvals(stack[0])
    assert s[3] < 0.01 * s[0]  # the exact route keeps 3
    got, records, caught = factors(stack, "lowrank")
    assert routes(records) == ["lowrank-fallback", "left"]
    assert records[0]["attempt"].outcome == "certificate failed"
    assert len(caught) == 1 and "svd: lowrank" in str(caught[0].message)
    exact, _, _ = factors(stack, "gram")
    assert torch.equal(got[1], exact[1])


def test_saturated_sketch_is_refused_without_growth():
    stack = decaying(2, 200, 150, seed=8)
    found, attempt = rangefinder.certified_basis(stack, 0.01, k=40, growths=0)
    assert found is None and attempt.outcome == "saturated" and attempt.passes == 1


@pytest.mark.parametrize("seed", range(4))
def test_certificate_brackets_what_a_basis_leaves_out(seed):
    """Leave a planted direction out of the basis: the lower bound sees it,
    the upper bound is above the true lambda_max of the remainder."""
    gen = torch.Generator().manual_seed(100 + seed)
    n, m, r = 150, 220, 6
    u = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))[0]
    sigma = torch.tensor([1.0, 0.8, 0.6, 0.3, 0.05, 0.02], dtype=torch.float64)
    stack = ((u * sigma) @ v.T + 1e-4 * torch.randn(n, m, generator=gen, dtype=torch.float64)).unsqueeze(0)
    basis = u[:, [0, 1, 2, 4, 5]]  # 0.3 left out: lambda 0.09
    rest = stack[0] - basis @ (basis.T @ stack[0])
    truth = float(torch.linalg.matrix_norm(rest, 2) ** 2)
    work = {"n": 0}
    upper, lower = rangefinder._certificate(
        stack, basis, 1.0, 0.09 * 0.5, gen, lambda columns: True, lambda columns: work.__setitem__("n", work["n"] + 1))
    assert lower <= truth * (1 + 1e-12) <= upper * (1 + 1e-12) or math.isinf(upper)
    assert lower >= 0.045  # a missed direction above the limit is proven, and stops early
    assert work["n"] < rangefinder.PROBE_POWERS[1]


def test_top_k_request_certifies_the_gap():
    gen = torch.Generator().manual_seed(9)
    n, m = 180, 240
    u = torch.linalg.qr(torch.randn(n, 10, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(m, 10, generator=gen, dtype=torch.float64))[0]
    sigma = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.1, 0.09, 0.08, 0.07, 0.06, 0.05], dtype=torch.float64)
    # float32: the rank floor (max(shape) * eps) is a cut float64 can resolve
    stack = ((u * sigma) @ v.T).unsqueeze(0).float()
    got, records, _ = factors(stack, "lowrank", rank_tol=0.0, max_rank=4)
    assert routes(records) == ["lowrank"] and records[0]["attempt"].cut == pytest.approx(0.49, rel=1e-6)
    exact, _, _ = factors(stack, "gram", rank_tol=0.0, max_rank=4)
    assert got[1].numel() == exact[1].numel() == 4
    torch.testing.assert_close(aligned(got, exact)[0], exact[0], rtol=0, atol=1e-6)


def clean_lora(n_models, n, m, rank, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, rank, generator=gen) @ torch.randn(rank, m, generator=gen) / math.sqrt(n)
            for _ in range(n_models)]


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_subspace_methods_match_the_exact_route_on_lora_products(method):
    deltas = clean_lora(3, 240, 300, rank=4, seed=21)
    weights = [1.0, 0.5, 1.5]
    merge = {"tsv_m": tsv_merge_matrix, "iso_c": iso_c_merge_matrix, "iso_cts": iso_cts_merge_matrix}[method]
    with rangefinder.record_attempts() as records, warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        got = merge(deltas, weights, svd="lowrank")
    if method == "iso_cts":
        # the sum's decomposition is low rank; each task's residual outside the
        # common subspace is rounding noise (full rank), which falls back
        assert routes(records)[0] == "lowrank"
    else:  # every task's top-k (tsv_m) or the sum (iso_c); polar factors are exact
        assert routes(records).count("lowrank") == (3 if method == "tsv_m" else 1)
        assert "lowrank-fallback" not in routes(records)
    want = merge(deltas, weights, svd="gram")
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_all_zero_stack_gives_rank_zero():
    stack = torch.zeros(3, 120, 90, dtype=torch.float64)
    (basis, sigma, coords), records, caught = factors(stack, "lowrank")
    assert routes(records) == ["lowrank"] and not caught
    assert basis.shape == (120, 0) and sigma.numel() == 0 and coords.shape == (3, 0, 90)
    merged = drm_merge_matrix(stack, svd="lowrank", compute_dtype=torch.float64)
    assert not merged.any()


def test_auto_skips_the_probe_on_a_series_of_dense_stacks_and_rechecks():
    """After FAILED_STREAK failed probes of one shape, auto probes only every
    RECHECK_EVERY-th stack of that shape; the factors are the exact route's
    either way, and a certified (low-rank) stack resets the count."""
    from mergekit_drm import decompose, rangefinder

    g = torch.Generator().manual_seed(3)
    p, q = 1024, 1024  # wide enough that auto plans a probe
    dense = [torch.randn(3, p, q, generator=g) for _ in range(2)]
    probes = []
    n_calls = decompose.FAILED_STREAK + decompose.RECHECK_EVERY + 1
    for index in range(n_calls):
        deltas = dense[index % 2]
        with rangefinder.record_attempts() as records:
            basis, sigma, coords = decompose.low_rank_factors(deltas, rank_tol=0.01, mode="auto")
        probes.append(routes(records)[0])
        if index < 2:
            exact = decompose.low_rank_factors(deltas, rank_tol=0.01, mode="full")
            assert torch.allclose(sigma, exact[1], rtol=1e-4)
    streak = decompose.FAILED_STREAK
    assert probes[:streak] == ["lowrank-fallback"] * streak
    assert probes[streak:streak + decompose.RECHECK_EVERY - 1] == ["lowrank-skipped"] * (decompose.RECHECK_EVERY - 1)
    assert probes[streak + decompose.RECHECK_EVERY - 1] == "lowrank-fallback"  # the periodic re-check
    # a low-rank stack of the same shape is still found when its turn to be probed comes
    low = torch.randn(3, p, 8, generator=g) @ torch.randn(3, 8, q, generator=g)
    decompose.reset_probe_history()
    with rangefinder.record_attempts() as records:
        decompose.low_rank_factors(low, rank_tol=0.01, mode="auto")
    assert routes(records)[0] == "lowrank"
    # forced lowrank is never skipped, even where auto would skip
    for _ in range(streak):
        decompose.low_rank_factors(dense[0], rank_tol=0.01, mode="auto")
    with rangefinder.record_attempts() as records:
        decompose.low_rank_factors(dense[0], rank_tol=0.01, mode="auto")
    assert routes(records)[0] == "lowrank-skipped"
    with pytest.warns(UserWarning), rangefinder.record_attempts() as records:
        decompose.low_rank_factors(dense[0], rank_tol=0.01, mode="lowrank")
    assert routes(records)[0] == "lowrank-fallback"
