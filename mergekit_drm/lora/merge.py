"""Merge N LoRA adapters into one LoRA adapter with DRM, from a mergekit YAML.

The YAML is the one a user writes for the full-model route (``mergekit-yaml``
with ``model: base+adapter`` entries and ``merge_method: drm``). Parameters are
resolved by mergekit's own resolver with the ``drm`` method's own spec, per
target matrix (tensor name ``<module>.weight``, the name the full-model route
sees, and the same layer position ``t`` for gradients), so filters, gradients
and per-model overrides mean exactly what they mean there.

Three phases, so that bad input never leaves anything on disk:

1. ``plan_lora_merge``: read the YAML, the adapters (factors only) and cheap
   facts about the base model (config.json, safetensors headers), check
   everything and resolve parameters;
2. ``execute_plan``: DRM per target matrix on the factors
   (``lowrank.drm_merge_lowrank_parts``), optional truncation to a fixed rank;
3. ``write_adapter``: a PEFT adapter (config, safetensors, model card, YAML)
   written to a temporary directory and moved into place.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import yaml

from mergekit_drm.lora.adapters import (
    AdapterError,
    LoraAdapter,
    load_adapter,
    normalized_base_name,
    resolve_adapter_dir,
)
from mergekit_drm.lora.lowrank import (
    LoraFactors,
    drm_merge_lowrank_parts,
    pad_rank,
    truncate_factors,
)

LOG = logging.getLogger(__name__)

PRETTY_NAME = "DRM"
REFERENCE_URL = "https://arxiv.org/abs/2505.23117"
OUTPUT_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "README.md",
    "mergekit_config.yml",
)
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class LoraMergeError(ValueError):
    """A configuration or input that cannot be merged (nothing was written)."""


# ---------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------


@dataclass
class AdapterEntry:
    reference: Any  # mergekit ModelReference, as in the YAML
    adapter: LoraAdapter


@dataclass
class ModulePlan:
    name: str  # module name, e.g. model.layers.0.self_attn.q_proj
    shape: Tuple[int, int]  # (out, in), nn.Linear layout
    parts: Optional[Tuple[torch.Tensor, ...]]  # fused projection rows, or None
    weights: Tuple[float, ...]
    kwargs: Dict[str, Any]  # drm_merge_lowrank keyword arguments


@dataclass
class LoraMergePlan:
    config_text: str
    base_model: str
    entries: List[AdapterEntry]
    modules: List[ModulePlan]
    base_name: Optional[str]  # adapters' common base_model_name_or_path
    base_modules: Optional[List[str]]  # every 2-D weight's module in the base
    task_type: Optional[str]
    fan_in_fan_out: bool
    out_dtype: torch.dtype
    warnings: List[str] = field(default_factory=list)


@dataclass
class _BaseInfo:
    config: Any = None
    shapes: Optional[Dict[str, Tuple[int, ...]]] = None
    weights: Optional[Dict[str, Tuple[float, Any]]] = None  # name -> (t, WeightInfo)
    model_type: Optional[str] = None


def _read_base(base_ref) -> _BaseInfo:
    """config.json, safetensors headers and mergekit's weight list for the base."""
    from mergekit_drm.preflight import safetensors_shapes, model_config

    info = _BaseInfo()
    info.config = model_config(base_ref)
    if info.config is not None:
        info.model_type = getattr(info.config, "model_type", None)
    path = base_ref.model.path
    if os.path.isdir(path):
        try:
            from mergekit.io.lazy_tensor_loader import ShardedTensorIndex

            index = ShardedTensorIndex.from_disk(path)
            if index.is_safetensors:
                shapes: Dict[str, Tuple[int, ...]] = {}
                for shard in sorted(set(index.tensor_paths.values())):
                    shapes.update(safetensors_shapes(os.path.join(path, shard)))
                info.shapes = shapes
        except Exception as exc:  # no weights next to the config: checks skipped
            LOG.debug("could not read base safetensors headers: %s", exc)
    if info.config is not None and getattr(info.config, "architectures", None):
        try:
            info.weights = _weight_positions(info.config)
        except Exception as exc:
            LOG.debug("no mergekit architecture for the base: %s", exc)
    return info


def _weight_positions(config) -> Optional[Dict[str, Tuple[float, Any]]]:
    """Each weight's gradient position t, exactly as mergekit's planner sets it."""
    from mergekit.architecture import arch_info_for_config
    from mergekit.architecture.base import ConfiguredModuleArchitecture

    arch = arch_info_for_config(config)
    if arch is None:
        return None
    out: Dict[str, Tuple[float, Any]] = {}
    for module_def in arch.modules.values():
        module = ConfiguredModuleArchitecture(
            info=module_def.architecture,
            config=config,
            weight_prefix=module_def.weight_prefix,
        )

        def add(weight, t):
            for name in [weight.name] + list(weight.aliases or ()):
                out.setdefault(name, (t, weight))

        for weight in module.pre_weights():
            add(weight, 0.0)
        layers = module.num_layers()
        for index in range(layers):
            t = index / (layers - 1) if layers > 1 else 1.0
            for weight in module.layer_weights(index=index):
                add(weight, t)
        for weight in module.post_weights():
            add(weight, 0.0)
    return out


def _uses_gradient(setting) -> bool:
    from mergekit.config import ConditionalParameter

    if isinstance(setting, ConditionalParameter):
        return _uses_gradient(setting.value)
    if isinstance(setting, list):
        if setting and all(isinstance(e, (bool, int, float, str)) for e in setting):
            return len(setting) > 1
        return any(_uses_gradient(e) for e in setting)
    return False


def _same_model(a, b) -> bool:
    if a == b:
        return True
    pa, pb = os.path.expanduser(a.path), os.path.expanduser(b.path)
    if os.path.isdir(pa) and os.path.isdir(pb):
        return os.path.realpath(pa) == os.path.realpath(pb) and a.revision == b.revision
    return False


def _is_vocabulary(module: str, shape: Tuple[int, int], base: _BaseInfo) -> bool:
    from mergekit_drm.architectures import is_vocabulary

    weight = f"{module}.weight"
    if base.weights is not None and weight in base.weights:
        return base.weights[weight][1].vocabulary_axis is not None
    vocab = getattr(base.config, "vocab_size", None) if base.config is not None else None
    return is_vocabulary(base.model_type, weight) or (vocab is not None and vocab in shape)


def plan_lora_merge(
    config_text: str,
    *,
    allow_base_mismatch: bool = False,
    out_dtype: Optional[str] = None,
) -> LoraMergePlan:
    """Read and check everything; raise ``LoraMergeError`` on any problem."""
    from mergekit.config import ConfigReader, InputSliceDefinition, MergeConfiguration, OutputSliceDefinition
    from mergekit.parameter_resolver import resolve_parameters

    from mergekit_drm.architectures import is_conv1d, matrix_layout, may_be_fused
    from mergekit_drm.checks import UNKNOWN_PARAMETERS_ENV, parameter_name_problems
    from mergekit_drm.drm.method import drm_merge_method

    try:
        raw = yaml.safe_load(config_text)
        config = MergeConfiguration.model_validate(raw)
    except Exception as exc:
        raise LoraMergeError(f"invalid merge configuration: {exc}") from exc
    if config.merge_method != "drm":
        raise LoraMergeError(
            f"merge_method is {config.merge_method!r}; mergekit-drm-lora computes "
            "`merge_method: drm` only"
        )
    if not config.models:
        raise LoraMergeError(
            "mergekit-drm-lora needs a `models:` list (slices and modules are not "
            "supported: a LoRA adapter covers the whole model)"
        )
    if config.base_model is None:
        raise LoraMergeError(
            "drm merges task vectors, so the YAML needs `base_model:` (the model the "
            "adapters were trained on)"
        )
    if config.base_model.lora is not None:
        raise LoraMergeError("base_model must be a plain model, not base+adapter")
    warnings: List[str] = []
    names = parameter_name_problems(config, drm_merge_method.spec)
    if names and os.environ.get(UNKNOWN_PARAMETERS_ENV, "").strip().lower() == "error":
        raise LoraMergeError("; ".join(names))
    warnings.extend(names)
    if config.tokenizer is not None or config.tokenizer_source is not None:
        warnings.append("tokenizer settings are ignored: LoRA adapters keep the base vocabulary")

    base_ref = config.base_model
    entries: List[AdapterEntry] = []
    seen = {}
    for model_in in config.models:
        ref = model_in.model
        if ref.lora is not None:
            if not _same_model(ref.model, base_ref.model):
                raise LoraMergeError(
                    f"{ref}: the adapter is applied to {ref.model}, not to base_model "
                    f"{base_ref.model}. Its task vector would include the difference "
                    "between the two models, which is not low-rank; merge it with "
                    "`mergekit-yaml` instead."
                )
            adapter_path = ref.lora
        else:
            if _same_model(ref.model, base_ref.model):
                continue  # the base listed as a model: no task vector, as in mergekit
            adapter_path = ref.model
        try:
            directory = resolve_adapter_dir(adapter_path.path, adapter_path.revision)
            adapter = load_adapter(directory, label=str(ref))
        except AdapterError as exc:
            raise LoraMergeError(str(exc)) from exc
        key = os.path.realpath(directory)
        if key in seen:
            raise LoraMergeError(f"adapter {directory} is listed twice ({seen[key]} and {ref})")
        seen[key] = str(ref)
        entries.append(AdapterEntry(reference=ref, adapter=adapter))
    if not entries:
        raise LoraMergeError("no adapters to merge: list them under `models:`")

    # Same base: adapters' recorded base names, then every matrix's shape.
    names = collections.OrderedDict()
    for entry in entries:
        name = normalized_base_name(entry.adapter.base_name)
        if name is not None:
            names.setdefault(name, []).append(str(entry.reference))
    if len(names) > 1 and not allow_base_mismatch:
        listed = "; ".join(f"{name}: {', '.join(refs)}" for name, refs in names.items())
        raise LoraMergeError(
            "the adapters were trained on different base models "
            f"(base_model_name_or_path: {listed}). DRM merges task vectors of one "
            "base. If these names denote the same weights (a renamed or local copy), "
            "pass --allow-base-mismatch."
        )
    base_name = next(iter(names)) if len(names) == 1 else None
    yaml_base = normalized_base_name(base_ref.model.path)
    if base_name is not None and yaml_base != base_name:
        warnings.append(
            f"the adapters record base_model_name_or_path {base_name!r}, the YAML "
            f"says base_model {base_ref.model.path!r}; make sure these are the same weights"
        )

    base = _read_base(base_ref)
    if base.config is None:
        warnings.append(
            f"the base model's config.json ({base_ref.model.path}) could not be read: "
            "fused projections cannot be detected and shapes are checked between "
            "adapters only"
        )
    elif base.shapes is None:
        warnings.append(
            f"no safetensors weights found for the base model ({base_ref.model.path}): "
            "matrix shapes are checked between adapters only"
        )

    module_shapes: Dict[str, Tuple[int, int]] = {}
    owner: Dict[str, str] = {}
    for entry in entries:
        for module, shape in entry.adapter.shapes().items():
            if module in module_shapes and module_shapes[module] != shape:
                raise LoraMergeError(
                    f"{module} is {module_shapes[module][0]} x {module_shapes[module][1]} "
                    f"(out x in) in {owner[module]} but {shape[0]} x {shape[1]} in "
                    f"{entry.reference}: the adapters belong to different base models"
                )
            module_shapes.setdefault(module, shape)
            owner.setdefault(module, str(entry.reference))

    has_gradient = _uses_gradient(list((config.parameters or {}).values())) or any(
        _uses_gradient(list((m.parameters or {}).values())) for m in config.models
    )
    if has_gradient and base.weights is None:
        raise LoraMergeError(
            "the YAML uses parameter gradients (lists), which need the base model's "
            "layer structure; the base model's config.json could not be read or its "
            "architecture is unknown to mergekit"
        )

    reader = ConfigReader(
        config=config,
        t=0.0,
        slice_out=OutputSliceDefinition(
            sources=[
                InputSliceDefinition(
                    model=entry.reference,
                    layer_range=(0, 1),
                    parameters=next(
                        m.parameters for m in config.models if m.model == entry.reference
                    ),
                )
                for entry in entries
            ]
        ),
    )
    spec = drm_merge_method.spec
    modules: List[ModulePlan] = []
    for module in sorted(module_shapes):
        n, m = module_shapes[module]
        weight_name = f"{module}.weight"
        if _is_vocabulary(module, (n, m), base):
            raise LoraMergeError(
                f"an adapter targets {module}, a vocabulary matrix (embeddings / output "
                "head). `drm` merges those elementwise in the full-model route, which "
                "cannot be done on low-rank factors; merge with `mergekit-yaml` instead"
            )
        layout = None
        if base.shapes is not None:
            stored = base.shapes.get(weight_name)
            if stored is None:
                raise LoraMergeError(
                    f"{module} is targeted by {owner[module]} but the base model has "
                    f"no tensor {weight_name}: the adapter belongs to another model"
                )
            if tuple(stored) not in ((n, m), (m, n)):
                raise LoraMergeError(
                    f"{module}: the adapters change a {n} x {m} (out x in) matrix, the "
                    f"base model's {weight_name} is {list(stored)}: the adapters belong "
                    "to a different base model"
                )
        if base.config is not None:
            stored_shape = (n, m)
            try:
                if is_conv1d(base.model_type, weight_name):
                    stored_shape = (m, n)
                layout = matrix_layout(weight_name, base.model_type, base.config, stored_shape)
            except ValueError as exc:
                raise LoraMergeError(str(exc)) from exc
        elif may_be_fused(weight_name):
            raise LoraMergeError(
                f"{module} looks like a fused projection, whose parts DRM merges "
                "separately; the base model's config.json is needed to split it"
            )
        if base.weights is not None and weight_name not in base.weights:
            warnings.append(
                f"{weight_name} is not in mergekit's architecture definition for the "
                "base model; the full-model route would not merge it"
            )
        t = base.weights[weight_name][0] if base.weights and weight_name in base.weights else 0.0
        try:
            shared, per_model = resolve_parameters(
                spec,
                tensor_name=weight_name,
                inputs={entry.reference: weight_name for entry in entries},
                sources=reader.with_t(t).parameter_sources,
                base_model=base_ref,
                t=t,
            )
        except Exception as exc:
            raise LoraMergeError(f"{weight_name}: {exc}") from exc
        densities = {per_model[e.reference]["density"] for e in entries}
        if len(densities) > 1:
            raise LoraMergeError(
                f"drm prunes jointly over all models, so `density` must be one value for "
                f"{weight_name}; got {sorted(densities)}. Set it once under `parameters:`."
            )
        if not shared["decompose"]:
            raise LoraMergeError(
                f"`decompose: false` applies to {weight_name}: the elementwise path needs "
                "dense deltas; merge with `mergekit-yaml` instead"
            )
        modules.append(
            ModulePlan(
                name=module,
                shape=(n, m),
                parts=None if layout is None or layout.parts is None else tuple(rows for _, rows in layout.parts),
                weights=tuple(float(per_model[e.reference]["weight"]) for e in entries),
                kwargs=dict(
                    direction=shared["direction"],
                    density=float(densities.pop()),
                    rank_tol=float(shared["rank_tol"]),
                    renorm=bool(shared["renorm"]),
                    sign_election=bool(shared["sign_election"]),
                    disjoint=bool(shared["disjoint"]),
                    scale=float(shared["lambda"]),
                    compute_dtype=None if shared["compute_dtype"] == "auto" else DTYPES[shared["compute_dtype"]],
                    rank_budget=float(shared["rank_budget"]),
                    whiten=bool(shared["whiten"]),
                    isotropic=bool(shared["isotropic"]),
                    norm_target=str(shared["norm_target"]),
                ),
            )
        )

    base_modules = None
    if base.shapes is not None:
        base_modules = sorted(
            name[: -len(".weight")]
            for name, shape in base.shapes.items()
            if name.endswith(".weight") and len(shape) == 2
        )
    task_types = {entry.adapter.config.get("task_type") for entry in entries}
    dtype_name = out_dtype or config.out_dtype or config.dtype or "float32"
    if dtype_name not in DTYPES:
        raise LoraMergeError(f"unsupported output dtype {dtype_name!r}; use one of {', '.join(DTYPES)}")
    return LoraMergePlan(
        config_text=config_text,
        base_model=str(base_ref),
        entries=entries,
        modules=modules,
        base_name=entries[0].adapter.base_name if base_name is not None else None,
        base_modules=base_modules,
        task_type=task_types.pop() if len(task_types) == 1 else None,
        fan_in_fan_out=any(e.adapter.config.get("fan_in_fan_out") for e in entries),
        out_dtype=DTYPES[dtype_name],
        warnings=warnings,
    )


# ---------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------


@dataclass
class MergedModule:
    name: str
    B: torch.Tensor  # (n, r)
    A: torch.Tensor  # (r, m); delta = B @ A (scaling 1)
    merged_rank: int  # rank DRM produced (before truncation / padding)
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
    """DRM per target matrix on the adapters' factors."""
    if rank is not None and rank < 1:
        raise LoraMergeError(f"--rank must be >= 1, got {rank}")
    start = time.perf_counter()
    out: List[MergedModule] = []
    for module in plan.modules:
        factors: List[Optional[LoraFactors]] = [
            entry.adapter.modules.get(module.name) for entry in plan.entries
        ]
        B, A = drm_merge_lowrank_parts(
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
        out.append(
            MergedModule(
                name=module.name,
                B=B.cpu(),
                A=A.cpu(),
                merged_rank=merged_rank,
                truncation_error=error,
            )
        )
    return LoraMergeResult(modules=out, rank=rank, seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def check_output_dir(path: str, force: bool) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise LoraMergeError(f"output path {path} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and not force:
        raise LoraMergeError(
            f"output directory {path} exists and is not empty; choose another path or "
            "pass --force to overwrite the adapter files in it"
        )


def _pattern_keys(names: Sequence[str]) -> Dict[str, str]:
    """rank_pattern/alpha_pattern keys that PEFT resolves to exactly one module."""
    from peft.utils.other import get_pattern_key

    plain = list(names)
    if all(get_pattern_key(plain, name) == name for name in names):
        return {name: name for name in names}
    escaped = {name: re.escape(name) for name in names}
    keys = list(escaped.values())
    for name, key in escaped.items():
        if get_pattern_key(keys, name) != key:  # pragma: no cover - cannot happen
            raise LoraMergeError(f"cannot build an unambiguous rank_pattern key for {name}")
    return escaped


def _target_modules(names: Sequence[str], base_modules: Optional[Sequence[str]]) -> List[str]:
    """Leaf names (q_proj, ...) when they select exactly these modules, else full names."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
    if base_modules is not None:
        selected = {
            module for module in base_modules if module.rsplit(".", 1)[-1] in leaves
        }
        if selected == set(names):
            return leaves
    return sorted(names)


def build_lora_config(plan: LoraMergePlan, result: LoraMergeResult):
    """The output ``peft.LoraConfig``: per-module rank, alpha = rank (scaling 1)."""
    from peft import LoraConfig

    ranks = {module.name: module.B.shape[1] for module in result.modules}
    counts = collections.Counter(ranks.values())
    default = max(counts, key=lambda r: (counts[r], r))
    others = [name for name, r in ranks.items() if r != default]
    keys = _pattern_keys(others) if others else {}
    return LoraConfig(
        r=default,
        lora_alpha=default,
        target_modules=_target_modules(list(ranks), plan.base_modules),
        rank_pattern={keys[name]: ranks[name] for name in others},
        alpha_pattern={keys[name]: ranks[name] for name in others},
        lora_dropout=0.0,
        bias="none",
        use_rslora=False,
        fan_in_fan_out=plan.fan_in_fan_out,
        task_type=plan.task_type,
        base_model_name_or_path=plan.base_name or plan.base_model,
        inference_mode=True,
    )


def _hub_id(path: str) -> Optional[str]:
    if os.path.exists(os.path.expanduser(path)):
        return None
    return path if re.fullmatch(r"[\w.-]+/[\w.-]+", path) else None


def model_card(plan: LoraMergePlan, result: LoraMergeResult, name: str) -> str:
    metadata = {
        "library_name": "peft",
        "tags": ["mergekit", "merge", "lora", "drm"],
    }
    base_hub = _hub_id(plan.base_model)
    if base_hub:
        metadata["base_model"] = base_hub
    ranks = [m.B.shape[1] for m in result.modules]
    merged_ranks = [m.merged_rank for m in result.modules]
    rows = []
    for entry in plan.entries:
        index = plan.entries.index(entry)
        weights = {module.weights[index] for module in plan.modules}
        weight = ", ".join(f"{w:g}" for w in sorted(weights)) if weights else "1"
        adapter = entry.adapter
        adapter_ranks = sorted(set(adapter.ranks.values()))
        rows.append(
            f"| `{entry.reference}` | {weight} | {len(adapter.modules)} | "
            f"{', '.join(map(str, adapter_ranks))} | "
            f"{'yes' if adapter.config.get('use_rslora') else 'no'} |"
        )
    if result.rank is None:
        size = (
            f"Ranks are the exact ranks of the DRM-merged deltas ({min(ranks)} to "
            f"{max(ranks)} per module; `rank_pattern`), with `lora_alpha` equal to the "
            "rank, so the LoRA scaling is 1 and `B @ A` is the merged delta, `lambda` "
            "included. No truncation: applying this adapter gives the same weights as "
            "the full-model `drm` merge of the same YAML, up to rounding."
        )
    else:
        worst, overall = result.truncation_summary()
        size = (
            f"Truncated to rank {result.rank} by an SVD of each merged delta (DRM "
            f"ranks before truncation: {min(merged_ranks)} to {max(merged_ranks)}); "
            f"relative Frobenius truncation error: largest module {worst:.3g}, whole "
            f"adapter {overall:.3g}. `lora_alpha` = r, so the scaling is 1."
        )
    params = plan.modules[0].kwargs if plan.modules else {}
    shown = {
        k: ((str(v).replace("torch.", "") if v is not None else "auto") if k == "compute_dtype" else v)
        for k, v in params.items()
    }
    if "scale" in shown:
        shown["lambda"] = shown.pop("scale")
    return f"""---
{yaml.safe_dump(metadata, sort_keys=False).rstrip()}
---
# {name}

This is a LoRA adapter merged from {len(plan.entries)} LoRA adapters with
[DRM](https://arxiv.org/abs/2505.23117) (Decom-Renorm-Merge), computed directly
on the adapters' low-rank factors by `mergekit-drm-lora` (mergekit-drm), without
forming dense weight deltas.

## Merge details

- Base model: `{plan.base_model}`
- Method: [DRM](https://arxiv.org/abs/2505.23117), parameters (first module;
  see the YAML for filters): `{json.dumps(shown)}`
- Target modules: {len(result.modules)} matrices. {size}
- Only the LoRA target matrices change. Biases, norms, embeddings, the output
  head and every other tensor of the base model are untouched: the source
  adapters carry no other tensors.

### Source adapters

| adapter | weight | modules | rank(s) | rsLoRA |
|---|---|---|---|---|
{chr(10).join(rows)}

## Usage

```python
from transformers import AutoModelForCausalLM
from peft import PeftModel

model = AutoModelForCausalLM.from_pretrained("{plan.base_name or plan.base_model}")
model = PeftModel.from_pretrained(model, "path/to/this/adapter")
```

## Configuration

The following YAML configuration was used to produce this adapter:

```yaml
{plan.config_text.rstrip()}
```
"""


def write_adapter(
    plan: LoraMergePlan,
    result: LoraMergeResult,
    out_path: str,
    *,
    force: bool = False,
    write_card: bool = True,
) -> None:
    """Write the adapter into ``out_path`` (files first go to a temporary dir)."""
    from safetensors.torch import save_file

    check_output_dir(out_path, force)
    lora_config = build_lora_config(plan, result)
    parent = os.path.dirname(os.path.abspath(out_path)) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".drm-lora-", dir=parent)
    try:
        lora_config.save_pretrained(staging)
        tensors = {}
        for module in result.modules:
            prefix = f"base_model.model.{module.name}"
            tensors[f"{prefix}.lora_A.weight"] = module.A.to(plan.out_dtype).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = module.B.to(plan.out_dtype).contiguous()
        save_file(tensors, os.path.join(staging, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(staging, "mergekit_config.yml"), "w", encoding="utf-8") as handle:
            handle.write(plan.config_text)
        if write_card:
            name = os.path.basename(os.path.abspath(out_path))
            with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as handle:
                handle.write(model_card(plan, result, name))
        os.makedirs(out_path, exist_ok=True)
        for file in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, file), os.path.join(out_path, file))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
