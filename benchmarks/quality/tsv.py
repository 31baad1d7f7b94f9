"""TSV-M (Task Singular Vectors: Merge, Gargiulo et al., arXiv 2412.00081) as a
mergekit merge method, written from the paper for this benchmark's baseline.

Per 2-D matrix with task deltas D_1..D_N (n x m):
  1. SVD of each D_t (via the Gram matrix of its short side, float64); keep its top k = max(1, floor(min(n, m) / N)) singular
     triplets (the paper's 1/N share of the rank);
  2. concatenate U = [U_1k .. U_Nk] (n x Nk), S = diag(s_1k .. s_Nk),
     V = [V_1k .. V_Nk] (m x Nk); numerically zero singular values
     (< 1e-6 of the task's largest) are not kept (matters for low-rank, e.g.
     LoRA, deltas: their arbitrary singular vectors would distort step 3);
  3. orthogonalize both concatenations by SVD-based Procrustes:
     U = P Z Q^T  ->  U_perp = P Q^T (the nearest matrix with orthonormal
     columns), likewise V_perp;
  4. merged delta = U_perp S V_perp^T, scaled by the global ``lambda`` (alpha).
Tensors that are not matrices (biases, LayerNorm) and tensors mergekit marks
with a vocabulary axis (word embeddings, like ``drm`` does) take the mean of
the deltas, also scaled by alpha. alpha is tuned on validation data.
"""

from __future__ import annotations

from typing import Any

import torch

from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)


# Singular values below this fraction of a task's largest one count as zero
# (float32 checkpoints: rounding of W_t - W_base is ~1e-7 relative).
ZERO_RTOL = 1e-6


def _procrustes(x: torch.Tensor) -> torch.Tensor:
    """Nearest matrix with orthonormal columns: P Q^T for x = P S Q^T, computed
    as the polar factor x (x^T x)^(-1/2) from a small eigendecomposition
    (float64; directions with zero singular value are left out)."""
    x64 = x.to(torch.float64)
    w, q = torch.linalg.eigh(x64.T @ x64)
    keep = w > w.max().clamp_min(0) * 1e-12
    inv_sqrt = torch.where(keep, w.clamp_min(1e-300).rsqrt(), torch.zeros_like(w))
    return (x64 @ (q * inv_sqrt) @ q.T).to(x.dtype)


def _top_svd(d: torch.Tensor, k: int):
    """Top-k singular triplets of d from the eigendecomposition of the Gram
    matrix of its short side (float64): much faster on CPU than a full SVD."""
    d64 = d.to(torch.float64)
    transpose = d64.shape[0] < d64.shape[1]
    if transpose:
        d64 = d64.T
    w, v = torch.linalg.eigh(d64.T @ d64)
    w, v = w.flip(0)[:k].clamp_min(0), v.flip(1)[:, :k]
    s = w.sqrt()
    u = (d64 @ v) / torch.where(s > 0, s, torch.ones_like(s))
    if transpose:
        u, v = v, u
    return u.to(d.dtype), s.to(d.dtype), v.to(d.dtype)


def tsv_merge_deltas(deltas: torch.Tensor) -> torch.Tensor:
    """deltas: (N, n, m) float tensor -> merged (n, m) delta (alpha = 1)."""
    n_models, n, m = deltas.shape
    k = max(1, min(n, m) // n_models)
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, v = _top_svd(d, k)
        # Numerically zero singular values carry no part of the delta, but their
        # (arbitrary) singular vectors would take part in the orthogonalization
        # and rotate the real ones: a rank-8 LoRA delta would bring k - 8 random
        # directions. Keep only the numerical rank within the top k.
        keep = int((s > ZERO_RTOL * s[0]).sum()) if s.numel() and s[0] > 0 else 0
        us.append(u[:, :keep])
        ss.append(s[:keep])
        vs.append(v[:, :keep])
    if sum(x.numel() for x in ss) == 0:
        return torch.zeros_like(deltas[0])
    u_cat = torch.cat(us, 1)
    s_cat = torch.cat(ss)
    v_cat = torch.cat(vs, 1)
    return (_procrustes(u_cat) * s_cat) @ _procrustes(v_cat).T


class TSVMerge(GroupMergeMethod):
    spec = MergeMethodSpec(
        name="tsv_m",
        pretty_name="TSV-M",
        reference_url="https://arxiv.org/abs/2412.00081",
        parameters=(ParameterSpec("lambda", float, ParameterScope.SHARED, default=1.0),),
        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
    )

    def merge_group(self, group: TensorGroup, /, **params: Any) -> torch.Tensor:
        base = group.base.tensor
        # float32 arithmetic (float64 made a merge of 5 MiniLM fine-tunes take
        # ~2 min on 2 busy cores); bf16/fp16 inputs are upcast.
        base32 = base.to(torch.float32)
        deltas = torch.stack([e.tensor.to(torch.float32) - base32 for e in group.non_base])
        if base.dim() == 2 and group.metadata.vocabulary_axis is None:
            merged = tsv_merge_deltas(deltas)
        else:
            merged = deltas.mean(0)
        return (base32 + params["lambda"] * merged).to(base.dtype)


def register() -> None:
    """Register ``tsv_m`` with mergekit in this process (idempotent)."""
    from mergekit.merge_methods import registry

    try:
        registry.get("tsv_m")
    except RuntimeError:
        registry.register(TSVMerge())
