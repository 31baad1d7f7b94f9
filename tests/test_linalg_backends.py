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
        calls.append((name, gram.shape[0]))
        return real(name, gram)

    monkeypatch.setattr(lb, "_eigh", counting)
    monkeypatch.setattr(lb, "EIGH_RACE_MIN_S", 1e9)  # no cap here (a loaded machine); see below
    sym = torch.randn(1600, 1600, dtype=torch.float64)
    sym = sym + sym.T
    values, vectors = lb.eigh(sym)
    proxy = lb.eigh_proxy_size(1600)
    assert proxy == 400
    race = [name for name, size in calls if size == proxy]
    real_solves = [name for name, size in calls if size == 1600]
    assert len(race) + len(real_solves) == len(calls)
    # Every solver raced on the proxy;
    # a second, reversed round reran only those within 1.3x of the leader.
    available = lb._available_eigh()
    assert set(race) == set(available) and all(race.count(n) <= 2 for n in available)
    assert race[:len(available)] == available  # first round in order
    assert torch.allclose(vectors @ torch.diag(values) @ vectors.T, sym, atol=1e-9)
    path = lb.cache_path()
    stored = json.load(open(path))
    assert stored["machine"]["cpu"] == lb.cpu_model()
    entry = stored["results"][f"eigh:{lb._bucket(1600)}"]
    assert entry["best"] in lb.EIGH_SOLVERS and set(entry["seconds"]) == set(race)
    assert entry["best"] == min(entry["seconds"], key=entry["seconds"].get)
    assert race.count(entry["best"]) == 2  # the leader is always timed twice
    assert real_solves == [entry["best"]]  # the real matrix: one solve, by the winner
    assert lb.one_off_costs()[f"eigh:{lb._bucket(1600)}"] >= entry["race_seconds"] > 0
    # A new process (memory dropped) reads the file: one solver call, no race.
    lb.forget_memory()
    calls.clear()
    lb.eigh(sym)
    assert calls == [(entry["best"], 1600)]
    assert lb.one_off_costs() == {}


class _FakeSolvers:
    """Planted solvers on a fake clock: candidate c takes rate[c] * n^3 seconds."""

    def __init__(self, monkeypatch, rates):
        self.now = 0.0
        self.rates = rates
        self.calls = []
        monkeypatch.setattr(lb.time, "perf_counter", lambda: self.now)
        monkeypatch.setattr(lb, "_available_eigh", lambda: list(rates))
        monkeypatch.setattr(lb, "_eigh", self.solve)
        monkeypatch.setattr(lb, "_proxy_gram", lambda n: torch.eye(n, dtype=torch.float64))

    def solve(self, name, gram):
        n = gram.shape[0]
        self.calls.append((name, n))
        self.now += self.rates[name] * n ** 3
        return torch.ones(1, dtype=gram.dtype), torch.eye(1, dtype=gram.dtype)


def test_race_runs_on_a_proxy_and_costs_a_few_percent_of_the_solve(cache_dir, monkeypatch):
    """At n = 4096 every race solve is at n/4 and the race costs <= 20 % of the
    real solve; the planted fastest solver wins and solves the real matrix once."""
    # Relative speeds as measured at n = 4096 on the Zen 4 machine.
    rates = {"torch": 1.5e-10, "numpy": 1.4e-10, "scipy-evd": 1e-10, "scipy-evr": 2.2e-10}
    fake = _FakeSolvers(monkeypatch, rates)
    n = 4096
    with lb.record_stages() as stages:
        lb.eigh(torch.zeros(n, n, dtype=torch.float64))
    race = fake.calls[:-1]
    assert fake.calls[-1] == ("scipy-evd", n)
    assert {size for _, size in race} == {n // 4}
    entry = lb._read(lb.cache_path())[f"eigh:{lb._bucket(n)}"]
    assert entry["best"] == "scipy-evd" and entry["proxy"] == n // 4 and not entry["capped"]
    race_cost = sum(rates[name] * size ** 3 for name, size in race)
    real_solve = rates["scipy-evd"] * n ** 3
    assert entry["race_seconds"] == pytest.approx(race_cost)
    assert race_cost <= lb.EIGH_RACE_BUDGET * real_solve
    assert stages["race"] == pytest.approx(race_cost) and stages["eigh"] == pytest.approx(real_solve)
    # At 12288 the proxy is capped at 2048: the race is < 5 % of the solve.
    fake.calls.clear()
    lb.eigh(torch.zeros(12288, 1, dtype=torch.float64))  # only shape[0] is read by the fakes
    race = fake.calls[:-1]
    assert {size for _, size in race} == {2048}
    assert sum(rates[name] * size ** 3 for name, size in race) < 0.05 * rates["scipy-evd"] * 12288 ** 3


def test_race_stops_at_its_budget(cache_dir, monkeypatch):
    """A race whose candidates are slow on the proxy stops once it spent the
    budget: the default (torch) always runs, later candidates may not."""
    # torch's proxy solve alone costs 1/64 of the estimated real solve; the
    # next candidates are 8x slower each, so the 20 % budget runs out.
    rates = {"torch": 1e-10, "numpy": 8e-10, "scipy-evd": 8e-10, "scipy-evr": 8e-10}
    monkeypatch.setattr(lb, "EIGH_RACE_MIN_S", 0.0)
    fake = _FakeSolvers(monkeypatch, rates)
    n = 3000
    lb.eigh(torch.zeros(n, n, dtype=torch.float64))
    entry = lb._read(lb.cache_path())[f"eigh:{lb._bucket(n)}"]
    assert entry["capped"] and entry["best"] == "torch"
    assert "scipy-evr" not in entry["seconds"]
    spent_before_last = sum(rates[name] * size ** 3 for name, size in fake.calls[:-2])
    assert spent_before_last < lb.EIGH_RACE_BUDGET * rates["torch"] * n ** 3
    assert entry["race_seconds"] <= lb.EIGH_RACE_BUDGET * rates["torch"] * n ** 3 + max(
        rates[c] * (n // 4) ** 3 for c in rates)  # at most one solve past the budget


def test_stages_are_exclusive(monkeypatch):
    """A stage inside another is not counted twice: stages add up to the wall time."""
    now = [0.0]
    monkeypatch.setattr(lb.time, "perf_counter", lambda: now[0])
    with lb.record_stages() as stages:
        with lb.stage("project"):
            now[0] += 1.0
            with lb.stage("race"):
                now[0] += 5.0
            now[0] += 2.0
    assert stages == {"project": 3.0, "race": 5.0}


def _load_without(tmp_path, monkeypatch, missing, fake_msvcrt=None):
    """A fresh copy of linalg_backends imported as if ``missing`` modules did not exist."""
    import importlib.util
    import sys

    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    if fake_msvcrt is not None:
        monkeypatch.setitem(sys.modules, "msvcrt", fake_msvcrt)
    spec = importlib.util.spec_from_file_location("_lb_copy", lb.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_imports_and_writes_without_fcntl_using_msvcrt(tmp_path, monkeypatch):
    import types

    events = []
    fake = types.SimpleNamespace(
        LK_LOCK=1, LK_UNLCK=0, locking=lambda fd, mode, n: events.append((mode, n))
    )
    module = _load_without(tmp_path, monkeypatch, ["fcntl"], fake_msvcrt=fake)
    assert module.fcntl is None and module.msvcrt is fake
    path = str(tmp_path / "c" / "calibration.json")
    module._write(path, "x", 3)
    module._write(path, "y", 4)
    assert module._read(path) == {"x": 3, "y": 4}
    assert events == [(1, 1), (0, 1)] * 2  # locked and unlocked around each write


def test_imports_and_writes_without_any_lock_module(tmp_path, monkeypatch):
    module = _load_without(tmp_path, monkeypatch, ["fcntl", "msvcrt"])
    assert module.fcntl is None and module.msvcrt is None
    path = str(tmp_path / "calibration.json")
    module._write(path, "x", 1)
    assert module._read(path) == {"x": 1}
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


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


# ---------------------------------------------------------- routes on a GPU (no GPU needed)

# Per-flop costs as a device would measure them (seconds per unit of
# ``decompose.route_costs``): a consumer card runs float64 at 1/64 of float32,
# an H100 at 1/2. The SVD constant is the same on both.
CONSUMER_GPU = {"eigh64": 2e-10, "svd32": 1e-11, "svd64": 6e-10, "gemm32": 1e-13, "gemm64": 6.4e-12}
DATACENTER_GPU = {"eigh64": 5e-12, "svd32": 1e-11, "svd64": 2e-11, "gemm32": 1e-13, "gemm64": 2e-13}


@pytest.fixture
def fake_gpus(cache_dir, monkeypatch):
    """Route constants 'measured' on fake CUDA devices, by device model name."""
    measured = []
    names = {0: "Consumer GPU", 1: "Datacenter GPU"}

    def measure(device=None):
        device = torch.device(device or "cpu")
        measured.append(str(device))
        if device.type == "cpu":
            return dict(lb.DEFAULT_ROUTE_CONSTANTS)
        return dict(CONSUMER_GPU if device.index == 0 else DATACENTER_GPU)

    monkeypatch.setattr(lb, "_measure_route_constants", measure)
    monkeypatch.setattr(lb, "device_name", lambda device: names[device.index])
    return measured


def test_cuda_route_follows_the_devices_float64_rate(fake_gpus):
    """A 4096 x 12288 stack: on a card with slow float64 the float32 SVD
    (4 units of svd32 per 4096^3) beats the float64 Gram (1 unit of eigh64 =
    20 svd32 units); with fast float64 the Gram (eigh64 = svd32 / 2) wins."""
    from mergekit_drm.decompose import choose_route

    shape, tol = (4096, 12288), 0.01
    consumer = choose_route(shape, torch.float32, tol, "auto", torch.device("cuda", 0))
    datacenter = choose_route(shape, torch.float32, tol, "auto", torch.device("cuda", 1))
    assert consumer == ("full", None)
    assert datacenter == ("left", torch.float64)
    # Each device model measured once and cached under its name, not the CPU's.
    choose_route(shape, torch.float32, tol, "auto", torch.device("cuda", 0))
    assert fake_gpus == ["cuda:0", "cuda:1"]
    results = lb._read(lb.cache_path())
    assert results["route_constants:cuda:Consumer GPU"] == CONSUMER_GPU
    assert results["route_constants:cuda:Datacenter GPU"] == DATACENTER_GPU
    assert "route_constants:cpu" not in results


@pytest.mark.parametrize("index", [0, 1])
def test_cuda_route_never_goes_below_the_accuracy_bound(fake_gpus, index):
    """No rates make a Gram route float32, and where float64 Gram cannot resolve
    the cut (rank_tol 1e-5: eps64 / tol^2 = 2e-6 > 1e-6) the full SVD is used."""
    from mergekit_drm.decompose import choose_route

    device = torch.device("cuda", index)
    for shape in [(4096, 12288), (12288, 4096), (1024, 43008), (14336, 12288)]:
        route, gram_dtype = choose_route(shape, torch.float32, 0.01, "auto", device)
        assert gram_dtype in (None, torch.float64)
        assert choose_route(shape, torch.float32, 1e-5, "auto", device) == ("full", None)
        assert choose_route(shape, torch.float32, 1e-5, "gram", device) == ("full", None)


def test_cuda_route_with_calibration_off_measures_nothing(fake_gpus, monkeypatch):
    from mergekit_drm.decompose import route_costs

    monkeypatch.setenv("MERGEKIT_DRM_CALIBRATION", "off")
    route_costs(4096, 12288, torch.float32, torch.device("cuda", 0))
    assert fake_gpus == []
    assert lb.route_constants(torch.device("cuda", 0)) == lb.DEFAULT_ROUTE_CONSTANTS


def test_gpu_check_needs_a_gpu_and_says_so(monkeypatch, capsys, tmp_path):
    from benchmarks.perf import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.md"
    assert gpu_check.main(["--out", str(out)]) == 2
    assert "needs a GPU" in capsys.readouterr().out and not out.exists()
