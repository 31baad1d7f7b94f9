"""DRM beyond the paper: its opt-in options measured on the MiniLM quality benchmark.

    python -m benchmarks.quality.drm_options [--seeds 0,1,2] [--rows a,b,...]

Same fine-tunes, tasks, splits and selection rule as ``run.py`` (4 lambda
values per row, chosen per seed by mean validation accuracy, one more point
beyond a grid edge, test reported), plus the untuned row at lambda 1.

Each merge runs every method's own mergekit ``merge_group`` in this process,
tensor by tensor (the BertModel tensors, vocabulary axis on the word
embeddings as mergekit's BERT definition has it), instead of writing YAMLs
and checkpoints: the same per-tensor computation as ``run_merge`` minus the
disk traffic (checked against the YAML path, see ``--check``). Every method
here applies ``lambda`` as a final factor on the merged delta, so one merge
at lambda 1 serves the whole lambda grid. Results are cached per (seed, row)
under the benchmark cache; ``benchmarks/results/drm_options.md`` is written
from them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from . import data as D
from . import model as M
from .bert_checkpoint import load_encoder_state
from .run import DEFAULT_CACHE, FULL_SIZES, LAMBDAS, RESULTS_DIR, Bench, _mean, normalized

DENSITY = 0.2
DRM_V = {"direction": "vertical", "density": DENSITY}
NORM_LAMBDAS = [0.5, 0.7, 1.0, 1.4]  # rows whose scale is set by norm_target: lambda 1 = the target

# row -> (mergekit method, parameters at lambda 1, lambda grid)
ROWS: Dict[str, tuple] = {
    # references (run.py's grids)
    "drm-V": ("drm", DRM_V, LAMBDAS["drm-V"]),
    "ties": ("ties", {"density": DENSITY}, LAMBDAS["ties"]),
    "dare_ties": ("dare_ties", {"density": DENSITY}, LAMBDAS["dare_ties"]),
    "task_arithmetic": ("task_arithmetic", {}, LAMBDAS["task_arithmetic"]),
    "tsv_m": ("tsv_m", {}, LAMBDAS["tsv_m"]),
    "iso_c": ("iso_c", {}, [0.5, 0.75, 1.0, 1.5]),
    # (a) Iso-C's isotropic spectrum after DRM's merge
    "drm-V isotropic": ("drm", {**DRM_V, "isotropic": True}, LAMBDAS["drm-V"]),
    # (b) TSV-M-style decorrelation of the models' rows per joint direction
    "drm-V whiten": ("drm", {**DRM_V, "whiten": True}, LAMBDAS["drm-V"]),
    # (c) per-model rank budget (1/N of the joint directions each), density kept / off
    "drm-V rank_budget 0.2": ("drm", {**DRM_V, "rank_budget": 0.2}, LAMBDAS["drm-V"]),
    "drm-V rank_budget 0.2 density 1": (
        "drm", {**DRM_V, "density": 1.0, "rank_budget": 0.2}, LAMBDAS["drm-V"]),
    # (d) data-free scale
    "drm-V norm_target mean": ("drm", {**DRM_V, "norm_target": "mean"}, NORM_LAMBDAS),
    "drm-V norm_target sum": ("drm", {**DRM_V, "norm_target": "sum"}, NORM_LAMBDAS),
    # (a)+(d): the flat spectrum wants a sum-like scale (seed 0: drm-V isotropic chose
    # lambda 2.67, beyond its grid), so set it from the task-arithmetic sum's norm
    "drm-V isotropic norm_target sum": (
        "drm", {**DRM_V, "isotropic": True, "norm_target": "sum"}, NORM_LAMBDAS),
}


def method_params(method, params: Dict, ids: Sequence[str]) -> Dict:
    """Every parameter of ``method``'s spec: the given value or the default;
    per-model ones as {id: value}; weight 1 per model, lambda 1."""
    from mergekit.merge_methods.base import ParameterScope

    out = {}
    for spec in method.spec.parameters:
        if spec.name == "lambda":
            value = 1.0
        elif spec.name == "weight":
            value = 1.0
        else:
            value = params.get(spec.name, spec.default)
        out[spec.name] = {i: value for i in ids} if spec.scope == ParameterScope.NON_BASE else value
    unknown = set(params) - {s.name for s in method.spec.parameters}
    if unknown:
        raise ValueError(f"{method.spec.name} has no parameter(s) {sorted(unknown)}")
    return out


class Deltas:
    """One seed's base and fine-tuned encoder states; merges return merged deltas."""

    def __init__(self, bench: Bench, variant: str, seed: int):
        self.fts = bench.finetunes(variant, seed)
        self.base = M.base_state()
        self.models = [load_encoder_state(p) for p in self.fts.values()]
        self.seed = seed

    def merge(self, method_name: str, params: Dict) -> Dict[str, torch.Tensor]:
        import mergekit_drm
        from mergekit.merge_methods import registry
        from mergekit.merge_methods.base import TensorEntry, TensorGroup, TensorMetadata

        mergekit_drm.register()
        method = registry.get(method_name)
        ids = [f"model{i}" for i in range(len(self.models))]
        p = method_params(method, params, ids)
        torch.manual_seed(self.seed)  # dare_ties draws its masks from torch's RNG
        out = {}
        for name, base in self.base.items():
            if name.endswith("position_ids"):
                continue
            tensors = [m[name] for m in self.models]
            if all(torch.equal(t, base) for t in tensors):
                continue  # untouched by every fine-tune (the frozen word embeddings)
            group = TensorGroup(
                [TensorEntry("base", base, is_base=True)]
                + [TensorEntry(i, t) for i, t in zip(ids, tensors)],
                TensorMetadata(name=name, vocabulary_axis=0 if "word_embeddings" in name else None),
            )
            out[name] = method.merge_group(group, **p).to(torch.float32) - base
        return out

    def state(self, delta: Dict[str, torch.Tensor], lam: float) -> Dict[str, torch.Tensor]:
        return {k: (v + lam * delta[k] if k in delta else v) for k, v in self.base.items()}


def select(evaluate_val, grid: List[float]) -> float:
    """run.py's rule: best mean validation accuracy over the grid; at an edge,
    one more point beyond it (geometric step), kept only if better."""
    lams = sorted(grid)
    scores = {l: evaluate_val(l) for l in lams}
    best = max(lams, key=lambda l: scores[l])
    if best in (lams[0], lams[-1]):
        a, b = (lams[0], lams[1]) if best == lams[0] else (lams[-1], lams[-2])
        new = float(f"{a * a / b:.3g}")
        if evaluate_val(new) > scores[best]:
            best = new
    return best


def run_row(bench: Bench, deltas: Deltas, row: str, variant: str = "full") -> Dict:
    path = bench.cache / bench.tag / "drm_options" / f"{variant}-s{deltas.seed}-{row.replace(' ', '_').replace(',', '')}.json"
    if path.exists():
        return json.loads(path.read_text())
    method, params, grid = ROWS[row]
    t0 = time.time()
    delta = deltas.merge(method, params)
    merge_s = time.time() - t0
    val: Dict[float, Dict] = {}
    test: Dict[float, Dict] = {}

    def run(lam, split):
        enc = M.new_encoder(deltas.state(delta, lam))
        return bench.evaluate(enc, deltas.fts, (split,))[split]

    def evaluate_val(lam):
        if lam not in val:
            val[lam] = run(lam, "val")
        return _mean(val[lam])

    best = select(evaluate_val, grid)
    for lam in {best, 1.0}:
        test[lam] = run(lam, "test")
    evaluate_val(1.0)
    res = {"row": row, "method": method, "params": params, "grid": grid, "selected": best,
           "val": {str(k): v for k, v in val.items()}, "test": {str(k): v for k, v in test.items()},
           "merge_seconds": merge_s, "seconds": time.time() - t0,
           "delta_norm": float(torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values())))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    return res


def report(bench: Bench, seeds: Sequence[int], rows: Sequence[str], results: Dict, out: Path) -> str:
    refs = {s: bench.references("full", s)["individual"]["test"] for s in seeds}

    def norm(s, r, lam):
        return 100 * normalized(results[s][r]["test"][str(lam)], refs[s])

    tuned = {r: [norm(s, r, results[s][r]["selected"]) for s in seeds if r in results[s]] for r in rows}
    untuned = {r: [norm(s, r, 1.0) for s in seeds if r in results[s]] for r in rows}

    def ms(xs):
        if not xs:
            return "-"
        return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"

    def paired(r, ref, table):
        if not table[r] or len(table[r]) != len(table[ref]):
            return "-"
        d = [a - b for a, b in zip(table[r], table[ref])]
        pos = sum(x > 0 for x in d)
        spread = f" ± {statistics.stdev(d):.1f}" if len(d) > 1 else ""
        return f"{statistics.mean(d):+.1f}{spread} ({pos}/{len(d)})"

    lines = ["| row | tuned normalized acc | untuned (lambda 1) | lambda per seed | "
             "tuned − drm-V | tuned − ties | tuned − dare_ties | tuned − tsv_m | untuned − drm-V | merge s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not tuned[r]:
            continue
        lam = "; ".join(f"{results[s][r]['selected']:g}" for s in seeds if r in results[s])
        secs = statistics.mean(results[s][r]["merge_seconds"] for s in seeds if r in results[s])
        cells = [r, ms(tuned[r]), ms(untuned[r]), lam]
        for ref in ("drm-V", "ties", "dare_ties", "tsv_m"):
            cells.append(paired(r, ref, tuned) if ref in tuned and tuned[ref] else "-")
        cells.append(paired(r, "drm-V", untuned) if untuned.get("drm-V") else "-")
        cells.append(f"{secs:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    return table


def check_against_yaml(bench: Bench, deltas: Deltas, row: str, lam: float = 1.0) -> Dict:
    """The same merge through ``run.py``'s YAML path (``mergekit.merge.run_merge``):
    validation accuracies side by side."""
    method, params, _ = ROWS[row]
    via_yaml = bench.merge("full", deltas.seed, method, {**params, "lambda": lam})["val"]
    delta = deltas.merge(method, params)
    in_process = bench.evaluate(M.new_encoder(deltas.state(delta, lam)), deltas.fts, ("val",))["val"]
    return {"yaml": via_yaml, "in_process": in_process}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names (see ROWS)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--table", default=None, help="write the markdown table here")
    p.add_argument("--check", action="store_true",
                   help="compare the first row (first seed, lambda 1) with the YAML path, then stop")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("QUALITY_THREADS", "1")))
    bench = Bench(Path(args.cache), D.ALL_TASKS, FULL_SIZES, progress=False)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if args.check:
        print(json.dumps(check_against_yaml(bench, Deltas(bench, "full", seeds[0]), rows[0]), indent=1))
        return
    results: Dict[int, Dict] = {}
    for seed in seeds:
        deltas = Deltas(bench, "full", seed)
        results[seed] = {}
        for row in rows:
            res = run_row(bench, deltas, row)
            results[seed][row] = res
            print(f"seed {seed} {row}: lambda {res['selected']} val "
                  f"{_mean(res['val'][str(res['selected'])]):.3f} ({res['seconds']:.0f}s)", flush=True)
    table = report(bench, seeds, rows, results, RESULTS_DIR)
    print(table)
    if args.table:
        Path(args.table).write_text(table + "\n")


if __name__ == "__main__":
    main()
