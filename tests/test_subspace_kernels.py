"""TSV-M, Iso-C and Iso-CTS kernels against numpy float64 re-derivations from the papers, plus properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergekit_drm.iso.kernel import (
    iso_c_factors,
    iso_c_merge_matrix,
    iso_cts_merge_matrix,
    subspace_sizes,
)
from mergekit_drm.subspace import polar_factor
from mergekit_drm.tsv_m.kernel import kept_rank, tsv_factors, tsv_merge_matrix
from mergekit_drm.subspace import truncated_svd

MODES = ("auto", "full", "gram")


def _deltas(count, n, m, seed=0, rank=None):
    rng = np.random.default_rng(seed)
    if rank is None:
        return [rng.standard_normal((n, m)) * (1 + t) for t in range(count)]
    return [rng.standard_normal((n, rank)) @ rng.standard_normal((rank, m)) for _ in range(count)]


def _polar_np(x):
    p, _, qt = np.linalg.svd(x, full_matrices=False)
    return p @ qt


def tsv_oracle(deltas, weights, k):
    """Paper, section 4: per-task top-k SVD, concatenate, polar factors, rebuild."""
    us, ss, vs = [], [], []
    for d, w in zip(deltas, weights):
        u, s, vt = np.linalg.svd(w * d, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vt[:k].T)
    u, s, v = np.hstack(us), np.concatenate(ss), np.hstack(vs)
    return _polar_np(u) @ np.diag(s) @ _polar_np(v).T


def iso_c_oracle(deltas, weights):
    total = sum(w * d for d, w in zip(deltas, weights))
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    return s.mean() * u @ vt


def iso_cts_oracle(deltas, weights, fraction):
    """Paper, section 4 (Iso-CTS), with the authors' sizing of the subspaces."""
    total = sum(w * d for d, w in zip(deltas, weights))
    r, t = min(total.shape), len(deltas)
    k = int(np.floor(fraction * r))
    s_task = round((r - k) / t)
    k = r - t * s_task
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    us, ss, vs = [u[:, :k]], [s[:k]], [vt[:k].T]
    for d, w in zip(deltas, weights):
        res = w * d - u[:, :k] @ u[:, :k].T @ (w * d)
        ur, sr, vtr = np.linalg.svd(res, full_matrices=False)
        us.append(ur[:, :s_task])
        ss.append(sr[:s_task])
        vs.append(vtr[:s_task].T)
    sigma = np.concatenate(ss).mean()
    return sigma * _polar_np(np.hstack(us)) @ _polar_np(np.hstack(vs)).T


def _t(arrays, dtype=torch.float64):
    return [torch.tensor(a, dtype=dtype) for a in arrays]


def _close(actual, expected, rtol):
    err = np.linalg.norm(actual.double().numpy() - expected) / np.linalg.norm(expected)
    assert err < rtol, err


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_tsv_matches_oracle(mode, shape):
    deltas = _deltas(3, *shape, seed=1)
    weights = [1.0, 0.5, 2.0]
    k = min(shape) // 3
    expected = tsv_oracle(deltas, weights, k)
    got = tsv_merge_matrix(_t(deltas), weights, compute_dtype=torch.float64, svd=mode)
    _close(got, expected, 1e-9)
    got32 = tsv_merge_matrix(_t(deltas, torch.float32), weights, svd=mode)
    _close(got32, expected, 1e-4)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_tsv_rank_fraction_matches_oracle(fraction):
    deltas = _deltas(4, 20, 30, seed=2)
    k = int(np.floor(fraction * 20))
    expected = tsv_oracle(deltas, [1.0] * 4, k)
    got = tsv_merge_matrix(_t(deltas), rank_fraction=fraction, compute_dtype=torch.float64)
    _close(got, expected, 1e-9)


def test_kept_rank_rule():
    assert kept_rank((384, 1536), 5, None) == 76  # paper: int(r / T)
    assert kept_rank((10, 10), 20, None) == 1  # at least one
    assert kept_rank((30, 9), 3, 1 / 3) == 3  # no 2.9999 -> 2
    with pytest.raises(ValueError, match="rank_fraction"):
        kept_rank((4, 4), 2, 1.5)


def test_tsv_single_task_is_identity_then_truncation():
    (d,) = _t(_deltas(1, 12, 9, seed=3))
    torch.testing.assert_close(tsv_merge_matrix([d], compute_dtype=torch.float64), d)
    u, s, vt = np.linalg.svd(d.numpy())
    best4 = u[:, :4] @ np.diag(s[:4]) @ vt[:4]  # Eckart-Young
    _close(tsv_merge_matrix([d], rank_fraction=4 / 9, compute_dtype=torch.float64), best4, 1e-10)


def test_tsv_orthogonal_low_rank_tasks_sum_exactly():
    rng = np.random.default_rng(4)
    q_left, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    q_right, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    deltas = [
        q_left[:, 3 * t : 3 * t + 2] @ np.diag([2.0 + t, 0.5]) @ q_right[:, 3 * t : 3 * t + 2].T
        for t in range(4)
    ]
    got = tsv_merge_matrix(_t(deltas), compute_dtype=torch.float64)  # k = 4 >= rank 2
    _close(got, sum(deltas), 1e-10)


def test_tsv_low_rank_inputs_give_low_rank_factors():
    """LoRA-like tasks: only numerically non-zero triplets are kept, so the merged
    rank is at most the sum of the tasks' ranks (here 3 x 2), not T*k."""
    deltas = _t(_deltas(3, 30, 25, seed=5, rank=2))
    k = kept_rank((30, 25), 3, None)
    triplets = [truncated_svd(d, k) for d in deltas]
    assert [s.numel() for _, s, _ in triplets] == [2, 2, 2]
    left, right = tsv_factors(triplets)
    assert left.shape == (30, 6) and right.shape == (6, 25)
    expected = tsv_oracle([d.numpy() for d in deltas], [1.0] * 3, 2)
    _close(left @ right, expected, 1e-9)


def test_tsv_invariances():
    deltas = _t(_deltas(3, 14, 10, seed=6))
    merged = tsv_merge_matrix(deltas, compute_dtype=torch.float64)
    # task order does not matter
    torch.testing.assert_close(tsv_merge_matrix(deltas[::-1], compute_dtype=torch.float64), merged)
    # rotations of the input and output spaces carry through
    rng = np.random.default_rng(7)
    q = torch.tensor(np.linalg.qr(rng.standard_normal((14, 14)))[0])
    r = torch.tensor(np.linalg.qr(rng.standard_normal((10, 10)))[0])
    rotated = tsv_merge_matrix([q @ d @ r for d in deltas], compute_dtype=torch.float64)
    torch.testing.assert_close(rotated, q @ merged @ r)
    # positively homogeneous of degree 1
    torch.testing.assert_close(
        tsv_merge_matrix([2.5 * d for d in deltas], compute_dtype=torch.float64), 2.5 * merged
    )


def test_tsv_zero_weight_drops_the_task():
    deltas = _t(_deltas(3, 12, 12, seed=8))
    with_zero = tsv_merge_matrix(deltas, [1.0, 0.0, 1.0], rank_fraction=0.25, compute_dtype=torch.float64)
    without = tsv_merge_matrix([deltas[0], deltas[2]], rank_fraction=0.25, compute_dtype=torch.float64)
    torch.testing.assert_close(with_zero, without)


def test_polar_factor():
    rng = np.random.default_rng(9)
    x = torch.tensor(rng.standard_normal((12, 7)))
    p = polar_factor(x)
    torch.testing.assert_close(p.T @ p, torch.eye(7, dtype=torch.float64))
    _close(p, _polar_np(x.numpy()), 1e-10)
    # dependent columns: a partial isometry on the column space (no arbitrary direction)
    dup = torch.cat([x[:, :3], x[:, :1]], dim=1)
    p = polar_factor(dup)
    gram = p.T @ p
    torch.testing.assert_close(gram @ gram, gram)  # a projection
    assert torch.linalg.matrix_rank(p) == 3
    basis = torch.linalg.qr(x[:, :3])[0]
    torch.testing.assert_close(basis @ (basis.T @ p), p)  # inside span(x)


@pytest.mark.parametrize("mode", MODES)
def test_iso_c_matches_oracle_and_is_isotropic(mode):
    deltas = _deltas(4, 18, 26, seed=10)
    weights = [1.0, 2.0, 0.5, 1.0]
    expected = iso_c_oracle(deltas, weights)
    got = iso_c_merge_matrix(_t(deltas), weights, compute_dtype=torch.float64, svd=mode)
    _close(got, expected, 1e-9)
    _close(iso_c_merge_matrix(_t(deltas, torch.float32), weights, svd=mode), expected, 1e-4)
    s = torch.linalg.svdvals(got)
    total = sum(w * d for d, w in zip(deltas, weights))
    assert float(s.max() / s.min()) == pytest.approx(1.0, abs=1e-9)
    # the nuclear norm of the task-arithmetic sum is kept
    assert float(s.sum()) == pytest.approx(np.linalg.svd(total, compute_uv=False).sum(), rel=1e-10)


def test_iso_c_of_low_rank_sum_stays_on_its_support():
    deltas = _t(_deltas(3, 30, 20, seed=11, rank=2))
    left, right = iso_c_factors(sum(deltas))
    assert left.shape[1] == 6
    s = torch.linalg.svdvals(left @ right)[:6]
    expected = np.linalg.svd(sum(d.numpy() for d in deltas), compute_uv=False)[:6].mean()
    torch.testing.assert_close(s, torch.full_like(s, expected))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.0])
def test_iso_cts_matches_oracle(mode, fraction):
    deltas = _deltas(3, 22, 30, seed=12)
    weights = [1.0, 0.7, 1.3]
    expected = iso_cts_oracle(deltas, weights, fraction)
    got = iso_cts_merge_matrix(
        _t(deltas), weights, common_space_fraction=fraction, compute_dtype=torch.float64, svd=mode
    )
    _close(got, expected, 1e-9)
    s = torch.linalg.svdvals(got)
    assert float(s.max() / s.min()) == pytest.approx(1.0, abs=1e-9)


def test_iso_cts_special_cases():
    deltas = _t(_deltas(3, 16, 16, seed=13))
    iso_c = iso_c_merge_matrix(deltas, compute_dtype=torch.float64)
    # all of the rank common: Iso-C
    torch.testing.assert_close(
        iso_cts_merge_matrix(deltas, common_space_fraction=1.0, compute_dtype=torch.float64), iso_c
    )
    # one task: its residual holds exactly its remaining singular vectors, so Iso-C again
    for fraction in (0.3, 0.8):
        torch.testing.assert_close(
            iso_cts_merge_matrix(deltas[:1], common_space_fraction=fraction, compute_dtype=torch.float64),
            iso_c_merge_matrix(deltas[:1], compute_dtype=torch.float64),
        )


def test_iso_cts_keeps_the_common_subspace():
    deltas = _t(_deltas(4, 20, 20, seed=14))
    merged = iso_cts_merge_matrix(deltas, common_space_fraction=0.6, compute_dtype=torch.float64)
    k, _ = subspace_sizes(20, 4, 0.6)
    u = torch.linalg.svd(sum(deltas))[0][:, :k]
    # the top-k output directions of the sum are in the merged column space
    uu = torch.linalg.svd(merged)[0]
    torch.testing.assert_close(uu @ (uu.T @ u), u)


def test_subspace_sizes_rule():
    assert subspace_sizes(384, 5, 0.8) == (309, 15)  # k0 307, (77/5 = 15.4 -> 15)
    assert subspace_sizes(100, 8, 0.8) == (84, 2)  # 20/8 = 2.5 rounds half to even, as in the authors' code
    for r, t, f in [(10, 3, 0.0), (2, 3, 0.0), (50, 7, 0.35)]:
        k, s = subspace_sizes(r, t, f)
        assert k >= 0 and s >= 0 and k + t * s == r
    with pytest.raises(ValueError, match="common_space_fraction"):
        subspace_sizes(10, 2, 1.5)


def test_iso_cts_of_low_rank_tasks_inside_the_common_subspace_is_iso_c():
    """LoRA-like tasks: the sum's rank (6) is inside the common subspace, the residuals are
    rounding noise and must add no direction (float32, where the noise is largest)."""
    deltas = _t(_deltas(3, 40, 30, seed=15, rank=2), torch.float32)
    iso_c = iso_c_merge_matrix(deltas)
    iso_cts = iso_cts_merge_matrix(deltas, common_space_fraction=0.8)
    torch.testing.assert_close(iso_cts, iso_c, rtol=1e-4, atol=1e-5 * float(iso_c.abs().max()))
    assert torch.linalg.matrix_rank(iso_cts.double(), rtol=1e-4) == 6
