"""`--multi-gpu` runs merge tasks in threads of one process: the method, its
kernels and its caches must give the same answers under concurrency."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

import mergekit_drm
from mergekit.common import ModelReference
from mergekit.io.tasks import LoaderCache
from mergekit.merge_methods import TensorGroup
from mergekit_drm import preflight
from mergekit_drm.drm.method import drm_merge_method
from tests.tiny_models import build_finetunes

mergekit_drm.register()  # in-process merges, with or without the .pth hook


def _group(seed: int, shape=(48, 32), name="model.layers.0.mlp.up_proj.weight"):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    tensors = [base] + [base + 0.1 * torch.randn(shape, generator=gen) for _ in range(3)]
    return TensorGroup.from_tensors(tensors, base_index=0, name=name)


def test_concurrent_merges_equal_sequential():
    groups = [_group(seed) for seed in range(12)]
    params = {"density": 0.3, "direction": "horizontal"}
    sequential = [drm_merge_method([g], parameters=params)[0] for g in groups]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda g: drm_merge_method([g], parameters=params)[0], groups))
    for a, b in zip(sequential, concurrent):
        assert torch.equal(a, b)
    # and they are not trivially equal (each group gives its own merge)
    assert not torch.equal(sequential[0], sequential[1])


def test_caches_are_consistent_across_threads(tmp_path):
    paths = build_finetunes("gpt2", str(tmp_path), count=2)
    refs = [ModelReference.model_validate(p) for p in paths]
    for ref in refs:
        LoaderCache().get(ref)
    preflight.model_config.cache_clear()
    name = "transformer.h.0.attn.c_attn.weight"

    def probe(ref):
        return preflight.model_config(ref).model_type, preflight.stored_shape(ref, name)

    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(probe, refs * 8))
    assert set(answers) == {("gpt2", (32, 96))}
