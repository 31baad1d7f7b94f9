"""DRM speed and memory: kernel routes per shape, and whole merges vs ties.

Part 1 times the DRM kernel (one matrix, N fine-tunes) by decomposition
route (``full`` SVD vs the default ``auto`` Gram route) on LLM-shaped
matrices, and reports agreement: float64 routes against each other, and the
float32 routes against the float64 result next to each other.

Part 2 breaks one Llama layer's DRM merge (the whole-merge model's shapes)
into stages (Gram, eigh, basis, projection, SVD, merge) with the libraries
chosen on this machine, against the same with calibration off (torch/MKL for
everything, fixed cost constants: the behaviour before per-machine choice).

Part 3 generates a Llama checkpoint and dense fine-tunes and runs
``mergekit-yaml`` (as a user would) for drm (vertical, horizontal), ties and
task_arithmetic, reporting median wall time and peak RSS over repeated runs,
side by side in one run (optionally drm with calibration off too).

Every table is preceded by the machine: CPU model, cores, torch's and numpy's
BLAS/LAPACK, thread counts, and the libraries the calibration chose.

    python -m benchmarks.perf.bench_drm            # full: ~30-60 min on 2 cores
    python -m benchmarks.perf.bench_drm --quick    # CI-sized smoke run

Writes ``benchmarks/results/perf.md`` (``perf-quick.md`` with --quick).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from mergekit_drm import linalg_backends
from mergekit_drm.drm.kernel import drm_merge_matrix

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def finetune_like(n_models: int, rows: int, cols: int, seed: int, dtype=torch.float32):
    """Task vectors with a decaying spectrum plus dense noise, like real deltas."""
    gen = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    out = torch.empty((n_models, rows, cols), dtype=dtype)
    for t in range(n_models):
        left = torch.randn(rows, k, generator=gen)
        right = torch.randn(k, cols, generator=gen)
        spectrum = torch.exp(-torch.arange(k, dtype=torch.float32) / (k / 8))
        delta = (left * spectrum) @ right / (rows * cols) ** 0.5
        delta += 0.02 * torch.randn(rows, cols, generator=gen) / (rows * cols) ** 0.25
        out[t] = delta.to(dtype)
    return out


MERGE_FLAGS: list = []  # extra mergekit-yaml flags (--cuda with --device cuda)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn, reps: int):
    """Median wall time; GPU work is synchronized before and after each call."""
    times = []
    result = None
    for _ in range(reps):
        _sync()
        start = time.perf_counter()
        result = fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def kernel_table(shapes, counts, reps: int, lines):
    lines.append("| shape (out x in) | N | direction | full SVD s | auto s | speedup | f64 auto vs full | f32 full vs f64 | f32 auto vs f64 |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for rows, cols in shapes:
        for n_models in counts:
            deltas = finetune_like(n_models, rows, cols, seed=rows + cols + n_models)
            d64 = deltas.double()
            for direction in ("vertical", "horizontal"):
                kw = dict(direction=direction, density=0.2)
                t_full, r_full = _time(lambda: drm_merge_matrix(deltas, svd="full", **kw), reps)
                t_auto, r_auto = _time(lambda: drm_merge_matrix(deltas, svd="auto", **kw), reps)
                ref = drm_merge_matrix(d64, svd="full", compute_dtype=torch.float64, **kw)
                fast64 = drm_merge_matrix(d64, svd="auto", compute_dtype=torch.float64, **kw)
                row = (
                    f"| {rows}x{cols} | {n_models} | {direction} | {t_full:.2f} | {t_auto:.2f} | "
                    f"{t_full / t_auto:.1f}x | {_rel(fast64, ref):.1e} | {_rel(r_full, ref):.1e} | "
                    f"{_rel(r_auto, ref):.1e} |"
                )
                lines.append(row)
                print(row, flush=True)
                del ref, fast64, r_full, r_auto
            del deltas, d64


_MEMORY_PROBE = """
import resource, sys, torch
import mergekit_drm
from mergekit.merge_methods import TensorGroup
from mergekit_drm.drm.method import drm_merge_method
rows, cols, n, direction, svd = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
torch.manual_seed(0)
base = torch.randn(rows, cols)
tensors = [base] + [base + 0.01 * torch.randn(rows, cols) for _ in range(n)]
group = TensorGroup.from_tensors(tensors, base_index=0, name="model.layers.0.mlp.up_proj.weight")
drm_merge_method([TensorGroup.from_tensors([t[:8, :8] for t in tensors], base_index=0, name="w")])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
import psutil
current = psutil.Process().memory_info().rss // 1024
drm_merge_method([group], parameters={"direction": direction, "svd": svd})
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(max(peak - max(before, current), 0) * 1024)
"""


def memory_table(shapes, counts, lines):
    """Extra peak memory of one tensor's merge, in units of the N+1 inputs."""
    lines.append("| shape | N | direction | route | extra peak MiB | / input tensors (N+1) |")
    lines.append("|---|---|---|---|---|---|")
    for rows, cols in shapes:
        for n_models in counts:
            inputs = (n_models + 1) * rows * cols * 4
            for direction in ("vertical", "horizontal"):
                for svd in ("full", "auto"):
                    proc = subprocess.run(
                        [sys.executable, "-c", _MEMORY_PROBE, str(rows), str(cols),
                         str(n_models), direction, svd],
                        capture_output=True, text=True, check=True,
                    )
                    extra = int(proc.stdout.strip().splitlines()[-1])
                    row = (f"| {rows}x{cols} | {n_models} | {direction} | {svd} | "
                           f"{extra / 2**20:.0f} | {extra / inputs:.1f} |")
                    lines.append(row)
                    print(row, flush=True)


def layer_shapes(hidden: int, intermediate: int, kv: int) -> dict:
    """(out, in) of one Llama layer's projections."""
    return {
        "q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden),
        "o_proj": (hidden, hidden), "gate_proj": (intermediate, hidden),
        "up_proj": (intermediate, hidden), "down_proj": (hidden, intermediate),
    }


STAGES = ("sketch", "certify", "gram", "eigh", "basis", "project", "svd", "merge", "race")

# One Llama-3.1-8B decoder layer, (out, in).
LLAMA8B_LAYER = layer_shapes(4096, 14336, 1024)


def scale_layer_run(direction: str, n_models: int, out_json: str, reuse_same_shape: bool = True,
                    biggest_first: bool = True) -> None:
    """Stage breakdown of DRM on one 8B layer, one matrix at a time, written to
    ``out_json`` after every matrix (a long run leaves partial results).

    ``reuse_same_shape``: a projection with the same shape as one already
    timed (up_proj after gate_proj) reuses its row instead of re-running the
    same decomposition (marked in the table); stage costs depend on the
    shape and route only.
    """
    import json

    from mergekit_drm.decompose import choose_route, rank_floor

    names = list(LLAMA8B_LAYER)
    if biggest_first:
        def stack_side(name):
            rows, cols = LLAMA8B_LAYER[name]
            p, width = (cols, n_models * rows) if direction == "vertical" else (rows, n_models * cols)
            return -min(p, width)
        names.sort(key=stack_side)
    rows_out = {}
    done_shapes = {}
    for name in names:
        rows, cols = LLAMA8B_LAYER[name]
        if reuse_same_shape and (rows, cols) in done_shapes:
            rows_out[name] = dict(rows_out[done_shapes[(rows, cols)]], reused=done_shapes[(rows, cols)])
            continue
        deltas = finetune_like(n_models, rows, cols, seed=rows + cols + n_models)
        p, width = (cols, n_models * rows) if direction == "vertical" else (rows, n_models * cols)
        tol = max(0.01, rank_floor((p, width), torch.float32))
        route, _ = choose_route((p, width), torch.float32, tol, "auto")
        before = dict(linalg_backends.one_off_costs())
        start = time.perf_counter()
        with linalg_backends.record_stages() as stages:
            drm_merge_matrix(deltas, direction=direction, density=0.2)
        total = time.perf_counter() - start
        after = linalg_backends.one_off_costs()
        one_off = {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}
        rows_out[name] = {
            "shape": [rows, cols], "stack": [p, width], "route": route,
            "gram_side": {"left": p, "right": width}.get(route), "stages": dict(stages),
            "total": total, "one_off": one_off,
        }
        done_shapes[(rows, cols)] = name
        del deltas
        with open(out_json, "w") as handle:
            json.dump({"direction": direction, "n_models": n_models, "machine": machine(),
                       "threads": torch.get_num_threads(), "rows": rows_out}, handle, indent=1)
        print(name, rows_out[name], flush=True)


def scale_layer_report(layer_jsons, floor_json) -> list:
    """Markdown lines: per-matrix stages of each direction, then the eigensolver floor."""
    import json

    lines = []
    for path in layer_jsons:
        if not os.path.exists(path):
            continue
        data = json.load(open(path))
        lines += [f"### DRM-{data['direction'][0].upper()}, N = {data['n_models']}, "
                  f"{data['threads']} thread(s)", "", f"Machine: {data['machine']}", "",
                  "| matrix | stack p x N*q | route (Gram side) | " + " | ".join(STAGES)
                  + " | other | total s | one-off measurements s |",
                  "|---|---|---|" + "---|" * (len(STAGES) + 3)]
        sums = {}
        for name, row in data["rows"].items():
            stages = row["stages"]
            other = row["total"] - sum(stages.get(k, 0.0) for k in STAGES)
            for key in STAGES:
                sums[key] = sums.get(key, 0.0) + stages.get(key, 0.0)
            sums["other"] = sums.get("other", 0.0) + other
            sums["total"] = sums.get("total", 0.0) + row["total"]
            note = f" (= {row['reused']})" if row.get("reused") else ""
            lines.append(
                f"| {name}{note} | {row['stack'][0]}x{row['stack'][1]} | {row['route']}"
                f"{' (' + str(row['gram_side']) + ')' if row.get('gram_side') else ''} | "
                + " | ".join(f"{stages.get(k, 0.0):.1f}" for k in STAGES)
                + f" | {other:.1f} | {row['total']:.1f} | "
                + (", ".join(f"{k} {v:.1f}" for k, v in row.get("one_off", {}).items()) or "-") + " |")
        lines.append("| **layer** | | | " + " | ".join(f"{sums.get(k, 0.0):.1f}" for k in STAGES)
                     + f" | {sums.get('other', 0.0):.1f} | {sums.get('total', 0.0):.1f} | |")
        lines.append("")
    if floor_json and os.path.exists(floor_json):
        data = json.load(open(floor_json))
        lines += ["### Eigensolver alone (float64, Gram-like spectrum), every candidate once", "",
                  f"Machine: {data['machine']}", "", "| n | " + " | ".join(linalg_backends.EIGH_SOLVERS)
                  + " | best |", "|---|" + "---|" * (len(linalg_backends.EIGH_SOLVERS) + 1)]
        for size, times in data["seconds"].items():
            lines.append(f"| {size} | " + " | ".join(
                f"{times[k]:.1f}" if k in times else "-" for k in linalg_backends.EIGH_SOLVERS)
                + f" | {min(times.values()):.1f} |")
        lines.append("")
    return lines


def eigh_floor_run(sizes, out_json: str) -> None:
    """Every eigensolver candidate once on a Gram-like float64 matrix of each size."""
    import json

    results = {}
    for size in sizes:
        gram = linalg_backends._proxy_gram(size)
        for name in linalg_backends._available_eigh():
            start = time.perf_counter()
            linalg_backends._eigh(name, gram.clone())
            results.setdefault(str(size), {})[name] = time.perf_counter() - start
            print(size, name, results[str(size)][name], flush=True)
            with open(out_json, "w") as handle:
                json.dump({"machine": machine(), "threads": torch.get_num_threads(),
                           "seconds": results}, handle, indent=1)


def _layer_stages(layer, n_models: int, direction: str) -> dict:
    totals = {"total": 0.0}
    for name, (rows, cols) in layer.items():
        deltas = finetune_like(n_models, rows, cols, seed=rows + cols + n_models)
        start = time.perf_counter()
        with linalg_backends.record_stages() as stages:
            drm_merge_matrix(deltas, direction=direction, density=0.2)
        totals["total"] += time.perf_counter() - start
        for key, value in stages.items():
            totals[key] = totals.get(key, 0.0) + value
    return totals


def breakdown_table(layer, n_models: int, lines):
    """Seconds per layer by stage: calibrated libraries vs calibration off (= before)."""
    lines.append("| direction | libraries | " + " | ".join(STAGES) + " | other | total s |")
    lines.append("|---|---|" + "---|" * (len(STAGES) + 2))
    for direction in ("vertical", "horizontal"):
        start = time.perf_counter()
        _layer_stages(layer, n_models, direction)  # warm-up; runs the one-off races if uncached
        warm = time.perf_counter() - start
        for label, env in (("calibration off (torch/MKL)", "off"), ("calibrated", "on")):
            os.environ["MERGEKIT_DRM_CALIBRATION"] = env
            try:
                stages = _layer_stages(layer, n_models, direction)
            finally:
                os.environ.pop("MERGEKIT_DRM_CALIBRATION", None)
            other = stages["total"] - sum(stages.get(k, 0.0) for k in STAGES)
            row = (f"| {direction} | {label} | "
                   + " | ".join(f"{stages.get(k, 0.0):.2f}" for k in STAGES)
                   + f" | {other:.2f} | {stages['total']:.2f} |")
            lines.append(row)
            print(row, flush=True)
        lines.append(f"| {direction} | first pass (incl. any one-off calibration) | "
                     + " | " * len(STAGES) + f" | {warm:.2f} |")


def build_llama(root: str, hidden: int, intermediate: int, layers: int, vocab: int, n_ft: int):
    import transformers
    from safetensors.torch import load_file, save_file

    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
        vocab_size=vocab, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = os.path.join(root, "base")
    transformers.LlamaForCausalLM(config).save_pretrained(base)
    state = load_file(os.path.join(base, "model.safetensors"))
    paths = [base]
    for index in range(n_ft):
        gen = torch.Generator().manual_seed(index + 1)
        tuned = {}
        for name, tensor in state.items():
            if tensor.dim() == 2 and "embed" not in name and "lm_head" not in name:
                delta = finetune_like(1, *tensor.shape, seed=1000 * index + hash(name) % 997)[0]
            else:
                delta = 0.01 * torch.randn(tensor.shape, generator=gen) * tensor.std()
            tuned[name] = tensor + delta * tensor.std() * 10
        path = os.path.join(root, f"ft{index}")
        shutil.copytree(base, path, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file(tuned, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        paths.append(path)
    return paths


METHODS = {
    "drm (vertical)": ("drm", {"direction": "vertical", "density": 0.2}, {}),
    "drm (horizontal)": ("drm", {"direction": "horizontal", "density": 0.2}, {}),
    "ties": ("ties", {}, {"density": 0.2, "weight": 1.0}),
    "task_arithmetic": ("task_arithmetic", {}, {"weight": 1.0}),
}
# The same drm merges with calibration off (torch/MKL everywhere): the before.
BASELINES = {
    "drm (vertical), calibration off": "drm (vertical)",
    "drm (horizontal), calibration off": "drm (horizontal)",
}


def run_merge_measured(config_path: str, out: str, env=None):
    """Wall time and peak RSS (KiB) of one `mergekit-yaml` process."""
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%M", exe, config_path, out, "--no-copy-tokenizer",
         "--no-write-model-card", *MERGE_FLAGS],
        capture_output=True, text=True, env=env,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    peak_kib = int(proc.stderr.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return wall, peak_kib


def write_merge_config(path: str, method: str, base: str, finetunes, shared: dict,
                       per_model: dict, dtype: str) -> None:
    """The mergekit YAML a user would write: shared parameters once, per-model ones per model."""
    import yaml

    config = {
        "merge_method": method,
        "base_model": base,
        "models": [{"model": p, **({"parameters": per_model} if per_model else {})} for p in finetunes],
        "dtype": dtype,
    }
    if shared:
        config["parameters"] = shared
    with open(path, "w") as handle:
        yaml.safe_dump(config, handle)


def merge_table(paths, runs: int, lines, workdir: str, baseline_runs: int = 0):
    base, *fts = paths
    results = {}
    for label, (method, shared, per_model) in METHODS.items():
        path = os.path.join(workdir, f"{method}-{shared.get('direction', 'x')}.yml")
        write_merge_config(path, method, base, fts, shared, per_model, "float32")
        results[label] = (path, [])
    off = dict(os.environ, MERGEKIT_DRM_CALIBRATION="off")
    for label, of in BASELINES.items():
        if baseline_runs:
            results[label] = (results[of][0], [])
    # Interleave methods so machine load affects all of them alike.
    for run in range(runs):
        for label, (path, samples) in results.items():
            if label in BASELINES and run >= baseline_runs:
                continue
            env = off if label in BASELINES else None
            samples.append(run_merge_measured(path, os.path.join(workdir, "out"), env))
            print(f"run {run + 1}/{runs} {label}: {samples[-1][0]:.1f} s, "
                  f"{samples[-1][1] / 1024:.0f} MiB", flush=True)
    ties_wall = statistics.median(w for w, _ in results["ties"][1])
    ties_rss = statistics.median(m for _, m in results["ties"][1])
    lines.append("| method | median wall s | runs (s) | / ties | median peak RSS MiB | / ties |")
    lines.append("|---|---|---|---|---|---|")
    for label, (_, samples) in results.items():
        wall = statistics.median(w for w, _ in samples)
        rss = statistics.median(m for _, m in samples)
        runs_txt = ", ".join(f"{w:.1f}" for w, _ in samples)
        lines.append(
            f"| {label} | {wall:.1f} | {runs_txt} | {wall / ties_wall:.2f} | "
            f"{rss / 1024:.0f} | {rss / ties_rss:.2f} |"
        )


def torch_lapack() -> str:
    """torch's BLAS/LAPACK from ``torch.__config__.show()`` (e.g. MKL 2024.2)."""
    import re

    config = torch.__config__.show()
    info = dict(re.findall(r"\b(BLAS_INFO|LAPACK_INFO)=([^,\s]+)", config))
    mkl = [line.strip(" -") for line in config.splitlines() if "Math Kernel Library" in line]
    version = mkl[0].split("Version")[-1].split("-")[0].strip() if mkl else ""
    capability = [line.split(":")[-1].strip() for line in config.splitlines() if "CPU capability" in line]
    return (f"BLAS {info.get('BLAS_INFO', '?')} / LAPACK {info.get('LAPACK_INFO', '?')} {version}"
            f"{', kernels ' + capability[0] if capability else ''}")


def thread_pools() -> str:
    try:
        import threadpoolctl

        import scipy.linalg  # noqa: F401  (load scipy's BLAS so it is listed)

        pools = [f"{p['internal_api']} {p.get('version') or ''} {p.get('architecture') or ''}"
                 f" {p['num_threads']} threads".replace("  ", " ")
                 for p in threadpoolctl.threadpool_info()]
        return "; ".join(pools)
    except ImportError:
        return "threadpoolctl not installed"


def calibration_summary() -> str:
    path = linalg_backends.cache_path()
    if not linalg_backends.calibration_enabled():
        return "calibration off"
    results = linalg_backends._read(path)
    eigh = {key: value["best"] for key, value in results.items() if key.startswith("eigh:")}
    eigh_txt = ", ".join(f"n~{round(2 ** float(k.split(':')[1]))}: {v}" for k, v in sorted(eigh.items()))
    gemm = results.get("gemm", {})
    gemm_txt = ", ".join(f"{k} {v['best']}" for k, v in gemm.items())
    return f"eigh {eigh_txt or '(not yet raced)'}; GEMM {gemm_txt or '(not yet raced)'} ({path})"


def machine() -> str:
    import mergekit

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{linalg_backends.cpu_model()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, load average {load}; "
        f"Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, {torch_lapack()}), numpy {np_version()} "
        f"({linalg_backends.numpy_blas()}); thread pools: {thread_pools()}; "
        f"mergekit {getattr(mergekit, '__version__', '0.1.5')}; "
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}; "
        f"chosen libraries: {calibration_summary()}"
    )


def np_version() -> str:
    import numpy

    return numpy.__version__


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, one run: a smoke test")
    parser.add_argument("--skip-kernel", action="store_true")
    parser.add_argument("--skip-merge", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-breakdown", action="store_true")
    parser.add_argument("--vocab", type=int, default=4096,
                        help="whole-merge vocabulary (4096: the issue-15 comparison; 32000: Llama's)")
    parser.add_argument("--baseline-runs", type=int, default=None,
                        help="whole-merge runs of drm with calibration off (default 1; quick 0)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--reps", type=int, default=None, help="kernel timing repetitions")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 = reproducible on a loaded machine)")
    parser.add_argument("--device", default="cpu", help="device for the kernel table (cuda if available)")
    parser.add_argument("--full-width", action="store_true",
                        help="the real shapes 4096x4096, 14336x4096, 4096x14336 (GPU or a patient CPU)")
    parser.add_argument("--scale-layer", action="store_true",
                        help="only the Llama-3.1-8B layer stage breakdown (V and H, N=3) and the "
                             "eigensolver floor at 4096 and 12288: hours on 2 cores")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.scale_layer:
        work = os.environ.get("BENCH_TMP") or tempfile.gettempdir()
        jsons = [os.path.join(work, f"scale_layer_{d}.json") for d in ("vertical", "horizontal")]
        for direction, path in zip(("vertical", "horizontal"), jsons):
            scale_layer_run(direction, 3, path)
        floor = os.path.join(work, "scale_layer_floor.json")
        eigh_floor_run([4096, 12288], floor)
        text = "\n".join(["# One Llama-3.1-8B layer, DRM by stage", ""]
                         + scale_layer_report(jsons, floor)) + "\n"
        out = args.out or os.path.join(ROOT, "benchmarks", "results", "scale_layer.md")
        with open(out, "w") as handle:
            handle.write(text)
        print(text)
        return 0
    MERGE_FLAGS[:] = ["--cuda"] if args.device.startswith("cuda") else []
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for mergekit-yaml children
    if args.device != "cpu":
        torch.set_default_device(args.device)
    started = time.time()
    lines = ["# DRM performance", ""]
    if args.quick:
        shapes, counts, reps, runs = [(256, 256), (896, 256), (256, 896)], [2, 3], 1, 1
        model = dict(hidden=256, intermediate=704, layers=2, vocab=1000, n_ft=3)
    else:
        # The real shapes (4096x4096, 14336x4096, 4096x14336) at 1/4 width,
        # same aspect ratios: the full N=5 stacks do not fit this machine's
        # time budget (a 71680x4096 SVD alone takes many minutes on 2 cores).
        shapes, counts, reps, runs = [(1024, 1024), (3584, 1024), (1024, 3584)], [2, 3, 5], 3, args.runs
        model = dict(hidden=1024, intermediate=2816, layers=8, vocab=args.vocab, n_ft=3)
    if args.full_width and not args.quick:
        shapes = [(4096, 4096), (14336, 4096), (4096, 14336)]
    if args.reps:
        reps = args.reps
    if not args.skip_kernel:
        lines += ["## Kernel, one matrix, density 0.2, rank_tol 0.01 (median of "
                  f"{reps}; relative Frobenius differences of the merged delta)", "",
                  f"Machine: {machine()}", ""]
        kernel_table(shapes, counts, reps, lines)
        lines.append("")
    if not args.skip_memory:
        lines += ["## Memory of one tensor's merge (float32 inputs; extra peak RSS of the "
                  "merge call beyond the inputs already in memory, via the mergekit method)", "",
                  f"Machine: {machine()}", ""]
        memory_table(shapes[1:], counts[-1:], lines)
        lines.append("")
    if not args.skip_breakdown:
        layer = layer_shapes(model["hidden"], model["intermediate"], model["hidden"] // 2)
        heading = ("## One layer's DRM merge by stage (s): the whole-merge model's 7 projections, "
                   f"{model['n_ft']} fine-tunes, float32, density 0.2")
        lines += [heading, ""]
        table = []
        breakdown_table(layer, model["n_ft"], table)
        lines += [f"Machine: {machine()}", ""] + table + [""]
    if not args.skip_merge:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
            print("building the benchmark model ...", flush=True)
            paths = build_llama(tmp, **model)
            baseline_runs = args.baseline_runs if args.baseline_runs is not None else (0 if args.quick else 1)
            lines += [
                f"## Whole merge with mergekit-yaml: Llama, hidden {model['hidden']}, "
                f"intermediate {model['intermediate']}, {model['layers']} layers, vocab "
                f"{model['vocab']}, {model['n_ft']} dense fine-tunes, float32 "
                f"({runs} runs each, interleaved; peak RSS from /usr/bin/time)",
                "",
            ]
            table = []
            merge_table(paths, runs, table, tmp, baseline_runs)
            lines += [f"Machine (at the end of the runs): {machine()}", ""] + table + [""]
    lines.append(f"Total benchmark time: {time.time() - started:.0f} s.")
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or os.path.join(
        ROOT, "benchmarks", "results", "perf-quick.md" if args.quick else "perf.md"
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as handle:
        handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
