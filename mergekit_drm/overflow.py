"""Overflow: a merged tensor that is not finite in the output dtype, an input the cast made inf.

Inputs are checked finite before a merge (``checks.check_finite``) and every
parameter is finite (``parameters``), yet the output can still hold inf: a
large ``lambda`` or ``weight`` overflows the compute dtype, or the merged
values are finite but exceed the range of the dtype the result is cast to
(float16's largest value is 65504). ``checked_cast`` casts the merged tensor
and checks it, and on failure says which: the parameters (the tensor was
already inf before the cast) or the dtype (finite before, inf after).

mergekit casts every input to the YAML's ``dtype:`` while loading it, so a
method receives an inf where the checkpoint holds a finite 3e38 and the YAML
says ``dtype: float16``. ``cast_overflow`` tells the two apart by reading the
stored entry (only on this failure path): the cast overflowed when the
checkpoint's own values are finite and exceed the received dtype's range.
When the stored entry cannot be read (a ``.bin`` checkpoint, a renamed
tensor, a direct call), it says that a cast may be the cause instead of
asserting either.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from mergekit_drm.checks import _all_finite


class OutputOverflowError(ValueError):
    """A merged tensor is not finite in the dtype it is returned in."""


# mergekit returns a method's tensor in the inputs' dtype and casts it to the
# YAML's `out_dtype:` only when writing. The planning call that sees the
# configuration records it here per method (``plan_output_dtype``), so the
# output check covers that cast too. One merge per method at a time (as
# mergekit runs them); the next planning replaces the entry.
_out_dtypes: Dict[str, Optional[str]] = {}


def plan_output_dtype(method: str, out_dtype: Optional[str]) -> None:
    """Record the merge's ``out_dtype:`` (None: the returned dtype is written)."""
    _out_dtypes[method] = out_dtype


def _wider(dtype: torch.dtype) -> str:
    """The YAML change that gives values beyond ``dtype``'s range room."""
    if dtype == torch.float16:
        return "use `dtype: bfloat16` or `dtype: float32` (both have float32's range, about 3.4e38)"
    return "use `dtype: float64`"


def _scalars(params: Optional[Mapping[str, Any]]) -> str:
    """The merge's lambda and weights, for the message."""
    if not params:
        return ""
    parts = []
    if "lambda" in params:
        parts.append(f"lambda {params['lambda']:g}")
    weights = params.get("weight")
    if isinstance(weights, Mapping) and weights:
        parts.append("weights " + ", ".join(f"{float(w):g}" for w in weights.values()))
    return " and ".join(parts)


def checked_cast(
    merged: torch.Tensor,
    dtype: torch.dtype,
    *,
    method: str,
    tensor_name: str,
    params: Optional[Mapping[str, Any]] = None,
) -> torch.Tensor:
    """``merged`` cast to ``dtype``; raises ``OutputOverflowError`` if the result is not finite.

    The message names the tensor and what overflowed: the parameters (the
    merge was already inf/NaN in its compute dtype) or the output dtype.
    """
    out = merged.to(dtype)
    if not out.is_floating_point():
        return out
    if _all_finite(out):
        _check_written_dtype(out, method, tensor_name, params)
        return out
    scalars = _scalars(params)
    if not _all_finite(merged):
        raise OutputOverflowError(
            f"{method}: the merged tensor {tensor_name} is not finite in the compute dtype "
            f"{str(merged.dtype).replace('torch.', '')} ({int((~torch.isfinite(merged)).sum())} entries)"
            + (f" with {scalars}" if scalars else "")
            + ": the inputs are finite, so a parameter made it overflow. Use a smaller "
            "`lambda` or `weight`."
        )
    largest = float(merged.abs().amax())
    limit = torch.finfo(dtype).max
    name = str(dtype).replace("torch.", "")
    cause = f"; with {scalars}, a smaller `lambda` or `weight` would fit" if scalars else ""
    raise OutputOverflowError(
        f"{method}: the merged tensor {tensor_name} holds values up to {largest:.3g}, beyond "
        f"{name}'s largest {limit:.3g}, so the cast to {name} overflowed to inf{cause}. "
        f"To keep these values, {_wider(dtype)}."
    )


def _check_written_dtype(out: torch.Tensor, method: str, tensor_name: str, params) -> None:
    """The values also fit the `out_dtype:` mergekit casts to when writing (one more
    read, only when that dtype's range is smaller than the returned one's)."""
    name = _out_dtypes.get(method)
    written = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(written, torch.dtype) or not written.is_floating_point:
        return
    limit = torch.finfo(written).max
    if limit >= torch.finfo(out.dtype).max:
        return
    largest = float(out.abs().amax())
    if largest <= limit:
        return
    scalars = _scalars(params)
    raise OutputOverflowError(
        f"{method}: the merged tensor {tensor_name} holds values up to {largest:.3g}, beyond "
        f"{name}'s largest {limit:.3g}: mergekit's cast to `out_dtype: {name}` when writing "
        f"would make them inf"
        + (f" (with {scalars}; a smaller `lambda` or `weight` might fit)" if scalars else "")
        + f". {_wider(written).replace('dtype:', 'out_dtype:').capitalize()}, or leave `out_dtype:` unset."
    )


def _stored(model: Any, tensor_name: str) -> Optional[torch.Tensor]:
    """The entry as the checkpoint stores it (safetensors only), or None."""
    from mergekit_drm.compat import model_index

    index = model_index(model)
    if index is None or not index.is_safetensors:
        return None
    shard = index.tensor_paths.get(tensor_name)
    if shard is None:
        return None
    try:
        import os

        from safetensors import safe_open

        with safe_open(os.path.join(index.base_path, shard), framework="pt") as handle:
            return handle.get_tensor(tensor_name)
    except Exception:  # unreadable here: the caller says a cast may be the cause
        return None


def cast_overflow(tensor: torch.Tensor, model: Any, tensor_name: str) -> Optional[Tuple[bool, str]]:
    """Why ``tensor`` (received by a method, not finite) is inf when mergekit's cast made it so.

    Returns (certain, sentence naming the cast and the fix): certain when the
    stored entry was read and shows it; (False, a hedged sentence) when it
    could not be read; None when the checkpoint itself holds the NaN/inf.
    """
    if not tensor.is_floating_point() or bool(torch.isnan(tensor).any()):
        return None  # a cast to a float dtype turns a finite number into inf, never NaN
    if model is None or isinstance(model, str):
        return None  # not read through mergekit's loader (a label, an adapter): no cast
    stored = _stored(model, tensor_name)
    limit = torch.finfo(tensor.dtype).max
    if stored is None:
        # float16 is the dtype a cast commonly overflows (bf16/fp32 checkpoints
        # hold values above 65504); a cast to bf16/fp32 needs values beyond 3.4e38.
        if tensor.dtype == torch.float16:
            return False, (
                f"If the checkpoint stores this tensor in a wider dtype than {tensor.dtype} "
                f"(largest {limit:.3g}), the cast to `dtype: {str(tensor.dtype).replace('torch.', '')}` "
                f"overflowed; then {_wider(tensor.dtype)}. Otherwise repair or re-export that checkpoint."
            )
        return None
    if stored.dtype == tensor.dtype or stored.shape != tensor.shape or not _all_finite(stored):
        return None  # the checkpoint holds the inf itself
    over = stored.to(torch.float64).abs() > limit
    if not bool(over.any()) or not torch.equal(over, torch.isinf(tensor)):
        return None
    name = str(tensor.dtype).replace("torch.", "")
    return True, (
        f"The checkpoint is finite ({stored.dtype}, values up to {float(stored.abs().amax()):.3g}); "
        f"the cast to {name} (the YAML's `dtype: {name}`) overflowed {int(over.sum())} "
        f"entries beyond {name}'s largest {limit:.3g}: {_wider(tensor.dtype)}, or leave "
        "`dtype:` unset to keep the checkpoint's dtype."
    )
