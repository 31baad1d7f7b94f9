"""The merge methods ``mergekit-drm-lora`` computes on LoRA factors: one table entry each.

An entry names the low-rank kernel (adapters' factors in, merged factors out,
equal to the dense merge of the folded deltas up to rounding), turns the
parameters mergekit's resolver gives for one matrix into that kernel's
keywords, and says what the model card and messages need (exact merged rank,
what the full-model route does with a vocabulary matrix).
Adding a method whose merge of low-rank deltas is low rank is one entry here
plus its kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List

import torch

from mergekit_drm.lora.lowrank import drm_merge_lowrank
from mergekit_drm.lora.lowrank_subspace import iso_c_merge_lowrank, iso_cts_merge_lowrank, tsv_merge_lowrank


class LoraMergeError(ValueError):
    """A configuration or input that cannot be merged (nothing was written)."""


DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def compute_dtype(shared: Dict[str, Any]):
    """The resolved ``compute_dtype`` parameter as a torch dtype (None = auto)."""
    name = shared["compute_dtype"]
    return None if name == "auto" else DTYPES[name]


@dataclass(frozen=True)
class LoraMethod:
    """How one merge method runs on adapters' factors."""

    name: str  # merge_method in the YAML; paper and parameters come from its mergekit spec
    merge: Callable[..., Any]  # (adapters, weights, *, shape, **options) -> (B, A)
    options: Callable[[Dict[str, Any], List[Dict[str, Any]], str], Dict[str, Any]]
    rank_bound: str  # the exact merged rank, for the model card
    full_model_path: str  # what the full-model route does with a vocabulary matrix

    def spec(self):
        """The mergekit method's ``MergeMethodSpec`` (its parameters and defaults)."""
        from mergekit_drm.registration import METHODS, load_method

        return load_method(METHODS[self.name]).spec


def _kernel_options(method: str, merge: Callable[..., Any]):
    """The low-rank kernel's keywords from ``method_options`` (the mergekit
    adapters' table): the same parameters reach the same arguments, and
    ``lambda`` becomes the kernel's ``scale`` (the factors carry it)."""
    from mergekit_drm.method_options import OPTIONS

    table = OPTIONS[method]

    def options(shared, per_model, weight_name):
        values = dict(shared)
        for param in table.params:
            if param.set_per_model:
                values[param.name] = {index: model[param.name] for index, model in enumerate(per_model)}
        return table.kernel_kwargs(
            values, merge, models=range(len(per_model)), where=weight_name,
            skip=("weight",),  # the plan passes weights positionally
            compute_dtype=compute_dtype(shared),
        )

    return options


METHODS: Dict[str, LoraMethod] = {
    method.name: method
    for method in (
        LoraMethod(
            "drm", drm_merge_lowrank,
            _kernel_options("drm", drm_merge_lowrank), "the number of joint singular directions DRM keeps", "elementwise",
        ),
        LoraMethod(
            "tsv_m", tsv_merge_lowrank, _kernel_options("tsv_m", tsv_merge_lowrank),
            "at most the sum over adapters of min(kept rank per task, adapter rank)", "by the weighted mean",
        ),
        LoraMethod(
            "iso_c", iso_c_merge_lowrank, _kernel_options("iso_c", iso_c_merge_lowrank),
            "at most the sum of the adapters' ranks", "by the weighted mean",
        ),
        LoraMethod(
            "iso_cts", iso_cts_merge_lowrank,
            _kernel_options("iso_cts", iso_cts_merge_lowrank),
            "at most the common subspace's size plus the sum over adapters of min(per-task size, "
            "adapter rank)", "by the weighted mean",
        ),
    )
}
