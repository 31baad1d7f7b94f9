"""The ``tsv_m`` merge method: mergekit adapter around ``kernel.py``.

Everything but the per-matrix kernel (which tensors are decomposed, fused
projections, the mean for the rest, ``lambda``, planning-time checks) is
shared with ``iso_c``/``iso_cts`` in ``subspace_method.py``.
"""

from __future__ import annotations

from mergekit_drm.method_options import TSV_M
from mergekit_drm.subspace_method import SubspaceMerge, common_parameters, method_spec
from mergekit_drm.tsv_m.kernel import tsv_merge_matrix

PRETTY_NAME = "TSV-M"
REFERENCE_URL = "https://arxiv.org/abs/2412.00081"

PARAMETERS = common_parameters("tsv_m")  # method_options.TSV_M


class TSVMerge(SubspaceMerge):
    """Task Singular Vectors: Merge, as a mergekit group method."""

    spec = method_spec("tsv_m", PRETTY_NAME, REFERENCE_URL, PARAMETERS)

    def merge_matrix(self, deltas, weights, params, compute_dtype):
        return tsv_merge_matrix(
            deltas, weights, **TSV_M.kernel_kwargs(params, tsv_merge_matrix, skip=("weight",), compute_dtype=compute_dtype)
        )


tsv_m_merge_method = TSVMerge()
