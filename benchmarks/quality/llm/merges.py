"""Merge stages of the LLM benchmark: every merge is a mergekit YAML run
in-process through ``mergekit.merge.run_merge`` (``benchmarks/quality/merging.py``),
exactly as ``mergekit-yaml`` would run it.

LoRA fine-tunes enter the YAML as ``BASE+ADAPTER`` references, which mergekit
folds into the base once (``--lora-merge-cache``); ``drm`` is also run through
``mergekit-drm-lora`` on the adapters' factors, and the two routes are
compared weight by weight.

Two tables per fine-tune setting (kind, seed):
* defaults: every method once, at the values its documentation recommends;
* tuned: the same number of grid points for every method (4; ``linear`` has
  no hyperparameter), chosen on validation, test reported.

Every merge's YAML is written under ``cache/configs`` and its scores are cached
by a hash of (fine-tunes, method, parameters, route), so a rerun resumes.
Merged checkpoints are deleted once scored (540 MB each).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .. import merging
from . import model as M
from .bench import Bench, settings_hash


@dataclasses.dataclass(frozen=True)
class Method:
    label: str  # name in the tables, e.g. "drm-V"
    merge_method: str  # mergekit's merge_method
    defaults: Dict  # documented/recommended values (the defaults table)
    grid: Tuple[Dict, ...]  # tuned table's grid: 4 points (linear: 1)
    source: str  # where the defaults come from


def _grid(lambdas, densities=None, **fixed) -> Tuple[Dict, ...]:
    if densities is None:
        return tuple({**fixed, "lambda": l} for l in lambdas)
    return tuple({**fixed, "density": d, "lambda": l} for d in densities for l in lambdas)


def methods(n_models: int) -> Dict[str, Method]:
    """Every method of the benchmark for a merge of ``n_models`` fine-tunes.

    Grid ranges follow each method's scale: ties, della and drm are (disjoint)
    means at lambda 1; task_arithmetic, dare_ties and breadcrumbs are sums of
    task vectors (a mean is lambda = 1/N); tsv_m and iso_c/iso_cts are sums
    of orthogonalized/flattened parts (papers' alpha around 1).
    """
    inv = round(1.0 / n_models, 4)
    table = [
        Method("linear", "linear", {}, ({},), "mergekit: weight 1, normalize: true (a plain mean)"),
        Method("task_arithmetic", "task_arithmetic", {"lambda": 0.4},
               _grid([0.2, 0.3, 0.5, 0.7]),
               "lambda 0.4: mid-range of the 0.3-0.5 the task-arithmetic literature selects"),
        Method("ties", "ties", {"density": 0.2, "lambda": 1.0},
               _grid([1.0, 1.5], [0.2, 0.5]),
               "TIES paper: top-20% (density 0.2), lambda 1 without validation data"),
        Method("dare_ties", "dare_ties", {"density": 0.5, "lambda": inv},
               _grid([0.3, 0.5], [0.2, 0.5]),
               "mergekit's DARE-TIES example configs: density ~0.5, weights summing to 1 (lambda 1/N)"),
        Method("breadcrumbs", "breadcrumbs", {"density": 0.9, "gamma": 0.01, "lambda": inv},
               _grid([0.3, 0.5], [0.5, 0.9], gamma=0.01),
               "mergekit's breadcrumbs defaults/examples: density 0.9, gamma 0.01, weights summing to 1"),
        Method("della", "della", {"density": 0.5, "epsilon": 0.1, "lambda": 1.0},
               _grid([1.0, 1.5], [0.2, 0.5], epsilon=0.1),
               "DELLA: density 0.5, epsilon 0.1, lambda 1"),
        Method("tsv_m", "tsv_m", {"lambda": 1.0}, _grid([0.5, 1.0, 1.5, 2.0]),
               "TSV-M paper: alpha 1, rank 1/T per task (this package's defaults)"),
        Method("iso_c", "iso_c", {"lambda": 1.0}, _grid([0.5, 1.0, 1.5, 2.0]),
               "this package's default lambda 1 (the Iso-C paper tunes alpha)"),
        Method("iso_cts", "iso_cts", {"lambda": 1.0, "common_space_fraction": 0.8},
               _grid([0.5, 1.0, 1.5, 2.0], common_space_fraction=0.8),
               "Iso-CTS paper: common space 0.8 of the rank; lambda 1"),
        Method("drm-V", "drm", {"direction": "vertical", "density": 0.2, "lambda": 1.0},
               _grid([1.0, 1.5], [0.2, 0.5], direction="vertical"),
               "README defaults (paper: drop rate 0.8)"),
        Method("drm-H", "drm", {"direction": "horizontal", "density": 0.2, "lambda": 1.0},
               _grid([1.0, 1.5], [0.2, 0.5], direction="horizontal"),
               "README defaults, horizontal"),
        # drm's opt-in options (benchmarks/results/drm_options.md): the merged spectrum made
        # isotropic and scaled to the sum of the task vectors' norms; on MiniLM (3 seeds)
        # validation chose lambda 1 every time, so lambda 1 is the untuned setting
        Method("drm-V-iso", "drm",
               {"direction": "vertical", "density": 0.2, "isotropic": True, "norm_target": "total",
                "lambda": 1.0},
               _grid([0.5, 0.75, 1.0, 1.5], direction="vertical", density=0.2, isotropic=True,
                     norm_target="total"),
               "drm options: isotropic + norm_target total, lambda 1"),
    ]
    return {m.label: m for m in table}


METHOD_ORDER = list(methods(6))
QUICK_METHODS = ("ties", "drm-V")


def _slug(label: str, params: Dict) -> str:
    parts = [label] + [f"{k}{v}" for k, v in sorted(params.items()) if k != "direction"]
    return "_".join(str(p).replace(".", "p") for p in parts)


def mean_normalized(scores: Dict[str, float], reference: Dict[str, float]) -> float:
    """Merged accuracy / the task's own fine-tune accuracy, mean over tasks."""
    return sum(scores[t] / max(reference[t], 1e-9) for t in scores) / len(scores)


class MergeStage:
    """Merges of one fine-tune setting (``kind`` lora/full, ``seed``)."""

    def __init__(self, bench: Bench, kind: str, seed: int):
        self.bench, self.kind, self.seed = bench, kind, seed
        self.cache = bench.cache
        self.log = bench.log
        self.tasks = bench.task_names
        self.methods = methods(len(self.tasks))
        self.base = bench.base.resolve()
        self.finetunes = [bench.finetune(kind, t, seed).resolve() for t in self.tasks]
        self.fingerprint = settings_hash({"kind": kind, "seed": seed,
                                          "finetunes": [p.name for p in self.finetunes]})
        # one fold cache per fine-tune setting: runs of different seeds may go
        # on in parallel, and _clean_lora_cache must not touch another's folds
        self.lora_cache = self.cache / "lora_merged" / f"{kind}-s{seed}"

    # ------------------------------------------------------------ references
    def own_scores(self) -> Dict[str, Dict[str, float]]:
        """{split: {task: accuracy of that task's own fine-tune}}."""
        out: Dict[str, Dict[str, float]] = {"val": {}, "test": {}}
        for t in self.tasks:
            s = self.bench.finetune_scores(self.kind, t, self.seed)
            for split in out:
                out[split][t] = s[split][t]
        return out

    def models(self) -> List[str]:
        if self.kind == "lora":
            return [f"{self.base}+{p}" for p in self.finetunes]
        return [str(p) for p in self.finetunes]

    # ------------------------------------------------------------ one merge
    def key(self, label: str, params: Dict, route: str = "mergekit") -> str:
        return settings_hash({"stage": self.fingerprint, "method": self.methods[label].merge_method,
                              "params": params, "route": route})

    def name(self, label: str, params: Dict, route: str = "mergekit") -> str:
        return f"{self.kind}-s{self.seed}-{_slug(label, params)}-{route}-{self.key(label, params, route)}"

    def write_config(self, label: str, params: Dict, route: str = "mergekit") -> Path:
        cfg = merging.merge_config(self.methods[label].merge_method, self.base, self.models(), params)
        return merging.write_yaml(cfg, self.cache / "configs" / f"{self.name(label, params, route)}.yml")

    def _clean_lora_cache(self) -> None:
        """mergekit creates a LoRA-cache folder before saving into it: an
        interrupted fold leaves an empty folder that it would later trust."""
        if self.lora_cache.exists():
            for d in self.lora_cache.iterdir():
                if d.is_dir() and not (d / "config.json").exists():
                    shutil.rmtree(d)

    def merged(self, label: str, params: Dict) -> Path:
        """The merged checkpoint (kept until ``drop``), merged if missing."""
        name = self.name(label, params)
        out = self.cache / "merged" / name
        if (out / "config.json").exists():
            return out
        config = self.write_config(label, params)
        lora_cache = None
        if self.kind == "lora":
            self._clean_lora_cache()
            lora_cache = self.lora_cache
        from mergekit_drm import linalg_backends

        t0, c0 = time.time(), time.process_time()
        races0 = sum(linalg_backends.one_off_costs().values())
        tmp = out.with_name(name + ".tmp")
        merging.run_yaml(config, tmp, lora_merge_cache=lora_cache)
        seconds, cpu = time.time() - t0, time.process_time() - c0
        # one-off: the library races of mergekit_drm/linalg_backends.py, run once per
        # machine and matrix size, then cached in ~/.cache/mergekit-drm
        races = sum(linalg_backends.one_off_costs().values()) - races0
        tmp.rename(out)
        self._record_time(name, {"merge_s": round(seconds, 1), "merge_cpu_s": round(cpu, 1),
                                 "calibration_s": round(races, 1), "load_avg": round(os.getloadavg()[0], 2),
                                 "label": label, "route": "mergekit", "kind": self.kind})
        self.log(f"  merged {name} in {seconds:.0f} s wall, {cpu:.0f} s CPU"
                 + (f", of which {races:.0f} s one-off library races" if races >= 1 else "")
                 + f" (load average {os.getloadavg()[0]:.1f})")
        return out

    def drop(self, label: str, params: Dict) -> None:
        shutil.rmtree(self.cache / "merged" / self.name(label, params), ignore_errors=True)

    def _record_time(self, name: str, fields: Dict) -> None:
        path = self.cache / "timings" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**old, **fields}, indent=1, sort_keys=True))

    def timing(self, label: str, params: Dict, route: str = "mergekit") -> Dict:
        path = self.cache / "timings" / f"{self.name(label, params, route)}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def scores(self, label: str, params: Dict, split: str) -> Dict[str, float]:
        """{task: accuracy} of the merge on ``split`` (cached)."""
        name = self.name(label, params)

        def run():
            path = self.merged(label, params)
            t0 = time.time()
            model = M.load_model(path)
            result = self.bench.score_model(model, (split,))[split]
            del model
            return {"scores": result, "seconds": round(time.time() - t0, 1)}

        return self.bench.cached_json(self.cache / "scores" / f"merge-{name}-{split}.json", run)["scores"]

    # ------------------------------------------------------------ the drm-lora route
    def drm_lora(self, label: str, params: Dict, keep_merged: bool = False) -> Dict:
        """``mergekit-drm-lora`` on the same YAML: one merged adapter, scored on
        val and test and compared weight by weight with the mergekit route."""
        assert self.kind == "lora" and self.methods[label].merge_method == "drm"
        name = self.name(label, params, "drm-lora")

        def run():
            from mergekit_drm.lora.cli import main as drm_lora_main

            config = self.write_config(label, params, "drm-lora")
            out = self.cache / "drm_lora" / name
            if not (out / "adapter_config.json").exists():
                shutil.rmtree(out, ignore_errors=True)
                tmp = out.with_name(name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                t0 = time.time()
                drm_lora_main([str(config), str(tmp), "--no-write-model-card", "--quiet"],
                              standalone_mode=False)
                tmp.rename(out)
                self._record_time(name, {"merge_s": round(time.time() - t0, 1), "label": label,
                                         "route": "drm-lora", "kind": self.kind})
            adapter_model = M.load_model(out, self.bench.base)
            dense = M.load_model(self.merged(label, params))
            diff = weight_difference(dense, adapter_model, M.load_model(self.bench.base))
            del dense
            t0 = time.time()
            result = self.bench.score_model(adapter_model, ("val", "test"))
            del adapter_model
            return {**result, "difference": diff, "seconds": round(time.time() - t0, 1),
                    "merge_s": self.timing(label, params, "drm-lora").get("merge_s"), "config": name}

        result = self.bench.cached_json(self.cache / "scores" / f"route-{name}.json", run)
        if not keep_merged:
            self.drop(label, params)
        return result

    # ------------------------------------------------------------ tables
    def defaults(self, labels: Sequence[str], route_check: bool = False) -> Dict[str, Dict]:
        """Every method at its documented defaults: val and test. With
        ``route_check`` (LoRA), drm also goes through ``mergekit-drm-lora``."""
        out = {}
        for label in labels:
            params = self.methods[label].defaults
            out[label] = {"params": params, **{s: self.scores(label, params, s) for s in ("val", "test")},
                          "config": self.name(label, params),
                          "merge_s": self.timing(label, params).get("merge_s")}
            if route_check and self.methods[label].merge_method == "drm":
                out[label]["drm_lora"] = self.drm_lora(label, params)
            self.drop(label, params)
            self.log(f"{self.kind} s{self.seed} defaults {label}: test "
                     f"{sum(out[label]['test'].values()) / len(self.tasks):.3f}")
        return out

    def tuned(self, labels: Sequence[str], chosen: Optional[Dict[str, Dict]] = None) -> Dict[str, Dict]:
        """The grid on validation, test of the best point. With ``chosen``
        ({label: params}, e.g. seed 0's choices) only those points are run."""
        own_val = self.own_scores()["val"]
        out = {}
        for label in labels:
            method = self.methods[label]
            if chosen is not None:
                best = chosen[label]
                val = {json.dumps(best, sort_keys=True): self.scores(label, best, "val")}
            else:
                val = {}
                for params in method.grid:
                    val[json.dumps(params, sort_keys=True)] = self.scores(label, params, "val")
                ranked = sorted(method.grid, key=lambda p: -mean_normalized(
                    val[json.dumps(p, sort_keys=True)], own_val))
                best = ranked[0]
            test = self.scores(label, best, "test")
            for params in method.grid if chosen is None else (best,):
                self.drop(label, params)
            out[label] = {"params": best, "grid_val": val, "config": self.name(label, best),
                          "val": val[json.dumps(best, sort_keys=True)], "test": test}
            self.log(f"{self.kind} s{self.seed} tuned {label} {best}: test "
                     f"{sum(test.values()) / len(self.tasks):.3f}")
        return out


def weight_difference(a, b, base) -> Dict[str, float]:
    """How far model ``b`` is from model ``a``: the largest absolute weight
    difference, and the largest per-tensor ||a - b|| / ||a - base|| (relative
    to the merge's change, over tensors the merge changed)."""
    sa, sb, s0 = a.state_dict(), b.state_dict(), base.state_dict()
    max_abs, max_rel, worst = 0.0, 0.0, ""
    for name, x in sa.items():
        d = x.double() - sb[name].double()
        max_abs = max(max_abs, float(d.abs().max()) if d.numel() else 0.0)
        change = float((x.double() - s0[name].double()).norm())
        if change > 0:
            rel = float(d.norm()) / change
            if rel > max_rel:
                max_rel, worst = rel, name
    return {"max_abs": max_abs, "max_rel_to_change": max_rel, "worst_tensor": worst}
