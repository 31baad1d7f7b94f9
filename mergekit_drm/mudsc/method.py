"""The ``mudsc`` merge method: mergekit adapter around the alignment engine.

Planning (before mergekit creates the output directory): parameter ranges,
the calibration file, the saved alignment, the architecture and tensor shapes
are checked. The first tensor mergekit asks for triggers the global
alignment pass (``engine.cached_alignment``); every tensor then merges under
that one alignment (``alignment.merge_tensor``).
"""

from __future__ import annotations

import os
from typing import Any, Hashable, Mapping, Optional, Sequence, Tuple

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    TensorGroup,
)
from mergekit_drm.checks import (
    check_finite,
    check_parameter_names,
    parameter_scopes,
)
from mergekit_drm.compat import CleansPartialOutput, is_slice_call, planned_configuration, planned_task
from mergekit_drm.mudsc.alignment import merge_tensor
from mergekit_drm.mudsc.calibration import check_calibration_path
from mergekit_drm.mudsc.engine import (
    CalibrationOptions,
    begin_merge,
    cached_alignment,
    check_models,
    describe_models,
    plan_alignment,
)
from mergekit_drm.mudsc.solver import SolverOptions
from mergekit_drm.method_options import MUDSC
from mergekit_drm.overflow import checked_cast

PRETTY_NAME = "MuDSC"
REFERENCE_URL = "https://arxiv.org/abs/2403.01753"


def _calibration(value: str) -> str:
    if value:
        check_calibration_path(value)
    return value


def _saved(value: str) -> str:
    if value:
        for name in ("alignment.json", "alignment.safetensors"):
            if not os.path.isfile(os.path.join(value, name)):
                raise ValueError(
                    f"mudsc parameter `alignment`: {value!r} has no {name}; write one with "
                    "`mergekit-mudsc-align config.yml --alignment-out DIR`"
                )
    return value


# Declared in method_options.MUDSC; the two paths are checked when parsed.
PARAMETERS = MUDSC.parameter_specs(extra={"calibration": _calibration, "alignment": _saved})


def alignment_options(values: Mapping[str, Any]) -> Tuple[SolverOptions, CalibrationOptions]:
    """The search and calibration settings from validated parameter values."""
    solver = SolverOptions(**MUDSC.kernel_kwargs(values, SolverOptions, skip=("weight",)))
    calibration = CalibrationOptions(**MUDSC.kernel_kwargs(values, CalibrationOptions, skip=("weight",)))
    return solver, calibration


class MuDSCMerge(CleansPartialOutput, GroupMergeMethod):
    """Align units across models (dual-space similarity), then average."""

    spec = MergeMethodSpec(
        name="mudsc",
        pretty_name=PRETTY_NAME,
        reference_url=REFERENCE_URL,
        parameters=PARAMETERS,
        contract=InputContract(base=BasePolicy.FORBIDDEN, min_inputs=2),
    )

    def validate_inputs(
        self,
        input_ids: Sequence[Hashable],
        base_id: Optional[Hashable] = None,
        *,
        group_name: Optional[str] = None,
    ) -> None:
        if base_id is not None:
            raise ValueError(
                "mudsc merges models without a common base (they may come from different "
                "initializations): remove `base_model:` from the YAML"
            )
        if len(input_ids) < 2:
            raise ValueError("mudsc needs at least 2 models under `models:`")
        super().validate_inputs(input_ids, base_id, group_name=group_name)
        # The slice-level call starts a merge: check the models and the
        # parameter names, reset the cache. Each tensor task's call (while
        # planning, and again while executing) fixes or compares the alignment
        # options and, the first time, verifies the saved alignment or reads
        # and tokenizes the calibration text.
        if is_slice_call(group_name):
            config = planned_configuration()
            check_parameter_names(config, self.spec)
            check_models(describe_models(input_ids))
            explicit = None
            if config is not None:
                explicit = {
                    key for _, per_model, settings in parameter_scopes(config)
                    if not per_model for key in settings
                }
            begin_merge(input_ids, explicit)
        elif group_name:
            task = planned_task()
            if task is not None:
                solver, calibration = alignment_options(task.parameters)
                plan_alignment(
                    input_ids, solver, calibration, task.parameters["alignment"] or None, group_name
                )

    def merge_group(self, group: TensorGroup, /, **params: Any) -> torch.Tensor:
        entries = group.entries
        name = group.metadata.name or "<tensor>"
        models = [entry.id for entry in entries]
        device = entries[0].tensor.device
        for entry in entries:
            check_finite(entry.tensor, method="mudsc", tensor_name=name, model=entry.id)
        solver, calibration = alignment_options(params)
        result = cached_alignment(models, solver, calibration, params["alignment"] or None, device)
        tensor_spec = result.spec.tensors.get(name)
        if tensor_spec is None:
            if name in result.spec.buffers:
                return entries[0].tensor
            raise ValueError(
                f"mudsc: tensor {name} has no place in the {result.spec.architecture} "
                "permutation spec; it cannot be merged without breaking the alignment"
            )
        weights = [float(params["weight"][entry.id]) for entry in entries]
        merged = merge_tensor(
            tensor_spec, [entry.tensor for entry in entries], weights, result.alignment
        )
        return checked_cast(merged, entries[0].tensor.dtype, method="mudsc", tensor_name=name, params=params)


mudsc_merge_method = MuDSCMerge()
