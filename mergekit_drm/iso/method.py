"""The ``iso_c`` and ``iso_cts`` merge methods: mergekit adapters around ``kernel.py``.

Everything but the per-matrix kernel is shared with ``tsv_m`` in
``subspace_method.py``.
"""

from __future__ import annotations

from mergekit_drm.iso.kernel import iso_c_merge_matrix, iso_cts_merge_matrix
from mergekit_drm.method_options import ISO_C, ISO_CTS
from mergekit_drm.subspace_method import SubspaceMerge, common_parameters, method_spec

REFERENCE_URL = "https://arxiv.org/abs/2502.04959"


class IsoCMerge(SubspaceMerge):
    """Isotropic merging in the common subspace (Iso-C)."""

    spec = method_spec("iso_c", "Iso-C", REFERENCE_URL, common_parameters("iso_c"))

    def merge_matrix(self, deltas, weights, params, compute_dtype):
        return iso_c_merge_matrix(
            deltas, weights, **ISO_C.kernel_kwargs(params, iso_c_merge_matrix, skip=("weight",), compute_dtype=compute_dtype)
        )


class IsoCTSMerge(SubspaceMerge):
    """Isotropic merging in common and task-specific subspaces (Iso-CTS)."""

    spec = method_spec("iso_cts", "Iso-CTS", REFERENCE_URL, common_parameters("iso_cts"))

    def merge_matrix(self, deltas, weights, params, compute_dtype):
        return iso_cts_merge_matrix(
            deltas, weights, **ISO_CTS.kernel_kwargs(params, iso_cts_merge_matrix, skip=("weight",), compute_dtype=compute_dtype)
        )


iso_c_merge_method = IsoCMerge()
iso_cts_merge_method = IsoCTSMerge()
