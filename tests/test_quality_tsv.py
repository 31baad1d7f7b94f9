"""TSV-M baseline (benchmarks/quality/tsv.py)."""

import torch

from benchmarks.quality.tsv import _procrustes, tsv_merge_deltas


def test_single_task_full_rank_is_identity():
    d = torch.randn(1, 6, 4, dtype=torch.float64)
    assert torch.allclose(tsv_merge_deltas(d), d[0], atol=1e-10)


def test_procrustes_gives_orthonormal_columns():
    x = torch.randn(10, 6, dtype=torch.float64)
    q = _procrustes(x)
    assert torch.allclose(q.T @ q, torch.eye(6, dtype=torch.float64), atol=1e-10)


def test_orthogonal_tasks_merge_to_their_truncated_sum():
    # two rank-1 tasks on orthogonal row and column spaces: the merge is their sum
    e = torch.eye(6, dtype=torch.float64)
    d1 = 3.0 * torch.outer(e[0], e[1])
    d2 = 2.0 * torch.outer(e[2], e[3])
    merged = tsv_merge_deltas(torch.stack([d1, d2]))
    assert torch.allclose(merged, d1 + d2, atol=1e-10)


def test_keeps_top_share_of_rank():
    torch.manual_seed(0)
    d = torch.randn(4, 8, 8, dtype=torch.float64)
    merged = tsv_merge_deltas(d)
    assert torch.linalg.matrix_rank(merged) <= 8
    assert merged.shape == (8, 8)
