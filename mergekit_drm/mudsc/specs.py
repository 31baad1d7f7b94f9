"""Permutation specs: which tensor axes move with which units, per architecture.

A *group* is a set of units that must be permuted together for the network to
compute the same function: the residual stream (one group for the whole
model), each layer's MLP hidden units, each layer's attention heads. A group
has one or more index *spaces*: a flat group has one (``unit``); an attention
group has four (``q``, ``k``, ``v`` rows and the ``o`` input columns), tied
together by the head layout. Every tensor axis that moves is listed with its
group, space and *role*: ``out`` (the axis produces the units: rows of a
projection, a bias, a norm scale, an embedding's feature axis) or ``in`` (the
axis consumes them: the columns of the next projection).

The tables are built from the model's config and its tensor names (biases,
q/k norms, tied heads are read off the checkpoint), so one builder covers a
whole family. Which builder a ``model_type`` uses, its head layout, its
``Conv1D`` tensors (builders describe every projection in ``nn.Linear`` terms,
axis 0 = outputs; stored [in, out] tensors get their axes swapped) and its
fused projections come from the architecture table (``architectures.py``).
Tensors a spec does not place are an error, never averaged unaligned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Collection, Dict, List, Optional, Sequence, Tuple

from mergekit_drm.architectures import ARCHITECTURES, HeadLayout, fused_layout, is_conv1d


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class Tap:
    """Where a space's activations are read: a module's input or output.

    ``start``/``stop`` slice the last dimension (GPT-2's fused ``c_attn``).
    """

    module: str
    where: str  # "input" | "output"
    space: str
    start: int = 0
    stop: Optional[int] = None


@dataclass(frozen=True)
class Group:
    name: str
    spaces: Tuple[Tuple[str, int], ...]
    heads: Optional[HeadLayout] = None
    taps: Tuple[Tap, ...] = ()

    @property
    def space_sizes(self) -> Dict[str, int]:
        return dict(self.spaces)

    @property
    def is_attention(self) -> bool:
        return self.heads is not None


@dataclass(frozen=True)
class Segment:
    group: str
    space: str
    length: int


@dataclass(frozen=True)
class AxisSpec:
    axis: int
    role: str  # "out" | "in"
    segments: Tuple[Segment, ...]

    @property
    def length(self) -> int:
        return sum(segment.length for segment in self.segments)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    axes: Tuple[AxisSpec, ...] = ()


@dataclass
class PermutationSpec:
    architecture: str
    groups: Dict[str, Group]
    tensors: Dict[str, TensorSpec]
    # tensors that are not weights of the function (buffers): copied from the
    # first model if the mergekit architecture lists them.
    buffers: Tuple[str, ...] = ()

    def tensors_touching(self, group: str) -> List[TensorSpec]:
        return [
            t for t in self.tensors.values()
            if any(s.group == group for a in t.axes for s in a.segments)
        ]


# --- builders ---------------------------------------------------------------


def _axis(axis: int, role: str, *segments: Tuple[str, str, int]) -> AxisSpec:
    return AxisSpec(axis, role, tuple(Segment(*s) for s in segments))


class _Builder:
    def __init__(self, architecture: str, names: Collection[str]):
        self.architecture = architecture  # the model_type
        self.names = set(names)
        self.groups: Dict[str, Group] = {}
        self.tensors: Dict[str, TensorSpec] = {}
        self.buffers: List[str] = []

    def group(self, group: Group) -> None:
        self.groups[group.name] = group

    def tensor(self, name: str, *axes: AxisSpec, required: bool = True) -> None:
        if name not in self.names:
            if required:
                raise UnsupportedArchitecture(
                    f"mudsc: expected tensor {name} for a {self.architecture} model, "
                    "but the checkpoint does not have it"
                )
            return
        if is_conv1d(self.architecture, name):
            axes = tuple(AxisSpec(1 - a.axis, a.role, a.segments) for a in axes)
        self.tensors[name] = TensorSpec(name, tuple(sorted(axes, key=lambda a: a.axis)))

    def has(self, name: str) -> bool:
        return name in self.names

    def finish(self, buffer_patterns: Sequence[str] = ()) -> PermutationSpec:
        unplaced = []
        for name in sorted(self.names):
            if name in self.tensors:
                continue
            if any(re.search(p, name) for p in buffer_patterns):
                self.buffers.append(name)
                continue
            unplaced.append(name)
        if unplaced:
            shown = ", ".join(unplaced[:5]) + (" ..." if len(unplaced) > 5 else "")
            raise UnsupportedArchitecture(
                f"mudsc: the {self.architecture} permutation spec has no place for "
                f"{len(unplaced)} tensor(s): {shown}. Averaging them unaligned would "
                "break the merge; this checkpoint layout is not supported."
            )
        return PermutationSpec(
            self.architecture, self.groups, self.tensors, tuple(self.buffers)
        )


def _get(config: Any, *names: str, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _attention(config: Any) -> HeadLayout:
    layout = ARCHITECTURES[config.model_type].attention(config)
    if layout.num_heads % layout.num_kv_heads:
        raise UnsupportedArchitecture(
            f"mudsc: {layout.num_heads} attention heads are not a multiple of "
            f"{layout.num_kv_heads} KV heads"
        )
    return layout


def _fused_parts(config: Any, name: str) -> List[Tuple[str, int, int]]:
    """(part, first row, end row) of a fused projection whose parts are whole."""
    groups, sizes = fused_layout(config.model_type, name, config)
    if groups != 1:
        raise UnsupportedArchitecture(f"mudsc: {name} interleaves its parts per head")
    parts, offset = [], 0
    for part, size in sizes:
        parts.append((part, offset, offset + size))
        offset += size
    return parts


def _llama_family(config: Any, names: Collection[str]) -> PermutationSpec:
    b = _Builder(config.model_type, names)
    hidden = config.hidden_size
    layout = _attention(config)
    heads, kv, head_dim = layout.num_heads, layout.num_kv_heads, layout.head_dim
    inter = config.intermediate_size
    layers = config.num_hidden_layers
    R = ("residual", "unit", hidden)
    res_taps = []
    for i in range(layers):
        p = f"model.layers.{i}"
        res_taps += [
            Tap(f"{p}.input_layernorm", "output", "unit"),
            Tap(f"{p}.post_attention_layernorm", "output", "unit"),
        ]
    res_taps.append(Tap("model.norm", "output", "unit"))
    b.group(Group("residual", (("unit", hidden),), taps=tuple(res_taps)))

    b.tensor("model.embed_tokens.weight", _axis(1, "out", R))
    b.tensor("model.norm.weight", _axis(0, "out", R))
    b.tensor("lm_head.weight", _axis(1, "in", R), required=False)
    for i in range(layers):
        p = f"model.layers.{i}"
        attn, mlp = f"layers.{i}.attn", f"layers.{i}.mlp"
        b.group(Group(
            attn,
            (("q", heads * head_dim), ("k", kv * head_dim),
             ("v", kv * head_dim), ("o", heads * head_dim)),
            heads=layout,
            taps=(
                Tap(f"{p}.self_attn.q_proj", "output", "q"),
                Tap(f"{p}.self_attn.k_proj", "output", "k"),
                Tap(f"{p}.self_attn.v_proj", "output", "v"),
            ),
        ))
        b.group(Group(
            mlp, (("unit", inter),),
            taps=(Tap(f"{p}.mlp.down_proj", "input", "unit"),),
        ))
        b.tensor(f"{p}.input_layernorm.weight", _axis(0, "out", R))
        b.tensor(f"{p}.post_attention_layernorm.weight", _axis(0, "out", R))
        for proj, space, size in (("q", "q", heads), ("k", "k", kv), ("v", "v", kv)):
            seg = (attn, space, size * head_dim)
            b.tensor(f"{p}.self_attn.{proj}_proj.weight", _axis(0, "out", seg), _axis(1, "in", R))
            b.tensor(f"{p}.self_attn.{proj}_proj.bias", _axis(0, "out", seg), required=False)
        # q_norm / k_norm act on head_dim, shared by all heads; Q/K dims stay put.
        b.tensor(f"{p}.self_attn.q_norm.weight", required=False)
        b.tensor(f"{p}.self_attn.k_norm.weight", required=False)
        b.tensor(
            f"{p}.self_attn.o_proj.weight",
            _axis(0, "out", R), _axis(1, "in", (attn, "o", heads * head_dim)),
        )
        b.tensor(f"{p}.self_attn.o_proj.bias", _axis(0, "out", R), required=False)
        M = (mlp, "unit", inter)
        for proj in ("gate", "up"):
            b.tensor(f"{p}.mlp.{proj}_proj.weight", _axis(0, "out", M), _axis(1, "in", R))
            b.tensor(f"{p}.mlp.{proj}_proj.bias", _axis(0, "out", M), required=False)
        b.tensor(f"{p}.mlp.down_proj.weight", _axis(0, "out", R), _axis(1, "in", M))
        b.tensor(f"{p}.mlp.down_proj.bias", _axis(0, "out", R), required=False)
    return b.finish(buffer_patterns=(r"rotary_emb\.inv_freq$",))


def _gpt2(config: Any, names: Collection[str]) -> PermutationSpec:
    b = _Builder(config.model_type, names)
    hidden = config.n_embd
    inter = _get(config, "n_inner", default=4 * hidden)
    layers = config.n_layer
    layout = _attention(config)
    R = ("residual", "unit", hidden)
    res_taps = []
    for i in range(layers):
        res_taps += [
            Tap(f"transformer.h.{i}.ln_1", "output", "unit"),
            Tap(f"transformer.h.{i}.ln_2", "output", "unit"),
        ]
    res_taps.append(Tap("transformer.ln_f", "output", "unit"))
    b.group(Group("residual", (("unit", hidden),), taps=tuple(res_taps)))
    b.tensor("transformer.wte.weight", _axis(1, "out", R))
    b.tensor("transformer.wpe.weight", _axis(1, "out", R))
    b.tensor("transformer.ln_f.weight", _axis(0, "out", R))
    b.tensor("transformer.ln_f.bias", _axis(0, "out", R))
    b.tensor("lm_head.weight", _axis(1, "in", R), required=False)
    for i in range(layers):
        p = f"transformer.h.{i}"
        attn, mlp = f"layers.{i}.attn", f"layers.{i}.mlp"
        fused = _fused_parts(config, f"{p}.attn.c_attn.weight")  # q, k, v
        b.group(Group(
            attn,
            tuple((part, stop - start) for part, start, stop in fused) + (("o", hidden),),
            heads=layout,
            taps=tuple(Tap(f"{p}.attn.c_attn", "output", part, start, stop)
                       for part, start, stop in fused),
        ))
        b.group(Group(mlp, (("unit", inter),), taps=(Tap(f"{p}.mlp.c_proj", "input", "unit"),)))
        qkv = tuple((attn, part, stop - start) for part, start, stop in fused)
        b.tensor(f"{p}.attn.c_attn.weight", _axis(0, "out", *qkv), _axis(1, "in", R))
        b.tensor(f"{p}.attn.c_attn.bias", _axis(0, "out", *qkv))
        b.tensor(f"{p}.attn.c_proj.weight", _axis(0, "out", R), _axis(1, "in", (attn, "o", hidden)))
        b.tensor(f"{p}.attn.c_proj.bias", _axis(0, "out", R))
        for ln in ("ln_1", "ln_2"):
            b.tensor(f"{p}.{ln}.weight", _axis(0, "out", R))
            b.tensor(f"{p}.{ln}.bias", _axis(0, "out", R))
        M = (mlp, "unit", inter)
        b.tensor(f"{p}.mlp.c_fc.weight", _axis(0, "out", M), _axis(1, "in", R))
        b.tensor(f"{p}.mlp.c_fc.bias", _axis(0, "out", M))
        b.tensor(f"{p}.mlp.c_proj.weight", _axis(0, "out", R), _axis(1, "in", M))
        b.tensor(f"{p}.mlp.c_proj.bias", _axis(0, "out", R))
    return b.finish(buffer_patterns=(r"attn\.(masked_)?bias$",))


def _bert_heads(b: "_Builder", prefix: str, hidden: int, R) -> None:
    """BERT's pooler + classifier (its own group when both exist) and masked-LM head."""
    pooler = f"{prefix}pooler.dense.weight"
    if b.has("classifier.weight") and b.has(pooler):
        P = ("pooler", "unit", hidden)
        b.group(Group("pooler", (("unit", hidden),),
                      taps=(Tap("classifier", "input", "unit"),)))
        b.tensor(pooler, _axis(0, "out", P), _axis(1, "in", R))
        b.tensor(f"{prefix}pooler.dense.bias", _axis(0, "out", P))
        b.tensor("classifier.weight", _axis(1, "in", P))
        b.tensor("classifier.bias")
    else:
        # Pooler output is a model output here: its rows stay in place.
        b.tensor(pooler, _axis(1, "in", R), required=False)
        b.tensor(f"{prefix}pooler.dense.bias", required=False)
        b.tensor("classifier.weight", _axis(1, "in", R), required=False)
        b.tensor("classifier.bias", required=False)
    # Masked-LM head: the decoder is tied to the word embeddings, so the
    # transform's output lives in the residual permutation.
    t = "cls.predictions.transform"
    b.tensor(f"{t}.dense.weight", _axis(0, "out", R), _axis(1, "in", R), required=False)
    for name in (f"{t}.dense.bias", f"{t}.LayerNorm.weight", f"{t}.LayerNorm.bias"):
        b.tensor(name, _axis(0, "out", R), required=False)
    b.tensor("cls.predictions.decoder.weight", _axis(1, "in", R), required=False)
    b.tensor("cls.predictions.bias", required=False)
    b.tensor("cls.predictions.decoder.bias", required=False)


def _bert(config: Any, names: Collection[str]) -> PermutationSpec:
    b = _Builder(config.model_type, names)
    prefix = "bert." if any(n.startswith("bert.") for n in names) else ""
    hidden = config.hidden_size
    inter = config.intermediate_size
    layers = config.num_hidden_layers
    layout = _attention(config)
    R = ("residual", "unit", hidden)
    res_taps = [Tap(f"{prefix}embeddings.LayerNorm", "output", "unit")]
    for i in range(layers):
        p = f"{prefix}encoder.layer.{i}"
        res_taps += [
            Tap(f"{p}.attention.output.LayerNorm", "output", "unit"),
            Tap(f"{p}.output.LayerNorm", "output", "unit"),
        ]
    b.group(Group("residual", (("unit", hidden),), taps=tuple(res_taps)))
    for emb in ("word", "position", "token_type"):
        b.tensor(f"{prefix}embeddings.{emb}_embeddings.weight", _axis(1, "out", R),
                 required=emb == "word")
    for part in ("weight", "bias"):
        b.tensor(f"{prefix}embeddings.LayerNorm.{part}", _axis(0, "out", R))
    for i in range(layers):
        p = f"{prefix}encoder.layer.{i}"
        attn, mlp = f"layers.{i}.attn", f"layers.{i}.mlp"
        b.group(Group(
            attn,
            (("q", hidden), ("k", hidden), ("v", hidden), ("o", hidden)),
            heads=layout,
            taps=(
                Tap(f"{p}.attention.self.query", "output", "q"),
                Tap(f"{p}.attention.self.key", "output", "k"),
                Tap(f"{p}.attention.self.value", "output", "v"),
            ),
        ))
        b.group(Group(mlp, (("unit", inter),), taps=(Tap(f"{p}.output.dense", "input", "unit"),)))
        for proj, space in (("query", "q"), ("key", "k"), ("value", "v")):
            seg = (attn, space, hidden)
            b.tensor(f"{p}.attention.self.{proj}.weight", _axis(0, "out", seg), _axis(1, "in", R))
            b.tensor(f"{p}.attention.self.{proj}.bias", _axis(0, "out", seg))
        b.tensor(f"{p}.attention.output.dense.weight", _axis(0, "out", R),
                 _axis(1, "in", (attn, "o", hidden)))
        b.tensor(f"{p}.attention.output.dense.bias", _axis(0, "out", R))
        M = (mlp, "unit", inter)
        b.tensor(f"{p}.intermediate.dense.weight", _axis(0, "out", M), _axis(1, "in", R))
        b.tensor(f"{p}.intermediate.dense.bias", _axis(0, "out", M))
        b.tensor(f"{p}.output.dense.weight", _axis(0, "out", R), _axis(1, "in", M))
        b.tensor(f"{p}.output.dense.bias", _axis(0, "out", R))
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            for part in ("weight", "bias"):
                b.tensor(f"{p}.{ln}.{part}", _axis(0, "out", R))
    _bert_heads(b, prefix, hidden, R)
    return b.finish(buffer_patterns=(r"position_ids$",))


# Builder per ``permutation`` name of the architecture table.
BUILDERS = {"llama": _llama_family, "gpt2": _gpt2, "bert": _bert}
SUPPORTED_MODEL_TYPES = tuple(t for t, a in ARCHITECTURES.items() if a.permutation)


def build_spec(config: Any, tensor_names: Collection[str]) -> PermutationSpec:
    """The permutation spec of a checkpoint, from its config and tensor names."""
    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(model_type or "")
    if arch is None or arch.permutation is None:
        raise UnsupportedArchitecture(
            f"mudsc does not know how to align units of model_type {model_type!r}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return BUILDERS[arch.permutation](config, tensor_names)
