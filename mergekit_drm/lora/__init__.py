"""LoRA-native merges: N PEFT adapters into one adapter, on their factors.

Kernels (plain tensors, no n x m deltas): ``lowrank`` (DRM, truncation),
``lowrank_subspace`` (TSV-M, Iso-C, Iso-CTS). The ``mergekit-drm-lora``
command (``cli``) runs three phases so that bad input never leaves anything
on disk: ``plan`` (read and check the YAML, adapters and base; resolve
parameters per matrix), ``execute`` (the method's kernel per matrix, optional
fixed rank) and ``peft_output`` (PEFT adapter, YAML and model card from
``model_card.md``). ``methods`` is the table of methods it computes;
``adapters`` reads and checks PEFT LoRA adapters.
"""

from mergekit_drm.lora.lowrank import (
    LoraFactors,
    drm_merge_lowrank,
    drm_merge_lowrank_parts,
    truncate_factors,
)

__all__ = [
    "LoraFactors",
    "drm_merge_lowrank",
    "drm_merge_lowrank_parts",
    "truncate_factors",
]
