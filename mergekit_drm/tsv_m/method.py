"""The ``tsv_m`` merge method: mergekit adapter around ``kernel.py``.

Everything but the per-matrix kernel (which tensors are decomposed, fused
projections, the mean for the rest, ``lambda``, planning-time checks) is
shared with ``iso_c``/``iso_cts`` in ``subspace_method.py``.
"""

from __future__ import annotations

from mergekit.merge_methods.base import ParameterScope, ParameterSpec
from mergekit_drm.parameters import RANK_FRACTION, typed
from mergekit_drm.subspace_method import SubspaceMerge, common_parameters, method_spec
from mergekit_drm.tsv_m.kernel import tsv_merge_matrix

PRETTY_NAME = "TSV-M"
REFERENCE_URL = "https://arxiv.org/abs/2412.00081"

PARAMETERS = common_parameters("tsv_m") + [
    ParameterSpec(
        "rank_fraction",
        typed("tsv_m", "rank_fraction", RANK_FRACTION, optional=True),
        ParameterScope.SHARED,
        default=None,
        description="per-task kept rank as a fraction of min(rows, cols) (paper: 1/T)",
    ),
]


class TSVMerge(SubspaceMerge):
    """Task Singular Vectors: Merge, as a mergekit group method."""

    spec = method_spec("tsv_m", PRETTY_NAME, REFERENCE_URL, PARAMETERS)

    def merge_matrix(self, deltas, weights, params, compute_dtype):
        return tsv_merge_matrix(
            deltas, weights,
            rank_fraction=params["rank_fraction"],
            compute_dtype=compute_dtype,
            svd=params["svd"],
        )


tsv_m_merge_method = TSVMerge()
