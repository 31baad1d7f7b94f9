"""Which library runs each dense CPU operation, chosen by timing it on this machine.

torch ships MKL; numpy and scipy ship OpenBLAS. Which is faster depends on the
CPU: on an AMD EPYC (Zen 4) OpenBLAS's float64 GEMM was measured 2x MKL's and
its ``syevd`` 1.4x at n = 2816, while on other CPUs MKL wins. So nothing here
is a constant measured elsewhere: each choice is a race between exact
implementations, run once per machine and library versions and cached in a
JSON file (``$MERGEKIT_DRM_CACHE_DIR``, default ``~/.cache/mergekit-drm``).

* ``eigh``: symmetric eigensolver, raced per size bucket (a quarter octave)
  when the first real Gram matrix of that size comes: every candidate
  decomposes a synthetic proxy a quarter of its size (``_race_eigh``; the
  ranking is assumed to carry over; the race stops at ~20 % of one real
  solve, a fraction of a percent of a merge that meets the size in every
  layer), and the winner's name is cached and solves the matrix. Candidates: torch
  (MKL ``syevd``), numpy (OpenBLAS ``syevd``), scipy drivers ``evd`` and
  ``evr``. (scipy's ``subset_by_value``, i.e. only the eigenpairs above the
  rank cut, was measured 5x slower than the full ``evr`` at n = 2816: DRM
  keeps about half the spectrum, where bisection and inverse iteration lose
  to the full tridiagonal solvers.)
* ``gemm``: float32/float64 matrix products (torch vs numpy), and the Gram
  matrix D D^T (torch GEMM vs BLAS ``dsyrk``, half the flops), raced once on
  small synthetic matrices; the other library must win by 25 % to replace
  torch (see ``GEMM_SWITCH_MARGIN``).
* ``route constants``: seconds per flop of eigh, SVD and GEMM for
  ``decompose.route_costs``, measured once on small synthetic matrices, per
  accelerator model too (``--cuda``: the device's float64 rate decides
  between the float64 Gram routes and the float32 SVD).

Environment: ``MERGEKIT_DRM_CALIBRATION=off`` disables timing and the cache
(everything runs in torch, the cost model uses fixed constants);
``MERGEKIT_DRM_EIGH`` / ``MERGEKIT_DRM_GEMM`` force one candidate. Concurrent
processes are safe: the file is read-merged-written under an exclusive lock
and replaced atomically; a lost or corrupt file only means re-measuring.
GPU tensors always use torch. Windows has no ``fcntl``: the lock is msvcrt's.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import math
import os
import platform
import tempfile
import threading
import time
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

try:  # POSIX
    import fcntl
except ImportError:  # Windows: msvcrt's byte-range lock instead
    fcntl = None
try:
    import msvcrt
except ImportError:
    msvcrt = None

EIGH_SOLVERS = ("torch", "numpy", "scipy-evd", "scipy-evr")
GEMM_LIBRARIES = ("torch", "numpy")
# Below this size the eigensolvers differ by milliseconds: no race.
MIN_RACED_EIGH = 384
# The eigensolver race runs on a synthetic proxy a quarter of the real size
# (at most EIGH_PROXY_MAX), so each candidate costs ~1/64 of the solve it
# serves (1/216 at n = 12288), and stops at EIGH_RACE_BUDGET of that solve
# (or EIGH_RACE_MIN_S). It replaced a race of every solver on the real
# matrix, which made the first 4096 x 4096 Gram of a merge take 5.5x its solve.
# (The ranking held from 2048 to 4096 on the Zen 4 machine: scipy-evd, then
# torch/numpy within 15 %, evr last.)
EIGH_PROXY_FRACTION = 1 / 4
EIGH_PROXY_MAX = 2048
EIGH_RACE_BUDGET = 0.2
EIGH_RACE_MIN_S = 2.0
# A GEMM leaves torch (the default) only for a clear win: the race times each
# library alone, but interleaving OpenBLAS calls with torch's own kernels on
# few cores costs more than it shows (OpenBLAS's threads keep spinning after a
# call and slow the torch operations that follow: float32 numpy GEMMs won the
# race by 10 % and made DRM's projection and merge stages 35-60 % slower).
GEMM_SWITCH_MARGIN = 1.25

_lock = threading.Lock()
_memory: Dict[str, object] = {}


# ---------------------------------------------------------------- stage timer

_stage_state: contextvars.ContextVar = contextvars.ContextVar("drm_stage_state", default=None)


@contextlib.contextmanager
def stage(name: str):
    """Adds the block's wall time to ``name`` inside ``record_stages`` (else free).

    Exclusive time: a stage opened inside another (a one-off ``race`` inside
    ``project``, say) is not counted twice, so the stages add up to the total.
    """
    state = _stage_state.get()
    if state is None:
        yield
        return
    totals, nested = state
    nested.append(0.0)
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        inner = nested.pop()
        totals[name] = totals.get(name, 0.0) + elapsed - inner
        if nested:
            nested[-1] += elapsed


@contextlib.contextmanager
def record_stages():
    """Collect per-stage wall times (CPU; GPU work is not synchronized) in a dict."""
    totals: Dict[str, float] = {}
    token = _stage_state.set((totals, []))
    try:
        yield totals
    finally:
        _stage_state.reset(token)


# ------------------------------------------------------------------ the cache


def calibration_enabled() -> bool:
    return os.environ.get("MERGEKIT_DRM_CALIBRATION", "on").lower() not in ("off", "0", "false", "no")


def cpu_model() -> str:
    """CPU model name plus family/model (AMD's 'AMD EPYC' alone names no generation)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']} model {fields.get('model', '?')})"
    return name


def numpy_blas() -> str:
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # numpy < 1.26 has no dict mode
        return "unknown"


def machine_key() -> dict:
    """What a measurement depends on: CPU, libraries, threads, BLAS settings."""
    try:
        import scipy

        scipy_version = scipy.__version__
    except ImportError:
        scipy_version = None
    env = {
        name: os.environ.get(name)
        for name in ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                     "MKL_NUM_THREADS", "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE")
        if os.environ.get(name)
    }
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "numpy_blas": numpy_blas(),
        "scipy": scipy_version,
        "env": env,
    }


def cache_path() -> str:
    root = os.environ.get("MERGEKIT_DRM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mergekit-drm"
    )
    digest = hashlib.sha1(json.dumps(machine_key(), sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(root, f"calibration-{digest}.json")


def _read(path: str) -> dict:
    try:
        with open(path) as handle:
            data = json.load(handle)
        return data.get("results", {}) if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def _locked(path: str):
    """Exclusive lock on ``path`` (fcntl on POSIX, msvcrt on Windows).

    Without either (another platform) no lock is taken: writers still replace
    the file atomically, so the worst case is one lost result, re-measured later.
    """
    with open(path, "a+") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        elif msvcrt is not None:
            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)  # OSError after ~10 s
        try:
            yield
        finally:
            if fcntl is None and msvcrt is not None:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)


def _write(path: str, name: str, value) -> None:
    """Merge one result into the file: exclusive lock, atomic replace."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _locked(path + ".lock"):
            results = _read(path)
            results[name] = value
            handle, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            with os.fdopen(handle, "w") as out:
                json.dump({"machine": machine_key(), "results": results}, out, indent=1)
            os.replace(tmp, path)
    except OSError:
        pass  # read-only home: the result still lives in memory for this process


# Seconds this process spent measuring (races, rate probes), by cache entry:
# the one-off cost a benchmark reports next to the merge it served.
_one_off: Dict[str, float] = {}


def one_off_costs() -> Dict[str, float]:
    """{cache entry: seconds} of the measurements this process ran (not cache hits)."""
    with _lock:
        return dict(_one_off)


def cached(name: str, measure: Callable[[], object]):
    """The cached result ``name`` for this machine, measuring it if missing.

    A measurement's wall time counts as stage ``race`` and in ``one_off_costs``.
    """
    path = cache_path()
    key = path + "::" + name
    with _lock:
        if key in _memory:
            return _memory[key]
    value = _read(path).get(name)
    if value is None:
        start = time.perf_counter()
        with stage("race"):
            value = measure()
        with _lock:
            _one_off[name] = _one_off.get(name, 0.0) + time.perf_counter() - start
        _write(path, name, value)
    with _lock:
        _memory[key] = value
    return value


def forget_memory() -> None:
    """Drop the in-process copy and the one-off log (tests; the file is untouched)."""
    with _lock:
        _memory.clear()
        _one_off.clear()


# ----------------------------------------------------------------- candidates


def _scipy_linalg():
    try:
        import scipy.linalg

        return scipy.linalg
    except ImportError:
        return None


def _eigh(name: str, gram: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ascending eigenpairs of a float64 CPU matrix whose upper triangle is set."""
    if name == "torch":
        return torch.linalg.eigh(gram, UPLO="U")
    array = gram.numpy()
    if name == "numpy":
        values, vectors = np.linalg.eigh(array, UPLO="U")
    else:
        values, vectors = _scipy_linalg().eigh(
            array, lower=False, driver=name.split("-")[1], check_finite=False
        )
    return torch.from_numpy(values), torch.from_numpy(vectors)


def _available_eigh():
    names = [n for n in EIGH_SOLVERS if not n.startswith("scipy") or _scipy_linalg() is not None]
    forced = os.environ.get("MERGEKIT_DRM_EIGH")
    if forced:
        if forced not in names:
            raise ValueError(
                f"MERGEKIT_DRM_EIGH must be one of {', '.join(names)}; got {forced!r}"
            )
        return [forced]
    return names


def _bucket(size: int) -> str:
    return f"{round(4 * math.log2(max(size, 1))) / 4:.2f}"


def eigh_proxy_size(size: int) -> int:
    """Size of the synthetic matrix the eigensolvers race on for a real ``size``."""
    return min(size, max(MIN_RACED_EIGH, min(int(size * EIGH_PROXY_FRACTION), EIGH_PROXY_MAX)))


def _proxy_gram(size: int) -> torch.Tensor:
    """A Gram matrix with a decaying spectrum, like DRM's (deflation in the
    divide-and-conquer solvers depends on it), upper triangle set."""
    gen = torch.Generator().manual_seed(size)
    x = torch.randn(size, size, generator=gen, dtype=torch.float64)
    x *= torch.exp(-torch.arange(size, dtype=torch.float64) / (size / 8))
    return x @ x.T


def _race_eigh(size: int, names) -> dict:
    """Time every candidate on a proxy of a quarter of ``size`` and keep the fastest.

    Two interleaved rounds (the second reversed, rerunning only solvers within
    1.3x of the leader): a burst of load on a shared machine hits one timing,
    not one solver. The race stops once it has spent EIGH_RACE_BUDGET of the
    real solve it serves (the leader's proxy time scaled by the cube of the
    size ratio) or EIGH_RACE_MIN_S, whichever is more; the first candidate
    (torch, the default) always runs.
    """
    start = time.perf_counter()
    proxy = eigh_proxy_size(size)
    gram = _proxy_gram(proxy)
    times: Dict[str, float] = {}
    capped = False
    for round_names in (names, names[::-1]):
        leader = min(times.values(), default=math.inf)
        for candidate in round_names:
            if candidate in times and times[candidate] > 1.3 * leader:
                continue
            if times:
                estimate = min(times.values()) * (size / proxy) ** 3
                budget = max(EIGH_RACE_BUDGET * estimate, EIGH_RACE_MIN_S)
                if time.perf_counter() - start >= budget:
                    capped = True
                    break
            began = time.perf_counter()
            _eigh(candidate, gram.clone())
            times[candidate] = min(times.get(candidate, math.inf), time.perf_counter() - began)
        if capped:
            break
    best = min(times, key=times.get)
    return {
        "best": best, "seconds": times, "size": size, "proxy": proxy, "capped": capped,
        "race_seconds": time.perf_counter() - start,
        "estimated_solve_seconds": times[best] * (size / proxy) ** 3,
    }


def eigh(gram: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ascending eigenpairs of a symmetric float64 matrix (upper triangle read).

    On CPU by the solver that won this size bucket's race on this machine;
    the first matrix of a bucket runs the race on a smaller synthetic proxy
    (``_race_eigh``), then the winner solves the real matrix once.
    """
    size = gram.shape[0]
    names = _available_eigh()
    if gram.device.type != "cpu" or not calibration_enabled() or size < MIN_RACED_EIGH:
        name = names[0] if os.environ.get("MERGEKIT_DRM_EIGH") else "torch"
        name = name if gram.device.type == "cpu" else "torch"
        with stage("eigh"):
            return _eigh(name, gram)
    if len(names) > 1:
        choice = cached(f"eigh:{_bucket(size)}", lambda: _race_eigh(size, names))["best"]
    else:
        choice = names[0]
    with stage("eigh"):
        return _eigh(choice, gram)


def _time_min(fn, reps: int = 3) -> float:
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _race(candidates: Dict[str, Callable[[], object]], rounds: int = 3) -> Dict[str, float]:
    """Best time of each candidate over ``rounds`` interleaved rounds (order
    alternating), so a load burst does not fall on one candidate's timings."""
    names = list(candidates)
    times = {name: math.inf for name in names}
    for index in range(rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            candidates[name]()
            times[name] = min(times[name], time.perf_counter() - start)
    return times


def _with_margin(times: Dict[str, float], default: str) -> str:
    """The fastest candidate if it beats ``default`` by GEMM_SWITCH_MARGIN, else ``default``."""
    best = min(times, key=times.get)
    return best if times[best] * GEMM_SWITCH_MARGIN <= times[default] else default


def _race_gemm() -> dict:
    gen = torch.Generator().manual_seed(0)
    n = 768
    results = {}
    for dtype in (torch.float32, torch.float64):
        a = torch.randn(n, n, generator=gen, dtype=dtype)
        b = torch.randn(n, n, generator=gen, dtype=dtype)
        an, bn = a.numpy(), b.numpy()
        times = _race({
            "torch": lambda: torch.mm(a.T, b),
            "numpy": lambda: np.matmul(an.T, bn),
        })
        results[str(dtype).replace("torch.", "")] = {"best": _with_margin(times, "torch"), "seconds": times}
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    grams = {"torch-gemm": lambda: torch.mm(a, a.T)}
    if _scipy_linalg() is not None:
        from scipy.linalg.blas import dsyrk

        an = a.numpy()
        out = np.zeros((n, n), order="F")
        grams["blas-syrk"] = lambda: dsyrk(1.0, an.T, beta=0.0, c=out, trans=1, lower=0, overwrite_c=1)
    times = _race(grams)
    results["gram"] = {"best": _with_margin(times, "torch-gemm"), "seconds": times}
    return results


def gemm_choice(dtype: torch.dtype) -> str:
    """'torch' or 'numpy': the faster CPU GEMM library for this dtype."""
    forced = os.environ.get("MERGEKIT_DRM_GEMM")
    if forced:
        if forced not in GEMM_LIBRARIES:
            raise ValueError(f"MERGEKIT_DRM_GEMM must be torch or numpy; got {forced!r}")
        return forced
    if not calibration_enabled() or dtype not in (torch.float32, torch.float64):
        return "torch"
    return cached("gemm", _race_gemm)[str(dtype).replace("torch.", "")]["best"]


def gram_choice() -> str:
    """'torch-gemm' or 'blas-syrk' for float64 D D^T on CPU."""
    forced = os.environ.get("MERGEKIT_DRM_GEMM")
    if forced:
        return "torch-gemm" if forced == "torch" else ("blas-syrk" if _scipy_linalg() else "torch-gemm")
    if not calibration_enabled():
        return "torch-gemm"
    return cached("gemm", _race_gemm)["gram"]["best"]


def matmul(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b by the faster library for this dtype on this machine (same dtype, exact GEMM)."""
    if (
        a.device.type != "cpu"
        or a.dtype != b.dtype
        or a.requires_grad
        or b.requires_grad
        or gemm_choice(a.dtype) == "torch"
    ):
        return torch.mm(a, b, out=out)
    if out is None:
        return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))
    if out.is_contiguous():
        np.matmul(a.numpy(), b.numpy(), out=out.numpy())
    else:
        out.copy_(torch.from_numpy(np.matmul(a.numpy(), b.numpy())))
    return out


def add_gram(gram: torch.Tensor, delta: torch.Tensor) -> None:
    """gram += delta @ delta^T in float64 (upper triangle at least; ``gram`` from ``new_gram``)."""
    if gram.device.type == "cpu" and gram_choice() == "blas-syrk" and gram.stride(0) == 1:
        from scipy.linalg.blas import dsyrk

        d = delta.to(torch.float64).numpy()
        c = gram.T.numpy().T  # the Fortran-order view BLAS updates in place
        if d.flags.f_contiguous:
            dsyrk(1.0, d, beta=1.0, c=c, trans=0, lower=0, overwrite_c=1)
        else:
            # d (p, q) C-order is the Fortran array d^T (q, p): trans=1 gives d d^T.
            d = np.ascontiguousarray(d)
            dsyrk(1.0, d.T, beta=1.0, c=c, trans=1, lower=0, overwrite_c=1)
        return
    d = delta.to(torch.float64)
    gram.addmm_(d, d.T)


def new_gram(size: int, device) -> torch.Tensor:
    """A zero float64 matrix in the layout ``add_gram`` updates in place (column-major on CPU)."""
    if torch.device(device).type == "cpu":
        return torch.zeros((size, size), dtype=torch.float64).T
    return torch.zeros((size, size), dtype=torch.float64, device=device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure_route_constants(device: Optional[torch.device] = None) -> dict:
    """Seconds per flop unit of eigh, SVD and GEMM (ratios matter).

    Candidates are timed after a warm-up in 3 interleaved rounds (best of each, ``_race``): a
    multi-threaded eigensolver stalled by another process once read 4x slow
    at n = 384 and tipped 4096-wide stacks to the (then 4x slower) SVD. On a
    GPU everything runs in torch on the device, at sizes where a GPU is busy
    (its float64 rate, 1/2 to 1/64 of float32, is what the routes hinge on).
    """
    device = torch.device(device or "cpu")
    on_gpu = device.type != "cpu"
    gen = torch.Generator().manual_seed(0)
    n = 1024 if on_gpu else 384
    sym = torch.randn(n, n, generator=gen, dtype=torch.float64)
    sym = (sym + sym.T).to(device)
    tall = torch.randn(3 * n // 2, n, generator=gen).to(device)
    tall64 = tall.double()
    a, b = 3 * n // 2, n
    g = 4 * n if on_gpu else 2 * n
    sq = torch.randn(g, g, generator=gen).to(device)
    sq64 = sq.double()

    def timed(fn):
        def run():
            fn()
            _sync(device)
        return run

    candidates = {
        "svd32": timed(lambda: torch.linalg.svd(tall, full_matrices=False)),
        "svd64": timed(lambda: torch.linalg.svd(tall64, full_matrices=False)),
        "gemm32": timed(lambda: matmul(sq, sq)),
        "gemm64": timed(lambda: matmul(sq64, sq64)),
    }
    solvers = ["torch"] if on_gpu else _available_eigh()
    for name in solvers:
        candidates["eigh:" + name] = timed(lambda name=name: _eigh(name, sym.clone()))
    for fn in candidates.values():  # warm-up: cuSOLVER handles, MKL/OpenBLAS threads
        fn()
    times = _race(candidates, rounds=3)
    svd_units = a * b * b + b ** 3
    gemm_units = 2 * g ** 3
    return {
        "eigh64": min(t for k, t in times.items() if k.startswith("eigh:")) / n ** 3,
        "svd32": times["svd32"] / svd_units,
        "svd64": times["svd64"] / svd_units,
        "gemm32": times["gemm32"] / gemm_units,
        "gemm64": times["gemm64"] / gemm_units,
    }


# Fallback when calibration is off: torch 2.13 on 2 cores (an older machine).
DEFAULT_ROUTE_CONSTANTS = {
    "eigh64": 1.08e-10, "svd32": 7.7e-11, "svd64": 1.7e-10, "gemm32": 1e-11, "gemm64": 2.2e-11,
}


def device_name(device: torch.device) -> str:
    """The accelerator's model name (what its rates depend on), e.g. 'NVIDIA H100 80GB HBM3'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def route_constants(device=None) -> dict:
    """Per-flop costs for ``decompose.route_costs`` on this machine, or on the
    given accelerator (measured there, cached per device model)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if not calibration_enabled():
        return DEFAULT_ROUTE_CONSTANTS
    if device.type != "cpu":
        # A GPU's float64 rate (1/2 of float32 on an H100, 1/64 on consumer
        # cards) decides between the float64 Gram and the float32 SVD.
        name = device_name(device)
        return cached(f"route_constants:{device.type}:{name}", lambda: _measure_route_constants(device))
    return cached("route_constants:cpu", _measure_route_constants)
