"""SmolLM2-135M merge-quality benchmark (see README.md next to this file).

    python -m benchmarks.quality.llm.run --stage finetunes   # fine-tunes + cross-task matrix
    python -m benchmarks.quality.llm.run --stage all         # + merges, report (benchmarks/results/llm.md)
    python -m benchmarks.quality.llm.run --stage seed --seed 1   # one LoRA seed (1, 2 reuse seed 0's choices)
    python -m benchmarks.quality.llm.run --stage seed --kind full --seed 0 --labels ties,drm-V
    python -m benchmarks.quality.llm.run --quick             # smoke run: 2 tasks, 1 seed, tiny budgets

``--stage seed`` runs are independent of each other (their own fine-tunes,
folds and results), so two seeds can run side by side with ``--threads 1``.
Two runs of the same seed may also run side by side if their ``--labels``
do not overlap and the seed's fine-tunes already exist (nothing locks a
fine-tune; run one of them, or ``--stage finetunes``, first): each merges its
own rows into the seed's summary under a lock.

Every step is cached under ``--cache`` (default ``benchmarks/quality/llm/cache``):
rerunning resumes where an interrupted run stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

try:
    import fcntl
except ImportError:  # Windows: msvcrt's byte-range lock on the same lock file
    fcntl = None
    import msvcrt

import torch

from . import report
from .bench import QUICK_TASKS, TASKS, Bench, write_json
from .merges import QUICK_METHODS, MergeStage

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / "cache"

FULL = dict(train=1200, val=48, test=96,
            lora_rank=8, lora_steps=40, lora_batch=16, lora_lr=2e-3,
            full_steps=40, full_batch=16, full_lr=5e-5)
QUICK = dict(train=64, val=8, test=16,
             lora_rank=8, lora_steps=3, lora_batch=4, lora_lr=2e-3,
             full_steps=2, full_batch=4, full_lr=5e-5)
LORA_SEEDS = (0, 1, 2)
FULL_SEEDS = (0, 1)  # seed 1 reuses seed 0's tuned choices
# Tuned-table order: the headline comparisons first, so a run cut short
# still answers "drm vs the best built-in vs TSV-M vs Iso-C".
TUNE_ORDER = ("drm-V", "drm-H", "ties", "tsv_m", "iso_c", "drm-V-iso", "task_arithmetic", "dare_ties",
              "della", "breadcrumbs", "iso_cts", "linear")


def run_finetunes(bench: Bench, lora_seeds=LORA_SEEDS, full_seeds=FULL_SEEDS) -> None:
    """LoRA seed 0, then the full seeds, then the other LoRA seeds: the order in
    which later stages need them. Each fine-tune is scored on every task."""
    bench.base_scores()
    plan = [("lora", s) for s in lora_seeds[:1]] + [("full", s) for s in full_seeds] + \
           [("lora", s) for s in lora_seeds[1:]]
    for kind, seed in plan:
        for task in bench.task_names:
            scores = bench.finetune_scores(kind, task, seed)
            bench.log(f"{kind} {task} s{seed}: own-task test {scores['test'][task]:.3f}")


def quick_summary(bench: Bench, summary: Dict, out: Path) -> list:
    """What ``--quick`` printed numbers mean, where its report is, and whether
    its fine-tunes learned anything (they are too short to be a result)."""
    base = bench.base_scores()["test"]
    own = summary["own"]["test"]
    n_test = {t: len(bench.tasks[t].test) for t in bench.task_names}
    chance = {t: 1.0 / bench.tasks[t].num_labels for t in bench.task_names}
    lines = ["", "LLM quick mode: SmolLM2-135M-Instruct, LoRA fine-tunes of "
             f"{bench.settings['lora_steps']} steps x {bench.settings['lora_batch']} examples, "
             f"{', '.join(f'{t} ({n_test[t]} test examples)' for t in bench.task_names)}.",
             "Test accuracy (constrained choice among the label words):",
             "| model | " + " | ".join(bench.task_names) + " |", "|---|" + "---|" * len(bench.task_names)]

    def row(name, scores):
        return f"| {name} | " + " | ".join(f"{scores[t]:.3f}" for t in bench.task_names) + " |"

    lines += [row("chance", chance), row("base (no fine-tune)", base), row("own LoRA fine-tune", own)]
    for table in ("defaults", "tuned"):
        for label, entry in summary.get(table, {}).items():
            lines.append(row(f"{label} merge ({table})", entry["test"]))
    learned = [t for t in bench.task_names if own[t] > max(base[t], chance[t]) + 1.0 / n_test[t]]
    if len(learned) == len(bench.task_names):
        lines.append("The fine-tunes beat the base and chance on every task, but on this many test "
                     "examples and one seed the merges' differences are noise.")
    else:
        lines.append("These numbers are NOT a result: quick mode only checks the pipeline (fine-tune, "
                     "mergekit YAMLs with BASE+ADAPTER references, merges through mergekit and "
                     "mergekit-drm-lora, scoring, report). Its fine-tunes are too short to learn "
                     + ("any task" if not learned else "every task")
                     + f" (beat base and chance on: {', '.join(learned) or 'none'}). The measured "
                     "results are benchmarks/results/llm.md (`--stage all`).")
    lines.append(f"Report: {out / 'llm.md'} (plot {out / 'llm.png'}, YAMLs {out / 'llm_configs'}); "
                 f"cache: {bench.cache}")
    return lines


def results_path(bench: Bench, kind: str, seed: int) -> Path:
    return bench.cache / "results" / f"{kind}-s{seed}.json"


def run_merges(bench: Bench, kind: str, seed: int, labels: Sequence[str], *,
               chosen_from: Optional[int] = None, grid_points: Optional[int] = None,
               tune: Optional[Sequence[str]] = None, route_check: bool = True,
               on_update=lambda: None) -> Dict:
    """Defaults table, then the tuned table, of one fine-tune setting; the
    summary (``cache/results/<kind>-s<seed>.json``) is rewritten after every
    method so the report can be regenerated while the run goes on.
    ``chosen_from``: reuse that seed's validation choices (no grid);
    ``tune``: the methods of the tuned table (default: all of ``labels``)."""
    stage = MergeStage(bench, kind, seed)
    if grid_points is not None:
        stage.methods = {k: dataclasses.replace(m, grid=m.grid[:grid_points])
                         for k, m in stage.methods.items()}
    path = results_path(bench, kind, seed)
    header = {"kind": kind, "seed": seed, "tasks": bench.task_names, "own": stage.own_scores(),
              "chosen_from": chosen_from}
    mine: Dict[str, Dict] = {"defaults": {}, "tuned": {}}  # the rows this run computed

    def save():
        merge_into_summary(path, header, mine)
        on_update()

    chosen = None
    if chosen_from is not None:
        source = json.loads(results_path(bench, kind, chosen_from).read_text())["tuned"]
        chosen = {label: source[label]["params"] for label in labels if label in source}
    tuned = labels if tune is None else tune
    # Method by method, both tables: a run cut short has complete rows for
    # the methods that come first in ``labels``.
    for label in labels:
        mine["defaults"].update(stage.defaults([label], route_check=route_check and kind == "lora"))
        save()
        if label in tuned and (chosen is None or label in chosen):
            mine["tuned"].update(stage.tuned([label], chosen))
            save()
    return json.loads(path.read_text())


def merge_into_summary(path: Path, header: Dict, rows: Dict[str, Dict]) -> None:
    """Add this run's rows ({table: {label: row}}) to the summary at ``path``.
    Re-read under a lock: another run of the same seed (other labels) may have
    added rows since this one started; other seeds' runs read the file for
    their tuned choices, so it is replaced atomically."""
    with _locked(path):
        summary = json.loads(path.read_text()) if path.exists() else {}
        summary.update(header)
        for table, table_rows in rows.items():
            summary.setdefault(table, {}).update(table_rows)
        write_json(path, summary)


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        else:
            msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)
            else:
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--stage", default="finetunes", choices=["finetunes", "all", "seed"],
                    help="finetunes: fine-tunes and their cross-task scores only; all: "
                         "fine-tunes, merges and report, interleaved in priority order; "
                         "seed: the LoRA fine-tunes and merges of --seed alone")
    ap.add_argument("--seed", type=int, default=None, help="with --stage seed: which seed")
    ap.add_argument("--kind", default="lora", choices=["lora", "full"],
                    help="with --stage seed: LoRA or full fine-tunes")
    ap.add_argument("--labels", default=",".join(TUNE_ORDER),
                    help="with --stage seed: the methods, in order (default: all, headline first)")
    ap.add_argument("--tune", default=None,
                    help="with --stage seed: the methods that also get the tuned table "
                         "(default: all of --labels; the others get their defaults row only)")
    ap.add_argument("--out", type=Path, default=None,
                    help="report folder (default: benchmarks/results; quick: <cache>/report)")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("LLM_BENCH_THREADS", "2")))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:7.0f} s] {msg}", flush=True)

    if args.quick:
        bench = Bench(args.cache or DEFAULT_CACHE / "quick", QUICK, QUICK_TASKS, log=log)
        out = args.out or bench.cache / "report"
        update = lambda: report.write(bench.cache, out, quick=True)
        run_finetunes(bench, (0,), ())
        summary = run_merges(bench, "lora", 0, QUICK_METHODS, grid_points=2, tune=QUICK_METHODS[-1:],
                             on_update=update)
        update()
        for line in quick_summary(bench, summary, out):
            print(line)
    elif args.stage == "finetunes":
        bench = Bench(args.cache or DEFAULT_CACHE, FULL, TASKS, log=log)
        run_finetunes(bench)
    elif args.stage == "seed":
        labels = [label for label in args.labels.split(",") if label]
        tune = labels if args.tune is None else [label for label in args.tune.split(",") if label]
        unknown = sorted((set(labels) | set(tune)) - set(TUNE_ORDER))
        if args.seed is None or unknown:
            ap.error(f"--stage seed needs --seed, and --labels/--tune from {', '.join(TUNE_ORDER)}"
                     + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        bench = Bench(args.cache or DEFAULT_CACHE, FULL, TASKS, log=log)
        out = args.out or report.RESULTS_DIR
        update = lambda: report.write(bench.cache, out)
        seeds = LORA_SEEDS if args.kind == "lora" else FULL_SEEDS
        if args.kind == "lora":
            run_finetunes(bench, (args.seed,), ())
        else:
            run_finetunes(bench, (), (args.seed,))
        first = args.seed == seeds[0]  # the first seed tunes on validation; the others reuse its choices
        run_merges(bench, args.kind, args.seed, labels, chosen_from=None if first else seeds[0],
                   tune=tune, route_check=first, on_update=update)
    else:
        bench = Bench(args.cache or DEFAULT_CACHE, FULL, TASKS, log=log)
        out = args.out or report.RESULTS_DIR
        update = lambda: report.write(bench.cache, out)
        run_finetunes(bench, LORA_SEEDS[:1], ())
        run_merges(bench, "lora", 0, TUNE_ORDER, on_update=update)
        run_finetunes(bench, (), FULL_SEEDS)
        for seed in FULL_SEEDS:
            run_merges(bench, "full", seed, TUNE_ORDER, chosen_from=None if seed == FULL_SEEDS[0]
                       else FULL_SEEDS[0], on_update=update)
        for seed in LORA_SEEDS[1:]:
            run_finetunes(bench, (seed,), ())
            run_merges(bench, "lora", seed, TUNE_ORDER, chosen_from=LORA_SEEDS[0],
                       route_check=False, on_update=update)
    log("done")


if __name__ == "__main__":
    main()
