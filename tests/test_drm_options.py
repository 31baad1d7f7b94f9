"""DRM's opt-in options (isotropic, norm_target) against a numpy oracle, plus properties.

The oracle is written from the options' definitions (README, ``drm/options.py``
docstrings), on top of the paper's steps as the kernel oracle states them:
joint SVD and rank cut; renormalization; joint pruning, sigma~ scaling,
election, disjoint mean; the merged coordinates' spectrum set to its mean; Frobenius norm set to the mean of the
task vectors' norms (projected on the kept basis) or the norm of their sum.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergekit_drm.drm.kernel import drm_merge_matrix, elementwise_merge
from mergekit_drm.lora.lowrank import LoraFactors, drm_merge_lowrank
from tests.test_drm_kernel_oracle import oracle_elect_mean, oracle_keep_count, oracle_top_mask
from tests.test_lora_cli import llama64  # noqa: F401 (fixture)

EPS64 = float(np.finfo(np.float64).eps)


def oracle(deltas, weights=None, *, direction="vertical", density=1.0, rank_tol=0.0,
           isotropic=False, norm_target="none", info=None):
    mats = [np.asarray(d, dtype=np.float64) for d in deltas]
    if direction == "vertical":  # DRM-V is DRM-H of the transposes
        mats = [d.T for d in mats]
    n_models = len(mats)
    lam = np.ones(n_models) if weights is None else np.asarray(weights, dtype=np.float64)
    active = np.array([np.any(d != 0) for d in mats])
    a = np.concatenate(mats, axis=1)
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    r = int(np.sum(s > max(rank_tol, max(a.shape) * EPS64) * s[0]))
    u, s, vt = u[:, :r], s[:r], vt[:r]
    q = mats[0].shape[1]
    vecs = np.stack([vt[:, t * q:(t + 1) * q] for t in range(n_models)])  # (N, r, q)
    projected = [u @ (u.T @ d) for d in mats]
    if norm_target == "mean":
        target = np.mean([abs(w) * np.linalg.norm(p) for w, p, on in zip(lam, projected, active) if on])
    elif norm_target == "sum":
        target = np.linalg.norm(sum(w * p for w, p in zip(lam, projected)))
    elif norm_target == "total":
        target = np.sum([abs(w) * np.linalg.norm(p) for w, p in zip(lam, projected)])
    nu = np.linalg.norm(vecs, axis=2)
    significant = (nu > math.sqrt(EPS64)) & active[:, None]
    coords = np.where(significant[:, :, None], vecs / np.where(significant, nu, 1.0)[:, :, None], 0.0)
    sig_t = np.where(significant, s[None, :] * nu, 0.0)
    keep = oracle_keep_count(density, coords.size)
    mask = oracle_top_mask(coords, keep)
    if info is not None:
        mags = np.sort(np.abs(coords).ravel())[::-1]
        info["prune_margin"] = (mags[keep - 1] - mags[keep]) / mags[0] if keep < coords.size else np.inf
    merged = oracle_elect_mean(sig_t[:, :, None] * np.where(mask, coords, 0.0), lam,
                               sign_election=True, disjoint=True)
    if isotropic:
        mu, ms, mvt = np.linalg.svd(merged, full_matrices=False)
        k = int(np.sum(ms > max(merged.shape) * EPS64 * ms[0]))
        merged = ms[:k].mean() * mu[:, :k] @ mvt[:k]
    if norm_target != "none":
        merged = merged * target / np.linalg.norm(merged)
    out = u @ merged
    return out.T if direction == "vertical" else out


def _deltas(seed, n_models=3, shape=(7, 5)):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) * (1 + t) for t in range(n_models)]


def _kernel(deltas, weights=None, **kw):
    return drm_merge_matrix([torch.from_numpy(d) for d in deltas], weights,
                            compute_dtype=torch.float64, svd="full", **kw).numpy()


OPTIONS = [
    {"isotropic": True},
    {"norm_target": "mean"},
    {"norm_target": "sum"},
    {"isotropic": True, "norm_target": "total"},
    {"isotropic": True, "norm_target": "mean"},
]


@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
@pytest.mark.parametrize("density", [1.0, 0.4])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(f"{k}={v}" for k, v in o.items()))
def test_options_match_oracle(direction, density, options):
    for seed in range(3):
        deltas = _deltas(seed)
        weights = [1.0, 0.5, 2.0]
        info = {}
        want = oracle(deltas, weights, direction=direction, density=density, info=info, **options)
        assert info["prune_margin"] > 1e-7  # well posed: no near-tie at the threshold
        got = _kernel(deltas, weights, direction=direction, density=density, rank_tol=0.0, **options)
        assert np.linalg.norm(got - want) <= 1e-9 * np.linalg.norm(want)


def test_defaults_are_the_paper():
    deltas = [torch.from_numpy(d) for d in _deltas(5)]
    faithful = drm_merge_matrix(deltas, compute_dtype=torch.float64)
    explicit = drm_merge_matrix(deltas, compute_dtype=torch.float64, isotropic=False,
                                norm_target="none")
    assert torch.equal(faithful, explicit)


def test_isotropic_flat_spectrum_same_nuclear_norm():
    deltas = [torch.from_numpy(d) for d in _deltas(1, shape=(9, 6))]
    plain = drm_merge_matrix(deltas, compute_dtype=torch.float64)
    flat = drm_merge_matrix(deltas, compute_dtype=torch.float64, isotropic=True)
    s = torch.linalg.svdvals(flat)
    assert torch.allclose(s, s[0].expand_as(s), rtol=1e-10)
    assert torch.isclose(torch.linalg.svdvals(plain).sum(), s.sum(), rtol=1e-10)


@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
def test_norm_targets(direction):
    raw = _deltas(2, n_models=4, shape=(8, 6))
    raw[2] = np.zeros_like(raw[2])  # an untouched matrix does not lower the mean
    deltas = [torch.from_numpy(d) for d in raw]
    mean = drm_merge_matrix(deltas, direction=direction, rank_tol=0.0,
                            compute_dtype=torch.float64, norm_target="mean")
    want = np.mean([np.linalg.norm(d) for i, d in enumerate(raw) if i != 2])
    assert math.isclose(float(mean.norm()), want, rel_tol=1e-10)
    total = drm_merge_matrix(deltas, direction=direction, rank_tol=0.0,
                             compute_dtype=torch.float64, norm_target="sum")
    assert math.isclose(float(total.norm()), np.linalg.norm(sum(raw)), rel_tol=1e-10)
    aligned = drm_merge_matrix(deltas, direction=direction, rank_tol=0.0,
                               compute_dtype=torch.float64, norm_target="total")
    assert math.isclose(float(aligned.norm()), sum(np.linalg.norm(d) for d in raw), rel_tol=1e-10)
    # only the scale changes
    plain = drm_merge_matrix(deltas, direction=direction, rank_tol=0.0, compute_dtype=torch.float64)
    cosine = float((plain * mean).sum() / (plain.norm() * mean.norm()))
    assert cosine == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(f"{k}={v}" for k, v in o.items()))
def test_lowrank_path_matches_dense(direction, options):
    gen = torch.Generator().manual_seed(7)
    adapters = [
        LoraFactors(torch.randn(12, 2, generator=gen, dtype=torch.float64),
                    torch.randn(2, 9, generator=gen, dtype=torch.float64), 0.5 + t)
        for t in range(3)
    ]
    adapters.append(None)  # an adapter that does not target this matrix
    dense = [a.scale * a.B @ a.A for a in adapters[:3]] + [torch.zeros(12, 9, dtype=torch.float64)]
    want = drm_merge_matrix(dense, direction=direction, density=0.5,
                            compute_dtype=torch.float64, **options)
    b, a = drm_merge_lowrank(adapters, shape=(12, 9), direction=direction, density=0.5,
                             compute_dtype=torch.float64, **options)
    torch.testing.assert_close(b @ a, want, rtol=1e-9, atol=1e-11)


def test_elementwise_norm_target():
    raw = _deltas(8, n_models=3, shape=(11,))
    got = elementwise_merge([torch.from_numpy(d) for d in raw], compute_dtype=torch.float64,
                            norm_target="mean")
    assert math.isclose(float(got.norm()), np.mean([np.linalg.norm(d) for d in raw]), rel_tol=1e-12)


@pytest.mark.parametrize("kwargs, needle", [
    ({"norm_target": "median"}, "norm_target"),
])
def test_kernel_rejects_bad_options(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        drm_merge_matrix([torch.ones(3, 2)], **kwargs)


# ---------------------------------------------------------------- through mergekit


def test_method_passes_options_to_the_kernel():
    from mergekit.merge_methods import TensorGroup

    import mergekit_drm
    from mergekit_drm.drm.method import drm_merge_method

    mergekit_drm.register()
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(8, 6, generator=gen)
    fts = [base + 0.1 * torch.randn(8, 6, generator=gen) for _ in range(3)]
    params = {"density": 0.5, "isotropic": True, "norm_target": "mean", "lambda": 0.7}
    group = TensorGroup.from_tensors([base] + fts, base_index=0, name="mlp.down_proj.weight")
    (out,) = drm_merge_method([group], parameters=params)
    kernel_kw = {k: v for k, v in params.items() if k != "lambda"}
    expect = base + 0.7 * drm_merge_matrix([ft - base for ft in fts], **kernel_kw)
    torch.testing.assert_close(out, expect, rtol=1e-6, atol=1e-7)
    bias = TensorGroup.from_tensors([base[0]] + [ft[0] for ft in fts], base_index=0, name="mlp.bias")
    (out,) = drm_merge_method([bias], parameters={"norm_target": "sum"})
    want = torch.linalg.vector_norm(sum(ft[0] - base[0] for ft in fts))
    torch.testing.assert_close(torch.linalg.vector_norm(out - base[0]), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("params, needles", [
    ({"norm_target": "median"}, ("`norm_target`", "none, mean, sum, total", "median")),
])
def test_bad_option_fails_before_output(tmp_path, params, needles):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_drm
    from tests.tiny_models import build_finetunes

    mergekit_drm.register()
    base, *fts = build_finetunes("llama", str(tmp_path / "models"), count=2)
    config = {"merge_method": "drm", "base_model": base, "models": [{"model": p} for p in fts],
              "parameters": params, "dtype": "float32"}
    out = tmp_path / "out"
    with pytest.raises(Exception) as info:
        run_merge(MergeConfiguration.model_validate(config), str(out),
                  MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    assert not out.exists()


def test_lora_cli_with_options_equals_mergekit_route(tmp_path, llama64):
    """mergekit-drm-lora passes the options on: its adapter equals the dense mergekit merge."""
    import os

    from safetensors.torch import load_file

    from tests.test_lora_cli import TOL, applied_state, rel, run_cli, run_route1, yaml_config

    base, paths = llama64
    params = {"direction": "vertical", "density": 0.4, "compute_dtype": "float64",
              "isotropic": True, "norm_target": "mean", "lambda": 0.8}
    config = yaml_config(base, list(paths.values()), [1.0, 0.6, 1.4, 1.0], params, dtype="float64")
    route1 = run_route1(tmp_path, config)
    out, _ = run_cli(tmp_path, config)
    base_state = load_file(os.path.join(base, "model.safetensors"))
    full = load_file(os.path.join(route1, "model.safetensors"))
    applied = applied_state(base, str(out))
    moved = 0
    for name, tensor in full.items():
        delta = tensor.double() - base_state[name].double()
        if float(delta.norm()) == 0:
            continue
        moved += 1
        assert rel(applied[name].double() - base_state[name].double(), delta) < TOL[torch.float64], name
    assert moved == 14


@pytest.mark.parametrize("shape", [(40, 96), (96, 40), (50, 50)])
@pytest.mark.parametrize("condition", [1e2, 1e7])
def test_flatten_spectrum_equals_the_full_svd_formula(shape, condition):
    """flatten_spectrum takes the Gram route on a rectangular matrix when it
    resolves every direction (condition 1e2), the full SVD otherwise (1e7: below
    the Gram's reach; square matrices);
    either way it equals mean(s) U V^T of the float64 SVD, with every singular
    value above the numerical floor taking part."""
    from mergekit_drm.drm.options import flatten_spectrum

    g = torch.Generator().manual_seed(11)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(condition), k, dtype=torch.float64)
    merged = (u * s) @ v.T
    want = (u * s.mean()) @ v.T
    got = flatten_spectrum(merged)
    assert torch.allclose(got, want, atol=1e-9 * float(want.norm()), rtol=0)
    # float32 input: the formula on the float32 matrix itself, result in float32
    rounded = merged.float().double()
    uu, ss, vvh = torch.linalg.svd(rounded, full_matrices=False)
    want32 = (uu * ss.mean()) @ vvh
    got32 = flatten_spectrum(merged.float())
    assert got32.dtype == torch.float32
    assert float((got32.double() - want32).norm() / want32.norm()) < 1e-5
