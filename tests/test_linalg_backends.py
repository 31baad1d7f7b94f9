"""Per-machine library choice: every candidate is exact, the cache is per machine and safe."""

import json
import multiprocessing
import os

import numpy as np
import pytest
import torch

from mergekit_drm import linalg_backends as lb
from mergekit_drm.decompose import low_rank_factors
from mergekit_drm.drm.kernel import drm_merge_matrix, elementwise_merge


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_DRM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MERGEKIT_DRM_CALIBRATION", raising=False)
    monkeypatch.delenv("MERGEKIT_DRM_EIGH", raising=False)
    monkeypatch.delenv("MERGEKIT_DRM_GEMM", raising=False)
    lb.forget_memory()
    yield tmp_path
    lb.forget_memory()


def _deltas(n_models, rows, cols, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spectrum = torch.exp(-torch.arange(min(rows, cols), dtype=torch.float64) / 40)
    out = []
    for _ in range(n_models):
        left = torch.linalg.qr(torch.randn(rows, min(rows, cols), generator=gen, dtype=torch.float64))[0]
        right = torch.linalg.qr(torch.randn(cols, min(rows, cols), generator=gen, dtype=torch.float64))[0]
        out.append((left * spectrum) @ right.T)
    return torch.stack(out)


@pytest.mark.parametrize("solver", lb.EIGH_SOLVERS)
@pytest.mark.parametrize("gemm", lb.GEMM_LIBRARIES)
@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
def test_every_solver_and_gemm_library_agrees_with_the_svd_route(cache_dir, monkeypatch, solver, gemm, direction):
    """float64: each eigensolver x GEMM library gives the full-SVD merge to <= 1e-8."""
    monkeypatch.setenv("MERGEKIT_DRM_EIGH", solver)
    monkeypatch.setenv("MERGEKIT_DRM_GEMM", gemm)
    deltas = _deltas(3, 420, 150, seed=1)  # 420 >= MIN_RACED_EIGH: the chosen solver runs
    reference = drm_merge_matrix(deltas, direction=direction, svd="full")
    for mode in ("gram", "auto"):
        merged = drm_merge_matrix(deltas, direction=direction, svd=mode)
        assert merged.dtype == torch.float64
        assert float((merged - reference).norm() / reference.norm()) <= 1e-8


def test_left_gram_by_syrk_equals_the_product(cache_dir, monkeypatch):
    monkeypatch.setenv("MERGEKIT_DRM_GEMM", "numpy")  # blas-syrk
    assert lb.gram_choice() == "blas-syrk"
    deltas = torch.randn(3, 50, 70, dtype=torch.float32)
    for stack in (deltas, deltas.transpose(1, 2)):  # C- and Fortran-ordered models
        gram = lb.new_gram(stack.shape[1], "cpu")
        for delta in stack:
            lb.add_gram(gram, delta)
        expected = sum(d.double() @ d.double().T for d in stack)
        upper = torch.triu(torch.ones_like(expected, dtype=torch.bool))
        assert torch.allclose(gram[upper], expected[upper], rtol=1e-12, atol=1e-9)


def test_race_is_cached_and_reused(cache_dir, monkeypatch):
    calls = []
    real = lb._eigh

    def counting(name, gram):
        calls.append(name)
        return real(name, gram)

    monkeypatch.setattr(lb, "_eigh", counting)
    sym = torch.randn(400, 400, dtype=torch.float64)
    sym = sym + sym.T
    values, vectors = lb.eigh(sym)
    # Every solver ran; a second, reversed round reran only those within 1.3x
    # of the leader (the leader among them), so no solver ran more than twice.
    available = lb._available_eigh()
    assert set(calls) == set(available) and len(calls) <= 2 * len(available)
    assert all(calls.count(name) <= 2 for name in available)
    assert calls[:len(available)] == available  # first round in order
    assert torch.allclose(vectors @ torch.diag(values) @ vectors.T, sym, atol=1e-9)
    path = lb.cache_path()
    stored = json.load(open(path))
    assert stored["machine"]["cpu"] == lb.cpu_model()
    entry = stored["results"][f"eigh:{lb._bucket(400)}"]
    assert entry["best"] in lb.EIGH_SOLVERS and set(entry["seconds"]) == set(calls)
    assert entry["best"] == min(entry["seconds"], key=entry["seconds"].get)
    assert calls.count(entry["best"]) == 2  # the leader is always timed twice
    # A new process (memory dropped) reads the file: one solver call, no race.
    lb.forget_memory()
    calls.clear()
    lb.eigh(sym)
    assert calls == [entry["best"]]


def test_cache_key_follows_library_versions_and_threads(cache_dir, monkeypatch):
    first = lb.cache_path()
    monkeypatch.setattr(torch, "__version__", "0.0-other")
    assert lb.cache_path() != first
    monkeypatch.undo()
    monkeypatch.setenv("MERGEKIT_DRM_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    assert lb.cache_path() != first


def test_calibration_off_measures_nothing_and_writes_nothing(cache_dir, monkeypatch):
    monkeypatch.setenv("MERGEKIT_DRM_CALIBRATION", "off")
    deltas = _deltas(2, 400, 200)
    drm_merge_matrix(deltas, svd="auto")
    assert list(cache_dir.iterdir()) == []
    assert lb.route_constants() == lb.DEFAULT_ROUTE_CONSTANTS


def test_bad_override_names_the_variable(cache_dir, monkeypatch):
    monkeypatch.setenv("MERGEKIT_DRM_EIGH", "lapack")
    with pytest.raises(ValueError, match="MERGEKIT_DRM_EIGH.*numpy"):
        low_rank_factors(_deltas(2, 400, 200), rank_tol=0.01, mode="gram")


def _write_many(args):
    directory, worker = args
    os.environ["MERGEKIT_DRM_CACHE_DIR"] = directory
    for index in range(20):
        lb._write(lb.cache_path(), f"w{worker}-{index}", index)


def test_concurrent_writers_lose_nothing(cache_dir):
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_write_many, [(str(cache_dir), w) for w in range(4)])
    results = lb._read(lb.cache_path())
    assert {f"w{w}-{i}" for w in range(4) for i in range(20)} <= set(results)
    assert not [p for p in cache_dir.iterdir() if p.suffix == ".tmp"]


def test_corrupt_cache_is_remeasured(cache_dir):
    path = lb.cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write("{not json")
    assert lb.cached("x", lambda: 7) == 7
    assert lb._read(path)["x"] == 7


@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
def test_compute_dtype_defaults_to_the_inputs_precision(cache_dir, direction):
    """float64 in -> float64 compute (= explicit float64); float32/bf16 in -> float32."""
    d64 = _deltas(3, 40, 30, seed=3)
    auto = drm_merge_matrix(d64, direction=direction)
    explicit = drm_merge_matrix(d64, direction=direction, compute_dtype=torch.float64)
    forced32 = drm_merge_matrix(d64, direction=direction, compute_dtype=torch.float32)
    assert auto.dtype == torch.float64 and torch.equal(auto, explicit)
    assert forced32.dtype == torch.float32
    assert drm_merge_matrix(d64.float(), direction=direction).dtype == torch.float32
    assert drm_merge_matrix(list(d64.bfloat16()), direction=direction).dtype == torch.float32
    # A list mixing float32 and float64 computes in float64.
    assert drm_merge_matrix([d64[0].float(), d64[1], d64[2]], direction=direction).dtype == torch.float64
    assert elementwise_merge(d64).dtype == torch.float64
    assert elementwise_merge(d64.half()).dtype == torch.float32


def test_mergekit_method_computes_float64_checkpoints_in_float64(cache_dir):
    from mergekit.merge_methods import TensorGroup

    from mergekit_drm.drm.method import drm_merge_method

    gen = torch.Generator().manual_seed(4)
    base = torch.randn(24, 16, generator=gen, dtype=torch.float64)
    deltas = _deltas(3, 24, 16, seed=5) * 1e-3
    tensors = [base] + [base + d for d in deltas]
    group = TensorGroup.from_tensors(tensors, base_index=0, name="model.layers.0.mlp.up_proj.weight")
    (merged,) = drm_merge_method([group])
    expected = base + drm_merge_matrix(
        torch.stack([t - base for t in tensors[1:]]), compute_dtype=torch.float64
    )
    assert merged.dtype == torch.float64
    assert float((merged - expected).abs().max()) <= 1e-15
    (as32,) = drm_merge_method([group], parameters={"compute_dtype": "float32"})
    assert float((as32 - expected).abs().max()) > 1e-12  # float32 compute really differs


def test_race_interleaves_rounds_and_keeps_each_candidates_best(monkeypatch):
    order = []
    # A fake clock: each candidate's k-th run takes a planted duration, so the
    # minimum over rounds is known; a load burst inflates one round of "a".
    durations = {"a": [9.0, 1.0, 5.0], "b": [2.0, 3.0, 2.5]}
    now = [0.0]

    def perf_counter():
        return now[0]

    def runner(name):
        def run():
            order.append(name)
            now[0] += durations[name][order.count(name) - 1]
        return run

    monkeypatch.setattr(lb.time, "perf_counter", perf_counter)
    times = lb._race({"a": runner("a"), "b": runner("b")}, rounds=3)
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert times == {"a": 1.0, "b": 2.0}


@pytest.mark.parametrize(
    "times, default, expected",
    [
        ({"torch": 1.0, "numpy": 0.9}, "torch", "torch"),  # a 10 % win is not enough
        ({"torch": 1.0, "numpy": 0.8}, "torch", "numpy"),  # exactly the margin
        ({"torch": 1.0, "numpy": 0.3}, "torch", "numpy"),
        ({"torch": 0.5, "numpy": 1.0}, "torch", "torch"),
        ({"torch-gemm": 1.0, "blas-syrk": 0.9}, "torch-gemm", "torch-gemm"),
        ({"torch-gemm": 1.0, "blas-syrk": 0.4}, "torch-gemm", "blas-syrk"),
    ],
)
def test_gemm_leaves_torch_only_for_a_clear_win(times, default, expected):
    assert lb.GEMM_SWITCH_MARGIN == 1.25
    assert lb._with_margin(times, default) == expected
