"""Input checks shared by every method: finite values and parameter names.

A NaN or inf in one input entry does not fail a merge by itself: DRM's Gram
route reads it as an all-zero stack (the clean models' changes are lost too),
the elementwise path copies it to the output, a full SVD raises an unnamed
``LinAlgError``. So every entry point checks its inputs first and names the
tensor, the model and the fix.

mergekit 0.1.5 drops parameter names a method does not declare, and gives a
method no handle on the merge configuration; ``compat.planned_configuration``
finds it while planning, and the checks here read it.
"""

from __future__ import annotations

import difflib
import logging
import os
from typing import Any, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch

from mergekit_drm.parameters import REMOVED

log = logging.getLogger(__name__)

# "warn" (default) logs unknown parameter names, "error" refuses the merge.
UNKNOWN_PARAMETERS_ENV = "MERGEKIT_DRM_UNKNOWN_PARAMETERS"


class NonFiniteError(ValueError):
    """An input tensor holds NaN or inf."""


def check_finite(
    tensor: torch.Tensor,
    *,
    method: str,
    tensor_name: str,
    model: Optional[Any] = None,
    fix: Optional[str] = None,
    source: Optional[Any] = None,
) -> None:
    """Raise ``NonFiniteError`` naming tensor and model if ``tensor`` is not all finite.

    ``source``: the mergekit model reference the tensor was read from, when
    ``model`` is a label; with either, an inf that mergekit's cast to the
    YAML's ``dtype:`` produced from a finite checkpoint is reported as such
    (``overflow.cast_overflow``), not blamed on the checkpoint.
    """
    if not tensor.is_floating_point() or _all_finite(tensor):
        return
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    first = torch.nonzero(~torch.isfinite(tensor))[0].tolist()
    of_model = f" of model {model}" if model is not None else ""
    cast = None
    if model is not None or source is not None:
        from mergekit_drm.overflow import cast_overflow

        cast = cast_overflow(tensor, source if source is not None else model, tensor_name)
    if cast is not None and cast[0]:
        raise NonFiniteError(
            f"{method}: tensor {tensor_name}{of_model} holds {inf} inf value(s) as read "
            f"(first at index {tuple(first)}). {cast[1]}"
        )
    if cast is not None:
        fix = cast[1]
    raise NonFiniteError(
        f"{method}: tensor {tensor_name}{of_model} holds {nan} NaN and {inf} inf "
        f"value(s) (first at index {tuple(first)}); a merge would spread them or silently "
        "drop every model's change to this tensor. "
        + (fix or "Repair or re-export that checkpoint (a diverged fine-tune?), or remove "
           "the model from `models:`.")
    )


def _all_finite(tensor: torch.Tensor) -> bool:
    """One reading pass, no mask: a NaN or inf anywhere makes the sum non-finite;
    only then (or on an overflowing sum) is every entry tested."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def closest(name: str, known: Iterable[str]) -> Optional[str]:
    matches = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.5)
    return matches[0] if matches else None


def parameter_scopes(config: Any) -> Iterator[Tuple[str, bool, Mapping[str, Any]]]:
    """(where, per_model, settings) for every ``parameters:`` mapping of a configuration."""
    if config.parameters:
        yield "parameters", False, config.parameters
    for model in config.models or ():
        if model.parameters:
            yield f"the parameters of model {model.model}", True, model.parameters
    slices = list(enumerate(config.slices or ()))
    for name, module in (config.modules or {}).items():
        if module.parameters:
            yield f"modules.{name}.parameters", False, module.parameters
        for model in module.models or ():
            if model.parameters:
                yield f"the parameters of model {model.model}", True, model.parameters
        slices.extend(enumerate(module.slices or ()))
    for index, output_slice in slices:
        if output_slice.parameters:
            yield f"slices[{index}].parameters", False, output_slice.parameters
        for source in output_slice.sources:
            if source.parameters:
                yield f"the parameters of model {source.model}", True, source.parameters


def parameter_name_problems(config: Any, spec: Any) -> List[str]:
    """One sentence per parameter name the method would silently ignore."""
    known = {p.name for p in spec.parameters}
    per_model = {p.name for p in spec.input_parameters}
    removed = REMOVED.get(spec.name, {})
    article = "an" if spec.name[:1] in "aeiou" else "a"  # "an iso_c parameter"
    problems = []
    for where, is_model, settings in parameter_scopes(config):
        for key in settings:
            if key in removed:
                problems.append(
                    f"`{key}` under {where} was removed from {spec.name} in this version: "
                    f"{removed[key]}, so it would be ignored"
                )
            elif key not in known:
                guess = closest(key, known)
                hint = f"; did you mean `{guess}`?" if guess else ""
                problems.append(
                    f"`{key}` under {where} is not {article} {spec.name} parameter and would be "
                    f"ignored{hint} (known: {', '.join(sorted(known))})"
                )
            elif is_model and key not in per_model:
                problems.append(
                    f"`{key}` under {where} applies to the whole merge, not to one model, "
                    "and would be ignored there: move it to the top-level `parameters:`"
                )
    return problems


def check_parameter_names(config: Any, spec: Any) -> None:
    """Warn about (or, with MERGEKIT_DRM_UNKNOWN_PARAMETERS=error, refuse) ignored names.

    Also checks every value the configuration sets for the method (type,
    range, finiteness), naming the parameter and where it is set, since
    mergekit's own validation later names neither.
    """
    from mergekit_drm.method_options import OPTIONS, unknown_parameters_mode

    from mergekit_drm.overflow import plan_output_dtype

    plan_output_dtype(spec.name, getattr(config, "out_dtype", None))
    if config is None:
        return
    mode = unknown_parameters_mode()
    if spec.name in OPTIONS:
        OPTIONS[spec.name].check_values(config)
    problems = parameter_name_problems(config, spec)
    if not problems:
        return
    text = "; ".join(problems)
    if mode == "error":
        raise ValueError(
            f"{text}. Fix the name, or unset {UNKNOWN_PARAMETERS_ENV} to only warn."
        )
    log.warning(
        "%s (set %s=error to refuse such a configuration)", text, UNKNOWN_PARAMETERS_ENV
    )


def check_finite_stack(stack: torch.Tensor, *, method: str, what: str) -> None:
    """Raise naming the position in a stack (N, ...) of plain tensors that is not finite."""
    if _all_finite(stack):
        return
    for index in range(stack.shape[0]):
        check_finite(
            stack[index], method=method, tensor_name=f"{what} {index} (0-based)",
            fix="Pass finite tensors.",
        )
