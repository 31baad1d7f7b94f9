"""SmolLM2-135M merge-quality benchmark (see README.md next to this file).

    python -m benchmarks.quality.llm.run --stage finetunes   # fine-tunes + cross-task matrix
    python -m benchmarks.quality.llm.run --quick             # smoke run: 2 tasks, 1 seed, tiny budgets

Every step is cached under ``--cache`` (default ``benchmarks/quality/llm/cache``):
rerunning resumes where an interrupted run stopped.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from .bench import QUICK_TASKS, TASKS, Bench

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / "cache"

FULL = dict(train=1200, val=48, test=96,
            lora_rank=8, lora_steps=40, lora_batch=16, lora_lr=2e-3,
            full_steps=40, full_batch=16, full_lr=5e-5)
QUICK = dict(train=64, val=8, test=16,
             lora_rank=8, lora_steps=3, lora_batch=4, lora_lr=2e-3,
             full_steps=2, full_batch=4, full_lr=5e-5)
LORA_SEEDS = (0, 1, 2)
FULL_SEEDS = (0,)


def run_finetunes(bench: Bench, lora_seeds=LORA_SEEDS, full_seeds=FULL_SEEDS) -> None:
    """LoRA seed 0, then full seed 0, then the other LoRA seeds: the order in
    which later stages need them. Each fine-tune is scored on every task."""
    bench.base_scores()
    plan = [("lora", lora_seeds[0])] + [("full", s) for s in full_seeds] + \
           [("lora", s) for s in lora_seeds[1:]]
    for kind, seed in plan:
        for task in bench.task_names:
            scores = bench.finetune_scores(kind, task, seed)
            bench.log(f"{kind} {task} s{seed}: own-task test {scores['test'][task]:.3f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--stage", default="finetunes", choices=["finetunes"])
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("LLM_BENCH_THREADS", "2")))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:7.0f} s] {msg}", flush=True)

    if args.quick:
        bench = Bench(args.cache or DEFAULT_CACHE / "quick", QUICK, QUICK_TASKS, log=log)
        run_finetunes(bench, (0,), (0,))
    else:
        bench = Bench(args.cache or DEFAULT_CACHE, FULL, TASKS, log=log)
        run_finetunes(bench)


if __name__ == "__main__":
    main()
