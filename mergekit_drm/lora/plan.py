"""Planning a LoRA-native merge: read the YAML, the adapters and the base, check everything.

The YAML is the one a user writes for the full-model route (``mergekit-yaml``
with ``model: base+adapter`` entries and a ``merge_method`` from
``methods.METHODS``). Parameters are resolved by mergekit's own resolver
(through ``compat.ParameterResolver``, as are the layer positions) with
the method's own spec, per target matrix (tensor name ``<module>.weight``, the
name the full-model route sees, and the same layer position ``t`` for
gradients), so filters, gradients and per-model overrides mean exactly what
they mean there. Only adapter factors and cheap facts about the base
(config.json, safetensors headers) are read; any problem raises
``LoraMergeError`` before anything is written.
"""

from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import yaml

from mergekit_drm.lora.adapters import (
    AdapterError,
    LoraAdapter,
    load_adapter,
    normalized_base_name,
    resolve_adapter_dir,
)
from mergekit_drm.compat import ParameterResolver, check_host, directory_index, weight_positions
from mergekit_drm.lora.methods import DTYPES, METHODS, LoraMergeError, LoraMethod

LOG = logging.getLogger(__name__)


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
    kwargs: Dict[str, Any]  # the method's low-rank kernel keyword arguments


@dataclass
class LoraMergePlan:
    config_text: str
    method: LoraMethod
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


def plan_lora_merge(
    config_text: str,
    *,
    allow_base_mismatch: bool = False,
    out_dtype: Optional[str] = None,
) -> LoraMergePlan:
    """Read and check everything; raise ``LoraMergeError`` on any problem."""
    check_host(load=True)
    config, method = _read_config(config_text)
    warnings = _parameter_warnings(config, method)
    entries = _load_entries(config)
    base_name = _check_same_base(entries, config.base_model, allow_base_mismatch, warnings)
    base = _read_base(config.base_model)
    warnings.extend(_base_warnings(base, config.base_model))
    shapes, owner = _module_shapes(entries)
    _check_gradients(config, base)
    reader = ParameterResolver(config, [
        (entry.reference, next(m.parameters for m in config.models if m.model == entry.reference))
        for entry in entries
    ])
    modules = []
    for module in sorted(shapes):
        parts = _module_layout(module, shapes[module], owner[module], base, method, warnings)
        modules.append(_module_plan(module, shapes[module], parts, config, entries, base, method, reader))
    task_types = {entry.adapter.config.get("task_type") for entry in entries}
    dtype_name = out_dtype or config.out_dtype or config.dtype or "float32"
    if dtype_name not in DTYPES:
        raise LoraMergeError(f"unsupported output dtype {dtype_name!r}; use one of {', '.join(DTYPES)}")
    return LoraMergePlan(
        config_text=config_text,
        method=method,
        base_model=str(config.base_model),
        entries=entries,
        modules=modules,
        base_name=entries[0].adapter.base_name if base_name is not None else None,
        base_modules=_base_modules(base),
        task_type=task_types.pop() if len(task_types) == 1 else None,
        fan_in_fan_out=any(e.adapter.config.get("fan_in_fan_out") for e in entries),
        out_dtype=DTYPES[dtype_name],
        warnings=warnings,
    )


def _read_config(config_text: str):
    """The validated ``MergeConfiguration`` and its method's table entry."""
    from mergekit.config import MergeConfiguration

    try:
        config = MergeConfiguration.model_validate(yaml.safe_load(config_text))
    except Exception as exc:
        raise LoraMergeError(f"invalid merge configuration: {exc}") from exc
    method = METHODS.get(config.merge_method)
    if method is None:
        raise LoraMergeError(
            f"merge_method is {config.merge_method!r}; mergekit-drm-lora computes "
            f"`merge_method:` {', '.join(METHODS)} only (methods whose merge of LoRA "
            "adapters is itself low rank)"
        )
    if not config.models:
        raise LoraMergeError(
            "mergekit-drm-lora needs a `models:` list (slices and modules are not "
            "supported: a LoRA adapter covers the whole model)"
        )
    if config.base_model is None:
        raise LoraMergeError(
            f"{method.name} merges task vectors, so the YAML needs `base_model:` (the "
            "model the adapters were trained on)"
        )
    if config.base_model.lora is not None:
        raise LoraMergeError("base_model must be a plain model, not base+adapter")
    return config, method


def _parameter_warnings(config, method: LoraMethod) -> List[str]:
    """Misspelt parameter names (an error when the environment asks) and ignored settings."""
    from mergekit_drm.checks import parameter_name_problems
    from mergekit_drm.method_options import OPTIONS, unknown_parameters_mode

    try:
        mode = unknown_parameters_mode()
        OPTIONS[method.name].check_values(config)  # type, range, finiteness; names the model
    except ValueError as exc:
        raise LoraMergeError(str(exc)) from exc
    names = parameter_name_problems(config, method.spec())
    if names and mode == "error":
        raise LoraMergeError("; ".join(names))
    if config.tokenizer is not None or config.tokenizer_source is not None:
        names.append("tokenizer settings are ignored: LoRA adapters keep the base vocabulary")
    return names


def _same_model(a, b) -> bool:
    if a == b:
        return True
    pa, pb = os.path.expanduser(a.path), os.path.expanduser(b.path)
    if os.path.isdir(pa) and os.path.isdir(pb):
        return os.path.realpath(pa) == os.path.realpath(pb) and a.revision == b.revision
    return False


def _load_entries(config) -> List[AdapterEntry]:
    """Every listed adapter, read and checked; the base listed as a model is skipped."""
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
        elif _same_model(ref.model, base_ref.model):
            continue  # the base listed as a model: no task vector, as in mergekit
        else:
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
    return entries


def _check_same_base(entries, base_ref, allow_base_mismatch: bool, warnings: List[str]) -> Optional[str]:
    """The adapters' common recorded base name (None if none or several were allowed)."""
    names = collections.OrderedDict()
    for entry in entries:
        name = normalized_base_name(entry.adapter.base_name)
        if name is not None:
            names.setdefault(name, []).append(str(entry.reference))
    if len(names) > 1 and not allow_base_mismatch:
        listed = "; ".join(f"{name}: {', '.join(refs)}" for name, refs in names.items())
        raise LoraMergeError(
            "the adapters were trained on different base models "
            f"(base_model_name_or_path: {listed}). The merge combines task vectors of one "
            "base. If these names denote the same weights (a renamed or local copy), "
            "pass --allow-base-mismatch."
        )
    base_name = next(iter(names)) if len(names) == 1 else None
    if base_name is not None and normalized_base_name(base_ref.model.path) != base_name:
        warnings.append(
            f"the adapters record base_model_name_or_path {base_name!r}, the YAML "
            f"says base_model {base_ref.model.path!r}; make sure these are the same weights"
        )
    return base_name


def _read_base(base_ref) -> _BaseInfo:
    """config.json, safetensors headers and mergekit's weight list for the base."""
    from mergekit_drm.preflight import model_config, safetensors_shapes

    info = _BaseInfo()
    info.config = model_config(base_ref)
    if info.config is not None:
        info.model_type = getattr(info.config, "model_type", None)
    path = base_ref.model.path
    if os.path.isdir(path):
        try:
            index = directory_index(path)
            if index.is_safetensors:
                shapes: Dict[str, Tuple[int, ...]] = {}
                for shard in sorted(set(index.tensor_paths.values())):
                    shapes.update(safetensors_shapes(os.path.join(path, shard)))
                info.shapes = shapes
        except Exception as exc:  # no weights next to the config: checks skipped
            LOG.debug("could not read base safetensors headers: %s", exc)
    if info.config is not None and getattr(info.config, "architectures", None):
        try:
            info.weights = weight_positions(info.config)
        except Exception as exc:
            LOG.debug("no mergekit architecture for the base: %s", exc)
    return info


def _base_warnings(base: _BaseInfo, base_ref) -> List[str]:
    if base.config is None:
        return [
            f"the base model's config.json ({base_ref.model.path}) could not be read: "
            "fused projections cannot be detected and shapes are checked between "
            "adapters only"
        ]
    if base.shapes is None:
        return [
            f"no safetensors weights found for the base model ({base_ref.model.path}): "
            "matrix shapes are checked between adapters only"
        ]
    return []


def _base_modules(base: _BaseInfo) -> Optional[List[str]]:
    """Every 2-D weight's module name in the base (to shorten ``target_modules``)."""
    if base.shapes is None:
        return None
    return sorted(
        name[: -len(".weight")]
        for name, shape in base.shapes.items()
        if name.endswith(".weight") and len(shape) == 2
    )


def _module_shapes(entries) -> Tuple[Dict[str, Tuple[int, int]], Dict[str, str]]:
    """(module -> (out, in), module -> first adapter targeting it); shapes must agree."""
    shapes: Dict[str, Tuple[int, int]] = {}
    owner: Dict[str, str] = {}
    for entry in entries:
        for module, shape in entry.adapter.shapes().items():
            if module in shapes and shapes[module] != shape:
                raise LoraMergeError(
                    f"{module} is {shapes[module][0]} x {shapes[module][1]} "
                    f"(out x in) in {owner[module]} but {shape[0]} x {shape[1]} in "
                    f"{entry.reference}: the adapters belong to different base models"
                )
            shapes.setdefault(module, shape)
            owner.setdefault(module, str(entry.reference))
    return shapes, owner


def _uses_gradient(setting) -> bool:
    from mergekit.config import ConditionalParameter

    if isinstance(setting, ConditionalParameter):
        return _uses_gradient(setting.value)
    if isinstance(setting, list):
        if setting and all(isinstance(e, (bool, int, float, str)) for e in setting):
            return len(setting) > 1
        return any(_uses_gradient(e) for e in setting)
    return False


def _check_gradients(config, base: _BaseInfo) -> None:
    has_gradient = _uses_gradient(list((config.parameters or {}).values())) or any(
        _uses_gradient(list((m.parameters or {}).values())) for m in config.models
    )
    if has_gradient and base.weights is None:
        raise LoraMergeError(
            "the YAML uses parameter gradients (lists), which need the base model's "
            "layer structure; the base model's config.json could not be read or its "
            "architecture is unknown to mergekit"
        )


def _is_vocabulary(module: str, shape: Tuple[int, int], base: _BaseInfo) -> bool:
    from mergekit_drm.architectures import is_vocabulary

    weight = f"{module}.weight"
    if base.weights is not None and weight in base.weights:
        return base.weights[weight][1].vocabulary_axis is not None
    vocab = getattr(base.config, "vocab_size", None) if base.config is not None else None
    return is_vocabulary(base.model_type, weight) or (vocab is not None and vocab in shape)


def _module_layout(module, shape, owner, base: _BaseInfo, method: LoraMethod, warnings) -> Optional[tuple]:
    """Check one target matrix against the base; its fused parts' rows, or None."""
    from mergekit_drm.architectures import is_conv1d, matrix_layout, may_be_fused

    n, m = shape
    weight_name = f"{module}.weight"
    if _is_vocabulary(module, shape, base):
        raise LoraMergeError(
            f"an adapter targets {module}, a vocabulary matrix (embeddings / output "
            f"head). `{method.name}` merges those {method.full_model_path} in the full-model "
            "route, which cannot be done on low-rank factors; merge with `mergekit-yaml` instead"
        )
    if base.shapes is not None:
        stored = base.shapes.get(weight_name)
        if stored is None:
            raise LoraMergeError(
                f"{module} is targeted by {owner} but the base model has "
                f"no tensor {weight_name}: the adapter belongs to another model"
            )
        if tuple(stored) not in ((n, m), (m, n)):
            raise LoraMergeError(
                f"{module}: the adapters change a {n} x {m} (out x in) matrix, the "
                f"base model's {weight_name} is {list(stored)}: the adapters belong "
                "to a different base model"
            )
    layout = None
    if base.config is not None:
        try:
            stored_shape = (m, n) if is_conv1d(base.model_type, weight_name) else (n, m)
            layout = matrix_layout(weight_name, base.model_type, base.config, stored_shape)
        except ValueError as exc:
            raise LoraMergeError(str(exc)) from exc
    elif may_be_fused(weight_name):
        raise LoraMergeError(
            f"{module} looks like a fused projection, whose parts {method.name} merges "
            "separately; the base model's config.json is needed to split it"
        )
    if base.weights is not None and weight_name not in base.weights:
        warnings.append(
            f"{weight_name} is not in mergekit's architecture definition for the "
            "base model; the full-model route would not merge it"
        )
    if layout is None or layout.parts is None:
        return None
    return tuple(rows for _, rows in layout.parts)


def _module_plan(module, shape, parts, config, entries, base: _BaseInfo, method: LoraMethod, reader) -> ModulePlan:
    """Resolve the method's parameters for one target matrix, as the full-model route does."""
    weight_name = f"{module}.weight"
    t = base.weights[weight_name][0] if base.weights and weight_name in base.weights else 0.0
    try:
        shared, per_model = reader.resolve(
            method.spec(), weight_name, [entry.reference for entry in entries], t
        )
    except Exception as exc:
        raise LoraMergeError(f"{weight_name}: {exc}") from exc
    if not shared["decompose"]:
        raise LoraMergeError(
            f"`decompose: false` applies to {weight_name}: that path needs "
            "dense deltas; merge with `mergekit-yaml` instead"
        )
    values = [per_model[e.reference] for e in entries]
    try:
        kwargs = method.options(shared, values, weight_name)
    except ValueError as exc:
        raise LoraMergeError(str(exc)) from exc
    return ModulePlan(
        name=module,
        shape=shape,
        parts=parts,
        weights=tuple(float(v["weight"]) for v in values),
        kwargs=kwargs,
    )
