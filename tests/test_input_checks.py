"""Inputs that used to merge silently wrong now fail, naming the problem.

Non-finite values (every drm path, the kernels), missing tensors and .bin
shape mismatches at planning time, and parameter names mergekit would drop.
"""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import mergekit_drm
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from mergekit_drm.checks import UNKNOWN_PARAMETERS_ENV, NonFiniteError
from mergekit_drm.overflow import OutputOverflowError
from mergekit_drm.drm.kernel import drm_merge_matrix, elementwise_merge
from tests.tiny_models import CONFIGS, build_finetunes

mergekit_drm.register_methods()  # in-process merges, with or without the .pth hook

Q = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    return build_finetunes("llama", str(root), count=2), root


def _edited_copy(path: str, target: str, edit) -> str:
    shutil.copytree(path, target)
    weights = os.path.join(target, "model.safetensors")
    state = load_file(weights)
    edit(state)
    save_file(state, weights, metadata={"format": "pt"})
    return target


def _poisoned(path, target, name, value=float("nan")):
    def edit(state):
        state[name][(1, 2) if state[name].dim() == 2 else (2,)] = value

    return _edited_copy(path, target, edit)


def _config(base, fts, **params):
    return {
        "merge_method": "drm",
        "base_model": base,
        "models": [{"model": p} for p in fts],
        "parameters": {"density": 0.3, **params},
        "dtype": "float32",
    }


def _run(config, out):
    run_merge(
        MergeConfiguration.model_validate(config), str(out),
        MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True),
    )


def _nothing_written(out):
    return not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    "where, tensor, params, value",
    [
        ("finetune", Q, {"svd": "gram"}, float("nan")),
        ("finetune", Q, {"svd": "full"}, float("nan")),
        ("finetune", Q, {"svd": "auto"}, float("inf")),
        ("finetune", NORM, {}, float("nan")),  # elementwise path
        ("finetune", Q, {"decompose": False}, float("-inf")),
        ("base", Q, {}, float("nan")),
        ("base", NORM, {}, float("nan")),
    ],
)
def test_non_finite_input_fails_naming_tensor_and_model(models, tmp_path, where, tensor, params, value):
    (base, ft1, ft2), _ = models
    if where == "base":
        base = _poisoned(base, str(tmp_path / "bad-base"), tensor, value)
        culprit = base
    else:
        ft1 = _poisoned(ft1, str(tmp_path / "bad-ft"), tensor, value)
        culprit = ft1
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError) as info:
        _run(_config(base, [ft1, ft2], **params), out)
    message = str(info.value)
    counts = "1 NaN and 0 inf" if value != value else "0 NaN and 1 inf"
    assert tensor in message and culprit in message and counts in message
    assert ("base model" in message) == (where == "base")
    assert ("(1, 2)" if tensor == Q else "(2,)") in message
    assert "Repair" in message
    assert _nothing_written(out)


@pytest.mark.parametrize("where", ["finetune", "base"])
def test_finite_entry_that_overflows_the_requested_dtype_blames_the_cast(models, tmp_path, where):
    """Before: "repair or re-export that checkpoint" for a finite 3e38 read with dtype: float16."""
    (base, ft1, ft2), _ = models
    if where == "base":
        base = culprit = _poisoned(base, str(tmp_path / "big"), Q, 3e38)
    else:
        ft1 = culprit = _poisoned(ft1, str(tmp_path / "big"), Q, 3e38)
    config = dict(_config(base, [ft1, ft2]), dtype="float16")
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError) as info:
        _run(config, out)
    message = str(info.value)
    assert Q in message and culprit in message
    assert "The checkpoint is finite" in message and "the cast to float16" in message
    assert "dtype: bfloat16" in message and "Repair" not in message
    assert _nothing_written(out)


def test_merge_that_overflows_out_dtype_names_out_dtype(models, tmp_path):
    """Before: mergekit's cast to out_dtype: float16 wrote inf silently."""
    (base, ft1, ft2), _ = models
    # finite in float32, above float16's 65504, in every model: the merge keeps it
    base, ft1, ft2 = (_poisoned(p, str(tmp_path / f"big-{i}"), Q, 7.0e4) for i, p in enumerate((base, ft1, ft2)))
    out = tmp_path / "out"
    with pytest.raises(OutputOverflowError) as info:
        _run(dict(_config(base, [ft1, ft2]), out_dtype="float16"), out)
    message = str(info.value)
    assert Q in message and "out_dtype: float16" in message and "out_dtype: bfloat16" in message
    assert _nothing_written(out)


def test_lambda_that_overflows_names_lambda(models, tmp_path):
    """Before: exit 0 and a model that is inf everywhere (lambda 1e39 is finite in Python)."""
    (base, ft1, ft2), _ = models
    out = tmp_path / "out"
    config = dict(_config(base, [ft1, ft2], **{"lambda": 1e39}), dtype="bfloat16")
    with pytest.raises(OutputOverflowError) as info:
        _run(config, out)
    message = str(info.value)
    assert "lambda 1e+39" in message and "smaller `lambda`" in message and "the merged tensor " in message
    assert _nothing_written(out)


@pytest.mark.parametrize(
    "edit, needles",
    [
        (lambda c: c["parameters"].update(density="abc"), ["drm parameter `density` must be a number", "'abc'"]),
        (lambda c: c["models"][0].update(parameters={"weight": "heavy"}), ["drm parameter `weight`", "of model"]),
        (lambda c: c["parameters"].update(weight=float("nan")), ["drm parameter `weight` must be a finite number"]),
        (lambda c: c["parameters"].update(decompose="maybe"), ["drm parameter `decompose` must be true or false"]),
    ],
)
def test_bad_values_are_refused_at_planning_naming_the_parameter(models, tmp_path, edit, needles):
    """Before: pydantic errors naming neither parameter nor model, or (weight .nan) a NaN model."""
    (base, ft1, ft2), _ = models
    config = _config(base, [ft1, ft2])
    edit(config)
    out = tmp_path / "out"
    with pytest.raises(Exception) as info:
        _run(config, out)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    if "of model" in needles:
        assert ft1 in str(info.value)
    assert not out.exists()


def test_kernels_refuse_non_finite_deltas():
    gen = torch.Generator().manual_seed(0)
    deltas = torch.randn(3, 6, 5, generator=gen)
    deltas[2, 4, 1] = float("nan")
    for svd in ("gram", "full"):
        with pytest.raises(NonFiniteError, match=r"delta 2 \(0-based\).*1 NaN.*\(4, 1\)"):
            drm_merge_matrix(deltas, svd=svd)
    with pytest.raises(NonFiniteError, match=r"delta 2 \(0-based\)"):
        elementwise_merge(deltas)


@pytest.mark.parametrize("rank_tol", [1.0, 2.5])
def test_kernel_refuses_rank_tol_that_drops_everything(rank_tol):
    with pytest.raises(ValueError, match=r"rank_tol must be in \[0, 1\).*drop every direction"):
        drm_merge_matrix(torch.randn(2, 4, 3), rank_tol=rank_tol)


def test_missing_tensor_fails_before_the_output_exists(models, tmp_path):
    (base, ft1, ft2), _ = models
    incomplete = _edited_copy(ft1, str(tmp_path / "incomplete"), lambda s: s.pop(Q))
    out = tmp_path / "out"
    with pytest.raises(ValueError) as info:
        _run(_config(base, [incomplete, ft2]), out)
    message = str(info.value)
    assert f"Tensor {Q} is missing from {incomplete}" in message and ft2 in message
    assert not out.exists()


def test_bin_checkpoint_shape_mismatch_fails_before_the_output_exists(models, tmp_path):
    (base, ft1, _), _ = models
    config = CONFIGS["llama"]()
    config.intermediate_size = 40
    other = str(tmp_path / "other-bin")
    model = transformers.AutoModelForCausalLM.from_config(config)
    os.makedirs(other)
    model.config.architectures = ["LlamaForCausalLM"]
    model.config.save_pretrained(other)
    torch.save(model.state_dict(), os.path.join(other, "pytorch_model.bin"))
    out = tmp_path / "out"
    with pytest.raises(ValueError) as info:
        _run(_config(base, [ft1, other]), out)
    message = str(info.value)
    assert "different shapes" in message and "[48, 32]" in message and "[40, 32]" in message
    assert "vocab" not in message
    assert not out.exists()


def test_misspelt_parameter_names_are_reported_with_the_closest_name(models, tmp_path, caplog, monkeypatch):
    (base, ft1, ft2), _ = models
    config = _config(base, [ft1, ft2], densty=0.5)
    config["models"][0]["parameters"] = {"wieght": 2.0, "direction": "horizontal"}
    monkeypatch.delenv(UNKNOWN_PARAMETERS_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="mergekit_drm.checks"):
        _run(config, tmp_path / "warned")
    text = caplog.text
    assert "`densty` under parameters" in text and "did you mean `density`?" in text
    assert "`wieght`" in text and "did you mean `weight`?" in text
    assert f"`direction` under the parameters of model {ft1}" in text and "move it to the top-level" in text
    monkeypatch.setenv(UNKNOWN_PARAMETERS_ENV, "error")
    out = tmp_path / "refused"
    with pytest.raises(ValueError, match="did you mean `density`"):
        _run(config, out)
    assert not out.exists()


def test_removed_parameter_names_say_why_instead_of_a_near_name(models, tmp_path, monkeypatch):
    """`whiten` and `rank_budget` were drm options until they lost on the benchmark: the message
    says so (difflib alone would offer `rank_tol` for `rank_budget`) and names the results file."""
    (base, ft1, ft2), _ = models
    monkeypatch.setenv(UNKNOWN_PARAMETERS_ENV, "error")
    out = tmp_path / "refused"
    with pytest.raises(ValueError) as info:
        _run(_config(base, [ft1, ft2], whiten=True, rank_budget=0.2), out)
    message = str(info.value)
    for name in ("whiten", "rank_budget"):
        assert f"`{name}` under parameters was removed from drm in this version" in message, message
    assert "did you mean" not in message and "did not improve merges" in message
    results = "benchmarks/results/drm_options.md"
    assert results in message
    assert os.path.isfile(os.path.join(os.path.dirname(os.path.dirname(__file__)), results))
    assert not out.exists()


def test_known_parameter_names_are_not_reported(models, tmp_path, caplog, monkeypatch):
    (base, ft1, ft2), _ = models
    monkeypatch.setenv(UNKNOWN_PARAMETERS_ENV, "error")
    config = _config(base, [ft1, ft2], rank_tol=0.0, direction="horizontal")
    config["models"][0]["parameters"] = {"weight": 2.0, "density": 0.3}
    with caplog.at_level(logging.WARNING, logger="mergekit_drm.checks"):
        _run(config, tmp_path / "out")
    assert "parameter" not in caplog.text


# --- the LoRA route (mergekit-drm-lora) -------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    from tests.test_lora_cli import build_set

    root = str(tmp_path_factory.mktemp("lora_checks"))
    return build_set(root, adapters={
        "a1": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
        "a2": dict(r=3, lora_alpha=3, target_modules=["q_proj", "down_proj"]),
    })


def _lora_run(tmp_path, base, paths, params, name="merged"):
    from tests.test_lora_cli import run_cli, yaml_config

    config = yaml_config(base, paths, [1.0] * len(paths), {"density": 0.3, **params})
    return run_cli(tmp_path, config, name=name, expect_ok=False)


def test_lora_non_finite_factor_is_named_before_writing(tmp_path, adapters):
    base, paths = adapters
    bad = str(tmp_path / "bad-adapter")
    shutil.copytree(paths["a2"], bad)
    weights = os.path.join(bad, "adapter_model.safetensors")
    state = load_file(weights)
    key = next(k for k in state if "layers.1.mlp.down_proj.lora_B" in k)
    state[key][0, 1] = float("inf")
    save_file(state, weights)
    out, result = _lora_run(tmp_path, base, [paths["a1"], bad], {})
    assert result.exit_code != 0
    assert "model.layers.1.mlp.down_proj.lora_B" in result.output and bad in result.output
    assert "0 NaN and 1 inf" in result.output and "remove it from `models:`" in result.output
    assert not out.exists()


def test_lowrank_kernel_refuses_non_finite_factors():
    from mergekit_drm.lora.lowrank import LoraFactors, drm_merge_lowrank

    good = LoraFactors(B=torch.randn(5, 2), A=torch.randn(2, 4), scale=1.0)
    bad = LoraFactors(B=torch.randn(5, 2), A=torch.randn(2, 4), scale=1.0)
    bad.A[1, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"A of adapter 1 \(0-based\).*\(1, 3\)"):
        drm_merge_lowrank([good, bad], shape=(5, 4))


@pytest.mark.parametrize("rank_tol", [1.0, 3.0])
def test_lora_cli_refuses_rank_tol_of_one_or_more(tmp_path, adapters, rank_tol):
    base, paths = adapters
    out, result = _lora_run(tmp_path, base, list(paths.values()), {"rank_tol": rank_tol})
    assert result.exit_code != 0
    assert "`rank_tol` must be in [0, 1)" in result.output and "drop them all" in result.output
    assert not out.exists()


def test_lora_cli_reports_misspelt_parameter_names(tmp_path, adapters, monkeypatch):
    base, paths = adapters
    monkeypatch.delenv(UNKNOWN_PARAMETERS_ENV, raising=False)
    out, result = _lora_run(tmp_path, base, list(paths.values()), {"rank_tl": 0.05}, name="warned")
    assert result.exit_code == 0, result.output
    assert "`rank_tl`" in result.output and "did you mean `rank_tol`?" in result.output
    monkeypatch.setenv(UNKNOWN_PARAMETERS_ENV, "error")
    out, result = _lora_run(tmp_path, base, list(paths.values()), {"rank_tl": 0.05}, name="refused")
    assert result.exit_code != 0 and "did you mean `rank_tol`?" in result.output
    assert not out.exists()


def test_lora_cli_says_a_removed_parameter_was_removed(tmp_path, adapters, monkeypatch):
    base, paths = adapters
    monkeypatch.setenv(UNKNOWN_PARAMETERS_ENV, "error")
    out, result = _lora_run(tmp_path, base, list(paths.values()), {"rank_budget": 0.2}, name="refused")
    assert result.exit_code != 0
    assert "`rank_budget` under parameters was removed from drm" in result.output, result.output
    assert "did you mean" not in result.output
    assert not out.exists()


# ---------------------------------------------------------------- partial output
LATE = "model.layers.1.mlp.down_proj.weight"


def _run_sharded(config, out):
    """Tiny shards: every few tensors go to disk before the next is merged,
    so a failure late in the model comes after shards were written."""
    run_merge(
        MergeConfiguration.model_validate(config), str(out),
        MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, out_shard_size=4096),
    )


def _removed_count(exc) -> int:
    notes = " ".join(getattr(exc, "__notes__", []))
    assert "mergekit-drm: the merge stopped" in notes, notes
    return int(notes.split("so the ")[1].split(" unfinished shard")[0])


@pytest.mark.parametrize("method", ["drm", "tsv_m"])
def test_failure_mid_merge_removes_the_shards_it_wrote(models, tmp_path, method):
    (base, ft1, ft2), _ = models
    bad = _poisoned(ft2, str(tmp_path / "bad-ft"), LATE)
    out = tmp_path / "out"
    config = {**_config(base, [ft1, bad]), "merge_method": method}
    if method != "drm":
        config["parameters"] = {}
    with pytest.raises(NonFiniteError) as info:
        _run_sharded(config, out)
    assert LATE in str(info.value)
    assert _removed_count(info.value) >= 1  # shards had been written before the NaN was read
    assert not out.exists()


def test_failure_mid_merge_keeps_what_the_directory_held(models, tmp_path):
    (base, ft1, ft2), _ = models
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "README.md").write_text("my card")  # a name mergekit writes, but only after success
    bad = _poisoned(ft1, str(tmp_path / "bad-ft"), LATE)
    with pytest.raises(NonFiniteError) as info:
        _run_sharded(_config(base, [bad, ft2]), out)
    assert _removed_count(info.value) >= 1
    assert "no other file there was touched" in " ".join(info.value.__notes__)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "README.md").read_text() == "my card"


def test_a_clean_merge_after_a_failed_one_is_complete(models, tmp_path):
    """The snapshot belongs to one run: a later run to the same path starts afresh."""
    (base, ft1, ft2), _ = models
    out = tmp_path / "out"
    bad = _poisoned(ft1, str(tmp_path / "bad-ft"), LATE)
    with pytest.raises(NonFiniteError):
        _run_sharded(_config(base, [bad, ft2]), out)
    _run_sharded(_config(base, [ft1, ft2]), out)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and all("-of-" in name for name in shards)
    merged = {}
    for name in shards:
        merged.update(load_file(str(out / name)))
    assert torch.isfinite(merged[LATE]).all()
