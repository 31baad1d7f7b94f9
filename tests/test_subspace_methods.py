"""`tsv_m`, `iso_c` and `iso_cts` through mergekit on tiny checkpoints.

Every output tensor is checked against an expectation built here: 2-D
non-vocabulary weights go through the kernel (checked against numpy oracles in
test_subspace_kernels.py), fused projections part by part (the row layouts are
restated in test_drm_end_to_end.py), everything else is the weighted mean of
the task vectors; lambda scales the merged task vector. Bad input fails while
planning, before the output directory exists.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import transformers
import yaml

import mergekit_drm
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from mergekit_drm.iso.kernel import iso_c_merge_matrix, iso_cts_merge_matrix
from mergekit_drm.tsv_m.kernel import tsv_merge_matrix
from tests.test_drm_end_to_end import VOCAB, _is_conv1d, _load, _rows_of_parts
from tests.tiny_models import CONFIGS, build_finetunes

mergekit_drm.register()  # in-process merges, with or without the .pth hook

KERNELS = {
    "tsv_m": lambda mats, w, p: tsv_merge_matrix(mats, w, rank_fraction=p.get("rank_fraction")),
    "iso_c": lambda mats, w, p: iso_c_merge_matrix(mats, w),
    "iso_cts": lambda mats, w, p: iso_cts_merge_matrix(
        mats, w, common_space_fraction=p.get("common_space_fraction", 0.8)
    ),
}
CARDS = {
    "tsv_m": "[TSV-M](https://arxiv.org/abs/2412.00081)",
    "iso_c": "[Iso-C](https://arxiv.org/abs/2502.04959)",
    "iso_cts": "[Iso-CTS](https://arxiv.org/abs/2502.04959)",
}


def expected_merge(method, arch, base, finetunes, weights, params):
    config = CONFIGS[arch]()
    kernel = KERNELS[method]
    scale = params.get("lambda", 1.0)
    out = {}
    for name, b in base.items():
        if not b.is_floating_point():
            out[name] = b.float()
            continue
        deltas = [ft[name].float() - b.float() for ft in finetunes]
        if b.dim() == 2 and name not in VOCAB[arch]:
            mats = [d.T if _is_conv1d(arch, name) else d for d in deltas]
            parts = _rows_of_parts(arch, name, config)
            if parts is None:
                merged = kernel(mats, weights, params)
            else:
                merged = torch.zeros_like(mats[0])
                for rows in parts:
                    rows = torch.tensor(list(rows))
                    merged[rows] = kernel([m[rows] for m in mats], weights, params)
            if _is_conv1d(arch, name):
                merged = merged.T
        else:
            merged = sum(w * d for w, d in zip(weights, deltas)) / len(deltas)
        out[name] = b.float() + scale * merged
    return out


def _config(method, paths, params, weights):
    base, *fts = paths
    return {
        "merge_method": method,
        "base_model": base,
        "models": [{"model": p, "parameters": {"weight": w}} for p, w in zip(fts, weights)],
        "parameters": params,
        "dtype": "float32",
    }


def _merge(tmp_path, method, paths, params, weights):
    out = str(tmp_path / f"out-{method}")
    run_merge(
        MergeConfiguration.model_validate(_config(method, paths, params, weights)),
        out,
        MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True),
    )
    return out


def _check(method, arch, paths, out, params, weights):
    base, *fts = [_load(p) for p in paths]
    merged = _load(out)
    expected = expected_merge(method, arch, base, fts, weights, params)
    assert set(merged) <= set(expected) and len(merged) >= len(expected) - 1
    for name, tensor in merged.items():
        err = (tensor.float() - expected[name]).norm() / expected[name].norm().clamp_min(1e-30)
        assert err < 1e-5, f"{name}: relative error {err:.2e}"
    moved = sum(float((merged[n].float() - base[n].float()).norm()) for n in merged)
    assert moved > 0


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_finetunes("llama", str(tmp_path_factory.mktemp("llama")), count=3)


@pytest.mark.parametrize(
    "method, params",
    [
        ("tsv_m", {}),
        ("tsv_m", {"rank_fraction": 0.5, "lambda": 0.7}),
        ("iso_c", {"lambda": 1.3}),
        ("iso_cts", {}),
        ("iso_cts", {"common_space_fraction": 0.5, "svd": "full"}),
    ],
)
def test_llama_every_tensor(tmp_path, llama, method, params):
    weights = [1.0, 0.5, 2.0]
    out = _merge(tmp_path, method, llama, params, weights)
    _check(method, "llama", llama, out, params, weights)


@pytest.mark.parametrize("arch", ["gpt2", "phi3"])
@pytest.mark.parametrize("method", ["tsv_m", "iso_cts"])
def test_fused_and_conv1d_architectures(tmp_path, arch, method):
    paths = build_finetunes(arch, str(tmp_path), count=2)
    weights = [1.0, 0.6]
    out = _merge(tmp_path, method, paths, {}, weights)
    _check(method, arch, paths, out, {}, weights)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[3, 4, 5]])).logits).all()


def test_decompose_false_sends_a_tensor_to_the_mean(tmp_path, llama):
    name = "model.layers.0.mlp.down_proj.weight"
    params = {"decompose": [{"filter": "layers.0.mlp.down_proj", "value": False}, {"value": True}]}
    out = _merge(tmp_path, "iso_c", llama, params, [1.0, 1.0, 1.0])
    base, *fts = [_load(p) for p in llama]
    mean = base[name] + sum(ft[name] - base[name] for ft in fts) / 3
    torch.testing.assert_close(_load(out)[name], mean)
    other = "model.layers.1.mlp.down_proj.weight"
    # still Iso-C: the tiny fine-tunes' deltas are rank 2, so 3 of them span 6 directions
    s = torch.linalg.svdvals((_load(out)[other] - base[other]).double())
    assert float(s[0] / s[5]) == pytest.approx(1.0, abs=1e-4) and float(s[6] / s[0]) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(KERNELS))
def test_plain_mergekit_yaml_finds_the_method(tmp_path, method):
    """Plain `mergekit-yaml` (no import by the user), model card links the paper."""
    paths = build_finetunes("llama", str(tmp_path), count=2)
    cfg = tmp_path / "merge.yml"
    cfg.write_text(yaml.safe_dump(_config(method, paths, {}, [1.0, 1.0])))
    out = tmp_path / "out"
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    proc = subprocess.run(
        [exe, str(cfg), str(out), "--no-copy-tokenizer"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check(method, "llama", paths, str(out), {}, [1.0, 1.0])
    assert CARDS[method] in (out / "README.md").read_text()


# ---------------------------------------------------------------- planning-time errors


@pytest.fixture(scope="module")
def with_other_shape(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    paths = build_finetunes("llama", str(root), count=2)
    other = str(root / "other-shape")
    config = CONFIGS["llama"]()
    config.intermediate_size = 40
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(other)
    return paths, other


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
    "method, params, needles",
    [
        ("tsv_m", {"rank_fraction": 1.5}, ("tsv_m parameter `rank_fraction`", "(0, 1]", "1.5")),
        ("tsv_m", {"rank_fraction": 0.0}, ("`rank_fraction`",)),
        ("iso_cts", {"common_space_fraction": -0.1}, ("iso_cts parameter `common_space_fraction`", "[0, 1]")),
        ("iso_c", {"svd": "qr"}, ("iso_c parameter `svd`", "auto, full, gram")),
        ("tsv_m", {"compute_dtype": "bfloat16"}, ("`compute_dtype`", "float32, float64")),
    ],
)
def test_bad_parameters(tmp_path, with_other_shape, method, params, needles):
    paths, _ = with_other_shape
    _expect_error(tmp_path, _config(method, paths, params, [1.0, 1.0]), *needles)


@pytest.mark.parametrize("method", sorted(KERNELS))
def test_missing_base_and_models(tmp_path, with_other_shape, method):
    paths, _ = with_other_shape
    config = _config(method, paths, {}, [1.0, 1.0])
    del config["base_model"]
    _expect_error(tmp_path, config, "base_model")
    config = _config(method, paths, {}, [1.0, 1.0])
    config["models"] = [{"model": paths[0]}]
    _expect_error(tmp_path, config, "at least one model besides the base", "models:")


def test_shape_mismatch_names_tensor_and_models(tmp_path, with_other_shape):
    paths, other = with_other_shape
    config = _config("tsv_m", paths, {}, [1.0, 1.0])
    config["models"][1]["model"] = other
    _expect_error(tmp_path, config, "mlp.", "different shapes", os.path.basename(other), "[48, 32]", "[40, 32]")


@pytest.mark.parametrize("method, tensor", [("tsv_m", "q_proj"), ("iso_cts", "input_layernorm")])
def test_non_finite_input_is_named_before_writing(tmp_path, with_other_shape, method, tensor):
    from mergekit_drm.checks import NonFiniteError
    from tests.test_input_checks import _poisoned

    (base, ft1, ft2), _ = with_other_shape
    name = {"q_proj": "model.layers.0.self_attn.q_proj.weight",
            "input_layernorm": "model.layers.0.input_layernorm.weight"}[tensor]
    bad = _poisoned(ft1, str(tmp_path / "bad-ft"), name)
    config = _config(method, [base, bad, ft2], {}, [1.0, 1.0])
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError) as info:
        run_merge(
            MergeConfiguration.model_validate(config), str(out),
            MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True),
        )
    assert name in str(info.value) and bad in str(info.value) and method in str(info.value)
    assert not out.exists() or not any(out.rglob("*.safetensors"))


def test_misspelt_parameter_name_is_refused_with_the_closest_name(tmp_path, with_other_shape, monkeypatch):
    from mergekit_drm.checks import UNKNOWN_PARAMETERS_ENV

    paths, _ = with_other_shape
    monkeypatch.setenv(UNKNOWN_PARAMETERS_ENV, "error")
    _expect_error(
        tmp_path, _config("tsv_m", paths, {"rank_fracton": 0.3}, [1.0, 1.0]),
        "`rank_fracton`", "did you mean `rank_fraction`",
    )
