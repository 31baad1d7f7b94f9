"""What the package knows of each architecture: one table, keyed by ``model_type``.

Every method reads its per-architecture facts here, never guesses them from
shapes:

* ``conv1d``: tensors stored [in, out] (GPT-2's ``Conv1D``), the transpose of
  ``nn.Linear``. DRM transposes them so ``direction`` means the layer's axes,
  MuDSC swaps the axes its specs describe in Linear terms, the LoRA planner
  compares adapter shapes with the stored ones;
* ``fused``: one stored matrix holding several projections (Q, K, V; gate and
  up). DRM merges each part on its own; MuDSC places each part in its
  attention space. Some fusions interleave the parts per head (GPT-NeoX,
  Falcon), so a layout is ``groups`` repetitions of the part sizes along the
  output axis;
* ``vocabulary``: tensors with a vocabulary axis (embeddings, output heads),
  which the LoRA route cannot merge on factors;
* ``attention``: head counts, head size and whether RoPE is applied (which
  forbids permuting dimensions inside a head);
* ``permutation``: which MuDSC spec builder (``mudsc/specs.py``) describes the
  model's units, or None where MuDSC does not support it.

Patterns are regexes over tensor names. Adding an architecture means adding an
entry to ``ARCHITECTURES``. The module imports no heavy library at load time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

if TYPE_CHECKING:
    import torch

# (groups, ((part name, rows per group), ...)) computed from the model config.
LayoutFn = Callable[[Any], Tuple[int, Tuple[Tuple[str, int], ...]]]


@dataclass(frozen=True)
class HeadLayout:
    """Attention head layout; ``rope`` forbids within-head Q/K permutations."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: bool

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class FusedProjection:
    """A stored matrix whose output rows hold several projections."""

    pattern: str
    layout: LayoutFn


@dataclass(frozen=True)
class Architecture:
    conv1d: Tuple[str, ...] = ()
    fused: Tuple[FusedProjection, ...] = ()
    vocabulary: Tuple[str, ...] = ()
    attention: Optional[Callable[[Any], HeadLayout]] = None
    permutation: Optional[str] = None


def _rope_attention(config) -> HeadLayout:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return HeadLayout(heads, kv, head_dim, rope=True)


def _gpt2_attention(config) -> HeadLayout:
    return HeadLayout(config.n_head, config.n_head, config.n_embd // config.n_head, rope=False)


def _bert_attention(config) -> HeadLayout:
    heads = config.num_attention_heads
    return HeadLayout(heads, heads, config.hidden_size // heads, rope=False)


def _neox_attention(config) -> HeadLayout:
    heads = config.num_attention_heads
    return HeadLayout(heads, heads, config.hidden_size // heads, rope=True)


def _falcon_attention(config) -> HeadLayout:
    heads = config.num_attention_heads
    if getattr(config, "new_decoder_architecture", False):
        kv = getattr(config, "num_kv_heads", None) or heads
    elif getattr(config, "multi_query", False):
        kv = 1
    else:
        kv = heads
    rope = not getattr(config, "alibi", False)
    return HeadLayout(heads, kv, config.hidden_size // heads, rope)


def _qkv(config, attention) -> Tuple[int, Tuple[Tuple[str, int], ...]]:
    """Q, K, V stacked whole: all query heads, then all key, then all value heads."""
    a = attention(config)
    return 1, (("q", a.num_heads * a.head_dim), ("k", a.num_kv_heads * a.head_dim),
               ("v", a.num_kv_heads * a.head_dim))


def _neox_qkv(config):
    # query_key_value rows are (heads, 3, head_dim): q, k, v per head.
    d = _neox_attention(config).head_dim
    return config.num_attention_heads, (("q", d), ("k", d), ("v", d))


def _falcon_qkv(config):
    a = _falcon_attention(config)
    d = a.head_dim
    if getattr(config, "new_decoder_architecture", False):
        # rows are (kv_heads, heads/kv_heads + 2, head_dim): a query group, k, v.
        return a.num_kv_heads, (("q", a.group_size * d), ("k", d), ("v", d))
    if getattr(config, "multi_query", False):
        return 1, (("q", a.num_heads * d), ("k", d), ("v", d))
    return a.num_heads, (("q", d), ("k", d), ("v", d))


def _gate_up(config):
    return 1, (("gate", config.intermediate_size), ("up", config.intermediate_size))


def _names(*leaves: str) -> Tuple[str, ...]:
    """Patterns for the ``.weight`` of modules with these leaf names."""
    return tuple(rf"(^|\.){re.escape(leaf)}\.weight$" for leaf in leaves)


_LLAMA_LIKE = Architecture(
    vocabulary=_names("embed_tokens", "lm_head"),
    attention=_rope_attention,
    permutation="llama",
)

ARCHITECTURES: Dict[str, Architecture] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gpt2": Architecture(
        conv1d=_names("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        fused=(FusedProjection(_names("attn.c_attn")[0], lambda c: _qkv(c, _gpt2_attention)),),
        vocabulary=_names("wte", "lm_head"),
        attention=_gpt2_attention,
        permutation="gpt2",
    ),
    "bert": Architecture(
        vocabulary=_names("word_embeddings", "decoder"),
        attention=_bert_attention,
        permutation="bert",
    ),
    "phi3": Architecture(
        fused=(
            FusedProjection(_names("self_attn.qkv_proj")[0], lambda c: _qkv(c, _rope_attention)),
            FusedProjection(_names("mlp.gate_up_proj")[0], _gate_up),
        ),
        vocabulary=_names("embed_tokens", "lm_head"),
        attention=_rope_attention,
    ),
    "gpt_neox": Architecture(
        fused=(FusedProjection(_names("attention.query_key_value")[0], _neox_qkv),),
        vocabulary=_names("embed_in", "embed_out"),
        attention=_neox_attention,
    ),
    "falcon": Architecture(
        fused=(FusedProjection(_names("self_attention.query_key_value")[0], _falcon_qkv),),
        vocabulary=_names("word_embeddings", "lm_head"),
        attention=_falcon_attention,
    ),
}


def architecture(model_type: Optional[str]) -> Optional[Architecture]:
    return ARCHITECTURES.get(model_type or "")


def is_conv1d(model_type: Optional[str], name: str) -> bool:
    """Whether tensor ``name`` is stored [in, out]."""
    arch = architecture(model_type)
    return arch is not None and any(re.search(p, name) for p in arch.conv1d)


def is_vocabulary(model_type: Optional[str], name: str) -> bool:
    """Whether tensor ``name`` has a vocabulary axis; an unknown architecture
    is judged by every entry's patterns."""
    arch = architecture(model_type)
    entries = [arch] if arch is not None else ARCHITECTURES.values()
    return any(re.search(p, name) for a in entries for p in a.vocabulary)


def may_be_fused(name: str) -> bool:
    """Whether ``name`` is a fused projection in any known architecture."""
    return any(re.search(f.pattern, name) for a in ARCHITECTURES.values() for f in a.fused)


def fused_layout(
    model_type: Optional[str], name: str, config: Any
) -> Optional[Tuple[int, Tuple[Tuple[str, int], ...]]]:
    """(groups, ((part, rows per group), ...)) of a fused tensor, else None."""
    arch = architecture(model_type)
    for fused in arch.fused if arch is not None else ():
        if re.search(fused.pattern, name):
            return fused.layout(config)
    return None


@dataclass(frozen=True)
class MatrixLayout:
    """How to view one stored tensor as nn.Linear matrices for DRM."""

    transposed: bool = False
    # Row indices (in Linear layout) of each fused part; None = one matrix.
    parts: Optional[Tuple[Tuple[str, torch.Tensor], ...]] = None


def matrix_layout(
    name: str, model_type: Optional[str], config: Any, shape: Tuple[int, ...]
) -> MatrixLayout:
    """The layout of tensor ``name`` (stored ``shape``) for a model of ``model_type``."""
    transposed = is_conv1d(model_type, name)
    rows = shape[1] if transposed else shape[0]
    layout = fused_layout(model_type, name, config)
    if layout is None:
        return MatrixLayout(transposed)
    groups, sizes = layout
    return MatrixLayout(transposed, _part_rows(name, rows, groups, sizes))


def _part_rows(name, rows, groups, sizes):
    import torch

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
