"""An alignment (every model's unit maps) and what it does to tensors.

``Alignment.maps[group][space][i]`` sends unit u of model i to merged unit
``index[u]``. Merging a tensor (MuDSC Eq. 2 with per-model weights):

* an axis with role ``in`` (consumes the units) sums the columns that land on
  one merged unit (unmerge U = P);
* an axis with role ``out`` (produces them) takes the weighted mean of the rows
  that land on one merged unit (merge M = P / weighted column sums), so the
  weights are applied there;
* a tensor with no grouped ``out`` axis is a weighted mean over models.

For permutations this is exactly "permute, then weighted average" (no +1e-5 in
the normalization). Saved as safetensors (int64 maps) + JSON metadata.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from mergekit_drm.mudsc.specs import AxisSpec, PermutationSpec, TensorSpec

# 2: the metadata records each model's identity and the parameters that shaped
# the alignment, so a reuse with other models or parameters can be refused.
FORMAT_VERSION = 2


Maps = Dict[str, Dict[str, List[torch.Tensor]]]


def axis_index(maps: Maps, axis: AxisSpec, model: int) -> torch.Tensor:
    """Merged position of every entry of a (possibly fused) axis."""
    parts, offset = [], 0
    for seg in axis.segments:
        parts.append(maps[seg.group][seg.space][model] + offset)
        offset += seg.length
    return torch.cat(parts) if len(parts) > 1 else parts[0]


@dataclass
class Alignment:
    num_models: int
    maps: Maps
    metadata: Dict[str, Any] = field(default_factory=dict)
    _permutation: Optional[bool] = field(default=None, repr=False, compare=False)

    # --- per-axis views ---------------------------------------------------

    def axis_index(self, axis: AxisSpec, model: int) -> torch.Tensor:
        return axis_index(self.maps, axis, model)

    def is_permutation(self) -> bool:
        if self._permutation is None:
            self._permutation = self._check_permutation()
        return self._permutation

    def _check_permutation(self) -> bool:
        for spaces in self.maps.values():
            for indices in spaces.values():
                for index in indices:
                    if not torch.equal(torch.sort(index).values, torch.arange(len(index))):
                        return False
        return True

    # --- persistence ----------------------------------------------------------

    def save(self, directory: str) -> None:
        from safetensors.torch import save_file

        missing = [key for key in ("identities", "parameters") if key not in self.metadata]
        if missing:
            # Without them a later merge could not tell whether the file fits its models.
            raise ValueError(
                f"mudsc: an alignment is saved with the models' identities and the parameters "
                f"that shaped it; this one lacks {', '.join(missing)} (alignments computed by "
                "the engine record both)"
            )
        os.makedirs(directory, exist_ok=True)
        tensors = {
            f"{group}/{space}/{i}": index.to(torch.int64).contiguous().clone()
            for group, spaces in self.maps.items()
            for space, indices in spaces.items()
            for i, index in enumerate(indices)
        }
        save_file(tensors, os.path.join(directory, "alignment.safetensors"))
        meta = dict(self.metadata, format_version=FORMAT_VERSION, num_models=self.num_models)
        with open(os.path.join(directory, "alignment.json"), "w") as handle:
            json.dump(meta, handle, indent=2, sort_keys=True)

    @classmethod
    def load(cls, directory: str) -> "Alignment":
        from safetensors.torch import load_file

        meta_path = os.path.join(directory, "alignment.json")
        tensor_path = os.path.join(directory, "alignment.safetensors")
        for path in (meta_path, tensor_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"mudsc: saved alignment {directory!r} lacks {os.path.basename(path)}; "
                    "write one with `mergekit-mudsc-align config.yml --alignment-out DIR`"
                )
        redo = "recompute it with `mergekit-mudsc-align config.yml --alignment-out DIR`"
        try:
            with open(meta_path, encoding="utf-8") as handle:
                meta = json.load(handle)
        except (ValueError, OSError) as exc:  # truncated or not JSON (UnicodeDecodeError is a ValueError)
            raise ValueError(
                f"mudsc: saved alignment file {meta_path} cannot be read ({type(exc).__name__}: "
                f"{exc}); the file is truncated or not an alignment: {redo}"
            ) from None
        if not isinstance(meta, dict):
            raise ValueError(f"mudsc: saved alignment file {meta_path} is not a JSON object: {redo}")
        version = meta.get("format_version")
        lacking = [key for key in ("identities", "parameters") if key not in meta]
        if version == FORMAT_VERSION and lacking:
            raise ValueError(
                f"mudsc: saved alignment {directory!r} lacks {', '.join(lacking)} in "
                "alignment.json, so its reuse cannot be checked; recompute it with "
                "`mergekit-mudsc-align config.yml --alignment-out DIR`"
            )
        if version != FORMAT_VERSION:
            raise ValueError(
                f"mudsc: {directory!r} has alignment format {version}, expected {FORMAT_VERSION}"
                + (
                    " (format 1 does not record which models it was computed for, so its "
                    "reuse cannot be checked)" if version == 1 else ""
                )
                + "; recompute it with `mergekit-mudsc-align config.yml --alignment-out DIR`"
            )
        n = int(meta["num_models"])
        maps: Dict[str, Dict[str, List[Optional[torch.Tensor]]]] = {}
        try:
            stored = load_file(tensor_path)
        except Exception as exc:  # SafetensorError: truncated or not a safetensors file
            raise ValueError(
                f"mudsc: saved alignment file {tensor_path} cannot be read ({type(exc).__name__}: "
                f"{exc}); the file is truncated or not an alignment: {redo}"
            ) from None
        for key, value in stored.items():
            group, space, i = key.rsplit("/", 2)
            maps.setdefault(group, {}).setdefault(space, [None] * n)[int(i)] = value
        return cls(n, maps, meta)

    def reordered(self, order: Sequence[int]) -> "Alignment":
        """The same alignment for the models listed as ``order`` (new i = old order[i])."""
        maps = {
            group: {space: [indices[j] for j in order] for space, indices in spaces.items()}
            for group, spaces in self.maps.items()
        }
        metadata = dict(self.metadata)
        for key in ("models", "identities"):
            if key in metadata:
                metadata[key] = [metadata[key][j] for j in order]
        return Alignment(self.num_models, maps, metadata)

    def check_against(self, spec: PermutationSpec) -> None:
        """Raise if the saved maps do not fit the spec of the models being merged."""
        for group in spec.groups.values():
            for space, size in group.spaces:
                indices = self.maps.get(group.name, {}).get(space)
                if indices is None or any(i is None for i in indices):
                    raise ValueError(f"mudsc: saved alignment has no map for {group.name}/{space}")
                for i, index in enumerate(indices):
                    if index.shape != (size,) or int(index.min()) < 0 or int(index.max()) >= size:
                        raise ValueError(
                            f"mudsc: saved alignment map {group.name}/{space} of model {i} does not "
                            f"fit this model ({size} units): it was computed for other models"
                        )


def move_in(tensor: torch.Tensor, axis: int, index: torch.Tensor, size: int, mean: bool = False) -> torch.Tensor:
    """out[index[u]] += tensor[u] along ``axis`` (a gather when it is a permutation).

    ``mean`` divides each merged slot by the number of entries sent to it.
    """
    index = index.to(tensor.device)
    counts = torch.bincount(index, minlength=size)
    if len(index) == size and bool((counts == 1).all()):
        return tensor.index_select(axis, torch.argsort(index))
    out_shape = list(tensor.shape)
    out_shape[axis] = size
    out = tensor.new_zeros(out_shape)
    out.index_add_(axis, index, tensor)
    if mean:
        out /= _along(counts.clamp_min(1).to(out.dtype), axis, out.dim())
    return out


def _along(vector: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


def merge_tensor(
    spec: TensorSpec,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    alignment: Alignment,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Merge one tensor of N models under the alignment (see module docstring)."""
    n = len(tensors)
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"mudsc: model weights for {spec.name} sum to {total}; they must be positive")
    out_axes = [a for a in spec.axes if a.role == "out"]
    in_axes = [a for a in spec.axes if a.role == "in"]
    coef: List[Optional[torch.Tensor]] = [None] * n
    device = tensors[0].device
    if out_axes:
        (out_axis,) = out_axes
        size = out_axis.length
        indices = [alignment.axis_index(out_axis, i).to(device) for i in range(n)]
        mass = torch.zeros(size, dtype=torch.float64, device=device)
        for i in range(n):
            mass.index_add_(0, indices[i], torch.full((size,), float(weights[i]), dtype=torch.float64, device=device))
        if bool((mass <= 0).any()):
            raise ValueError(f"mudsc: a merged unit of {spec.name} has no members")
        for i in range(n):
            coef[i] = (float(weights[i]) / mass[indices[i]]).to(compute_dtype)
    result = None
    for i, tensor in enumerate(tensors):
        t = tensor.to(compute_dtype)
        for axis in in_axes:
            t = move_in(t, axis.axis, alignment.axis_index(axis, i), axis.length)
        if out_axes:
            axis = out_axes[0]
            t = move_in(t * _along(coef[i], axis.axis, t.dim()), axis.axis,
                         alignment.axis_index(axis, i), axis.length)
        else:
            t = t * (float(weights[i]) / total)
        result = t if result is None else result.add_(t)
    return result


def permute_tensor(spec: TensorSpec, tensor: torch.Tensor, alignment: Alignment, model: int) -> torch.Tensor:
    """Model ``model``'s tensor moved into the merged (model 0's) unit order."""
    if not alignment.is_permutation():
        raise ValueError("mudsc: permuted copies need an alignment (mode: align), not zip")
    t = tensor
    for axis in spec.axes:
        t = move_in(t, axis.axis, alignment.axis_index(axis, model), axis.length)
    return t
