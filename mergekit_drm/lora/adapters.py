"""Reading and checking PEFT LoRA adapters (adapter_config.json + weights).

Only plain LoRA on linear (and GPT-2 ``Conv1D``) layers is accepted: every
tensor in the file must be a 2-D ``lora_A``/``lora_B`` weight, and every option
that makes the change to a weight anything other than ``scale * B @ A`` on an
unmodified base is refused with a message saying why (DoRA, LoRA biases,
``modules_to_save``, trainable tokens, embedding or convolution LoRA,
``target_parameters``, aLoRA, initialisations that rewrite the base weights,
...). All checks run on the adapter files alone, before anything is written.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from mergekit_drm.checks import NonFiniteError, check_finite
from mergekit_drm.lora.lowrank import LoraFactors, lora_scale

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"

_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$"
)


class AdapterError(ValueError):
    """An input adapter that cannot be merged (raised before any output exists)."""


def _truthy(value: Any) -> bool:
    return value not in (None, False, "", [], {}, 0)


# (config key, is-unsupported predicate, why). Keys missing from older PEFT
# versions read as None and pass.
_UNSUPPORTED: List[Tuple[str, Callable[[Any], bool], str]] = [
    ("use_dora", _truthy, "DoRA adapters rescale the whole weight (magnitude vector), not a low-rank delta"),
    ("lora_bias", _truthy, "the adapter trains a bias on lora_B; only weight deltas are merged"),
    ("bias", lambda v: v not in (None, "none"), "the adapter trains biases (`bias` is not 'none'); only weight deltas are merged"),
    ("modules_to_save", _truthy, "`modules_to_save` stores full copies of modules (e.g. a classification head), which DRM-on-factors cannot merge; merge those models with `mergekit-yaml` (base+adapter) instead"),
    ("trainable_token_indices", _truthy, "trainable-token adapters change embedding rows, not a low-rank matrix"),
    ("target_parameters", _truthy, "`target_parameters` (LoRA on raw parameters, e.g. MoE experts) is not supported"),
    ("layer_replication", _truthy, "`layer_replication` changes the layer stack of the base model"),
    ("alora_invocation_tokens", _truthy, "activated LoRA (aLoRA) is applied only after invocation tokens and cannot be expressed as a weight delta"),
    ("arrow_config", _truthy, "Arrow routing adapters are not a single weight delta"),
    ("use_qalora", _truthy, "QA-LoRA pools the input, so its delta is not B @ A"),
    ("use_bdlora", _truthy, "block-diagonal LoRA (BD-LoRA) is not supported"),
    ("kasa_config", _truthy, "KaSA inserts singular values between A and B and truncates the base weight"),
    ("monteclora_config", _truthy, "MonteCLoRA samples its factors, not a fixed B @ A"),
]

# Initialisations that subtract the initial adapter from the base weights, so
# the saved adapter is only valid on a modified base.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")


@dataclass
class LoraAdapter:
    """One PEFT LoRA adapter, read into memory (factors only)."""

    path: str  # local directory
    label: str  # as written in the YAML
    config: Dict[str, Any]
    modules: Dict[str, LoraFactors] = field(default_factory=dict)
    ranks: Dict[str, int] = field(default_factory=dict)
    alphas: Dict[str, float] = field(default_factory=dict)
    dtypes: Tuple[torch.dtype, ...] = ()

    @property
    def base_name(self) -> Optional[str]:
        return self.config.get("base_model_name_or_path")

    def shapes(self) -> Dict[str, Tuple[int, int]]:
        return {
            name: (f.B.shape[0], f.A.shape[1]) for name, f in self.modules.items()
        }


def resolve_adapter_dir(path: str, revision: Optional[str] = None) -> str:
    """A local directory for ``path`` (downloading adapter files from the Hub
    only when ``path`` is not a local directory)."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise AdapterError(f"{path} is a file; expected an adapter directory")
    looks_local = path.startswith(("/", "./", "../", "~")) or path.count("/") != 1
    if looks_local:
        raise AdapterError(f"adapter directory {path} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            path,
            revision=revision,
            allow_patterns=[CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME],
        )
    except Exception as exc:  # offline, private, missing: say what was tried
        raise AdapterError(
            f"adapter {path} is neither a local directory nor downloadable from the "
            f"Hugging Face Hub ({type(exc).__name__}: {exc})"
        ) from exc


def read_adapter_config(path: str, label: str) -> Dict[str, Any]:
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        if os.path.isfile(os.path.join(path, "config.json")):
            raise AdapterError(
                f"{label}: {path} holds a full model (config.json), not a PEFT adapter "
                f"({CONFIG_NAME} is missing). mergekit-drm-lora merges LoRA adapters "
                "only; merge full models with `mergekit-yaml` and `merge_method: drm`."
            )
        raise AdapterError(f"{label}: {CONFIG_NAME} is missing in {path}")
    try:
        with open(file, encoding="utf-8") as handle:
            config = json.load(handle)
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{label}: {file} is not valid JSON ({exc})") from exc
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(
            f"{label}: peft_type is {config.get('peft_type')!r}; only LoRA adapters "
            "(peft_type LORA) can be merged"
        )
    problems = [
        f"`{key}: {json.dumps(config.get(key))}` ({why})"
        for key, bad, why in _UNSUPPORTED
        if bad(config.get(key))
    ]
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        problems.append(
            f"`init_lora_weights: {init}` (this initialisation modifies the base "
            "weights, so the adapter is not a delta on the original base; convert "
            "it to a plain LoRA first, e.g. PEFT's "
            "`path_initial_model_for_weight_conversion` when saving)"
        )
    if problems:
        raise AdapterError(
            f"{label} ({path}) uses options mergekit-drm-lora does not support: "
            + "; ".join(problems)
        )
    return config


def _unreadable(label: str, file: str, exc: Exception) -> str:
    return (
        f"{label}: cannot read the adapter weights {file} ({type(exc).__name__}: {exc}); the "
        "file is truncated or not a PEFT adapter file: copy or download the adapter again "
        "(or save it again with PEFT's save_pretrained)"
    )


def _load_state(path: str, label: str) -> Dict[str, torch.Tensor]:
    file = os.path.join(path, SAFETENSORS_NAME)
    if os.path.isfile(file):
        from safetensors.torch import load_file

        try:
            return load_file(file, device="cpu")
        except Exception as exc:  # SafetensorError, or an OSError: a truncated or foreign file
            raise AdapterError(_unreadable(label, file, exc)) from None
    file = os.path.join(path, BIN_NAME)
    if os.path.isfile(file):
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterError(_unreadable(label, file, exc)) from None
    raise AdapterError(
        f"{label}: no adapter weights in {path} (expected {SAFETENSORS_NAME} or {BIN_NAME})"
    )


def _pattern_value(patterns: Dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's own rank_pattern / alpha_pattern lookup (first matching key)."""
    if not patterns:
        return default
    try:
        from peft.utils.other import get_pattern_key
    except ImportError:  # pragma: no cover - very old/new PEFT

        def get_pattern_key(keys, key_to_match):
            for key in keys:
                if re.match(rf"(.*\.)?({key})$", key_to_match):
                    return key
            return key_to_match

    key = get_pattern_key(list(patterns.keys()), module)
    return patterns.get(key, default)


def load_adapter(path: str, label: Optional[str] = None) -> LoraAdapter:
    """Read and check one adapter directory; raise ``AdapterError`` if unusable."""
    label = label or path
    config = read_adapter_config(path, label)
    factors = _factor_pairs(_load_state(path, label), label)
    adapter = LoraAdapter(path=path, label=label, config=config)
    use_rslora = bool(config.get("use_rslora", False))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    dtypes = set()
    for module in sorted(factors):
        a, b = _checked_pair(factors[module], module, label)
        rank = int(_pattern_value(rank_pattern, module, config.get("r", 8)))
        alpha = float(_pattern_value(alpha_pattern, module, config.get("lora_alpha", 8)))
        if rank != a.shape[0]:
            raise AdapterError(
                f"{label}: module {module} has rank {a.shape[0]} in the weights but "
                f"{rank} in {CONFIG_NAME} (r / rank_pattern); the adapter is inconsistent"
            )
        adapter.modules[module] = LoraFactors(
            B=b, A=a, scale=lora_scale(alpha, rank, use_rslora)
        )
        adapter.ranks[module] = rank
        adapter.alphas[module] = alpha
        dtypes.update((a.dtype, b.dtype))
    adapter.dtypes = tuple(sorted(dtypes, key=str))
    return adapter


def _factor_pairs(state: Dict[str, torch.Tensor], label: str) -> Dict[str, Dict[str, torch.Tensor]]:
    """module -> {"A": lora_A, "B": lora_B}; any other tensor is refused."""
    factors: Dict[str, Dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match is None:
            unknown.append(key)
            continue
        factors.setdefault(match["module"], {})[match["which"]] = tensor
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise AdapterError(
            f"{label}: tensors that are not LoRA A/B weights of linear layers "
            f"({len(unknown)}: {shown}). Embedding LoRA, DoRA magnitudes, biases and "
            "modules_to_save are not supported."
        )
    if not factors:
        raise AdapterError(f"{label}: the adapter file holds no LoRA weights")
    return factors


def _checked_pair(pair: Dict[str, torch.Tensor], module: str, label: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lora_A, lora_B) of one module: both present, 2-D, same rank, float, finite."""
    if set(pair) != {"A", "B"}:
        raise AdapterError(
            f"{label}: module {module} has lora_{''.join(sorted(pair))} but not "
            "both lora_A and lora_B"
        )
    a, b = pair["A"], pair["B"]
    if a.dim() != 2 or b.dim() != 2:
        raise AdapterError(
            f"{label}: module {module} has {a.dim()}-D LoRA factors (convolution "
            "LoRA?); only linear layers are supported"
        )
    if a.shape[0] != b.shape[1]:
        raise AdapterError(
            f"{label}: module {module}: lora_A {tuple(a.shape)} and lora_B "
            f"{tuple(b.shape)} have different ranks"
        )
    if not (a.is_floating_point() and b.is_floating_point()):
        raise AdapterError(f"{label}: module {module} has non-float LoRA weights")
    try:
        for which, factor in (("lora_A", a), ("lora_B", b)):
            check_finite(
                factor, method="mergekit-drm-lora", tensor_name=f"{module}.{which}",
                model=f"adapter {label}",
                fix="Repair or re-export that adapter (a diverged training run?), or "
                "remove it from `models:`.",
            )
    except NonFiniteError as exc:
        raise AdapterError(str(exc)) from None
    return a, b


def normalized_base_name(name: Optional[str]) -> Optional[str]:
    """A base model name for comparisons: real path for local dirs."""
    if not name:
        return None
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return os.path.realpath(expanded)
    return name.rstrip("/")
