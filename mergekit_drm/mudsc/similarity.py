"""Streaming Pearson correlation between the units of N models.

Both of MuDSC's similarities are Pearson correlations between units, computed
over a *sample* axis: tokens for activations, the entries of each unit's
attached weights for the weight space. Samples arrive in chunks (batches,
tensors): each chunk is shifted by a per-unit reference (the first chunk's
mean), multiplied in float32 and accumulated in float64; the correlation is
formed once at the end.

``full=False`` (alignment) keeps only what matching against model 0 needs:
the cross blocks (model 0, model i) and each unit's own mean and variance, so
memory is (N - 1) * O^2 rather than (N * O)^2. ``full=True`` (zip) keeps the
whole (N * O)^2 matrix, within-model pairs included.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

STD_FLOOR = 1e-7


class Comoments:
    """Running sums for the correlation of N models' units (O units each)."""

    def __init__(self, num_models: int, units: int, full: bool, device=None):
        self.num_models = num_models
        self.units = units
        self.full = full
        self.count = 0
        self.shift: Optional[torch.Tensor] = None
        dev = device or "cpu"
        f64 = torch.float64
        self.sums = torch.zeros(num_models, units, dtype=f64, device=dev)
        self.squares = torch.zeros(num_models, units, dtype=f64, device=dev)
        if full:
            self.products = torch.zeros(num_models * units, num_models * units, dtype=f64, device=dev)
        else:
            self.products = torch.zeros(max(num_models - 1, 0), units, units, dtype=f64, device=dev)

    def add(self, samples: Sequence[torch.Tensor]) -> None:
        """Add one chunk: ``samples[i]`` is (S, O) for model i, same S for all.

        Each chunk is shifted by the first chunk's per-unit mean (which
        removes the cancellation in E[xy] - E[x]E[y]), multiplied in float32
        (GEMM speed on CPU and GPU) and accumulated in float64.
        """
        xs = [x.to(self.sums.device, torch.float32) for x in samples]
        s = xs[0].shape[0]
        for i, x in enumerate(xs):
            if x.shape != (s, self.units):
                raise ValueError(
                    f"model {i}: expected samples of shape ({s}, {self.units}), got {tuple(x.shape)}"
                )
        if self.shift is None:
            self.shift = torch.stack([x.mean(0) for x in xs])
        xs = [x - self.shift[i] for i, x in enumerate(xs)]
        for i, x in enumerate(xs):
            self.sums[i] += x.sum(0, dtype=torch.float64)
            self.squares[i] += (x * x).sum(0, dtype=torch.float64)
        if self.full:
            stacked = torch.cat(xs, dim=1)
            self.products += (stacked.T @ stacked).to(torch.float64)
        else:
            for i in range(1, len(xs)):
                self.products[i - 1] += (xs[0].T @ xs[i]).to(torch.float64)
        self.count += s

    def correlation(self) -> torch.Tensor:
        """float32 Pearson: (N*O, N*O) if full, else (N-1, O, O) cross blocks."""
        if self.count == 0:
            raise ValueError("no samples were accumulated")
        n = float(self.count)
        mean = self.sums / n
        var = (self.squares / n - mean * mean).clamp_min(0)
        std = var.sqrt().clamp_min(STD_FLOOR)
        if self.full:
            m = mean.reshape(-1)
            sd = std.reshape(-1)
            cov = self.products / n - torch.outer(m, m)
            corr = cov / torch.outer(sd, sd)
        else:
            cov = self.products / n - mean[0][None, :, None] * mean[1:, None, :]
            corr = cov / (std[0][None, :, None] * std[1:, None, :])
        return corr.clamp_(-1.0, 1.0).to(torch.float32)


def cross_blocks(corr: torch.Tensor, num_models: int, full: bool) -> List[torch.Tensor]:
    """The (model 0, model i) blocks, i = 1..N-1, of either storage form."""
    if not full:
        return [corr[i] for i in range(corr.shape[0])]
    o = corr.shape[0] // num_models
    return [corr[:o, i * o:(i + 1) * o] for i in range(1, num_models)]


def blend(weight: Optional[torch.Tensor], activation: Optional[torch.Tensor], alpha: float) -> torch.Tensor:
    """alpha * weight-space + (1 - alpha) * activation-space similarity."""
    if activation is None or alpha >= 1.0:
        if weight is None:
            raise ValueError("no similarity available")
        return weight
    if weight is None or alpha <= 0.0:
        return activation
    return weight * alpha + activation * (1.0 - alpha)
