"""MuDSC's alignment search on plain tensors (no mergekit, no files).

Algorithm 1 of the paper: start from activation-only matches, then sweep the
groups in a seeded random order; each visit rebuilds the group's weight-space
similarity with its neighbours' current maps applied, blends it with the
activation similarity (``alpha`` on the weight side), and re-matches. The best
set of maps is kept; a sweep that does not improve the objective (mean matched
similarity over groups) reverts to it, and ``patience`` such sweeps stop the
search.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from mergekit_drm.mudsc.alignment import Alignment, Maps, axis_index, move_in
from mergekit_drm.mudsc.matching import (
    align_flat,
    head_maps,
    identity_head_match,
    match_heads,
    zip_flat,
)
from mergekit_drm.mudsc.similarity import Comoments, blend, cross_blocks
from mergekit_drm.mudsc.specs import Group, PermutationSpec, TensorSpec
from mergekit_drm.parameters import ALPHA, MUDSC_MODE, check

log = logging.getLogger(__name__)

ZIP_PENALTY = 0.5  # ZipIt's `a`: a fused unit re-enters at half its similarity
ZIP_BUDGET = 1.0  # ZipIt's `b`: same-model fusions allowed, per model


@dataclass(frozen=True)
class SolverOptions:
    alpha: float = 0.5
    mode: str = "align"
    iterations: int = 100
    patience: int = 5
    seed: int = 0



def similarity_spaces(group: Group) -> List[str]:
    return ["q", "k", "v"] if group.is_attention else [s for s, _ in group.spaces]


def identity_maps(spec: PermutationSpec, num_models: int) -> Maps:
    return {
        g.name: {space: [torch.arange(size) for _ in range(num_models)] for space, size in g.spaces}
        for g in spec.groups.values()
    }


# --- weight-space features ------------------------------------------------------


def _neighbour_mapped(spec_t: TensorSpec, tensor: torch.Tensor, keep: int, maps: Maps, model: int):
    t = tensor
    for axis in spec_t.axes:
        if axis.axis != keep:
            # each merged slot: the mean of this model's entries mapped to it
            t = move_in(t, axis.axis, axis_index(maps, axis, model), axis.length, mean=True)
    return t


def _query_order(maps: Maps, group: Group, model: int) -> torch.Tensor:
    """For each own KV head, its query heads in the order of the merged slots."""
    lay = group.heads
    q = maps[group.name]["q"][model]
    merged_head = q.reshape(lay.num_heads, lay.head_dim)[:, 0] // lay.head_dim
    slot = (merged_head % lay.group_size).reshape(lay.num_kv_heads, lay.group_size)
    return torch.argsort(slot, dim=1)


def unit_features(
    spec: PermutationSpec,
    group: Group,
    space: str,
    tensors: Mapping[str, torch.Tensor],
    maps: Maps,
    model: int,
):
    """Yield (O, F) blocks: each unit's attached parameters, neighbours mapped."""
    for spec_t in spec.tensors_touching(group.name):
        tensor = None
        for axis in spec_t.axes:
            offset = 0
            for seg in axis.segments:
                start = offset
                offset += seg.length
                if seg.group != group.name:
                    continue
                wanted = seg.space == space or (space == "v" and seg.space == "o")
                if not wanted:
                    continue
                if tensor is None:
                    tensor = tensors[spec_t.name].to(torch.float32)
                t = _neighbour_mapped(spec_t, tensor, axis.axis, maps, model)
                t = t.movedim(axis.axis, 0)[start:start + seg.length].reshape(seg.length, -1)
                if seg.space == "o" and space == "v":
                    lay = group.heads
                    rest = t.shape[1]
                    t = t.reshape(lay.num_kv_heads, lay.group_size, lay.head_dim, rest)
                    order = _query_order(maps, group, model).to(t.device)
                    t = torch.stack([t[h, order[h]] for h in range(lay.num_kv_heads)])
                    t = t.permute(0, 2, 1, 3).reshape(lay.num_kv_heads * lay.head_dim, -1)
                yield t


def weight_similarity(
    spec: PermutationSpec,
    group: Group,
    weights: Sequence[Mapping[str, torch.Tensor]],
    maps: Maps,
    full: bool,
) -> Dict[str, torch.Tensor]:
    out = {}
    sizes = group.space_sizes
    for space in similarity_spaces(group):
        moments = Comoments(len(weights), sizes[space], full)
        streams = [unit_features(spec, group, space, w, maps, i) for i, w in enumerate(weights)]
        for blocks in zip(*streams):
            moments.add([b.T for b in blocks])
        out[space] = moments.correlation()
    return out


# --- matching a group ---------------------------------------------------------------


def match_group(group: Group, sims: Mapping[str, torch.Tensor], num_models: int, mode: str):
    full = mode == "zip"
    sizes = group.space_sizes
    if not group.is_attention:
        if mode == "align":
            maps, score = align_flat(cross_blocks(sims["unit"], num_models, full))
        else:
            maps, score = zip_flat(sims["unit"], num_models, sizes["unit"], ZIP_PENALTY, ZIP_BUDGET)
        return {"unit": maps}, score

    lay = group.heads
    cross = {s: cross_blocks(sims[s], num_models, full) for s in ("q", "k", "v")}
    matches = [identity_head_match(lay)]
    for i in range(num_models - 1):
        matches.append(match_heads(cross["q"][i], cross["k"][i], cross["v"][i], lay))
    if mode == "align":
        per_model = [head_maps(m, lay) for m in matches]
        score = float(np.mean([m.score for m in matches[1:]]))
    else:
        d = lay.head_dim
        ov = sizes["v"]
        v_dims = [[None] * lay.num_kv_heads for _ in range(num_models)]
        scores = []
        for g in range(lay.num_kv_heads):
            units = torch.cat([
                i * ov + int(matches[i].kv[g]) * d + torch.arange(d) for i in range(num_models)
            ])
            sub = sims["v"][units][:, units]
            zmaps, zscore = zip_flat(sub, num_models, d, ZIP_PENALTY, ZIP_BUDGET)
            scores.append(zscore)
            for i in range(num_models):
                v_dims[i][g] = zmaps[i].numpy()
        per_model = [head_maps(matches[i], lay, v_dims[i]) for i in range(num_models)]
        score = float(np.mean(scores))
    return {s: [pm[s] for pm in per_model] for s in ("q", "k", "v", "o")}, score


# --- the search -----------------------------------------------------------------------


def _check_solve(options: SolverOptions, n: int, activation) -> None:
    check(MUDSC_MODE, "mode", options.mode, "mudsc")
    check(ALPHA, "alpha", options.alpha, "mudsc")
    if n < 2:
        raise ValueError("mudsc merges at least 2 models")
    if options.alpha < 1.0 and activation is None:
        raise ValueError("mudsc with alpha < 1 needs activation similarities (calibration data)")


def solve(
    spec: PermutationSpec,
    weights: Sequence[Mapping[str, torch.Tensor]],
    activation: Optional[Mapping[str, Mapping[str, torch.Tensor]]],
    options: SolverOptions,
    progress: Optional[Callable[[str], None]] = None,
) -> Alignment:
    """Maps for every group of ``spec`` (model 0 is the reference).

    alpha < 1: one pass matching every group on activations alone (the
    starting point); alpha > 0: sweeps of weight-aware re-matching until
    the mean matched similarity stops improving (``_Search.sweep``).
    """
    _check_solve(options, len(weights), activation)
    started = time.perf_counter()
    search = _Search(spec, weights, activation, options)
    if options.alpha < 1.0:
        for group in search.groups:
            search.visit(group, use_weights=False)
    history: List[float] = []
    sweeps = 0
    if options.alpha > 0.0:
        history, sweeps = search.sweep(progress or (lambda message: None))
    elif search.scores:
        history.append(float(np.mean(list(search.scores.values()))))
    metadata = dict(
        alpha=options.alpha, mode=options.mode, iterations=options.iterations,
        patience=options.patience, seed=options.seed, sweeps=sweeps,
        objective_history=history, group_scores=dict(search.scores),
        solve_seconds=time.perf_counter() - started, architecture=spec.architecture,
    )
    return Alignment(len(weights), search.maps, metadata=metadata)


class _Search:
    """The maps and per-group scores that ``solve``'s steps update."""

    def __init__(self, spec: PermutationSpec, weights, activation, options: SolverOptions):
        self.spec, self.weights, self.activation, self.options = spec, weights, activation, options
        self.n = len(weights)
        self.groups = list(spec.groups.values())
        self.maps = identity_maps(spec, self.n)
        self.scores: Dict[str, float] = {}

    def visit(self, group: Group, use_weights: bool) -> None:
        """Re-match one group under the other groups' current maps."""
        options = self.options
        wsim = (weight_similarity(self.spec, group, self.weights, self.maps, options.mode == "zip")
                if use_weights else {})
        sims = {
            space: blend(wsim.get(space),
                         None if self.activation is None else self.activation[group.name][space],
                         options.alpha)
            for space in similarity_spaces(group)
        }
        new_maps, score = match_group(group, sims, self.n, options.mode)
        self.maps[group.name] = new_maps
        self.scores[group.name] = score

    def sweep(self, say: Callable[[str], None]) -> Tuple[List[float], int]:
        """Sweeps over the groups in random order; a sweep that does not improve
        the mean score is undone, ``patience`` of them in a row stop the search.
        Leaves the best maps and scores; returns (objective per sweep, sweeps)."""
        options = self.options
        rng = np.random.default_rng(options.seed)
        best_maps, best, best_scores = copy.deepcopy(self.maps), float("-inf"), dict(self.scores)
        history: List[float] = []
        stale = sweeps = 0
        for sweep in range(options.iterations):
            for k in rng.permutation(len(self.groups)):
                self.visit(self.groups[k], use_weights=True)
            sweeps += 1
            objective = float(np.mean([self.scores[g.name] for g in self.groups]))
            history.append(objective)
            say(f"mudsc sweep {sweep + 1}: mean matched similarity {objective:.6f}")
            if objective > best + 1e-9:
                best, best_maps, stale = objective, copy.deepcopy(self.maps), 0
                best_scores = dict(self.scores)
            else:
                stale += 1
                self.maps = copy.deepcopy(best_maps)
                if stale >= options.patience:
                    break
        self.maps, self.scores = best_maps, best_scores
        return history, sweeps
