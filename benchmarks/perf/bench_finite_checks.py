"""Cost of the non-finite input checks against the drm merge they guard.

For every tensor of one decoder layer of a Llama-shaped model (hidden H,
MLP 2.75 H, grouped KV) and N fine-tunes, times what ``DRMMerge.merge_group``
does (deltas, then the joint SVD or the elementwise merge) and, separately,
the checks it now runs: ``check_finite`` on the base and each input, and the
kernel's ``check_finite_stack`` on the deltas. Medians of interleaved
repeats; the ratio is the overhead on the merge's compute (file reading and
writing, which whole merges add, only make it smaller).

    python -m benchmarks.perf.bench_finite_checks [--hidden 1024] [--models 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from mergekit_drm.checks import check_finite, check_finite_stack
from mergekit_drm.drm import kernel
from mergekit_drm.drm.kernel import drm_merge_matrix, elementwise_merge

RESULTS = os.path.join(os.path.dirname(__file__), "..", "results", "finite_checks.md")


def layer_shapes(hidden: int):
    mlp, kv = int(hidden * 2.75), hidden // 4
    return {
        "q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden),
        "o_proj": (hidden, hidden), "gate_proj": (mlp, hidden), "up_proj": (mlp, hidden),
        "down_proj": (hidden, mlp), "input_layernorm": (hidden,), "post_attention_layernorm": (hidden,),
    }


def merge(base, fts):
    """The merge without any check (the kernel's own check is switched off in main)."""
    deltas = torch.stack([ft - base for ft in fts])
    if base.dim() == 2:
        return drm_merge_matrix(deltas, density=0.2)
    return elementwise_merge(deltas)


def checks(base, fts, deltas):
    """What merge_group adds: every input, then the kernel's check of the deltas."""
    check_finite(base, method="drm", tensor_name="t", model="base")
    for ft in fts:
        check_finite(ft, method="drm", tensor_name="t", model="ft")
    check_finite_stack(deltas, method="drm", what="delta")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    kernel.check_finite_stack = lambda *_, **__: None  # timed separately, in checks()
    gen = torch.Generator().manual_seed(0)
    rows, total_merge, total_check = [], 0.0, 0.0
    for name, shape in layer_shapes(args.hidden).items():
        base = torch.randn(shape, generator=gen)
        fts = [base + 0.01 * torch.randn(shape, generator=gen) for _ in range(args.models)]
        deltas = torch.stack([ft - base for ft in fts])
        merge_times, check_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            merge(base, fts)
            merge_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            checks(base, fts, deltas)
            check_times.append(time.perf_counter() - start)
        m, c = statistics.median(merge_times), statistics.median(check_times)
        total_merge, total_check = total_merge + m, total_check + c
        print(name, f"{m:.3f}s", f"{c * 1e3:.2f}ms", flush=True)
        rows.append(f"| {name} | {'x'.join(map(str, shape))} | {m * 1e3:.1f} | {c * 1e3:.2f} | {100 * c / m:.2f}% |")
    lines = [
        f"Non-finite checks vs the drm merge, one Llama-shaped layer, hidden {args.hidden}, "
        f"{args.models} fine-tunes, float32, {torch.get_num_threads()} threads, median of {args.repeats}.",
        "",
        "| tensor | shape | merge ms | checks ms | overhead |",
        "|---|---|---:|---:|---:|",
        *rows,
        f"| **layer** | | {total_merge * 1e3:.1f} | {total_check * 1e3:.2f} | **{100 * total_check / total_merge:.2f}%** |",
    ]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as handle:
        handle.write(text + "\n")


if __name__ == "__main__":
    main()
