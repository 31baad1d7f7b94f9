"""Save a BERT encoder so that mergekit 0.1.5 can merge it, and read it back.

mergekit 0.1.5 cannot plan any merge of a checkpoint whose ``architectures`` is
``BertModel``: its ``bert.json`` has an optional, aliased
``embeddings.position_ids`` entry, and planning fails with
``TypeError: can only concatenate list (not "tuple") to list`` (plan.py). Its
``bert-masked-lm.json`` (``BertForMaskedLM``) has no such entry and merges fine.
So every encoder in this benchmark is stored under the ``BertForMaskedLM``
naming:

* every encoder tensor gets the ``bert.`` prefix;
* ``cls.predictions.bias`` (required by ``bert-masked-lm.json``) is added as
  zeros, identical in every model so that every method returns zeros;
  ``cls.predictions.decoder.weight`` is optional there (tied to the word
  embeddings) and is not written;
* the non-persistent ``embeddings.position_ids`` buffer is not written (it is
  derived from the config).

``from_masked_lm_state`` is the exact inverse: it strips the prefix and drops
the ``cls.`` tensors. The pooler (``bert.pooler.dense.*``) is required by
mergekit's definition and kept, though mean pooling never uses it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import load_file, save_file

PREFIX = "bert."
MLM_ONLY = ("cls.",)
DROPPED = ("embeddings.position_ids",)
ARCHITECTURE = "BertForMaskedLM"


def to_masked_lm_state(encoder_state: Dict[str, torch.Tensor], vocab_size: int) -> Dict[str, torch.Tensor]:
    """``BertModel`` state dict -> ``BertForMaskedLM`` tensor names."""
    out = {}
    for name, tensor in encoder_state.items():
        if name.startswith(PREFIX) or name.startswith(MLM_ONLY):
            raise ValueError(f"{name!r} is already in BertForMaskedLM naming")
        if name in DROPPED:
            continue
        out[PREFIX + name] = tensor.detach().to("cpu").contiguous()
    dtype = out[PREFIX + "embeddings.word_embeddings.weight"].dtype
    out["cls.predictions.bias"] = torch.zeros(vocab_size, dtype=dtype)
    return out


def from_masked_lm_state(mlm_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``BertForMaskedLM`` tensor names -> ``BertModel`` state dict (inverse)."""
    out = {}
    for name, tensor in mlm_state.items():
        if name.startswith(MLM_ONLY):
            continue
        if not name.startswith(PREFIX):
            raise ValueError(f"unexpected tensor {name!r} in a BertForMaskedLM checkpoint")
        if name[len(PREFIX):] in DROPPED:
            continue
        out[name[len(PREFIX):]] = tensor
    return out


def save_encoder_checkpoint(directory, encoder_state, config) -> Path:
    """Write ``config.json`` (architectures: BertForMaskedLM) and
    ``model.safetensors`` under the masked-LM naming. ``config`` is a
    ``transformers.BertConfig`` (or a dict of one)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg["architectures"] = [ARCHITECTURE]
    cfg["model_type"] = "bert"
    state = to_masked_lm_state(encoder_state, int(cfg["vocab_size"]))
    tmp = directory / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return directory


def load_encoder_state(directory) -> Dict[str, torch.Tensor]:
    """Read every ``*.safetensors`` file of a (possibly merged, sharded)
    masked-LM-named checkpoint and return the ``BertModel`` state dict."""
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {directory}")
    state: Dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return from_masked_lm_state(state)
