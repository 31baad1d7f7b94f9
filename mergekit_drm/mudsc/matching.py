"""Matchers: turn unit similarities into maps from each model's units to merged units.

A *map* for model i is a long tensor ``index`` of length O: unit u of model i
becomes (part of) merged unit ``index[u]``. Alignment maps are permutations;
zip maps may send several units of one model to one merged unit and leave a
merged unit without members from some model.

* ``align_flat``: Hungarian assignment of every model to model 0 (a star;
  there is no cycle consistency between models 1..N-1, as in the reference).
* ``zip_flat``: ZipIt's greedy merge over all N*O units, re-matching penalty
  ``a``, same-model budget ``b``, stopping at O merged units.
* ``match_heads``: group matching for attention. Heads move whole; one head
  assignment moves Q, K, V and O together; with GQA a KV head carries its
  query heads (which may be re-ordered inside the group); V dims may be
  permuted inside a head; Q/K dims only where no rotary embedding fixes them,
  and then Q and K of a head share one permutation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from mergekit_drm.architectures import HeadLayout

NEG = float("-inf")


def lap_max(similarity: torch.Tensor) -> Tuple[np.ndarray, float]:
    """Column matched to each row maximizing total similarity; and that total."""
    sim = similarity.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(sim).all():
        raise FloatingPointError("similarity matrix has NaN or infinite entries")
    rows, cols = linear_sum_assignment(sim, maximize=True)
    order = np.empty(sim.shape[0], dtype=np.int64)
    order[rows] = cols
    return order, float(sim[rows, cols].sum())


def _inverse(match: np.ndarray) -> torch.Tensor:
    """index[b] = a for match[a] = b."""
    index = np.empty_like(match)
    index[match] = np.arange(len(match))
    return torch.from_numpy(index)


def align_flat(cross: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], float]:
    """Permutation maps for models 0..N-1 from the (model 0, model i) blocks."""
    units = cross[0].shape[0]
    maps = [torch.arange(units)]
    total = 0.0
    for block in cross:
        match, score = lap_max(block)
        maps.append(_inverse(match))
        total += score
    return maps, total / (units * len(cross))


def zip_flat(
    similarity: torch.Tensor,
    num_models: int,
    target: int,
    a: float = 0.5,
    b: float = 1.0,
) -> Tuple[List[torch.Tensor], float]:
    """ZipIt greedy matching on the full (N*O)^2 similarity, down to ``target`` units.

    Repeatedly fuses the most similar pair of live features (within or across
    models); the fused feature re-enters with the element-wise minimum of the
    two rows times ``a`` (``a <= 0`` bars it from fusing again). Each model may
    take part in ``b * (to_remove // N)`` within-model fusions, after which its
    within-model similarities are barred. Row maxima are cached, so a fusion
    costs O(N*O) rather than a scan of the whole matrix; the loop runs in numpy
    (single-threaded small vector ops; torch's thread pool only adds latency).
    The state the steps share (matrix, cached row maxima, budgets, members)
    lives in one ``_Zip`` object.
    """
    n = similarity.shape[0]
    sim = similarity.detach().to("cpu", torch.float32).numpy().copy()
    if not np.isfinite(sim).all():
        raise FloatingPointError("similarity matrix has NaN or infinite entries")
    zip_ = _Zip(sim, num_models, budget=int(b * ((n - target) // num_models)))
    scores = []
    for _ in range(n - target):
        r, c, best = zip_.best_pair()
        scores.append(best)
        zip_.fuse(r, c, a)
        zip_.charge_budget(r, c)
    return zip_.maps(), (sum(scores) / len(scores)) if scores else 1.0


class _Zip:
    """zip_flat's working state: the similarity matrix (fused rows replace
    their pair, dead rows are -inf), each row's cached best partner, the
    members of each live slot, and the within-model budgets."""

    def __init__(self, sim: np.ndarray, num_models: int, budget: int):
        n = sim.shape[0]
        np.fill_diagonal(sim, NEG)
        self.sim = sim
        self.n = n
        self.num_models = num_models
        self.units = n // num_models
        self.owner = np.arange(n) // self.units
        self.members: List[List[int]] = [[u] for u in range(n)]
        self.alive = np.ones(n, dtype=bool)
        self.budget = budget
        self.used = [0] * num_models
        self.row_arg = sim.argmax(axis=1)
        self.row_best = sim[np.arange(n), self.row_arg]
        for m in range(num_models):
            if budget <= 0:
                self.close_model(m)

    def rescan(self, rows: np.ndarray) -> None:
        if rows.size:
            args = self.sim[rows].argmax(axis=1)
            self.row_arg[rows] = args
            self.row_best[rows] = self.sim[rows, args]

    def close_model(self, m: int) -> None:
        """Bar every further fusion of two units of model ``m``."""
        block = slice(m * self.units, (m + 1) * self.units)
        self.sim[block, block] = NEG
        self.rescan(np.arange(m * self.units, (m + 1) * self.units))

    def best_pair(self) -> Tuple[int, int, float]:
        """The most similar live pair (r < c) and its similarity."""
        r = int(self.row_best.argmax())
        c = int(self.row_arg[r])
        best = float(self.row_best[r])
        if best == NEG:
            raise RuntimeError("zip ran out of admissible pairs; lower the same-model budget")
        return (r, c, best) if r < c else (c, r, best)

    def fuse(self, r: int, c: int, a: float) -> None:
        """Slot r takes c's members; its row becomes a * min of the two rows."""
        sim, alive, n = self.sim, self.alive, self.n
        self.members[r].extend(self.members[c])
        self.members[c] = []
        alive[c] = False
        if a <= 0:
            fused = np.full(n, NEG, dtype=np.float32)
        else:
            fused = np.minimum(sim[r], sim[c]) * np.float32(a)
            fused[~alive] = NEG
        fused[r] = NEG
        sim[r, :] = fused
        sim[:, r] = fused
        sim[c, :] = NEG
        sim[:, c] = NEG
        self.row_best[c] = NEG
        # rows whose best partner was r or c rescan; the others can only gain via column r
        stale = ((self.row_arg == r) | (self.row_arg == c)) & alive
        stale[r] = True
        gain = (fused > self.row_best) & alive & ~stale
        self.row_best[gain] = fused[gain]
        self.row_arg[gain] = r
        self.rescan(np.flatnonzero(stale))

    def charge_budget(self, r: int, c: int) -> None:
        """A within-model fusion uses that model's budget; at its end the model closes."""
        if self.owner[r] == self.owner[c]:
            m = int(self.owner[r])
            self.used[m] += 1
            if self.used[m] >= self.budget:
                self.close_model(m)

    def maps(self) -> List[torch.Tensor]:
        """Each model's unit -> merged slot, slots ordered by their first member."""
        slots = sorted((s for s in range(self.n) if self.alive[s]), key=lambda s: min(self.members[s]))
        maps = [torch.empty(self.units, dtype=torch.long) for _ in range(self.num_models)]
        for k, s in enumerate(slots):
            for u in self.members[s]:
                maps[u // self.units][u % self.units] = k
        return maps


# --- attention ----------------------------------------------------------------


@dataclass
class HeadMatch:
    """Model i's heads matched to model 0's: for each reference KV head g,
    ``kv[g]`` is model i's KV head, ``query[g][r]`` its query head (within the
    group) for reference query slot r, ``qk[g][j]`` its Q/K dim for reference
    dim j, ``v[g][j]`` its V dim."""

    kv: np.ndarray
    query: List[np.ndarray]
    qk: List[np.ndarray]
    v: List[np.ndarray]
    score: float


def _diag_mean(block: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(block, dim1=-2, dim2=-1).mean(-1)


def match_heads(
    sq: torch.Tensor, sk: torch.Tensor, sv: torch.Tensor, layout: HeadLayout
) -> HeadMatch:
    """Group matching of one model's heads to model 0's (cross blocks in)."""
    kv, rep, d = layout.num_kv_heads, layout.group_size, layout.head_dim
    q6 = sq.reshape(kv, rep, d, kv, rep, d).permute(0, 1, 3, 4, 2, 5)  # g r g' r' d d
    k4 = sk.reshape(kv, d, kv, d).permute(0, 2, 1, 3)  # g g' d d
    v4 = sv.reshape(kv, d, kv, d).permute(0, 2, 1, 3)
    if not layout.rope and rep != 1:
        raise ValueError("within-head Q/K permutations with grouped KV heads are not supported")
    qdiag = _diag_mean(q6)  # g r g' r'
    kdiag = _diag_mean(k4)  # g g'
    pair_score = np.zeros((kv, kv))
    pair = {}
    units = rep * d + 2 * d
    for g in range(kv):
        for h in range(kv):
            if rep > 1:
                tau, qsum = lap_max(qdiag[g, :, h, :])
                qsum *= d
            else:
                tau, qsum = np.zeros(1, dtype=np.int64), 0.0
            if layout.rope:
                rho = np.arange(d)
                qsum = qsum if rep > 1 else float(qdiag[g, 0, h, 0]) * d
                ksum = float(kdiag[g, h]) * d
            else:
                rho, qksum = lap_max(q6[g, 0, h, 0] + k4[g, h])
                qsum, ksum = qksum, 0.0
            sigma, vsum = lap_max(v4[g, h])
            pair[g, h] = (tau, rho, sigma)
            pair_score[g, h] = (qsum + ksum + vsum) / units
    kv_match, total = lap_max(torch.from_numpy(pair_score))
    return HeadMatch(
        kv=kv_match,
        query=[pair[g, kv_match[g]][0] for g in range(kv)],
        qk=[pair[g, kv_match[g]][1] for g in range(kv)],
        v=[pair[g, kv_match[g]][2] for g in range(kv)],
        score=total / kv,
    )


def head_maps(match: HeadMatch, layout: HeadLayout, v_dims: Optional[List[np.ndarray]] = None):
    """Index maps of the q, k, v and o spaces of the matched model.

    ``v_dims`` overrides the V-dim map: for each reference KV head, the merged
    dim of each of the matched head's dims (zip); default from ``match.v``.
    """
    kv, rep, d = layout.num_kv_heads, layout.group_size, layout.head_dim
    q = np.empty(kv * rep * d, dtype=np.int64)
    k = np.empty(kv * d, dtype=np.int64)
    v = np.empty(kv * d, dtype=np.int64)
    o = np.empty(kv * rep * d, dtype=np.int64)
    dims = np.arange(d)
    for g in range(kv):
        h = match.kv[g]
        rho = match.qk[g]
        if v_dims is None:
            v_of = np.empty(d, dtype=np.int64)
            v_of[match.v[g]] = dims  # own dim -> merged dim
        else:
            v_of = v_dims[g]
        k[h * d + rho] = g * d + dims
        v[h * d + dims] = g * d + v_of
        for r in range(rep):
            own = h * rep + match.query[g][r]
            ref = g * rep + r
            q[own * d + rho] = ref * d + dims
            o[own * d + dims] = ref * d + v_of
    return {name: torch.from_numpy(x) for name, x in (("q", q), ("k", k), ("v", v), ("o", o))}


def identity_head_match(layout: HeadLayout) -> HeadMatch:
    kv, rep, d = layout.num_kv_heads, layout.group_size, layout.head_dim
    return HeadMatch(
        kv=np.arange(kv),
        query=[np.arange(rep) for _ in range(kv)],
        qk=[np.arange(d) for _ in range(kv)],
        v=[np.arange(d) for _ in range(kv)],
        score=0.0,
    )
