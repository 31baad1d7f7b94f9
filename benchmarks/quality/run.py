"""Quality benchmark driver.

Quick mode (3 tasks, full fine-tunes, drm and ties through mergekit, a few minutes):
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

# Quick mode settings: the methods' defaults, untuned: density 0.2 and
# lambda 1 (a disjoint mean of the task vectors for both drm and ties). The full
# benchmark tunes lambda on validation; on these fine-tunes its choice for both
# is at or below 1.
QUICK_CONFIGS = {
    "drm-vertical": ("drm", {"direction": "vertical", "density": 0.2, "lambda": 1.0}),
    "drm-horizontal": ("drm", {"direction": "horizontal", "density": 0.2, "lambda": 1.0}),
    "ties": ("ties", {"density": 0.2, "lambda": 1.0}),
}

def run_quick(out_dir, cache: Optional[Path] = None, tasks: Sequence[str] = tuple(D.QUICK_TASKS),
              seed: int = 0, sizes: Optional[Dict] = None, max_steps: Optional[int] = None,
              progress: bool = True, print_fn=print,
              methods: Sequence[str] = ("drm-vertical", "drm-horizontal", "ties")) -> Dict:
    """Fine-tune (or reuse cached fine-tunes of) ``tasks``, merge them with drm
    and ties through mergekit (YAMLs written to ``out_dir/configs``, merged
    models to ``out_dir/merged``) and print a per-task test accuracy table.
    Returns {row name: {task: accuracy}}."""
    torch.set_num_threads(int(os.environ.get("QUALITY_THREADS", max(1, min(2, os.cpu_count() or 1)))))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bench = Bench(cache or DEFAULT_CACHE, tasks, sizes or QUICK_SIZES, max_steps=max_steps,
                  progress=progress, log=print_fn if progress else (lambda *a: None))
    t0 = time.time()
    fts = bench.finetunes("full", seed)
    refs = {"base encoder + heads": bench.evaluate(M.new_encoder(), fts, ("test",))["test"],
            "individual fine-tunes": {n: bench.evaluate(M.load_encoder(p), {n: p}, ("test",))["test"][n]
                                      for n, p in fts.items()}}
    rows = list(refs.items())
    for label in methods:
        method, params = QUICK_CONFIGS[label]
        cfg = merging.merge_config(method, bench.base, [fts[t] for t in tasks], params)
        ypath = merging.write_yaml(cfg, out_dir / "configs" / f"{label}.yml")
        merged = merging.run_yaml(ypath, out_dir / "merged" / label, random_seed=seed)
        rows.append((f"{label} (merged)", bench.evaluate(M.load_encoder(merged), fts, ("test",))["test"]))
        if progress:
            print_fn(f"  merged {label} with {ypath}")
    table = _table(rows, tasks)
    print_fn("\nTest accuracy (%), all-MiniLM-L6-v2, one head per task, encoder merged:\n")
    print_fn(table)
    print_fn(f"\n{time.time() - t0:.0f}s; YAMLs in {out_dir / 'configs'}")
    (out_dir / "results.md").write_text(table + "\n")
    return dict(rows)


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
    mode.add_argument("--quick", action="store_true", help="3 tasks, drm vs ties, a few minutes")
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
