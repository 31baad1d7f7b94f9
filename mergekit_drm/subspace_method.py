"""What the mergekit adapters of the subspace methods (TSV-M, Iso-C, Iso-CTS) share.

Each method is a ``SubspaceMerge`` with its own name, paper, extra parameters
and ``merge_matrix`` (a kernel call). This module decides which tensors take
the SVD path, splits fused projections into their parts (``architectures.py``,
as for ``drm``), gives every other tensor the weighted mean of the task
vectors, applies ``lambda``, and validates parameters and inputs at planning
time with the same checks and messages as ``drm`` (``checks.py``,
``preflight.py``).

Which tensors are decomposed: 2-D weights, as in both papers (their reference
code decomposes exactly the 2-D tensors, minus an exclusion list). Tensors
with a vocabulary axis (embeddings, output heads) take the mean instead, as
``drm`` sends them to its elementwise path: their rows are per-token lookups
that mergekit may re-index across tokenizers, not one linear map whose
singular subspaces the methods reason about, and their SVD dominates the
cost. ``decompose: false`` (with a filter) sends any other tensor to the mean,
like the papers' exclusion list.
"""

from __future__ import annotations

from typing import Any, Hashable, List, Optional, Sequence

import torch

from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterSpec,
    TensorGroup,
)
from mergekit_drm.architectures import matrix_layout
from mergekit_drm.checks import check_finite
from mergekit_drm.drm.kernel import compute_dtype_for
from mergekit_drm.compat import CleansPartialOutput
from mergekit_drm.overflow import checked_cast
from mergekit_drm.preflight import model_config, planning_checks, require_task_vectors

def common_parameters(method: str) -> List[ParameterSpec]:
    """The method's parameters, declared in ``method_options`` (shared five plus its own)."""
    from mergekit_drm.method_options import OPTIONS

    return list(OPTIONS[method].parameter_specs())


class SubspaceMerge(CleansPartialOutput, GroupMergeMethod):
    """A per-matrix SVD merge of task vectors; subclasses set ``spec`` and ``merge_matrix``."""

    def merge_matrix(
        self, deltas: List[torch.Tensor], weights: List[float], params: dict, compute_dtype: torch.dtype
    ) -> torch.Tensor:
        raise NotImplementedError

    def validate_inputs(
        self,
        input_ids: Sequence[Hashable],
        base_id: Optional[Hashable] = None,
        *,
        group_name: Optional[str] = None,
    ) -> None:
        require_task_vectors(self.spec.name, input_ids, base_id, group_name)
        super().validate_inputs(input_ids, base_id, group_name=group_name)
        planning_checks(self.spec, input_ids, group_name)

    def merge_group(self, group: TensorGroup, /, **params: Any) -> torch.Tensor:
        base = group.base.tensor
        entries = group.non_base
        name = group.metadata.name or "<tensor>"
        check_finite(
            base, method=self.spec.name, tensor_name=name, model=f"{group.base.id} (the base model)",
            source=group.base.id,
            fix="Repair or re-download the base checkpoint; every merged tensor adds to it.",
        )
        for entry in entries:
            check_finite(entry.tensor, method=self.spec.name, tensor_name=name, model=entry.id)
        compute_dtype = compute_dtype_for(
            params["compute_dtype"], [base] + [entry.tensor for entry in entries]
        )
        weights = [params["weight"][entry.id] for entry in entries]
        # The base in the compute dtype only when it is wider (a float64
        # checkpoint merged in float32); bf16 and float32 mix in exactly.
        base_c = base
        if torch.promote_types(base.dtype, compute_dtype) != compute_dtype:
            base_c = base.to(compute_dtype)

        def delta(entry):
            out = torch.empty(base.shape, dtype=compute_dtype, device=base.device)
            return out.copy_(entry.tensor).sub_(base_c)

        def delta_slice(tensor, base_part, weight):
            return tensor.to(compute_dtype, copy=True).sub_(base_part).mul_(weight)

        if params["decompose"] and group.metadata.vocabulary_axis is None and base.dim() == 2:
            deltas = [delta(entry) for entry in entries]
            merged = self._merge_layout(deltas, weights, name, group, params, compute_dtype)
            del deltas
        else:
            # The papers' rule for what they do not decompose: the mean, summed
            # slice by slice in model order (vocabulary tensors: no copy of a
            # whole delta in the compute dtype; the same sums as whole tensors).
            merged = torch.empty(base.shape, dtype=compute_dtype, device=base.device)
            flat, base_flat = merged.view(-1), base_c.reshape(-1)
            inputs = [entry.tensor.reshape(-1) for entry in entries]
            step = 1 << 16
            for start in range(0, flat.numel(), step):
                piece = flat[start:start + step].zero_()
                for tensor, weight in zip(inputs, weights):
                    piece.add_(delta_slice(tensor[start:start + step], base_flat[start:start + step], weight))
            merged.div_(len(entries))
        merged.mul_(params["lambda"]).add_(base_c)
        return checked_cast(merged, base.dtype, method=self.spec.name, tensor_name=name, params=params)

    def _merge_layout(self, deltas, weights, name, group, params, compute_dtype):
        """Fused projections (q/k/v, gate/up in one tensor) merge part by part,
        so a result does not depend on how a checkpoint packs its matrices."""
        config = model_config(group.base.id)
        model_type = getattr(config, "model_type", None) if config is not None else None
        layout = matrix_layout(name, model_type, config, tuple(deltas[0].shape))
        if layout.transposed:
            deltas = [d.T for d in deltas]
        if layout.parts is None:
            merged = self.merge_matrix(deltas, weights, params, compute_dtype)
        else:
            merged = deltas[0].new_empty(deltas[0].shape)
            for _, rows in layout.parts:
                rows = rows.to(merged.device)
                merged[rows] = self.merge_matrix(
                    [d.index_select(0, rows) for d in deltas], weights, params, compute_dtype
                )
        return (merged.T if layout.transposed else merged).contiguous()


def method_spec(name: str, pretty_name: str, reference_url: str, parameters) -> MergeMethodSpec:
    return MergeMethodSpec(
        name=name,
        pretty_name=pretty_name,
        reference_url=reference_url,
        parameters=tuple(parameters),
        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
    )
