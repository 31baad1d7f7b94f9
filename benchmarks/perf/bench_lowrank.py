"""One matrix, LoRA-product fine-tunes: the certified range finder vs the exact routes.

Setup (issue 20, point 3): a bf16 base W (n x m, std 0.02) and N fine-tunes
bf16(W + B_t A_t) with rank-r Gaussian factors scaled so that
||B_t A_t||_F = strength * ||W||_F; deltas in float32 as the merge sees them
(LoRA product plus bf16 rounding noise). A dense decaying-spectrum stack
(``bench_drm.finetune_like``) shows what the probe costs when it must fall
through. Per method: the exact route (``svd: gram``, the short-side float64
Gram route, what ``auto`` chose before) vs ``svd: auto`` (range finder first),
the route taken and the relative difference of the merged deltas; a
TIES-like baseline (mergekit's magnitude sparsify + sum-consensus mask on the
same deltas) for scale.

Usage: ``python -m benchmarks.perf.bench_lowrank [--rows 2048 --cols 8192 --strength 0.05]``
"""

from __future__ import annotations

import argparse
import time

import torch

from mergekit_drm import rangefinder
from mergekit_drm.drm.kernel import drm_merge_matrix
from mergekit_drm.iso.kernel import iso_c_merge_matrix
from mergekit_drm.linalg_backends import record_stages
from mergekit_drm.tsv_m.kernel import tsv_merge_matrix


def lora_deltas(n_models, rows, cols, rank, strength, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = (0.02 * torch.randn(rows, cols, generator=gen)).to(torch.bfloat16)
    base_f = base.float()
    out = torch.empty((n_models, rows, cols))
    for t in range(n_models):
        product = torch.randn(rows, rank, generator=gen) @ torch.randn(rank, cols, generator=gen)
        product *= strength * base_f.norm() / product.norm()
        out[t] = (base_f + product).to(torch.bfloat16).float() - base_f
    return out


def ties_like(deltas, density=0.2):
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask
    from mergekit.sparsify import SparsificationMethod, sparsify

    stack = torch.stack([sparsify(d.clone(), density=density, method=SparsificationMethod.magnitude)
                         for d in deltas])
    mask = get_mask(stack, method="sum")
    return (stack * mask).sum(0) / mask.sum(0).clamp_min(1)


METHODS = {
    "drm-V": lambda d, svd: drm_merge_matrix(d, direction="vertical", svd=svd),
    "drm-H": lambda d, svd: drm_merge_matrix(d, direction="horizontal", svd=svd),
    "tsv_m": lambda d, svd: tsv_merge_matrix(list(d), svd=svd),
    "iso_c": lambda d, svd: iso_c_merge_matrix(list(d), svd=svd),
}


def timed(fn):
    with rangefinder.record_attempts() as records, record_stages() as stages:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    return out, seconds, records, stages


def describe(records):
    parts = []
    for record in records:
        attempt = record.get("attempt")
        if attempt is None:
            parts.append(record["route"])
        else:
            parts.append(f"{record['route']} ({attempt.outcome}, k {attempt.k}, {attempt.passes} passes, "
                         f"rank {attempt.rank})")
    counts = {}
    for part in parts:
        counts[part] = counts.get(part, 0) + 1
    return "; ".join(f"{n} x {p}" if n > 1 else p for p, n in counts.items())


def run(deltas, label, methods, lines, ties=True):
    if ties:
        _, seconds, _, _ = timed(lambda: ties_like(deltas))
        lines.append(f"| {label} | ties-like (density 0.2) | {seconds:.1f} | | | |")
        base = seconds
    else:
        base = None
    for name in methods:
        exact, t_exact, rec_exact, _ = timed(lambda: METHODS[name](deltas, "gram"))
        fast, t_fast, rec_fast, stages = timed(lambda: METHODS[name](deltas, "auto"))
        diff = float((fast - exact).norm() / exact.norm().clamp_min(1e-30))
        ratio = f" ({t_fast / base:.2f}x ties)" if base else ""
        if "sketch" in stages and not any(r["route"] == "lowrank" for r in rec_fast):
            # what a fall-through wasted: the probe passes, against the exact route's time
            ratio += f" (probe {stages['sketch']:.2f} s = {100 * stages['sketch'] / t_exact:.1f} %)"
        lines.append(
            f"| {label} | {name} | {t_exact:.1f} | {t_fast:.1f}{ratio} | {describe(rec_fast)} | {diff:.1e} |")
        print(lines[-1], flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=8192)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--strength", type=float, nargs="*", default=[0.05])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--dense", action="store_true", help="also the decaying full-rank stack")
    args = parser.parse_args(argv)
    lines = ["| deltas | method | exact route (s) | auto (s) | auto's route | merged rel. diff |",
             "|---|---|---|---|---|---|"]
    for strength in args.strength:
        deltas = lora_deltas(args.models, args.rows, args.cols, args.rank, strength)
        run(deltas, f"LoRA r{args.rank} x{args.models}, strength {strength}", args.methods, lines)
    if args.dense:
        from benchmarks.perf.bench_drm import finetune_like

        deltas = finetune_like(args.models, args.rows, args.cols, seed=1)
        run(deltas, f"dense decaying x{args.models}", args.methods, lines, ties=False)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
