"""Per-architecture facts DRM needs, as tables.

Two facts matter to a per-matrix method:

* storage layout: GPT-2's ``Conv1D`` stores weights as [in, out], the
  transpose of ``nn.Linear``. DRM's ``direction`` refers to the layer's input
  and output axes, so those tensors are transposed before the merge;
* fused projections: one stored matrix holding several projections (Q, K, V;
  gate and up). Each projection is merged on its own and re-packed. Some
  fusions interleave the parts per head (GPT-NeoX, Falcon), so a layout is
  ``groups`` repetitions of the part sizes along the output axis.

Rules are keyed by the ``model_type`` of the model's config (what mergekit
uses to pick its architecture definition), never guessed from shapes.
Adding an architecture means adding an entry to ``RULES``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

# (groups, ((part name, rows per group), ...)) computed from the model config.
LayoutFn = Callable[[Any], Tuple[int, Tuple[Tuple[str, int], ...]]]


@dataclass(frozen=True)
class FusedProjection:
    """A stored matrix whose output rows hold several projections."""

    pattern: str
    layout: LayoutFn


@dataclass(frozen=True)
class ArchitectureRules:
    conv1d: Tuple[str, ...] = ()
    fused: Tuple[FusedProjection, ...] = field(default_factory=tuple)


def _head_dim(config) -> int:
    head_dim = getattr(config, "head_dim", None)
    return head_dim or config.hidden_size // config.num_attention_heads


def _phi3_qkv(config):
    d = _head_dim(config)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return 1, (("q", heads * d), ("k", kv * d), ("v", kv * d))


def _neox_qkv(config):
    # query_key_value rows are (heads, 3, head_dim): q, k, v per head.
    d = config.hidden_size // config.num_attention_heads
    return config.num_attention_heads, (("q", d), ("k", d), ("v", d))


def _falcon_qkv(config):
    heads = config.num_attention_heads
    d = config.hidden_size // heads
    if getattr(config, "new_decoder_architecture", False):
        # rows are (kv_heads, heads/kv_heads + 2, head_dim): a query group, k, v.
        kv = getattr(config, "num_kv_heads", None) or heads
        return kv, (("q", heads // kv * d), ("k", d), ("v", d))
    if getattr(config, "multi_query", False):
        return 1, (("q", heads * d), ("k", d), ("v", d))
    return heads, (("q", d), ("k", d), ("v", d))


RULES: Dict[str, ArchitectureRules] = {
    "gpt2": ArchitectureRules(
        conv1d=(
            r"(^|\.)attn\.c_attn\.weight$",
            r"(^|\.)attn\.c_proj\.weight$",
            r"(^|\.)mlp\.c_fc\.weight$",
            r"(^|\.)mlp\.c_proj\.weight$",
        ),
        fused=(
            FusedProjection(
                r"(^|\.)attn\.c_attn\.weight$",
                lambda c: (1, (("q", c.n_embd), ("k", c.n_embd), ("v", c.n_embd))),
            ),
        ),
    ),
    "phi3": ArchitectureRules(
        fused=(
            FusedProjection(r"(^|\.)self_attn\.qkv_proj\.weight$", _phi3_qkv),
            FusedProjection(
                r"(^|\.)mlp\.gate_up_proj\.weight$",
                lambda c: (
                    1,
                    (("gate", c.intermediate_size), ("up", c.intermediate_size)),
                ),
            ),
        )
    ),
    "gpt_neox": ArchitectureRules(
        fused=(
            FusedProjection(r"(^|\.)attention\.query_key_value\.weight$", _neox_qkv),
        )
    ),
    "falcon": ArchitectureRules(
        fused=(
            FusedProjection(
                r"(^|\.)self_attention\.query_key_value\.weight$", _falcon_qkv
            ),
        )
    ),
}


@dataclass(frozen=True)
class MatrixLayout:
    """How to view one stored tensor as nn.Linear matrices for DRM."""

    transposed: bool = False
    # Row indices (in Linear layout) of each fused part; None = one matrix.
    parts: Optional[Tuple[Tuple[str, torch.Tensor], ...]] = None


def matrix_layout(
    name: str, model_type: Optional[str], config: Any, shape: Tuple[int, ...]
) -> MatrixLayout:
    """The layout of tensor ``name`` for a model of ``model_type``."""
    rules = RULES.get(model_type or "")
    if rules is None:
        return MatrixLayout()
    transposed = any(re.search(p, name) for p in rules.conv1d)
    rows = shape[1] if transposed else shape[0]
    for fused in rules.fused:
        if re.search(fused.pattern, name):
            groups, sizes = fused.layout(config)
            return MatrixLayout(transposed, _part_rows(name, rows, groups, sizes))
    return MatrixLayout(transposed)


def _part_rows(name, rows, groups, sizes):
    stride = sum(size for _, size in sizes)
    if groups * stride != rows:
        described = " + ".join(f"{part} {size}" for part, size in sizes)
        raise ValueError(
            f"{name}: expected {groups} x ({described}) = {groups * stride} fused "
            f"output rows from the model config, found {rows}. The checkpoint does "
            "not match its config.json; fix the config (head counts, hidden size)."
        )
    parts: List[Tuple[str, torch.Tensor]] = []
    offset = 0
    for part, size in sizes:
        starts = torch.arange(groups) * stride + offset
        index = (starts[:, None] + torch.arange(size)[None, :]).reshape(-1)
        parts.append((part, index))
        offset += size
    return tuple(parts)
