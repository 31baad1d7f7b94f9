"""Quality benchmark driver.

Quick mode (5 tasks, full fine-tunes, the recommended drm setting, tsv_m, iso_c,
ties and the paper's drm through mergekit, untuned; table, YAMLs, plot):
    python -m benchmarks.quality.run --quick [--out drm-quality-quick]
Full benchmark (5 tasks, 3 seeds, 9 methods, ablations, LoRA; cached, resumable):
    python -m benchmarks.quality.run --full
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from mergekit_drm.demo import MERGES as DEMO_MERGES

from . import data as D
from . import merging
from . import model as M

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / "cache"
RESULTS_DIR = HERE.parent / "results"

FULL_SIZES = dict(train=640, val=100, test=250)
QUICK_SIZES = FULL_SIZES  # same splits and fine-tunes: quick mode reuses the full run's seed-0 cache

# ---------------------------------------------------------------- grids
# Equal budget: four lambda values per method (linear has none), density 0.2
# for every pruning method (TIES' and DRM's default; DRM's density is swept in
# the ablations). The ranges differ because the methods' scales differ:
# ties and drm are disjoint means at lambda 1; della is a mean of deltas
# rescaled by 1/keep-probability (larger); task_arithmetic and dare_ties are
# sums (5 tasks: a mean at 1 is a sum at 0.2); breadcrumbs sums pruned,
# un-rescaled deltas (smaller); TSV-M is a sum of orthogonalized low-rank parts
# (paper default alpha 1); Iso-C/Iso-CTS keep the nuclear norm of the sum but
# spread it evenly (smaller Frobenius norm than the sum; default alpha 1). The ranges were widened once after a first pass
# with three common values (ties' optimum was at the lower edge, breadcrumbs'
# at the upper one). To keep edges from deciding the ranking, ``Bench.best``
# applies one rule to every method: a selection at a grid edge gets one more
# point beyond it. The report marks selections outside the base grid.
DENSITY = 0.2
LAMBDAS = {
    "task_arithmetic": [0.2, 0.3, 0.45, 0.6],
    "ties": [0.7, 1.0, 1.5, 2.0],
    "dare_ties": [0.2, 0.3, 0.45, 0.6],
    "breadcrumbs": [0.3, 0.6, 0.9, 1.2],
    "della": [0.3, 0.5, 0.7, 1.0],
    "tsv_m": [0.3, 0.5, 1.0, 1.5],
    "iso_c": [0.5, 0.75, 1.0, 1.5],
    "iso_cts": [0.5, 0.75, 1.0, 1.5],
    "drm-V": [0.7, 1.0, 1.5, 2.0],
    "drm-H": [0.7, 1.0, 1.5, 2.0],
    "drm-V-iso": [0.5, 0.75, 1.0, 1.5],
}


def main_grid() -> Dict[str, List[Dict]]:
    L = LAMBDAS
    return {
        "linear": [("linear", {})],
        "task_arithmetic": [("task_arithmetic", {"lambda": l}) for l in L["task_arithmetic"]],
        "ties": [("ties", {"density": DENSITY, "lambda": l}) for l in L["ties"]],
        "dare_ties": [("dare_ties", {"density": DENSITY, "lambda": l}) for l in L["dare_ties"]],
        "breadcrumbs": [("breadcrumbs", {"density": DENSITY, "gamma": 0.01, "lambda": l}) for l in L["breadcrumbs"]],
        "della": [("della", {"density": DENSITY, "epsilon": 0.1, "lambda": l}) for l in L["della"]],
        "tsv_m": [("tsv_m", {"lambda": a}) for a in L["tsv_m"]],
        "iso_c": [("iso_c", {"lambda": a}) for a in L["iso_c"]],
        "iso_cts": [("iso_cts", {"lambda": a}) for a in L["iso_cts"]],
        "drm-V": [("drm", {"direction": "vertical", "density": DENSITY, "lambda": l}) for l in L["drm-V"]],
        "drm-H": [("drm", {"direction": "horizontal", "density": DENSITY, "lambda": l}) for l in L["drm-H"]],
        # drm's opt-in options (drm_options.md): isotropic merged spectrum, scaled to the
        # sum of the task vectors' norms
        "drm-V-iso": [("drm", {"direction": "vertical", "density": DENSITY, "isotropic": True,
                               "norm_target": "total", "lambda": l}) for l in L["drm-V-iso"]],
    }


# LoRA stage (time budget): the main competitors only. No iso_cts: for 5
# rank-8 adapters the sum's rank (<= 40) is inside Iso-CTS's common subspace
# (0.8 * 384 directions), the residuals are zero and it equals iso_c.
LORA_METHODS = ("linear", "task_arithmetic", "ties", "tsv_m", "iso_c", "drm-V", "drm-H", "drm-V-iso")


def _slug(method: str, params: Dict) -> str:
    parts = [method] + [f"{k}{v}" for k, v in sorted(params.items())]
    return "_".join(str(p).replace(".", "p") for p in parts)


class Bench:
    def __init__(self, cache: Path, task_names: Sequence[str], sizes: Dict, epochs: int = 1,
                 max_steps: Optional[int] = None, progress: bool = True, log=print):
        self.cache = Path(cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.epochs = epochs
        self.max_steps = max_steps
        self.log = log
        self.tasks = {n: D.build_task(n, **sizes) for n in task_names}
        self.sizes = sizes
        self._enc = {}
        self.base = M.ensure_base_checkpoint(self.cache)
        tag = json.dumps([sizes, epochs, max_steps, M.MAX_LENGTH], sort_keys=True)
        self.tag = hashlib.sha1(tag.encode()).hexdigest()[:8]

    def encoded(self, task: str, split: str) -> M.Encoded:
        key = (task, split)
        if key not in self._enc:
            self._enc[key] = M.Encoded(getattr(self.tasks[task], split))
        return self._enc[key]

    # fine-tunes are cached per (variant, task, seed, sizes/epochs tag)
    def finetunes(self, variant: str, seed: int, tasks: Optional[Sequence[str]] = None) -> Dict[str, Path]:
        out = {}
        for name in tasks or list(self.tasks):
            path = M.finetune_dir(self.cache / self.tag, variant, name, seed)
            if not (path / "info.json").exists():
                t0 = time.time()
                M.cached_finetune(self.cache / self.tag, self.tasks[name], seed, variant,
                                  epochs=self.epochs, max_steps=self.max_steps,
                                  progress=self.progress, train_data=self.encoded(name, "train"))
                self.log(f"  fine-tuned {variant} {name} seed {seed} in {time.time() - t0:.0f}s")
            out[name] = path
        return out

    def evaluate(self, encoder, heads: Dict[str, Path], splits=("val", "test")) -> Dict:
        res = {}
        for split in splits:
            res[split] = {
                name: M.evaluate(encoder, M.load_head(path, self.tasks[name].num_labels),
                                 self.encoded(name, split))
                for name, path in heads.items()
            }
        return res

    def _result_path(self, key: str) -> Path:
        return self.cache / self.tag / "results" / f"{key}.json"

    def cached(self, key: str, fn) -> Dict:
        path = self._result_path(key)
        if path.exists():
            return json.loads(path.read_text())
        t0 = time.time()
        res = fn()
        res["seconds"] = time.time() - t0
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1))
        return res

    def references(self, variant: str, seed: int) -> Dict:
        fts = self.finetunes(variant, seed)

        def individual():
            return {split: {n: self.evaluate(M.load_encoder(p), {n: p}, (split,))[split][n]
                            for n, p in fts.items()} for split in ("val", "test")}

        def base_heads():
            return self.evaluate(M.new_encoder(), fts)

        return {
            "individual": self.cached(f"{variant}-s{seed}-individual", individual),
            "base+heads": self.cached(f"{variant}-s{seed}-base_heads", base_heads),
        }

    def merge(self, variant: str, seed: int, method: str, params: Dict,
              tasks: Optional[Sequence[str]] = None, yaml_dir: Optional[Path] = None,
              keep_dir: Optional[Path] = None) -> Dict:
        tasks = list(tasks or self.tasks)
        fts = self.finetunes(variant, seed, tasks)
        tkey = "all" if len(tasks) == len(self.tasks) else "+".join(tasks)
        key = f"{variant}-s{seed}-{tkey}-{_slug(method, params)}"

        def do():
            ydir = Path(yaml_dir) if yaml_dir else self.cache / self.tag / "yaml"
            cfg = merging.merge_config(method, self.base, [fts[t] for t in tasks], params)
            ypath = merging.write_yaml(cfg, ydir / f"{key}.yml")
            out = Path(keep_dir) / key if keep_dir else self.cache / self.tag / "merged-tmp"
            t0 = time.time()
            merging.run_yaml(ypath, out, random_seed=seed)
            merge_s = time.time() - t0
            res = self.evaluate(M.load_encoder(out), fts)
            if not keep_dir:
                shutil.rmtree(out, ignore_errors=True)
            res.update(method=method, params=params, tasks=tasks, yaml=str(ypath), merge_seconds=merge_s)
            return res

        res = self.cached(key, do)
        self.log(f"  {key}: val {_mean(res['val']):.3f} test {_mean(res['test']):.3f}")
        return res

    def best(self, variant: str, seed: int, grid: List, tasks=None, extend: bool = True) -> Dict:
        """Run every grid point; return the one with the best mean validation
        accuracy. Same rule for every method: if the best lambda is at an edge
        of the grid, one more point is tried beyond it (geometric step) and kept
        if it is better on validation."""
        results = [self.merge(variant, seed, m, p, tasks) for m, p in grid]
        best = max(results, key=lambda r: _mean(r["val"]))
        lams = sorted(p["lambda"] for _, p in grid if "lambda" in p)
        lam = best["params"].get("lambda")
        if extend and len(lams) >= 2 and lam in (lams[0], lams[-1]):
            a, b = (lams[0], lams[1]) if lam == lams[0] else (lams[-1], lams[-2])
            new = float(f"{a * a / b:.3g}")
            extra = self.merge(variant, seed, best["method"], {**best["params"], "lambda": new}, tasks)
            if _mean(extra["val"]) > _mean(best["val"]):
                best = extra
        return best


def _mean(d: Dict[str, float]) -> float:
    return sum(d.values()) / len(d)


def normalized(merged: Dict[str, float], individual: Dict[str, float]) -> float:
    return sum(merged[t] / individual[t] for t in merged) / len(merged)


def _table(rows: List[tuple], tasks: Sequence[str]) -> str:
    head = "| " + " | ".join(["method"] + list(tasks) + ["avg"]) + " |"
    sep = "|" + "---|" * (len(tasks) + 2)
    lines = [head, sep]
    for name, accs in rows:
        cells = [f"{100 * accs[t]:.1f}" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * _mean(accs):.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- quick mode

# Quick mode: every method once, untuned, at the setting the main README
# recommends when there is no validation data ("When to pick what"):
#   drm-recommended  drm + isotropic: true, norm_target: total (defaults otherwise)
#   tsv_m            its defaults (lambda 1)
#   iso_c            lambda 2 (the README: never lambda 1 untuned on full fine-tunes)
#   ties             mergekit's best-known built-in, density 0.2, lambda 1
#   drm-paper        the paper's drm (vertical, density 0.2, lambda 1)
# The same five merges as mergekit-drm-demo, from one definition.
QUICK_CONFIGS = DEMO_MERGES
QUICK_LABELS = {
    "drm-recommended": "drm isotropic+total (recommended)",
    "tsv_m": "tsv_m",
    "iso_c": "iso_c lambda 2",
    "ties": "ties",
    "drm-paper": "drm paper (vertical)",
}
BASE_ROW, OWN_ROW = "base encoder + heads", "individual fine-tunes"


class _Clock:
    """Wall and CPU seconds per phase (CPU time is what a busy machine does not inflate)."""

    def __init__(self):
        self.phases: Dict[str, List[float]] = {}
        self._t = (time.time(), time.process_time())

    def lap(self, phase: str) -> float:
        now = (time.time(), time.process_time())
        wall, cpu = now[0] - self._t[0], now[1] - self._t[1]
        acc = self.phases.setdefault(phase, [0.0, 0.0])
        acc[0] += wall
        acc[1] += cpu
        self._t = now
        return wall


def _normalized_table(rows: List[tuple], tasks: Sequence[str], own: Dict[str, float]) -> str:
    head = "| " + " | ".join(["method"] + list(tasks) + ["avg acc", "**normalized**"]) + " |"
    lines = [head, "|" + "---|" * (len(tasks) + 3)]
    for name, accs in rows:
        cells = [f"{100 * accs[t]:.1f}" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {100 * _mean(accs):.1f} | **{100 * normalized(accs, own):.1f}** |")
    return "\n".join(lines)


def _plot(rows: List[tuple], own: Dict[str, float], path: Path) -> Optional[Path]:
    """Bar chart of normalized accuracy per merge; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    merged = [(n, a) for n, a in rows if n not in (BASE_ROW, OWN_ROW)]
    names = [n for n, _ in merged]
    values = [100 * normalized(a, own) for _, a in merged]
    base = 100 * normalized(dict(rows)[BASE_ROW], own)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    colors = ["tab:green" if "recommended" in n else "tab:gray" for n in names]
    ax.barh(names[::-1], values[::-1], color=colors[::-1])
    for y, v in enumerate(values[::-1]):
        ax.text(v + 0.3, y, f"{v:.1f}", va="center", fontsize=8)
    ax.axvline(100, color="k", lw=0.8, ls="--", label="individual fine-tunes (100)")
    ax.axvline(base, color="tab:red", lw=0.8, ls=":", label=f"base encoder + heads ({base:.1f})")
    ax.set_xlim(min(values + [base]) - 5, 103)
    ax.set_xlabel("normalized test accuracy (%)")
    ax.set_title("merged / own fine-tune, mean over tasks (untuned merges)", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.4, -0.22), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_quick(out_dir, cache: Optional[Path] = None, tasks: Sequence[str] = tuple(D.QUICK_TASKS),
              seed: int = 0, sizes: Optional[Dict] = None, max_steps: Optional[int] = None,
              progress: bool = True, print_fn=print,
              methods: Sequence[str] = tuple(QUICK_CONFIGS)) -> Dict:
    """Fine-tune (or reuse cached fine-tunes of) ``tasks``, merge them through
    mergekit with each of ``methods`` (``QUICK_CONFIGS``; YAMLs written to
    ``out_dir/configs``, merged models to ``out_dir/merged``), print per-task
    test accuracy and normalized accuracy, and write ``out_dir/results.md``
    (table, timings, load average) and ``out_dir/quality-quick.png``.
    Returns {row name: {task: accuracy}}; merge rows are named by label."""
    unknown = [m for m in methods if m not in QUICK_CONFIGS]
    if unknown:
        raise ValueError(f"unknown quick-mode method(s) {unknown}; choose from {list(QUICK_CONFIGS)}")
    # One thread unless QUALITY_THREADS says otherwise: with two OpenMP threads on a
    # busy 2-core machine a fine-tune step took 24 s instead of 1.2 s (2026-12-06)
    threads = int(os.environ.get("QUALITY_THREADS", "1"))
    torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    clock = _Clock()
    t0 = time.time()
    say = print_fn if progress else (lambda *a: None)
    bench = Bench(cache or DEFAULT_CACHE, tasks, sizes or QUICK_SIZES, max_steps=max_steps,
                  progress=progress, log=say)
    clock.lap("data + base model")
    ft_dir = bench.cache / bench.tag / "checkpoints"
    cached = [t for t in tasks if (M.finetune_dir(bench.cache / bench.tag, "full", t, seed) / "info.json").exists()]
    if len(cached) == len(tasks):
        print_fn(f"reusing {len(tasks)} cached fine-tunes from {ft_dir} (delete it to fine-tune again)")
    elif cached:
        print_fn(f"reusing cached fine-tunes of {', '.join(cached)} from {ft_dir}; fine-tuning the others")
    else:
        print_fn(f"fine-tuning {len(tasks)} models (cached in {ft_dir}: a second run reuses them)")
    fts = bench.finetunes("full", seed)
    clock.lap("fine-tunes" + (" (cached)" if len(cached) == len(tasks) else ""))
    refs = {BASE_ROW: bench.evaluate(M.new_encoder(), fts, ("test",))["test"],
            OWN_ROW: {n: bench.evaluate(M.load_encoder(p), {n: p}, ("test",))["test"][n]
                      for n, p in fts.items()}}
    clock.lap("evaluation")
    own = refs[OWN_ROW]
    rows = list(refs.items())
    result = dict(rows)
    merge_s = {}
    for label in methods:
        method, params = QUICK_CONFIGS[label]
        cfg = merging.merge_config(method, bench.base, [fts[t] for t in tasks], params)
        ypath = merging.write_yaml(cfg, out_dir / "configs" / f"{label}.yml")
        merged = merging.run_yaml(ypath, out_dir / "merged" / label, random_seed=seed)
        merge_s[label] = clock.lap("merges (mergekit run_merge, in-process)")
        accs = bench.evaluate(M.load_encoder(merged), fts, ("test",))["test"]
        clock.lap("evaluation")
        rows.append((QUICK_LABELS[label], accs))
        result[label] = accs
        say(f"  merged {label} with {ypath} in {merge_s[label]:.1f}s: "
            f"normalized {100 * normalized(accs, own):.1f}%")
    total = time.time() - t0
    table = _normalized_table(rows, tasks, own)
    png = _plot(rows, own, out_dir / "quality-quick.png")
    clock.lap("table + plot")
    load_end = os.getloadavg()
    n_test = round(sum(len(t.test) for t in bench.tasks.values()) / len(bench.tasks))
    meaning = (
        "Test accuracy (%) per task of all-MiniLM-L6-v2 (one linear head per task, only the encoder "
        "merged; every task keeps its own fine-tune's head). normalized = merged / the task's own "
        "fine-tune, mean over tasks: 100 keeps everything the fine-tunes learned; the base row is "
        "what merging nothing gives. Every merge is untuned (no validation data), at the settings in "
        f"{out_dir / 'configs'}. One fine-tuning seed, about {n_test} test examples per task: "
        "differences under ~2 points are noise."
    )
    timing = [f"| {phase} | {w:.1f} | {c:.1f} |" for phase, (w, c) in clock.phases.items()]
    timing_md = "\n".join(["| phase | wall s | CPU s (this process) |", "|---|---|---|"] + timing)
    print_fn("\n" + meaning + "\n")
    print_fn(table)
    print_fn("\n" + timing_md)
    print_fn(f"\ntotal {total:.0f} s wall, {time.process_time():.0f} s CPU, {threads} torch threads; "
             f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end "
             f"({os.cpu_count()} cores)")
    print_fn(f"YAMLs in {out_dir / 'configs'}, merged models in {out_dir / 'merged'}, "
             f"table and timings in {out_dir / 'results.md'}"
             + (f", plot {png}" if png else " (no plot: matplotlib missing)"))
    (out_dir / "results.md").write_text(
        f"# Quality quick run, {started}\n\n"
        "`python -m benchmarks.quality.run --quick` (benchmarks/quality/README.md).\n\n"
        + meaning + "\n\n" + table + "\n\n"
        + "\n".join(f"* `{QUICK_LABELS[l]}`: `merge_method: {QUICK_CONFIGS[l][0]}`, parameters "
                    f"{QUICK_CONFIGS[l][1] or '(defaults)'}" for l in methods)
        + "\n\n## Time\n\n" + timing_md
        + f"\n\nTotal {total:.0f} s wall, {time.process_time():.0f} s CPU (this process), "
          f"{threads} torch threads, {os.cpu_count()} cores; load average (1 min) "
          f"{load_start[0]:.2f} at start, {load_end[0]:.2f} at end; "
          f"fine-tunes {'reused from the cache' if len(cached) == len(tasks) else 'trained in this run'}.\n"
        + "".join(f"\n* merge {l}: {s:.1f} s" for l, s in merge_s.items()) + "\n"
    )
    return result


# ---------------------------------------------------------------- full run

def run_full(cache: Path = DEFAULT_CACHE, seeds=(0, 1, 2), lora_seeds=(0,), results_dir=RESULTS_DIR,
             progress: bool = False, stages=("main", "ablations", "lora")) -> None:
    from .report import write_report

    # One thread by default: on a shared 2-core machine, two OpenMP threads
    # competing with other jobs made LAPACK calls (eigh, svd) up to 10x slower.
    torch.set_num_threads(int(os.environ.get("QUALITY_THREADS", "1")))
    t_start = time.time()

    def log(msg):
        print(msg, flush=True)

    bench = Bench(cache, D.ALL_TASKS, FULL_SIZES, progress=progress, log=log)
    grid = main_grid()
    state = {"seeds": list(seeds), "lora_seeds": list(lora_seeds), "tasks": D.ALL_TASKS,
             "sizes": FULL_SIZES, "grid": {k: [p for _, p in v] for k, v in grid.items()},
             "stages_done": [], "started": time.strftime("%Y-%m-%d %H:%M:%S"),
             "lora_methods": list(LORA_METHODS)}
    collected = {"full": {}, "lora": {}, "ablations": {}}

    def report():
        state["elapsed_s"] = time.time() - t_start
        write_report(bench, state, collected, results_dir)

    # stage 1: full fine-tunes, main comparison, every seed
    for seed in seeds:
        log(f"[full seed {seed}] references + main grid")
        entry = {"refs": bench.references("full", seed), "methods": {}}
        for name, g in grid.items():
            entry["methods"][name] = bench.best("full", seed, g)
        collected["full"][seed] = entry
        report()
    state["stages_done"].append("main (full fine-tunes)")
    report()

    if "ablations" in stages:
        # drm-V ablations at its selected lambda, each switch re-tuned on the same lambda grid
        for seed in seeds[:1]:
            abl = {}
            best = collected["full"][seed]["methods"]["drm-V"]
            lam = best["params"]["lambda"]
            for label, extra in [("no renorm", {"renorm": False}), ("no sign election", {"sign_election": False}),
                                 ("no disjoint mean", {"disjoint": False})]:
                g = [("drm", {**p, **extra}) for _, p in grid["drm-V"]]
                abl[label] = bench.best("full", seed, g)
            abl["rank_tol 0 (no 1% rank cut)"] = bench.merge(
                "full", seed, "drm", {**best["params"], "rank_tol": 0.0})
            abl["density"] = {d: bench.merge("full", seed, "drm", {"direction": "vertical", "density": d, "lambda": lam})
                              for d in (0.05, 0.2, 0.5, 1.0)}
            # task count: 2 and 3 tasks (fixed subsets), drm-V vs ties, each at its own best lambda
            subsets = [D.ALL_TASKS[:2], D.ALL_TASKS[2:5]]
            counts = {}
            for name in ("drm-V", "ties"):
                for sub in subsets:
                    counts.setdefault(name, {})["+".join(sub)] = bench.best("full", seed, grid[name], tasks=sub)
            abl["task_count"] = counts
            collected["ablations"][seed] = abl
            report()
        state["stages_done"].append("ablations (seed %s)" % ",".join(map(str, seeds[:1])))
        report()

    if "lora" in stages:
        for seed in lora_seeds:
            log(f"[lora seed {seed}] fine-tunes + main grid")
            entry = {"refs": bench.references("lora", seed), "methods": {}}
            for name, g in grid.items():
                if name not in LORA_METHODS:
                    continue
                entry["methods"][name] = bench.best("lora", seed, g)
            collected["lora"][seed] = entry
            report()
        state["stages_done"].append("LoRA (seed %s)" % ",".join(map(str, lora_seeds)))
        report()
    log(f"done in {time.time() - t_start:.0f}s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="5 tasks, 5 untuned merges (recommended drm setting, tsv_m, iso_c, ties, paper drm)")
    mode.add_argument("--full", action="store_true", help="the full benchmark (cached, resumable)")
    p.add_argument("--out", default="drm-quality-quick", help="quick mode: output folder")
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--seeds", default="0,1,2", help="full mode: fine-tuning seeds")
    p.add_argument("--lora-seeds", default="0", help="full mode: LoRA seeds")
    p.add_argument("--results", default=str(RESULTS_DIR))
    args = p.parse_args(argv)
    if args.quick:
        run_quick(args.out, cache=Path(args.cache))
    else:
        run_full(Path(args.cache), seeds=[int(s) for s in args.seeds.split(",")],
                 lora_seeds=[int(s) for s in args.lora_seeds.split(",") if s],
                 results_dir=Path(args.results))


if __name__ == "__main__":
    main()
