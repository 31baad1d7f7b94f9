"""Checks that must fail during mergekit's planning, before any output exists.

mergekit 0.1.5 compares tensor shapes only when a tensor is merged, after the
output directory was created and possibly after shards were written. The one
hook a method gets during planning is ``validate_inputs``, called once per
output tensor with the model references. These helpers answer what it needs
from safetensors headers alone (no tensor data is read) and from each model's
config, cached and thread-safe (``--multi-gpu`` runs tasks in threads).
"""

from __future__ import annotations

import functools
import json
import os
import struct
import threading
from typing import Any, Dict, Hashable, Optional, Sequence, Tuple

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


def stored_shape(model: Any, tensor_name: str) -> Optional[Tuple[int, ...]]:
    """Shape of ``tensor_name`` in a mergekit ``ModelReference``, if knowable cheaply."""
    try:
        from mergekit.io.tasks import LoaderCache

        index = LoaderCache().get(model).index
    except Exception:  # not a ModelReference, or not loadable: nothing to check
        return None
    if not index.is_safetensors:
        return None
    shard = index.tensor_paths.get(tensor_name)
    if shard is None:
        return None
    return safetensors_shapes(os.path.join(index.base_path, shard)).get(tensor_name)


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
