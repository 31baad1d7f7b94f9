"""Time and peak memory: DRM on LoRA factors vs folding the adapters first.

Setup: 5 adapters of rank 16 (lora_alpha 32), each on the same square
``width x width`` modules (q/k/v/o-like; Llama-3.1-8B's q_proj and o_proj are
4096 x 4096), random Gaussian factors, float32, ``direction: vertical``,
density 0.2 (the method's defaults).

* ``low-rank``: ``mergekit_drm.lora.lowrank.drm_merge_lowrank`` per module
  (what ``mergekit-drm-lora`` runs).
* ``dense (svd=auto)``: fold every adapter (scale * B @ A, n x m each) and run
  ``drm_merge_matrix`` with its default decomposition route (``svd: auto``:
  a Gram/eigh or full-SVD route chosen by a cost model in
  ``decompose.py``), which is what the full-model ``drm`` merge runs.
* ``dense (svd=full)``: the same with the full SVD of the N*n x m stack (the
  reference implementation's route).

Each measurement runs in a fresh worker process: one warm-up, then ``--runs``
timed runs (median reported). Peak memory is the process's peak resident set
size (Linux ``VmHWM``, reset before every run through
``/proc/self/clear_refs``) minus the resident size just before the run, so it
counts everything the run allocates (torch CPU tensors, LAPACK workspace),
which ``tracemalloc`` cannot see. Inputs (the factors) exist before the run
and are not counted.

Usage: ``python -m benchmarks.perf.bench_lora`` (writes benchmarks/results/lora.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULT = os.path.join(ROOT, "benchmarks", "results", "lora.md")
N_ADAPTERS, RANK, ALPHA = 5, 16, 32
DENSITY, DIRECTION = 0.2, "vertical"


# ---------------------------------------------------------------------------
# Worker (fresh process per measurement)
# ---------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim() -> None:
    """Hand freed heap memory back to the OS so RSS baselines are honest."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _factors(width: int, modules: int):
    import torch

    from mergekit_drm.lora.lowrank import LoraFactors

    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(modules):
        out.append(
            [
                LoraFactors(
                    B=torch.randn(width, RANK, generator=gen) * 0.01,
                    A=torch.randn(RANK, width, generator=gen) / width**0.5,
                    scale=ALPHA / RANK,
                )
                for _ in range(N_ADAPTERS)
            ]
        )
    return out


def worker(spec: dict) -> dict:
    import torch

    from mergekit_drm.drm.kernel import drm_merge_matrix
    from mergekit_drm.lora.lowrank import drm_merge_lowrank

    torch.set_num_threads(spec["threads"])
    width, modules, path = spec["width"], spec["modules"], spec["path"]
    all_factors = _factors(width, modules)

    def run_once():
        results = []
        for factors in all_factors:
            if path == "lowrank":
                results.append(
                    drm_merge_lowrank(
                        factors, shape=(width, width), direction=DIRECTION,
                        density=DENSITY, compute_dtype=torch.float32,
                    )
                )
            else:
                deltas = [f.scale * (f.B @ f.A) for f in factors]
                merged = drm_merge_matrix(
                    deltas, direction=DIRECTION, density=DENSITY,
                    compute_dtype=torch.float32, svd=path.split("-")[1],
                )
                del deltas
                results.append(merged)
        return results

    times, peaks = [], []
    can_reset = True
    for index in range(spec["runs"] + spec["warmup"]):
        _trim()
        can_reset = _reset_peak() and can_reset
        before = _status_kb("VmRSS")
        start = time.perf_counter()
        results = run_once()
        elapsed = time.perf_counter() - start
        peak = _status_kb("VmHWM") - before
        if index >= spec["warmup"]:
            times.append(elapsed)
            peaks.append(peak * 1024)
        if index < spec["runs"] + spec["warmup"] - 1:
            del results
    error = None
    if path != "lowrank":
        # Same answer as the low-rank path? (relative Frobenius error, module 0)
        low_b, low_a = drm_merge_lowrank(
            all_factors[0], shape=(width, width), direction=DIRECTION,
            density=DENSITY, compute_dtype=torch.float64,
        )
        ref = results[0].double()
        error = float((low_b @ low_a - ref).norm() / ref.norm())
    return {"times": times, "peaks": peaks, "peak_reset": can_reset, "error_vs_lowrank": error}


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def measure(path, width, modules, runs, threads, warmup=1):
    spec = dict(path=path, width=width, modules=modules, runs=runs, threads=threads, warmup=warmup)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    # Large blocks through mmap, returned to the OS when freed: the resident
    # size before a run then no longer includes the previous run's buffers.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
        capture_output=True, text=True, env=env, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out.update(spec)
    print(
        f"  {path:12s} width {width:5d} x{modules} modules: median "
        f"{statistics.median(out['times']):.3f} s, peak +{statistics.median(out['peaks']) / 2**20:.1f} MiB "
        f"(runs {', '.join(f'{t:.2f}' for t in out['times'])})",
        flush=True,
    )
    return out


def _machine(threads):
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg()
    return (
        f"{cpu}; {os.cpu_count()} logical cores (torch threads: {threads}); "
        f"{psutil.virtual_memory().total / 2**30:.1f} GiB RAM; torch {torch.__version__}; "
        f"Python {platform.python_version()}; {platform.system()} {platform.release()}; "
        f"load average at start {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}"
    )


def _auto_route(width):
    """The route ``svd: auto`` picks for this benchmark's stacks (if knowable)."""
    try:
        import torch

        from mergekit_drm.decompose import choose_route, rank_floor

        # vertical: DRM-H of the transposes, p = width (input axis), N*q = N*width
        shape = (width, N_ADAPTERS * width)
        tol = max(0.01, rank_floor(shape, torch.float32))
        route, dtype = choose_route(shape, torch.float32, tol, "auto")
        return route if dtype is None else f"{route} Gram, {str(dtype).replace('torch.', '')}"
    except Exception:
        return "route unknown"


def _row(label, result):
    t = statistics.median(result["times"])
    peak = statistics.median(result["peaks"]) / 2**20
    per = t / result["modules"]
    err = result["error_vs_lowrank"]
    return (
        f"| {label} | {result['width']} | {result['modules']} | {len(result['times'])} | "
        f"{t:.3f} | {per:.3f} | {peak:.1f} | "
        f"{'-' if err is None else f'{err:.1e}'} |"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--modules", type=int, default=4, help="modules for the low-rank path")
    parser.add_argument("--dense-modules", type=int, default=1, help="modules for the dense paths at --width")
    parser.add_argument("--runs", type=int, default=5, help="timed runs (low-rank)")
    parser.add_argument("--dense-runs", type=int, default=3, help="timed runs (dense svd=auto)")
    parser.add_argument("--full-runs", type=int, default=1, help="timed runs (dense svd=full at --width; very slow on CPU)")
    parser.add_argument("--small-width", type=int, default=1024, help="second, smaller size where every path runs --dense-runs times (0: skip)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: on a shared 2-core machine two threads "
        "oversubscribe and BLAS/LAPACK calls stall by 10-100x)",
    )
    parser.add_argument("--output", default=RESULT)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    machine = _machine(args.threads)
    print(machine)
    rows, results = [], {}
    sizes = [(args.width, args.modules, args.dense_modules, args.full_runs, 0)]
    if args.small_width:
        sizes.append((args.small_width, args.modules, args.modules, args.dense_runs, 1))
    for width, modules, dense_modules, full_runs, full_warmup in sizes:
        print(f"width {width}:")
        low = measure("lowrank", width, modules, args.runs, args.threads)
        gram = measure("dense-auto", width, dense_modules, args.dense_runs, args.threads)
        full = measure("dense-full", width, dense_modules, full_runs, args.threads, warmup=full_warmup)
        results[width] = (low, gram, full)
        rows += [
            _row("low-rank (factors)", low),
            _row(f"dense, svd=auto ({_auto_route(width)}; the `drm` method's default)", gram),
            _row("dense, svd=full (reference route)", full),
        ]

    lines = [
        "# DRM on LoRA adapters: low-rank path vs densifying",
        "",
        "Generated by `python -m benchmarks.perf.bench_lora`.",
        "",
        f"- Machine: {machine}.",
        f"- Inputs: {N_ADAPTERS} LoRA adapters, rank {RANK}, lora_alpha {ALPHA}, on square "
        "`width x width` modules (q/k/v/o-like; Llama-3.1-8B q_proj/o_proj are 4096 x 4096), "
        f"random Gaussian factors, float32; `direction: {DIRECTION}`, density {DENSITY}, "
        "rank_tol 0.01, compute_dtype float32.",
        "- low-rank: `drm_merge_lowrank` per module (what `mergekit-drm-lora` runs). dense: fold each "
        "adapter (`scale * B @ A`) and run `drm_merge_matrix` (what the full-model `drm` merge runs "
        "per matrix, with its default `svd: auto` route, and with `svd: full`, the reference's full SVD).",
        "- Time: wall clock of the merge only (no file I/O), median of the timed runs after one "
        "warm-up (no warm-up for the single dense svd=full run at the large width), each "
        "measurement in a fresh process.",
        "- Peak memory: peak resident set size during a run (`VmHWM`, reset per run through "
        "`/proc/self/clear_refs`) minus the resident size before it; counts torch CPU tensors and "
        "LAPACK workspace (tracemalloc cannot see those). Median over runs.",
        "- err: relative Frobenius difference between the dense result and the low-rank result "
        "(float64 low-rank reference) on module 0.",
        "",
        "| path | width | modules | runs | median time (s) | per module (s) | peak memory (MiB) | err vs low-rank |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    for width, (low, gram, full) in results.items():
        lt = statistics.median(low["times"]) / low["modules"]
        lm = statistics.median(low["peaks"])
        for label, dense in (("svd=auto", gram), ("svd=full", full)):
            dt = statistics.median(dense["times"]) / dense["modules"]
            dm = statistics.median(dense["peaks"])
            lines.append(
                f"- width {width}, dense {label} vs low-rank: {dt / lt:,.0f}x the time per "
                f"module, {dm / max(lm, 1):,.0f}x the peak memory (dense: peak of "
                f"{dense['modules']} module(s); low-rank: peak over all {low['modules']})."
            )
    if args.dense_modules < args.modules:
        lines.append(
            f"- At width {args.width} the dense paths ran on {args.dense_modules} module(s) only "
            f"(svd=full {args.full_runs} run(s)): a full SVD of the {N_ADAPTERS * args.width} x "
            f"{args.width} stack takes minutes on this machine. Per-module figures compare like with like."
        )
    if not all(r["peak_reset"] for trio in results.values() for r in trio):
        lines.append("- WARNING: /proc/self/clear_refs was not writable; peaks are process-lifetime peaks.")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as handle:
        handle.write(text)
    print()
    print(text)


if __name__ == "__main__":
    main()
