"""Write the LLM benchmark's report (``llm.md``, ``llm.png``, the YAMLs) from its cache.

    python -m benchmarks.quality.llm.report [--cache DIR] [--out DIR]

Reads only what the runner cached (``results/``, ``scores/``, ``timings/``,
``configs/``), so it can be rerun at any time while the benchmark goes on.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .merges import METHOD_ORDER, mean_normalized, methods

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE.parent.parent / "results"
BUILT_IN = ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della")
OURS = ("drm-V", "drm-H", "drm-V-iso")
PACKAGE_BASELINES = ("tsv_m", "iso_c", "iso_cts")


def _load(path: Path) -> Dict:
    return json.loads(path.read_text())


def _mean(d: Dict[str, float]) -> float:
    return sum(d.values()) / len(d)


def _ms(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "-"
    m = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def _params(p: Dict) -> str:
    keep = {k: v for k, v in p.items() if k not in ("direction",)}
    return ", ".join(f"{k} {v}" for k, v in keep.items()) or "-"


def _ft_scores(cache: Path, kind: str, task: str, seed: int) -> Optional[Dict]:
    hits = sorted((cache / "scores").glob(f"ft-{kind}-{task}-s{seed}-*.json"))
    return _load(hits[-1]) if hits else None


def _settings(cache: Path) -> List[Dict]:
    return [_load(p) for p in sorted((cache / "results").glob("*.json"))]


def _norm_test(entry: Dict, own: Dict) -> float:
    return mean_normalized(entry["test"], own["test"])


def _methods_present(summaries: List[Dict], table: str) -> List[str]:
    present = {m for s in summaries for m in s.get(table, {})}
    return [m for m in METHOD_ORDER if m in present]


def _table_rows(summaries: List[Dict], table: str, tasks: Sequence[str]) -> List[str]:
    """One row per method: normalized and raw test accuracy (mean ± std over
    the given settings = seeds), per-task raw accuracy (mean over seeds)."""
    rows = []
    for label in _methods_present(summaries, table):
        have = [s for s in summaries if label in s.get(table, {})]
        norm = [_norm_test(s[table][label], s["own"]) for s in have]
        raw = [_mean(s[table][label]["test"]) for s in have]
        first = have[0][table][label]
        per_task = [f"{100 * statistics.mean(s[table][label]['test'][t] for s in have):.1f}" for t in tasks]
        chosen = _params(first["params"])
        if len(have) > 1 and any(s[table][label]["params"] != first["params"] for s in have):
            chosen += " (varies by seed)"
        mark = "**" if label in OURS else ""
        rows.append(f"| {mark}{label}{mark} | {chosen} | {_ms(norm)} | {_ms(raw)} | "
                    + " | ".join(per_task) + f" | {len(have)} |")
    return rows


def _header(tasks: Sequence[str]) -> List[str]:
    return ["| method | parameters | normalized test (%) | mean test acc (%) | "
            + " | ".join(tasks) + " | seeds |",
            "|---|---|---|---|" + "---|" * len(tasks) + "---|"]


def _best(summaries: List[Dict], table: str, labels: Sequence[str]) -> Optional[str]:
    """Of ``labels``, the one with the highest mean normalized test accuracy,
    among those measured on the most seeds (a mean over fewer seeds is not
    comparable)."""
    scored = []
    for label in labels:
        have = [s for s in summaries if label in s.get(table, {})]
        if have:
            scored.append((len(have), statistics.mean(_norm_test(s[table][label], s["own"]) for s in have), label))
    return max(scored)[2] if scored else None


def _paired(summaries: List[Dict], table: str, reference: str) -> List[str]:
    """Differences to ``reference`` in normalized test points: paired per seed
    when there are several seeds, else per task."""
    rows = []
    for label in _methods_present(summaries, table):
        if label == reference:
            continue
        both = [s for s in summaries if label in s.get(table, {}) and reference in s.get(table, {})]
        if not both:
            continue
        if len(both) > 1:
            diffs = [_norm_test(s[table][label], s["own"]) - _norm_test(s[table][reference], s["own"])
                     for s in both]
            unit = f"{len(diffs)} seeds"
        else:
            s = both[0]
            diffs = [(s[table][label]["test"][t] - s[table][reference]["test"][t]) / s["own"]["test"][t]
                     for t in s["tasks"]]
            unit = f"{len(diffs)} tasks"
        wins = sum(d > 0 for d in diffs)
        rows.append(f"| {label} | {_ms(diffs)} | {wins}/{len(diffs)} ({unit}) |")
    return rows


def _groups(summaries: List[Dict]) -> Dict[str, List[Dict]]:
    out: Dict[str, List[Dict]] = {}
    for s in sorted(summaries, key=lambda s: (s["kind"], s["seed"])):
        out.setdefault(s["kind"], []).append(s)
    return out


def _copy_configs(cache: Path, out: Path, summaries: List[Dict]) -> int:
    """The exact YAMLs of every reported merge, next to the results."""
    dest = out / "llm_configs"
    names = {e["config"] for s in summaries for table in ("defaults", "tuned")
             for e in s.get(table, {}).values()}
    names |= {e["drm_lora"]["config"] for s in summaries for e in s.get("defaults", {}).values()
              if "drm_lora" in e}
    count = 0
    for name in sorted(names):
        path = cache / "configs" / f"{name}.yml"
        if path.exists():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest / path.name)
            count += 1
    return count


def _seeds(seeds) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))


def _timings(cache: Path) -> Dict[str, List[float]]:
    """Merge wall seconds per (kind, method, route)."""
    out: Dict[str, List[float]] = {}
    for p in (cache / "timings").glob("*.json"):
        t = _load(p)
        out.setdefault(f"{t['kind']} {t['label']} ({t['route']})", []).append(t["merge_s"])
    return out


def _score_seconds(cache: Path) -> List[float]:
    return [_load(p)["seconds"] for p in (cache / "scores").glob("merge-*-val.json")]


PLANNED = (("lora", 0), ("full", 0), ("lora", 1), ("lora", 2), ("full", 1))


def _coverage(cache: Path, summaries: List[Dict], tasks: Sequence[str]) -> List[str]:
    """What of the planned run is in the cache, and what is not (cut to fit)."""
    if not tasks:
        return []
    done = {(s["kind"], s["seed"]): s for s in summaries}
    lines = ["## Scope: what ran and what was cut", "",
             "| setting | fine-tunes | defaults table | tuned table |", "|---|---|---|---|"]
    for kind, seed in PLANNED:
        n_ft = sum(1 for t in tasks if any(p.suffix != ".tmp" for p in
                                            (cache / "finetunes").glob(f"{kind}-{t}-s{seed}-*")))
        s = done.get((kind, seed), {})
        cells = []
        for table in ("defaults", "tuned"):
            have = [m for m in METHOD_ORDER if m in s.get(table, {})]
            missing = [m for m in METHOD_ORDER if m not in have]
            cells.append("all methods" if not missing else
                         ("not run" if not have else f"{len(have)} methods; not run: {', '.join(missing)}"))
        lines.append(f"| {kind} seed {seed} | {n_ft}/{len(tasks)} | {cells[0]} | {cells[1]} |")
    return lines + [""]


def plot(groups: Dict[str, List[Dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("lora", "full") if k in groups]
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(6.5 * max(1, len(kinds)), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        summaries = groups[kind]
        labels = [m for m in METHOD_ORDER if any(m in s.get("defaults", {}) or m in s.get("tuned", {})
                                                 for s in summaries)]
        for offset, table, color in ((-0.2, "defaults", "#9bb7d4"), (0.2, "tuned", "#1f4e79")):
            xs, ys, errs = [], [], []
            for i, label in enumerate(labels):
                vals = [_norm_test(s[table][label], s["own"]) * 100 for s in summaries if label in s.get(table, {})]
                if vals:
                    xs.append(i + offset)
                    ys.append(statistics.mean(vals))
                    errs.append(statistics.stdev(vals) if len(vals) > 1 else 0)
            ax.bar(xs, ys, width=0.4, yerr=errs, color=color, label=table)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=45, ha="right")
        ax.axhline(100, color="gray", lw=0.8, ls=":")
        lows = [b.get_height() for b in ax.patches]
        ax.set_ylim(max(0, min(lows + [100]) - 10), 105)
        seeds = sorted({s["seed"] for s in summaries})
        ax.set_title(f"SmolLM2-135M, {kind} fine-tunes ({_seeds(seeds)})")
        ax.set_ylabel("normalized test accuracy (%)")
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(cache: Path, out: Path, quick: bool = False, notes: Sequence[str] = ()) -> Path:
    cache, out = Path(cache), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = _settings(cache)
    groups = _groups(summaries)
    tasks = summaries[0]["tasks"] if summaries else []
    lines = ["# Merge quality on a real decoder LLM: SmolLM2-135M-Instruct", ""]
    if quick:
        lines += ["**Quick mode** (smoke run: 2 tasks, tiny fine-tunes, few methods). Not a result.", ""]
    lines += [f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
              "`python -m benchmarks.quality.llm.report` from the benchmark's cache "
              f"({platform.machine()}, {platform.python_version()}).", ""]
    lines += list(notes)

    # ---- base vs fine-tune, cross-task matrix
    base = sorted((cache / "scores").glob("base-*.json"))
    if base and tasks:
        b = _load(base[-1])["test"]
        lines += ["## Base vs fine-tune (test accuracy, %)", "",
                  "| setting | " + " | ".join(tasks) + " | mean |", "|---|" + "---|" * (len(tasks) + 1)]
        lines.append("| base (no fine-tune) | " + " | ".join(f"{100 * b[t]:.1f}" for t in tasks)
                     + f" | {100 * _mean({t: b[t] for t in tasks}):.1f} |")
        for kind, group in groups.items():
            per_task = {t: [s["own"]["test"][t] for s in group] for t in tasks}
            means = [_mean({t: s["own"]["test"][t] for t in tasks}) for s in group]
            lines.append(f"| {kind} fine-tune on the task ({_seeds([s['seed'] for s in group])}) | "
                         + " | ".join(_ms(per_task[t]) for t in tasks) + f" | {_ms(means)} |")
        lines.append("")
        for kind in groups:
            seed = groups[kind][0]["seed"]
            rows = [(t, _ft_scores(cache, kind, t, seed)) for t in tasks]
            if not all(r for _, r in rows):
                continue
            lines += [f"### Cross-task matrix, {kind} seed {seed} (row: fine-tuned on; column: scored on; test %)", "",
                      "| fine-tune | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
            lines.append("| base | " + " | ".join(f"{100 * b[t]:.1f}" for t in tasks) + " |")
            for t, r in rows:
                lines.append(f"| {t} | " + " | ".join(
                    (f"**{100 * r['test'][c]:.1f}**" if c == t else f"{100 * r['test'][c]:.1f}") for c in tasks) + " |")
            lines.append("")

    # ---- defaults first, then tuned
    for table, title, blurb in (
        ("defaults", "Defaults, no tuning (the table to read first)",
         "Every method once, at the values its documentation recommends (sources below). "
         "Normalized = merged accuracy / the task's own fine-tune, mean over tasks."),
        ("tuned", "Tuned on validation",
         "Each method's grid (the same 4 points per method; `linear` has none) scored on "
         "validation, the best point's test accuracy reported."),
    ):
        lines += [f"## {title}", "", blurb, ""]
        for kind, group in groups.items():
            if not any(s.get(table) for s in group):
                continue
            chosen_from = {s.get("chosen_from") for s in group if s.get("chosen_from") is not None}
            extra = (f"; seeds other than {min(chosen_from)} reuse seed {min(chosen_from)}'s "
                     "validation choices" if table == "tuned" and chosen_from else "")
            lines += [f"### {kind} fine-tunes{extra}", ""] + _header(tasks) + _table_rows(group, table, tasks) + [""]
            ref = _best(group, table, BUILT_IN)
            pairing = ("mean ± std over seeds" if len(group) > 1 else
                       "one seed: paired by task, mean ± std over tasks")
            if ref:
                lines += [f"Paired differences to the best built-in here (`{ref}`), normalized test points "
                          f"({pairing}; wins):", "", "| method | difference | wins |", "|---|---|---|"]
                lines += _paired(group, table, ref) + [""]
            if any("tsv_m" in s.get(table, {}) for s in group):
                rows = [r for r in _paired(group, table, "tsv_m")
                        if r.split(" | ")[0].lstrip("| ") in OURS + PACKAGE_BASELINES]
                lines += [f"Paired differences to `tsv_m` (the strongest SVD baseline), this package's "
                          f"methods ({pairing}):", "", "| method | difference | wins |", "|---|---|---|"] + rows + [""]

    # ---- defaults' sources, grids
    if tasks:
        table = methods(len(tasks))
        lines += ["## Defaults and grids", "", "| method | defaults | source | tuned grid |", "|---|---|---|---|"]
        for label, m in table.items():
            grid = "; ".join(_params(p) for p in m.grid)
            lines.append(f"| {label} | {_params(m.defaults)} | {m.source} | {grid} |")
        lines.append("")

    # ---- drm routes
    routes = [(s, label, e["drm_lora"]) for s in summaries for label, e in s.get("defaults", {}).items()
              if "drm_lora" in e]
    if routes:
        lines += ["## drm through mergekit-yaml (BASE+ADAPTER) vs mergekit-drm-lora", "",
                  "Same YAML; route 1 folds each adapter into the base (`--lora-merge-cache`) and merges dense "
                  "weights, route 2 merges the adapters' factors into one adapter. Difference of the "
                  "resulting weights (route 2 applied to the base vs route 1):", "",
                  "| setting | method | max abs weight difference | max per-tensor rel. to the merge's change | "
                  "test acc route 1 / route 2 (%) | merge s route 1 / route 2 |", "|---|---|---|---|---|---|"]
        for s, label, r in routes:
            d = r["difference"]
            m1 = s["defaults"][label].get("merge_s")
            lines.append(f"| {s['kind']} s{s['seed']} | {label} | {d['max_abs']:.2e} | "
                         f"{d['max_rel_to_change']:.2e} (`{d['worst_tensor']}`) | "
                         f"{100 * _mean(s['defaults'][label]['test']):.2f} / {100 * _mean(r['test']):.2f} | "
                         f"{m1 if m1 is not None else '-'} / {r.get('merge_s', '-')} |")
        lines.append("")

    # ---- cost
    timings = _timings(cache)
    if timings:
        lines += ["## Cost (this 2-core machine, shared with other work)", "",
                  "| method (route) | merges | median merge wall s | max |", "|---|---|---|---|"]
        for name in sorted(timings):
            v = timings[name]
            lines.append(f"| {name} | {len(v)} | {statistics.median(v):.0f} | {max(v):.0f} |")
        lines += ["", "Wall seconds of `run_merge` (or `mergekit-drm-lora`) alone, on a shared machine: the "
                  "first LoRA merge also folds every adapter into the base (mergekit's LoRA cache), and a "
                  "merge during which the run was paused by another job (SIGSTOP) counts the pause; "
                  "medians are robust to both."]
        sec = _score_seconds(cache)
        if sec:
            lines += ["", f"Validation scoring of one merge (load + {len(tasks)} tasks): median "
                          f"{statistics.median(sec):.0f} s over {len(sec)} merges."]
        merge_h = sum(sum(v) for v in timings.values()) / 3600
        score_h = sum(_load(p).get("seconds", 0.0) for p in (cache / "scores").glob("*.json")) / 3600
        lines += ["", f"Process time recorded in the cache: merges {merge_h:.1f} h, scoring (fine-tunes' "
                      f"cross-task matrices and merges) {score_h:.1f} h; fine-tunes are not recorded "
                      "(their logs: ~1.5 min per LoRA fine-tune, ~3.5 min per full fine-tune at 1 thread)."]
        lines.append("")

    lines += _coverage(cache, summaries, tasks)
    n = _copy_configs(cache, out, summaries)
    if n:
        lines += [f"The exact YAMLs of the {n} reported merges: [`llm_configs/`](llm_configs/) "
                  "(absolute paths of this machine's cache).", ""]
    if groups:
        plot(groups, out / "llm.png")
        lines.insert(2, "![normalized test accuracy per method](llm.png)\n")
    path = out / "llm.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=HERE / "cache")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    print(write(args.cache, args.out, quick=args.quick))


if __name__ == "__main__":
    main()
