"""Executing a LoRA merge plan: the method's low-rank kernel per target matrix.

Fused projections merge part by part (``lowrank.merge_lowrank_parts``); an
optional fixed ``rank`` truncates each merged delta by an SVD of its factors
and zero-pads lower ranks. Nothing n x m is formed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from mergekit_drm.lora.lowrank import merge_lowrank_parts, pad_rank, truncate_factors
from mergekit_drm.lora.methods import LoraMergeError
from mergekit_drm.lora.plan import LoraMergePlan


@dataclass
class MergedModule:
    name: str
    B: torch.Tensor  # (n, r)
    A: torch.Tensor  # (r, m); delta = B @ A (scaling 1)
    merged_rank: int  # rank the merge produced (before truncation / padding)
    truncation_error: float = 0.0  # relative Frobenius error of the cut


@dataclass
class LoraMergeResult:
    modules: List[MergedModule]
    rank: Optional[int]
    seconds: float

    def truncation_summary(self) -> Tuple[float, float]:
        """(largest per-module relative error, whole-adapter relative error)."""
        worst = max((m.truncation_error for m in self.modules), default=0.0)
        num = den = 0.0
        for module in self.modules:
            norm = _factored_norm(module.B, module.A)
            # ||full||^2 = ||kept||^2 / (1 - e^2); ||cut||^2 = ||full||^2 e^2
            e = module.truncation_error
            full = norm**2 / max(1.0 - e * e, 1e-300)
            num += full * e * e
            den += full
        return worst, math.sqrt(num / den) if den > 0 else 0.0


def _factored_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """||B @ A||_F without forming it: sqrt(trace((B^T B)(A A^T)))."""
    B64, A64 = B.to(torch.float64), A.to(torch.float64)
    value = float(((B64.T @ B64) * (A64 @ A64.T)).sum())
    return math.sqrt(max(value, 0.0))


def execute_plan(
    plan: LoraMergePlan,
    *,
    rank: Optional[int] = None,
    device: str | torch.device = "cpu",
) -> LoraMergeResult:
    """The plan's method per target matrix on the adapters' factors."""
    if rank is not None and rank < 1:
        raise LoraMergeError(f"--rank must be >= 1, got {rank}")
    start = time.perf_counter()
    out: List[MergedModule] = []
    for module in plan.modules:
        factors = [entry.adapter.modules.get(module.name) for entry in plan.entries]
        B, A = merge_lowrank_parts(
            plan.method.merge,
            factors,
            module.weights,
            shape=module.shape,
            parts=module.parts,
            device=device,
            **module.kwargs,
        )
        merged_rank = B.shape[1]
        error = 0.0
        if rank is not None:
            B, A, error = truncate_factors(B, A, rank)
            B, A = pad_rank(B, A, rank)
        elif merged_rank == 0:
            B, A = pad_rank(B, A, 1)  # PEFT needs r >= 1; the delta stays zero
        out.append(MergedModule(module.name, B.cpu(), A.cpu(), merged_rank, error))
    return LoraMergeResult(modules=out, rank=rank, seconds=time.perf_counter() - start)
