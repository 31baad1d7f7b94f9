"""Cost of the non-finite checks against the drm merge they guard.

For every tensor of one decoder layer of a Llama-shaped model (hidden H,
MLP 2.75 H, grouped KV) and N fine-tunes, times what ``DRMMerge.merge_group``
does (deltas, then the joint SVD or the elementwise merge) and, separately,
the checks it now runs: ``check_finite`` on the base and each input, the
kernel's ``check_finite_stack`` on the deltas, and the output check
(``overflow.checked_cast``: the cast to the output dtype, bfloat16 here, and a
finiteness test of the result, timed apart from the cast).
Medians of interleaved repeats; the ratio is the overhead on the merge's
compute (file reading and writing, which whole merges add, only make it
smaller). A second table times the output check alone on large tensors
(``--large``), against the cast it follows, since there the merge itself was
not run (its SVD would take minutes on this machine).

    python -m benchmarks.perf.bench_finite_checks [--hidden 1024] [--models 3] [--large 4096x14336]
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
from mergekit_drm import overflow

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


def output_check(merged, dtype=torch.bfloat16):
    """Seconds of (the cast to the output dtype, the check checked_cast adds to it).

    Timed apart: checked_cast is the cast plus this check (and, with an
    ``out_dtype:`` planned, one more read that this benchmark does not plan).
    """
    start = time.perf_counter()
    out = merged.to(dtype)
    cast = time.perf_counter() - start
    start = time.perf_counter()
    assert overflow._all_finite(out)
    return cast, time.perf_counter() - start


def large_rows(shapes, repeats, gen):
    rows = []
    for shape in shapes:
        merged = torch.randn(shape, generator=gen)
        casts, checks_ = [], []
        for _ in range(repeats):
            cast, check = output_check(merged)
            casts.append(cast)
            checks_.append(check)
        p, c = statistics.median(casts), statistics.median(checks_)
        gib = merged.numel() * 2 / 2**30  # the bfloat16 result the check reads
        print("large", shape, f"cast {p * 1e3:.1f}ms", f"check {c * 1e3:.1f}ms", flush=True)
        rows.append(
            f"| {'x'.join(map(str, shape))} | {merged.numel() / 1e6:.1f} M | {p * 1e3:.1f} | {c * 1e3:.1f} | "
            f"{100 * c / p:.0f}% | {gib / max(c, 1e-9):.2f} |"
        )
        del merged
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--large", default="4096x14336,32000x4096",
        help="comma-separated shapes for the output check alone ('' to skip)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    kernel.check_finite_stack = lambda *_, **__: None  # timed separately, in checks()
    gen = torch.Generator().manual_seed(0)
    rows, total_merge, total_check, total_out = [], 0.0, 0.0, 0.0
    for name, shape in layer_shapes(args.hidden).items():
        base = torch.randn(shape, generator=gen)
        fts = [base + 0.01 * torch.randn(shape, generator=gen) for _ in range(args.models)]
        deltas = torch.stack([ft - base for ft in fts])
        merge_times, check_times, out_times = [], [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            merged = merge(base, fts) + base
            merge_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            checks(base, fts, deltas)
            check_times.append(time.perf_counter() - start)
            out_times.append(output_check(merged)[1])
        m, c = statistics.median(merge_times), statistics.median(check_times)
        o = statistics.median(out_times)
        total_merge, total_check, total_out = total_merge + m, total_check + c, total_out + o
        print(name, f"{m:.3f}s", f"{c * 1e3:.2f}ms", f"out {o * 1e3:.2f}ms", flush=True)
        rows.append(
            f"| {name} | {'x'.join(map(str, shape))} | {m * 1e3:.1f} | {c * 1e3:.2f} | {100 * c / m:.2f}% "
            f"| {o * 1e3:.2f} | {100 * o / m:.2f}% |"
        )
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    lines = [
        f"Non-finite checks vs the drm merge, one Llama-shaped layer, hidden {args.hidden}, "
        f"{args.models} fine-tunes, float32, {torch.get_num_threads()} threads, median of {args.repeats}; "
        f"{os.cpu_count()} CPUs, load average {load} when written (other jobs slow every timing alike).",
        "",
        "| tensor | shape | merge ms | input checks ms | overhead | output check ms | overhead |",
        "|---|---|---:|---:|---:|---:|---:|",
        *rows,
        f"| **layer** | | {total_merge * 1e3:.1f} | {total_check * 1e3:.2f} | **{100 * total_check / total_merge:.2f}%** "
        f"| {total_out * 1e3:.2f} | **{100 * total_out / total_merge:.2f}%** |",
    ]
    shapes = [tuple(int(v) for v in item.split("x")) for item in args.large.split(",") if item]
    if shapes:
        lines += [
            "",
            f"Output check alone on large float32 merged tensors cast to bfloat16, "
            f"{torch.get_num_threads()} threads, median of {args.repeats}: "
            "the check costs one read of the cast result (a sum; the entry-by-entry test runs only "
            "when the sum is not finite).",
            "",
            "| shape | entries | cast ms | check ms | check / cast | check GiB/s |",
            "|---|---:|---:|---:|---:|---:|",
            *large_rows(shapes, args.repeats, gen),
        ]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as handle:
        handle.write(text + "\n")


if __name__ == "__main__":
    main()
