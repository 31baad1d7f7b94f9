"""The ``drm`` merge method: mergekit adapter around ``kernel.py``.

mergekit calls ``merge_group`` once per output tensor with the base and the
fine-tuned tensors. This module decides which path a tensor takes (joint SVD
or elementwise), undoes storage quirks (Conv1D transposition, fused
projections) using ``architectures.py``, and validates parameters and inputs
at planning time so that bad input fails before anything is written.
"""

from __future__ import annotations

from typing import Any, Hashable, Optional, Sequence

import torch

from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    TensorGroup,
)
from mergekit_drm.architectures import matrix_layout
from mergekit_drm.checks import check_finite
from mergekit_drm.drm.kernel import compute_dtype_for, drm_merge_matrix, elementwise_merge
from mergekit_drm.compat import CleansPartialOutput
from mergekit_drm.method_options import DRM
from mergekit_drm.overflow import checked_cast
from mergekit_drm.preflight import model_config, planning_checks, require_task_vectors

PRETTY_NAME = "DRM"
REFERENCE_URL = "https://arxiv.org/abs/2505.23117"


# Declared in method_options.DRM (defaults, rules, scopes, kernel arguments).
PARAMETERS = DRM.parameter_specs()


def check_one_density(name: str, densities) -> None:
    """drm prunes jointly, so every model of one tensor has the same ``density``."""
    DRM.one_value("density", densities, name)


class DRMMerge(CleansPartialOutput, GroupMergeMethod):
    """Decom-Renorm-Merge as a mergekit group method."""

    spec = MergeMethodSpec(
        name="drm",
        pretty_name=PRETTY_NAME,
        reference_url=REFERENCE_URL,
        parameters=PARAMETERS,
        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
    )

    def validate_inputs(
        self,
        input_ids: Sequence[Hashable],
        base_id: Optional[Hashable] = None,
        *,
        group_name: Optional[str] = None,
    ) -> None:
        require_task_vectors("drm", input_ids, base_id, group_name)
        super().validate_inputs(input_ids, base_id, group_name=group_name)
        task = planning_checks(self.spec, input_ids, group_name)
        if task is not None:
            check_one_density(
                group_name,
                [task.input_parameters[m]["density"] for m in input_ids if m != base_id],
            )

    def merge_group(self, group: TensorGroup, /, **params: Any) -> torch.Tensor:
        base = group.base.tensor
        entries = group.non_base
        name = group.metadata.name or "<tensor>"
        check_finite(
            base, method="drm", tensor_name=name, model=f"{group.base.id} (the base model)",
            source=group.base.id,
            fix="Repair or re-download the base checkpoint; every merged tensor adds to it.",
        )
        for entry in entries:
            check_finite(entry.tensor, method="drm", tensor_name=name, model=entry.id)
        densities = {params["density"][entry.id] for entry in entries}
        check_one_density(name, densities)
        compute_dtype = compute_dtype_for(
            params["compute_dtype"], [base] + [entry.tensor for entry in entries]
        )
        weights = [params["weight"][entry.id] for entry in entries]
        # The base in the compute dtype only when it is wider (a float64
        # checkpoint merged in float32); bf16 and float32 mix in exactly.
        base_c = base
        if torch.promote_types(base.dtype, compute_dtype) != compute_dtype:
            base_c = base.to(compute_dtype)
        decompose = (
            params["decompose"]
            and group.metadata.vocabulary_axis is None
            and base.dim() >= 2
        )
        if decompose:
            # The joint SVD needs the N deltas in the compute dtype: built in
            # place, one model at a time (no cast copy of each input, no cast base).
            deltas = torch.empty(
                (len(entries),) + tuple(base.shape), dtype=compute_dtype, device=base.device
            )
            for index, entry in enumerate(entries):
                deltas[index].copy_(entry.tensor).sub_(base_c)
            merged = self._merge_matrix(
                deltas, weights, name, group, densities.pop(), params, compute_dtype
            )
            del deltas
        else:
            # Vocabulary tensors: the kernel streams over the models' slices
            # and never holds the N deltas in the compute dtype.
            merged = elementwise_merge(
                [entry.tensor for entry in entries],
                weights,
                base=base_c,
                **DRM.kernel_kwargs(
                    params, elementwise_merge, models=[e.id for e in entries], where=name,
                    skip=("weight", "lambda"), compute_dtype=compute_dtype,
                ),
            )
        merged.mul_(params["lambda"]).add_(base_c)
        return checked_cast(merged, base.dtype, method="drm", tensor_name=name, params=params)

    def _merge_matrix(self, deltas, weights, name, group, density, params, compute_dtype):
        config = model_config(group.base.id)
        model_type = getattr(config, "model_type", None) if config is not None else None
        layout = matrix_layout(name, model_type, config, tuple(deltas.shape[1:]))
        stored_shape = deltas.shape[1:]
        if layout.transposed:
            deltas = deltas.transpose(1, 2)
        linear_shape = deltas.shape[1:]
        # Tensors of more than two dimensions are merged as (out, rest).
        matrices = deltas.reshape(deltas.shape[0], linear_shape[0], -1)
        # weights are passed positionally; lambda is applied by merge_group.
        kwargs = DRM.kernel_kwargs(
            params, drm_merge_matrix, skip=("weight", "lambda"), density=density,
            compute_dtype=compute_dtype,
        )
        if layout.parts is None:
            merged = drm_merge_matrix(matrices, weights, **kwargs)
        else:
            merged = matrices.new_empty(matrices.shape[1:])
            for _, rows in layout.parts:
                rows = rows.to(matrices.device)
                merged[rows] = drm_merge_matrix(
                    matrices.index_select(1, rows), weights, **kwargs
                )
        merged = merged.reshape(linear_shape)
        if layout.transposed:
            merged = merged.T
        return merged.reshape(stored_shape).contiguous()


drm_merge_method = DRMMerge()
