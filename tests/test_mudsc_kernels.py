"""Unit tests of MuDSC's pure kernels against independent expectations.

Every expectation is re-derived here: numpy.corrcoef for the streamed
correlations, brute force over permutations for the assignment, planted
answers for the matchers, dense merge/unmerge matrices for ``merge_tensor``.
No model, no tokenizer, no mergekit.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from mergekit_drm.mudsc.alignment import Alignment, merge_tensor, permute_tensor
from mergekit_drm.mudsc.calibration import default_corpus_path, load_texts, token_windows
from mergekit_drm.mudsc.matching import align_flat, head_maps, lap_max, match_heads, zip_flat
from mergekit_drm.mudsc.similarity import Comoments, blend, cross_blocks
from mergekit_drm.mudsc.specs import AxisSpec, Group, HeadLayout, PermutationSpec, Segment, TensorSpec


# --- helpers --------------------------------------------------------------------


def _samples(rng, num_models, rows, units):
    """Correlated samples with non-zero means and unequal scales."""
    base = rng.normal(size=(rows, units))
    out = []
    for _ in range(num_models):
        mix = rng.normal(size=(units, units)) * 0.5 + np.eye(units)
        scale = rng.uniform(0.1, 10.0, size=units)
        shift = rng.uniform(-5.0, 5.0, size=units)
        out.append((base @ mix + 0.3 * rng.normal(size=(rows, units))) * scale + shift)
    return out


def _feed(moments, xs, chunk_sizes):
    start = 0
    for size in chunk_sizes:
        moments.add([torch.from_numpy(x[start:start + size]).to(torch.float32 if size % 2 else torch.float64)
                     for x in xs])
        start += size
    assert start == xs[0].shape[0]


def _dense_p(index, size):
    """P[u, k] = 1 if index[u] == k."""
    index = np.asarray(index)
    p = np.zeros((len(index), size))
    p[np.arange(len(index)), index] = 1.0
    return p


def _seg(group, space, length):
    return Segment(group, space, length)


# --- 1. Comoments -----------------------------------------------------------------


CHUNKS = (1, 7, 30, 2, 60)  # 100 samples in chunks of different sizes


def test_full_correlation_equals_corrcoef_of_concatenated_samples():
    rng = np.random.default_rng(0)
    n, o = 3, 5
    xs = _samples(rng, n, sum(CHUNKS), o)
    moments = Comoments(n, o, full=True)
    _feed(moments, xs, CHUNKS)
    corr = moments.correlation()
    assert corr.shape == (n * o, n * o) and corr.dtype == torch.float32
    expected = np.corrcoef(np.concatenate(xs, axis=1), rowvar=False)
    np.testing.assert_allclose(corr.numpy().astype(np.float64), expected, atol=2e-6)
    assert moments.count == sum(CHUNKS)


def test_cross_blocks_mode_equals_the_model0_blocks_of_the_full_matrix():
    rng = np.random.default_rng(1)
    n, o = 3, 4
    xs = _samples(rng, n, sum(CHUNKS), o)
    cross = Comoments(n, o, full=False)
    _feed(cross, xs, CHUNKS)
    corr = cross.correlation()
    assert corr.shape == (n - 1, o, o)
    full = np.corrcoef(np.concatenate(xs, axis=1), rowvar=False)
    for i in range(1, n):
        np.testing.assert_allclose(corr[i - 1].numpy(), full[:o, i * o:(i + 1) * o], atol=2e-6)
    # cross_blocks reads the same blocks out of either storage form.
    whole = Comoments(n, o, full=True)
    _feed(whole, xs, CHUNKS)
    from_full = cross_blocks(whole.correlation(), n, full=True)
    from_cross = cross_blocks(corr, n, full=False)
    assert len(from_full) == len(from_cross) == n - 1
    for a, b, i in zip(from_full, from_cross, range(1, n)):
        assert a.shape == (o, o)
        np.testing.assert_allclose(a.numpy(), full[:o, i * o:(i + 1) * o], atol=2e-6)
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-6)


@pytest.mark.parametrize("full", [True, False])
def test_constant_units_give_finite_correlations(full):
    rng = np.random.default_rng(2)
    n, o, s = 3, 4, 50
    xs = [rng.normal(size=(s, o)) for _ in range(n)]
    xs[0][:, 1] = 3.25  # a dead unit of model 0
    xs[2][:, 0] = 0.0  # a zero unit of model 2
    moments = Comoments(n, o, full=full)
    _feed(moments, xs, (20, 30))
    corr = moments.correlation()
    assert torch.isfinite(corr).all()
    assert float(corr.abs().max()) <= 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        reference = np.corrcoef(np.concatenate(xs, axis=1), rowvar=False)
    block = (lambda i: corr[:o, i * o:(i + 1) * o]) if full else (lambda i: corr[i - 1])
    # the live entries are unaffected
    for i in (1, 2):
        live_rows = [u for u in range(o) if u != 1]
        live_cols = [u for u in range(o) if not (i == 2 and u == 0)]
        got = block(i).numpy()[np.ix_(live_rows, live_cols)]
        want = reference[:o, i * o:(i + 1) * o][np.ix_(live_rows, live_cols)]
        np.testing.assert_allclose(got, want, atol=2e-6)
    # a constant unit is uncorrelated with everything
    np.testing.assert_allclose(block(1).numpy()[1], 0.0, atol=1e-6)
    np.testing.assert_allclose(block(2).numpy()[:, 0], 0.0, atol=1e-6)


def test_comoments_rejects_bad_shapes_and_empty():
    moments = Comoments(2, 3, full=True)
    with pytest.raises(ValueError):
        moments.correlation()
    with pytest.raises(ValueError):
        moments.add([torch.zeros(4, 3), torch.zeros(4, 2)])
    with pytest.raises(ValueError):
        moments.add([torch.zeros(4, 3), torch.zeros(5, 3)])


# --- 2. blend -------------------------------------------------------------------------


def test_blend_endpoints_and_linear_mix():
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    a = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(blend(w, a, 1.0), w)
    assert torch.equal(blend(w, a, 0.0), a)
    torch.testing.assert_close(blend(w, a, 0.3), 0.3 * w + 0.7 * a)
    # a missing side falls back to the other one
    assert torch.equal(blend(None, a, 0.5), a)
    assert torch.equal(blend(w, None, 0.5), w)
    with pytest.raises(ValueError):
        blend(None, None, 0.5)


# --- 3. lap_max -------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_lap_max_equals_brute_force(n):
    rng = np.random.default_rng(10 + n)
    for trial in range(3):
        sim = rng.normal(size=(n, n))
        if trial == 2:
            sim = np.round(sim, 1)  # ties
        order, total = lap_max(torch.from_numpy(sim))
        best = max(sum(sim[r, p[r]] for r in range(n)) for p in itertools.permutations(range(n)))
        assert sorted(order.tolist()) == list(range(n))
        assert total == pytest.approx(best, abs=1e-9)
        assert sum(sim[r, order[r]] for r in range(n)) == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_lap_max_rejects_non_finite(bad):
    sim = torch.eye(3)
    sim[1, 2] = bad
    with pytest.raises(FloatingPointError):
        lap_max(sim)


# --- 4. align_flat ------------------------------------------------------------------


def test_align_flat_recovers_planted_permutations():
    rng = np.random.default_rng(3)
    o, n = 12, 3
    plants = [rng.permutation(o) for _ in range(n - 1)]  # model-0 unit a is model-i unit plant[a]
    cross = []
    for plant in plants:
        block = rng.uniform(-0.3, 0.3, size=(o, o))
        block[np.arange(o), plant] = rng.uniform(0.7, 0.9, size=o)
        cross.append(torch.from_numpy(block).float())
    maps, score = align_flat(cross)
    assert len(maps) == n
    assert torch.equal(maps[0], torch.arange(o))
    for i, plant in enumerate(plants, 1):
        assert sorted(maps[i].tolist()) == list(range(o))
        assert maps[i][torch.from_numpy(plant)].tolist() == list(range(o))
    expected = np.mean([c.numpy()[np.arange(o), p] for c, p in zip(cross, plants)])
    assert score == pytest.approx(expected, abs=1e-6)


# --- 5. zip_flat ----------------------------------------------------------------------


def _members(maps, target):
    """counts[k][m]: how many units of model m merged unit k holds."""
    counts = np.zeros((target, len(maps)), dtype=int)
    for m, index in enumerate(maps):
        for k in index.tolist():
            counts[k, m] += 1
    return counts


def _symmetric(a):
    return np.triu(a, 1) + np.triu(a, 1).T


def test_zip_flat_follows_a_dominant_cross_pairing():
    rng = np.random.default_rng(4)
    o = 7
    plant = rng.permutation(o)  # model-0 unit u pairs with model-1 unit plant[u]
    sim = _symmetric(rng.uniform(-0.3, 0.3, size=(2 * o, 2 * o)))
    sim[np.arange(o), o + plant] = sim[o + plant, np.arange(o)] = rng.uniform(0.8, 0.95, size=o)
    np.fill_diagonal(sim, 1.0)
    maps, score = zip_flat(torch.from_numpy(sim).float(), 2, o)
    counts = _members(maps, o)
    assert (counts == 1).all()  # one unit of each model in every merged unit
    assert [int(maps[1][plant[u]]) for u in range(o)] == maps[0].tolist()
    assert score == pytest.approx(float(np.mean(sim[np.arange(o), o + plant])), abs=1e-6)


@pytest.mark.parametrize("n,o,target", [(2, 6, 6), (2, 6, 4), (3, 5, 5), (3, 4, 6)])
def test_zip_flat_reaches_the_target_width(n, o, target):
    rng = np.random.default_rng(5 + n + target)
    x = rng.normal(size=(200, n * o))
    sim = torch.from_numpy(np.corrcoef(x, rowvar=False)).float()
    maps, _ = zip_flat(sim, n, target)
    assert len(maps) == n and all(m.shape == (o,) for m in maps)
    merged = torch.cat(maps)
    assert int(merged.min()) >= 0 and int(merged.max()) < target
    assert len(torch.unique(merged)) == target  # every merged unit has a member


@pytest.mark.parametrize("b", [0.0, 0.5, 1.0])
def test_zip_flat_same_model_budget_is_respected(b):
    rng = np.random.default_rng(6)
    n, o, target = 2, 6, 6
    sim = _symmetric(rng.uniform(-0.2, -0.1, size=(n * o, n * o)))  # cross: negative
    for m in range(n):  # within-model similarities are the largest
        block = slice(m * o, (m + 1) * o)
        sim[block, block] = _symmetric(rng.uniform(0.6, 0.9, size=(o, o)))
    np.fill_diagonal(sim, 1.0)
    maps, _ = zip_flat(torch.from_numpy(sim).float(), n, target, a=0.5, b=b)
    counts = _members(maps, target)
    assert len(np.unique(torch.cat(maps).numpy())) == target
    to_remove = n * o - target
    budget = int(b * (to_remove // n))
    within = np.clip(counts - 1, 0, None).sum(axis=0)  # same-model fusions, per model
    assert (within <= budget).all(), (within, budget)
    # within-model pairs dominate, so every model uses its whole budget
    assert (within == budget).all(), (within, budget)
    if budget == 0:
        assert (counts == 1).all()


def _greedy_zip_reference(sim, n_models, target, a, b):
    """ZipIt's greedy written plainly: a full argmax over the matrix at every step."""
    s = sim.astype(np.float32).copy()
    n = s.shape[0]
    o = n // n_models
    np.fill_diagonal(s, -np.inf)
    groups = {u: [u] for u in range(n)}
    budget = int(b * ((n - target) // n_models))
    used = [0] * n_models
    scores = []

    def close(m):
        s[m * o:(m + 1) * o, m * o:(m + 1) * o] = -np.inf

    if budget <= 0:
        for m in range(n_models):
            close(m)
    while len(groups) > target:
        r, c = sorted(np.unravel_index(int(np.argmax(s)), s.shape))
        if s[r, c] == -np.inf:
            return None
        scores.append(float(s[r, c]))
        groups[r] += groups.pop(c)
        if r // o == c // o:
            used[r // o] += 1
            if used[r // o] >= budget:
                close(r // o)
        row = np.minimum(s[r], s[c]) * np.float32(a) if a > 0 else np.full(n, -np.inf, np.float32)
        row[[u for u in range(n) if u not in groups]] = -np.inf
        row[r] = -np.inf
        s[r, :] = row
        s[:, r] = row
        s[c, :] = -np.inf
        s[:, c] = -np.inf
    partition = sorted(sorted(g) for g in groups.values())
    return partition, float(np.mean(scores)) if scores else 1.0


@pytest.mark.parametrize("n_models,o,target", [(2, 5, 5), (2, 6, 3), (3, 4, 4), (3, 3, 6), (4, 3, 3)])
@pytest.mark.parametrize("a,b", [(0.5, 1.0), (0.3, 0.5), (0.9, 0.0), (0.0, 1.0)])
def test_zip_flat_equals_a_plain_greedy(n_models, o, target, a, b):
    rng = np.random.default_rng(n_models * 100 + o * 10 + target)
    for _ in range(4):
        x = rng.normal(size=(40, n_models * o)) + rng.normal(size=(40, 1)) * rng.uniform(0, 1)
        sim = np.corrcoef(x, rowvar=False).astype(np.float32)
        expected = _greedy_zip_reference(sim, n_models, target, a, b)
        if expected is None:
            with pytest.raises(RuntimeError):
                zip_flat(torch.from_numpy(sim), n_models, target, a=a, b=b)
            continue
        maps, score = zip_flat(torch.from_numpy(sim), n_models, target, a=a, b=b)
        merged = [[] for _ in range(target)]
        for m, index in enumerate(maps):
            for u, k in enumerate(index.tolist()):
                merged[k].append(m * o + u)
        assert sorted(sorted(g) for g in merged) == expected[0]
        # merged units are numbered by their smallest member
        assert [min(g) for g in merged] == sorted(min(g) for g in merged)
        assert score == pytest.approx(expected[1], abs=1e-6)


def test_zip_flat_rejects_non_finite():
    sim = torch.eye(4)
    sim[0, 3] = float("nan")
    with pytest.raises(FloatingPointError):
        zip_flat(sim, 2, 2)


# --- 6. match_heads + head_maps -----------------------------------------------------


def _plant_heads(layout, rng):
    kv, rep, d = layout.num_kv_heads, layout.group_size, layout.head_dim
    kvp = rng.permutation(kv)
    tau = [rng.permutation(rep) for _ in range(kv)]
    rho = [np.arange(d) if layout.rope else rng.permutation(d) for _ in range(kv)]
    sigma = [rng.permutation(d) for _ in range(kv)]
    return kvp, tau, rho, sigma


def _planted_positions(layout, plant):
    """For each space, own[ref_pos] = the matched model's position of reference unit ref_pos."""
    kv, rep, d = layout.num_kv_heads, layout.group_size, layout.head_dim
    kvp, tau, rho, sigma = plant
    q = np.empty(kv * rep * d, dtype=np.int64)
    o = np.empty(kv * rep * d, dtype=np.int64)
    k = np.empty(kv * d, dtype=np.int64)
    v = np.empty(kv * d, dtype=np.int64)
    for g in range(kv):
        for j in range(d):
            k[g * d + j] = kvp[g] * d + rho[g][j]
            v[g * d + j] = kvp[g] * d + sigma[g][j]
            for r in range(rep):
                own_head = kvp[g] * rep + tau[g][r]
                q[(g * rep + r) * d + j] = own_head * d + rho[g][j]
                o[(g * rep + r) * d + j] = own_head * d + sigma[g][j]
    return {"q": q, "k": k, "v": v, "o": o}


def _noisy_cross(own, rng, noise=0.05):
    size = len(own)
    block = rng.normal(scale=noise, size=(size, size))
    block[np.arange(size), own] += 1.0
    return torch.from_numpy(block).float()


@pytest.mark.parametrize(
    "layout",
    [HeadLayout(4, 2, 4, rope=True), HeadLayout(2, 2, 4, rope=False), HeadLayout(4, 4, 2, rope=False)],
    ids=["gqa-rope", "mha-norope", "mha-norope-4"],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_match_heads_inverts_a_planted_head_permutation(layout, seed):
    rng = np.random.default_rng(100 + seed)
    plant = _plant_heads(layout, rng)
    own = _planted_positions(layout, plant)
    sims = {s: _noisy_cross(own[s], rng) for s in ("q", "k", "v")}
    match = match_heads(sims["q"], sims["k"], sims["v"], layout)
    assert match.kv.tolist() == plant[0].tolist()
    # score: mean similarity of the matched q, k and v units, per KV group, averaged
    kv, rep, d = layout.num_kv_heads, layout.group_size, layout.head_dim
    planted = {s: sims[s].double().numpy()[np.arange(len(own[s])), own[s]] for s in ("q", "k", "v")}
    per_group = [
        (planted["q"][g * rep * d:(g + 1) * rep * d].sum() + planted["k"][g * d:(g + 1) * d].sum()
         + planted["v"][g * d:(g + 1) * d].sum()) / (rep * d + 2 * d)
        for g in range(kv)
    ]
    assert match.score == pytest.approx(float(np.mean(per_group)), abs=1e-5)
    maps = head_maps(match, layout)
    for space in ("q", "k", "v", "o"):
        index = maps[space].numpy()
        assert sorted(index.tolist()) == list(range(len(index))), space
        assert index[own[space]].tolist() == list(range(len(index))), space
    if layout.rope:
        for qk in match.qk:
            assert qk.tolist() == list(range(layout.head_dim))


def test_match_heads_refuses_qk_permutations_with_grouped_kv():
    layout = HeadLayout(4, 2, 4, rope=False)
    q, kv = torch.eye(16), torch.eye(8)
    with pytest.raises(ValueError):
        match_heads(q, kv, kv, layout)


# --- 7. merge_tensor / permute_tensor -----------------------------------------------


def _dense_merge(tensors, weights, out_index, in_index, out_size, in_size):
    """W' = sum_i M_i^T W_i U_i for 2-D tensors (rows out, cols in)."""
    ps = [_dense_p(idx, out_size) for idx in out_index]
    w = np.asarray(weights, dtype=np.float64)
    mass = sum(w[j] * ps[j].sum(0) for j in range(len(ps)))
    result = 0.0
    for i, t in enumerate(tensors):
        m = w[i] * ps[i] / mass[None, :]
        u = _dense_p(in_index[i], in_size) if in_index is not None else np.eye(t.shape[1])
        result = result + m.T @ t @ u
    return result


ZIP_OUT = [np.array([0, 1, 2, 3]), np.array([0, 0, 1, 2])]  # unit 3 has no member of model 1
ZIP_IN = [np.array([2, 0, 1, 1, 3]), np.array([0, 1, 2, 3, 4])]


def _alignment(maps_by_group, n=2):
    return Alignment(n, {g: {"unit": [torch.as_tensor(ix, dtype=torch.long) for ix in idx]}
                         for g, idx in maps_by_group.items()})


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.25, 2.0)])
@pytest.mark.parametrize("out_axis", [0, 1])
def test_merge_tensor_matches_the_dense_formula(weights, out_axis):
    rng = np.random.default_rng(8)
    o_out, o_in = 4, 5
    tensors = [rng.normal(size=(o_out, o_in)) for _ in range(2)]
    alignment = _alignment({"mlp": ZIP_OUT, "res": ZIP_IN})
    axes = (AxisSpec(0, "out", (_seg("mlp", "unit", o_out),)), AxisSpec(1, "in", (_seg("res", "unit", o_in),)))
    expected = _dense_merge(tensors, weights, ZIP_OUT, ZIP_IN, o_out, o_in)
    if out_axis == 1:  # same tensor stored transposed (Conv1D-style)
        axes = (AxisSpec(1, "out", axes[0].segments), AxisSpec(0, "in", axes[1].segments))
        tensors = [t.T.copy() for t in tensors]
        expected = expected.T
    spec = TensorSpec("w", axes)
    got = merge_tensor(spec, [torch.from_numpy(t) for t in tensors], weights, alignment, torch.float64)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)
    assert not alignment.is_permutation()


def test_merge_tensor_three_models_with_permutations_is_permute_then_average():
    rng = np.random.default_rng(9)
    o_out, o_in, weights = 5, 3, (1.0, 2.0, 0.5)
    out_index = [np.arange(o_out)] + [rng.permutation(o_out) for _ in range(2)]
    in_index = [np.arange(o_in)] + [rng.permutation(o_in) for _ in range(2)]
    tensors = [rng.normal(size=(o_out, o_in)) for _ in range(3)]
    alignment = _alignment({"a": out_index, "b": in_index}, n=3)
    spec = TensorSpec("w", (AxisSpec(0, "out", (_seg("a", "unit", o_out),)),
                            AxisSpec(1, "in", (_seg("b", "unit", o_in),))))
    got = merge_tensor(spec, [torch.from_numpy(t) for t in tensors], weights, alignment, torch.float64)
    np.testing.assert_allclose(got.numpy(), _dense_merge(tensors, weights, out_index, in_index, o_out, o_in),
                               atol=1e-12)
    # for permutations: move each model's rows/cols into place, then weighted average
    moved = []
    for t, oi, ii in zip(tensors, out_index, in_index):
        m = np.empty_like(t)
        m[np.ix_(oi, ii)] = t
        moved.append(m)
    np.testing.assert_allclose(got.numpy(), sum(w * m for w, m in zip(weights, moved)) / sum(weights), atol=1e-12)


def test_merge_tensor_fused_out_axis_with_two_segments():
    """Like GPT-2's c_attn (Conv1D [in, out]) with the out axis split into q and v segments."""
    rng = np.random.default_rng(10)
    nq, nv, o_in, weights = 4, 3, 5, (0.7, 1.3)
    q_maps = ZIP_OUT
    v_maps = [np.array([1, 0, 2]), np.array([2, 2, 0])]  # model 1: two v units on 2, none on 1
    alignment = Alignment(2, {
        "attn": {"q": [torch.from_numpy(x) for x in q_maps], "v": [torch.from_numpy(x) for x in v_maps]},
        "res": {"unit": [torch.from_numpy(x) for x in ZIP_IN]},
    })
    spec = TensorSpec("c_attn", (
        AxisSpec(0, "in", (_seg("res", "unit", o_in),)),
        AxisSpec(1, "out", (_seg("attn", "q", nq), _seg("attn", "v", nv))),
    ))
    tensors = [rng.normal(size=(o_in, nq + nv)) for _ in range(2)]
    fused_maps = [np.concatenate([q, v + nq]) for q, v in zip(q_maps, v_maps)]  # block-diagonal P
    expected = _dense_merge([t.T for t in tensors], weights, fused_maps, ZIP_IN, nq + nv, o_in).T
    got = merge_tensor(spec, [torch.from_numpy(t) for t in tensors], weights, alignment, torch.float64)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)
    # its bias: a 1-D tensor with only the fused out axis
    biases = [rng.normal(size=nq + nv) for _ in range(2)]
    bias_spec = TensorSpec("bias", (AxisSpec(0, "out", spec.axes[1].segments),))
    got_b = merge_tensor(bias_spec, [torch.from_numpy(b) for b in biases], weights, alignment, torch.float64)
    expected_b = _dense_merge([b[:, None] for b in biases], weights, fused_maps, None, nq + nv, 1)[:, 0]
    np.testing.assert_allclose(got_b.numpy(), expected_b, atol=1e-12)


def test_merge_tensor_one_dimensional_out_axis():
    rng = np.random.default_rng(11)
    weights = (2.0, 1.0)
    biases = [rng.normal(size=4) for _ in range(2)]
    alignment = _alignment({"mlp": ZIP_OUT})
    spec = TensorSpec("b", (AxisSpec(0, "out", (_seg("mlp", "unit", 4),)),))
    got = merge_tensor(spec, [torch.from_numpy(b) for b in biases], weights, alignment, torch.float64)
    # by hand: unit 0 <- 2*b0[0] + b1[0] + b1[1] over mass 4; unit 3 <- b0[3] alone
    b0, b1 = biases
    want = [(2 * b0[0] + b1[0] + b1[1]) / 4, (2 * b0[1] + b1[2]) / 3, (2 * b0[2] + b1[3]) / 3, b0[3]]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)


def test_merge_tensor_without_grouped_axes_is_a_weighted_mean():
    rng = np.random.default_rng(12)
    weights = (0.2, 0.3, 1.5)
    tensors = [rng.normal(size=(3, 2)) for _ in range(3)]
    alignment = _alignment({"mlp": [np.arange(4)] * 3}, n=3)
    got = merge_tensor(TensorSpec("norm"), [torch.from_numpy(t) for t in tensors], weights, alignment,
                       torch.float64)
    np.testing.assert_allclose(got.numpy(), sum(w * t for w, t in zip(weights, tensors)) / sum(weights),
                               atol=1e-12)


def test_merge_tensor_in_axis_only_sums_columns_then_averages_models():
    rng = np.random.default_rng(13)
    weights = (1.0, 3.0)
    tensors = [rng.normal(size=(6, 5)) for _ in range(2)]
    alignment = _alignment({"res": ZIP_IN})
    spec = TensorSpec("lm_head", (AxisSpec(1, "in", (_seg("res", "unit", 5),)),))
    got = merge_tensor(spec, [torch.from_numpy(t) for t in tensors], weights, alignment, torch.float64)
    want = sum(w * t @ _dense_p(ix, 5) for w, t, ix in zip(weights, tensors, ZIP_IN)) / sum(weights)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)


def test_merge_tensor_errors():
    alignment = _alignment({"mlp": [np.array([0, 0, 1, 2]), np.array([1, 0, 2, 2])]})
    spec = TensorSpec("b", (AxisSpec(0, "out", (_seg("mlp", "unit", 4),)),))
    tensors = [torch.ones(4), torch.ones(4)]
    with pytest.raises(ValueError, match="no members"):
        merge_tensor(spec, tensors, (1.0, 1.0), alignment)
    with pytest.raises(ValueError, match="positive"):
        merge_tensor(spec, tensors, (0.0, 0.0), alignment)


def test_permute_tensor_inverts_gathering():
    rng = np.random.default_rng(14)
    rows, cols = rng.permutation(6), rng.permutation(4)
    w0 = torch.from_numpy(rng.normal(size=(6, 4)))
    w1 = w0[torch.from_numpy(rows)][:, torch.from_numpy(cols)]  # model 1 row u is model 0 row rows[u]
    alignment = _alignment({"a": [np.arange(6), rows], "b": [np.arange(4), cols]})
    spec = TensorSpec("w", (AxisSpec(0, "out", (_seg("a", "unit", 6),)), AxisSpec(1, "in", (_seg("b", "unit", 4),))))
    assert torch.equal(permute_tensor(spec, w1, alignment, 1), w0)
    assert torch.equal(permute_tensor(spec, w0, alignment, 0), w0)
    zipped = _alignment({"a": ZIP_OUT})
    with pytest.raises(ValueError, match="zip"):
        permute_tensor(TensorSpec("b", (AxisSpec(0, "out", (_seg("a", "unit", 4),)),)), torch.ones(4), zipped, 1)


# --- 8. Alignment persistence ---------------------------------------------------------


def _spec_for(sizes):
    groups = {name: Group(name, tuple(spaces.items())) for name, spaces in sizes.items()}
    return PermutationSpec("test", groups, {})


def test_alignment_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(15)
    maps = {
        "residual": {"unit": [torch.arange(6), torch.from_numpy(rng.permutation(6))]},
        "layers.0.attn": {s: [torch.arange(8), torch.from_numpy(rng.permutation(8))] for s in "qkvo"},
        "layers.0.mlp": {"unit": [torch.tensor([0, 1, 2, 2]), torch.tensor([3, 0, 1, 2])]},
    }
    provenance = {"identities": [{"names": "a"}, {"names": "b"}], "parameters": {"alpha": 0.5}}
    with pytest.raises(ValueError, match="lacks identities, parameters"):
        Alignment(2, maps, {"alpha": 0.5}).save(str(tmp_path / "unchecked"))
    assert not (tmp_path / "unchecked").exists()
    original = Alignment(2, maps, {"alpha": 0.5, "mode": "zip", "objective_history": [0.1, 0.2], **provenance})
    original.save(str(tmp_path / "al"))
    loaded = Alignment.load(str(tmp_path / "al"))
    assert loaded.num_models == 2
    assert loaded.maps.keys() == maps.keys()
    for group, spaces in maps.items():
        assert loaded.maps[group].keys() == spaces.keys()
        for space, indices in spaces.items():
            for a, b in zip(indices, loaded.maps[group][space]):
                assert b.dtype == torch.int64 and torch.equal(a, b)
    assert loaded.metadata["alpha"] == 0.5 and loaded.metadata["objective_history"] == [0.1, 0.2]
    assert loaded.is_permutation() is False
    spec = _spec_for({"residual": {"unit": 6}, "layers.0.attn": {s: 8 for s in "qkvo"}, "layers.0.mlp": {"unit": 4}})
    loaded.check_against(spec)  # fits
    with pytest.raises(ValueError, match="residual/unit"):
        loaded.check_against(_spec_for({"residual": {"unit": 7}}))
    with pytest.raises(ValueError, match="no map"):
        loaded.check_against(_spec_for({"layers.1.mlp": {"unit": 4}}))


def test_alignment_save_with_shared_map_tensors(tmp_path):
    ident = torch.arange(3)
    provenance = {"identities": [{}, {}], "parameters": {}}
    Alignment(2, {"g": {"unit": [ident, ident]}}, provenance).save(str(tmp_path / "s"))
    assert torch.equal(Alignment.load(str(tmp_path / "s")).maps["g"]["unit"][1], ident)


def test_check_against_rejects_out_of_range_entries():
    alignment = Alignment(2, {"g": {"unit": [torch.arange(4), torch.tensor([0, 1, 2, 4])]}})
    with pytest.raises(ValueError, match="does not fit"):
        alignment.check_against(_spec_for({"g": {"unit": 4}}))


def test_alignment_load_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="mergekit-mudsc-align"):
        Alignment.load(str(tmp_path))
    provenance = {"identities": [{}, {}], "parameters": {}}
    Alignment(2, {"g": {"unit": [torch.arange(2), torch.arange(2)]}}, provenance).save(str(tmp_path / "x"))
    (tmp_path / "x" / "alignment.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="mergekit-mudsc-align"):
        Alignment.load(str(tmp_path / "x"))


# --- 9. calibration --------------------------------------------------------------------


def test_load_texts_txt_paragraphs(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("First para\nline two.\n\n\n  Second  \n\n\n\nThird.\n", encoding="utf-8")
    assert load_texts(str(path)) == ["First para\nline two.", "Second", "Third."]


def test_load_texts_jsonl(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [json.dumps("plain string"), "", json.dumps({"text": "an object", "id": 3}), json.dumps("ünï")]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert load_texts(str(path)) == ["plain string", "an object", "ünï"]


@pytest.mark.parametrize("line,needle", [
    ("{not json", ":2: not JSON"),
    (json.dumps({"body": "x"}), ":2: expected"),
    (json.dumps({"text": 5}), ":2: expected"),
    ("[1, 2]", ":2: expected"),
])
def test_load_texts_bad_jsonl_lines(tmp_path, line, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps("ok") + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=needle):
        load_texts(str(path))


def test_load_texts_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="`calibration`"):
        load_texts(str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no text"):
        load_texts(str(empty))


class _FakeTokenizer:
    """Words -> ids 10, 11, ... in order of first appearance."""

    def __init__(self, eos=1, sep=2):
        self.eos_token_id = eos
        self.sep_token_id = sep
        self.vocab = {}

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in text.split()]}


TEXTS = ["a b c", "d e", "f g h i", "j", "k l m n o"]


def _stream(texts, separator):
    ids, stream = {}, []
    for text in texts:
        stream += [ids.setdefault(w, 10 + len(ids)) for w in text.split()]
        if separator is not None:
            stream.append(separator)
    return stream


@pytest.mark.parametrize("samples,seq_len", [(2, 4), (3, 5), (100, 3), (1, 20)])
def test_token_windows_cut_the_joined_stream(samples, seq_len):
    stream = _stream(TEXTS, 1)  # 15 words + 5 separators
    windows = token_windows(_FakeTokenizer(), TEXTS, samples, seq_len)
    count = min(samples, len(stream) // seq_len)
    assert windows.dtype == torch.long and windows.shape == (count, seq_len)
    assert windows.reshape(-1).tolist() == stream[:count * seq_len]


def test_token_windows_separator_fallbacks():
    w = token_windows(_FakeTokenizer(eos=None, sep=7), TEXTS, 2, 4)
    assert w.reshape(-1).tolist() == _stream(TEXTS, 7)[:8]
    w = token_windows(_FakeTokenizer(eos=None, sep=None), TEXTS, 3, 5)
    assert w.reshape(-1).tolist() == _stream(TEXTS, None)[:15]


def test_token_windows_too_short():
    with pytest.raises(ValueError, match="seq_len=50"):
        token_windows(_FakeTokenizer(), TEXTS, 4, 50)


def test_bundled_corpus():
    import os

    path = default_corpus_path()
    assert os.path.isfile(path)
    texts = load_texts()
    assert texts == load_texts(path)
    assert len(texts) >= 50
    assert all(t.strip() == t and t for t in texts)
