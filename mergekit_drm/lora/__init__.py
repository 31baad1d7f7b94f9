"""DRM for LoRA adapters: merge N PEFT adapters into one adapter.

``lowrank`` runs DRM on the adapters' factors (no dense n x m deltas);
``adapters`` reads and checks PEFT LoRA adapters; ``cli`` is the
``mergekit-drm-lora`` command.
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
