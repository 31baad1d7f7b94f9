"""Checks that must fail during mergekit's planning, before any output exists.

mergekit 0.1.5 compares tensor shapes only when a tensor is merged, after the
output directory was created and possibly after shards were written. The one
hook a method gets during planning is ``validate_inputs``, called once per
output tensor with the model references. These helpers answer what it needs
from safetensors headers and memory-mapped ``.bin`` checkpoints (no tensor
data is read), from the planning task on the call stack, and from each model's
config, cached and thread-safe (``--multi-gpu`` runs tasks in threads).
What mergekit itself knows (the planned task, its loader's index) comes
through ``compat.py``.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import threading
from typing import Any, Dict, Hashable, Optional, Sequence, Tuple

from mergekit_drm.compat import is_slice_call, model_index, planned_configuration, planned_task

_header_lock = threading.Lock()
_headers: Dict[str, Dict[str, Tuple[int, ...]]] = {}


def safetensors_shapes(path: str) -> Dict[str, Tuple[int, ...]]:
    with _header_lock:
        cached = _headers.get(path)
    if cached is not None:
        return cached
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    shapes = {
        key: tuple(value["shape"])
        for key, value in header.items()
        if key != "__metadata__"
    }
    with _header_lock:
        _headers[path] = shapes
    return shapes


_bin_shapes: Dict[str, Dict[str, Tuple[int, ...]]] = {}


def bin_shapes(path: str) -> Dict[str, Tuple[int, ...]]:
    """Shapes in a PyTorch ``.bin`` checkpoint, memory-mapped: no tensor data is read."""
    with _header_lock:
        cached = _bin_shapes.get(path)
    if cached is not None:
        return cached
    import torch

    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # legacy (non-zip) format: cannot be mapped, so not checked here
        state = {}
    shapes = {
        key: tuple(value.shape) for key, value in state.items() if hasattr(value, "shape")
    }
    del state
    with _header_lock:
        _bin_shapes[path] = shapes
    return shapes


def stored_shape(model: Any, tensor_name: str) -> Optional[Tuple[int, ...]]:
    """Shape of ``tensor_name`` in a mergekit ``ModelReference``, if knowable cheaply."""
    index = model_index(model)
    if index is None:
        return None
    shard = index.tensor_paths.get(tensor_name)
    if shard is None:
        return None
    path = os.path.join(index.base_path, shard)
    if index.is_safetensors:
        return safetensors_shapes(path).get(tensor_name)
    return bin_shapes(path).get(tensor_name)


def check_present(tensor_name: str, models: Sequence[Any], task: Optional[Any]) -> None:
    """Raise if a required tensor is in none of a model's names (mergekit would
    otherwise fail only while merging, after creating the output directory)."""
    inputs = task.inputs if task is not None else None
    if not inputs:
        return
    missing, present = [], []
    for model in models:
        info = inputs.get(model)
        index = model_index(model)
        if info is None or index is None or info.optional:
            continue
        names = (info.name,) + info.aliases
        (present if any(n in index.tensor_paths for n in names) else missing).append(str(model))
    if missing:
        found = f" (it is in {', '.join(present)})" if present else ""
        raise ValueError(
            f"Tensor {tensor_name} is missing from {', '.join(missing)}{found}. All models "
            "must share the base model's architecture; remove that model from the YAML or "
            "use a complete checkpoint."
        )


@functools.lru_cache(maxsize=None)
def model_config(model: Hashable) -> Optional[Any]:
    """The transformers config of a mergekit ``ModelReference`` (None if unknown).

    Falls back to the raw ``config.json`` values (never running remote code)
    for architectures transformers does not know.
    """
    config_fn = getattr(model, "config", None)
    if config_fn is None:
        return None
    try:
        return config_fn(trust_remote_code=False)
    except Exception:
        pass
    try:
        from types import SimpleNamespace

        from transformers import PretrainedConfig

        raw, _ = PretrainedConfig.get_config_dict(model.model.path)
        return SimpleNamespace(**raw)
    except Exception:
        return None


def _vocab_size(model: Any) -> Optional[int]:
    config = model_config(model)
    return getattr(config, "vocab_size", None) if config is not None else None


def check_same_shapes(tensor_name: str, models: Sequence[Any]) -> None:
    """Raise if the models store ``tensor_name`` with different shapes.

    A difference only along a vocabulary-sized axis is left to mergekit, which
    re-indexes vocabularies when the YAML has a ``tokenizer:`` section.
    """
    shapes = [(model, stored_shape(model, tensor_name)) for model in models]
    shapes = [(model, shape) for model, shape in shapes if shape is not None]
    if len({shape for _, shape in shapes}) <= 1:
        return
    first = shapes[0][1]
    if all(len(shape) == len(first) for _, shape in shapes):
        differing = {
            axis
            for _, shape in shapes
            for axis in range(len(first))
            if shape[axis] != first[axis]
        }
        if len(differing) == 1:
            axis = differing.pop()
            if all(shape[axis] == _vocab_size(model) for model, shape in shapes):
                return
    listed = "; ".join(f"{model}: {list(shape)}" for model, shape in shapes)
    raise ValueError(
        f"Tensor {tensor_name} has different shapes in the input models ({listed}). "
        "All models must share the base model's architecture and sizes; remove the "
        "mismatched model from the YAML (or merge only models fine-tuned from the "
        "same base)."
    )


def require_task_vectors(method: str, input_ids: Sequence[Hashable], base_id: Optional[Hashable], group_name: Optional[str]) -> None:
    """A task-vector method (drm, tsv_m, iso_c, iso_cts) needs the base and one model besides it."""
    where = f" (for {group_name})" if group_name else ""
    if base_id is None or base_id not in input_ids:
        raise ValueError(
            f"{method} merges task vectors (fine-tuned minus base), so it needs the "
            f"model the fine-tunes started from{where}: add `base_model: <path>` "
            "to the YAML."
        )
    if len(input_ids) < 2:
        raise ValueError(
            f"{method} needs at least one model besides the base model{where}: list "
            "the fine-tuned models under `models:`."
        )


def planning_checks(spec: Any, input_ids: Sequence[Hashable], group_name: Optional[str]) -> Optional[Any]:
    """Parameter names per output slice; presence and shapes per tensor task.

    Returns the planned tensor task (its resolved parameters), or None.
    """
    from mergekit_drm.checks import check_parameter_names

    if is_slice_call(group_name):
        check_parameter_names(planned_configuration(), spec)
        return None
    if not group_name:
        return None
    task = planned_task()
    check_present(group_name, input_ids, task)
    check_same_shapes(group_name, input_ids)
    return task
