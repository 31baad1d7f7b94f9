"""Bad input fails during planning, naming the problem, before the output exists."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

import mergekit_drm
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.merge_methods import TensorGroup
from mergekit.options import MergeOptions
from mergekit_drm.drm.kernel import drm_merge_matrix
from mergekit_drm.drm.method import drm_merge_method
from tests.tiny_models import CONFIGS, build_finetunes

mergekit_drm.register()  # in-process merges, with or without the .pth hook


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    paths = build_finetunes("llama", str(root), count=2)
    other = str(root / "other-shape")
    config = CONFIGS["llama"]()
    config.intermediate_size = 40
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(other)
    return paths, other


def _config(paths, **params):
    base, *fts = paths
    return {
        "merge_method": "drm",
        "base_model": base,
        "models": [{"model": p} for p in fts],
        "parameters": {"density": 0.3, **params},
        "dtype": "float32",
    }


def _expect_error(tmp_path, config, *needles):
    out = tmp_path / "out"
    with pytest.raises(Exception) as info:
        run_merge(
            MergeConfiguration.model_validate(config), str(out),
            MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True),
        )
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    assert not out.exists(), "the output directory was created before the error"


@pytest.mark.parametrize(
    "params, needles",
    [
        ({"density": 1.5}, ("`density`", "(0, 1]", "1.5")),
        ({"density": 0.0}, ("`density`", "(0, 1]")),
        ({"direction": "diagonal"}, ("`direction`", "vertical, horizontal", "diagonal")),
        ({"rank_tol": -0.1}, ("`rank_tol`", "[0, 1)")),
        ({"rank_tol": 1.0}, ("`rank_tol`", "[0, 1)", "drop them all", "1.0")),
        ({"nonlinear_density": 2.0}, ("`nonlinear_density`",)),
        ({"svd": "qr"}, ("`svd`", "auto, full, gram")),
        ({"compute_dtype": "bfloat16"}, ("`compute_dtype`", "float32, float64")),
    ],
)
def test_bad_parameters(tmp_path, models, params, needles):
    paths, _ = models
    _expect_error(tmp_path, _config(paths, **params), *needles)


def test_missing_base_model(tmp_path, models):
    paths, _ = models
    config = _config(paths)
    del config["base_model"]
    _expect_error(tmp_path, config, "base_model")


def test_no_model_besides_the_base(tmp_path, models):
    paths, _ = models
    config = _config(paths)
    config["models"] = [{"model": paths[0]}]
    _expect_error(tmp_path, config, "at least one model besides the base", "models:")


def test_shape_mismatch_names_tensor_and_models(tmp_path, models):
    paths, other = models
    config = _config(paths)
    config["models"][1]["model"] = other
    _expect_error(tmp_path, config, "mlp.", "different shapes", os.path.basename(other), "[48, 32]", "[40, 32]")


def test_per_model_density_must_agree(tmp_path, models):
    paths, _ = models
    config = _config(paths)
    config["models"][0]["parameters"] = {"density": 0.5}
    _expect_error(tmp_path, config, "must be one value", "[0.3, 0.5]")


def test_tensors_of_more_than_two_dims_are_merged_as_out_by_rest():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(6, 3, 5, generator=gen)
    fts = [base + 0.1 * torch.randn(6, 3, 5, generator=gen) for _ in range(3)]
    group = TensorGroup.from_tensors([base] + fts, base_index=0, name="experts.gate_up_proj")
    (out,) = drm_merge_method([group], parameters={"density": 0.4, "direction": "horizontal"})
    expect = base + drm_merge_matrix(
        [(ft - base).reshape(6, 15) for ft in fts], density=0.4, direction="horizontal"
    ).reshape(6, 3, 5)
    torch.testing.assert_close(out, expect, rtol=1e-6, atol=1e-7)
