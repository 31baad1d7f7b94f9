"""mudsc inputs that used to merge silently wrong (or fail after the output
existed): stale saved alignments, non-finite weights, calibration problems,
per-tensor alignment parameters and misspelt parameter names."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import mergekit_drm
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
from mergekit_drm.checks import UNKNOWN_PARAMETERS_ENV, NonFiniteError
from mergekit_drm.mudsc import engine
from mergekit_drm.mudsc.cli import main as align_main
from tests.mudsc_models import (
    build_model,
    make_tokenizer,
    model_class,
    outputs,
    plant_permutation,
    sample_inputs,
    save,
    spec_of,
)

mergekit_drm.register_methods()  # in-process merges, with or without the .pth hook

FAST = {"calibration_samples": 8, "calibration_seq_len": 32}
Q = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.layers.1.post_attention_layernorm.weight"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A llama and a planted permutation of it, an unrelated llama, and a saved
    alpha-1 alignment of (a, b)."""
    tok = make_tokenizer()
    root = tmp_path_factory.mktemp("mudsc_checks")
    a = build_model("llama")
    state = {k: v.detach().clone() for k, v in a.state_dict().items()}
    state_b, _ = plant_permutation(spec_of(a), state, seed=4)
    b = build_model("llama", seed=1)
    b.load_state_dict(state_b)
    out = dict(
        a=a,
        path_a=save(a, str(root / "a"), tok),
        path_b=save(b, str(root / "b"), tok),
        path_c=save(build_model("llama", seed=7), str(root / "c"), tok),
    )
    config = root / "align.yml"
    config.write_text(yaml.safe_dump(_config([out["path_a"], out["path_b"]], alpha=1.0)))
    out["saved"] = str(root / "alignment")
    assert align_main([str(config), "--alignment-out", out["saved"]]) == 0
    return out


def _config(paths, **parameters):
    return {
        "merge_method": "mudsc",
        "models": [{"model": p} for p in paths],
        "parameters": {**FAST, **parameters},
        "dtype": "float32",
    }


def _merge(config, out):
    engine.clear_cache()
    run_merge(MergeConfiguration.model_validate(config), str(out),
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))


def _refused_before_writing(config, out, *needles, error=Exception):
    with pytest.raises(error) as info:
        _merge(config, out)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    assert not out.exists(), "the output directory was created before the error"
    return str(info.value)


def _copy_with(path, target, name, value):
    shutil.copytree(path, target)
    weights = os.path.join(target, "model.safetensors")
    state = load_file(weights)
    state[name].view(-1)[3] = value
    save_file(state, weights, metadata={"format": "pt"})
    return target


# --- saved alignments -------------------------------------------------------------------------


def test_saved_alignment_records_what_it_was_computed_for(pair):
    meta = json.load(open(os.path.join(pair["saved"], "alignment.json")))
    assert meta["format_version"] == 2
    assert [i["path"] for i in meta["identities"]] == [pair["path_a"], pair["path_b"]]
    assert meta["identities"][0]["fingerprint"] != meta["identities"][1]["fingerprint"]
    assert meta["identities"][0]["tensors"] == meta["identities"][1]["tensors"]
    assert meta["parameters"] == {"alpha": 1.0, "mode": "align", "iterations": 100, "patience": 5, "seed": 0}


def test_saved_alignment_in_the_other_model_order_is_rekeyed_to_the_exact_merge(pair, tmp_path):
    out = tmp_path / "swapped"
    _merge(_config([pair["path_b"], pair["path_a"]], alignment=pair["saved"]), out)
    merged = model_class("llama").from_pretrained(str(out)).eval()
    ids = sample_inputs("llama")
    torch.testing.assert_close(outputs(merged, ids), outputs(pair["a"], ids), atol=1e-5, rtol=1e-4)


def test_saved_alignment_for_other_models_is_refused(pair, tmp_path):
    message = _refused_before_writing(
        _config([pair["path_a"], pair["path_c"]], alignment=pair["saved"]), tmp_path / "out",
        "was computed for", pair["path_b"], f"not for {pair['path_c']}", "its weights differ",
    )
    assert "mergekit-mudsc-align" in message


@pytest.mark.parametrize("params, needle", [
    ({"alpha": 0.5}, "alpha: 0.5 (saved: 1.0)"),
    ({"mode": "zip"}, "mode: 'zip' (saved: 'align')"),
    ({"seed": 3, "iterations": 7}, "iterations: 7 (saved: 100); seed: 3 (saved: 0)"),
])
def test_saved_alignment_with_conflicting_parameters_is_refused(pair, tmp_path, params, needle):
    _refused_before_writing(
        _config([pair["path_a"], pair["path_b"]], alignment=pair["saved"], **params), tmp_path / "out",
        "computed with other parameters", needle, "Remove them from the YAML",
    )


def test_format_1_alignment_is_refused(pair, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(pair["saved"], old)
    meta = json.load(open(old / "alignment.json"))
    meta["format_version"] = 1
    del meta["identities"], meta["parameters"]
    (old / "alignment.json").write_text(json.dumps(meta))
    _refused_before_writing(
        _config([pair["path_a"], pair["path_b"]], alignment=str(old)), tmp_path / "out",
        "format 1 does not record which models", "recompute it",
    )


@pytest.mark.parametrize("name", ["alignment.safetensors", "alignment.json"])
def test_truncated_saved_alignment_names_the_file(pair, tmp_path, name):
    """Before: a raw SafetensorError / JSONDecodeError naming no file."""
    cut = tmp_path / "cut"
    shutil.copytree(pair["saved"], cut)
    path = cut / name
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)
    message = _refused_before_writing(
        _config([pair["path_a"], pair["path_b"]], alignment=str(cut)), tmp_path / "out",
        f"saved alignment file {path} cannot be read", "truncated", "recompute it",
    )
    assert "mergekit-mudsc-align" in message


def test_binary_calibration_file_names_the_file(pair, tmp_path):
    """Before: a raw UnicodeDecodeError."""
    path = tmp_path / "corpus.txt"
    path.write_bytes(bytes(range(128, 256)) * 8)
    _refused_before_writing(
        _config([pair["path_a"], pair["path_b"]], calibration=str(path)), tmp_path / "out",
        str(path), "is not UTF-8 text",
    )


def test_negative_weight_is_refused_during_planning(pair, tmp_path):
    """Before: accepted, although the merge's own text says weights must be positive."""
    config = _config([pair["path_a"], pair["path_b"]])
    config["models"][1]["parameters"] = {"weight": -0.5}
    _refused_before_writing(config, tmp_path / "out", "mudsc parameter `weight`", "not be negative", pair["path_b"])


# --- non-finite weights ---------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_non_finite_weight_is_named(pair, tmp_path, alpha):
    bad = _copy_with(pair["path_b"], str(tmp_path / "bad"), Q, float("nan"))
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=rf"tensor {Q} of model {bad} holds 1 NaN") as info:
        _merge(_config([pair["path_a"], bad], alpha=alpha), out)
    assert "remove the model" in str(info.value)
    assert not out.exists() or not any(out.iterdir())


def test_non_finite_weight_is_named_with_a_saved_alignment(pair, tmp_path):
    # a vector: not part of the content fingerprint, so the alignment is accepted
    bad = _copy_with(pair["path_b"], str(tmp_path / "bad"), NORM, float("inf"))
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=rf"tensor {NORM} of model {bad} holds 0 NaN and 1 inf"):
        _merge(_config([pair["path_a"], bad], alignment=pair["saved"]), out)
    assert not out.exists() or not any(out.iterdir())


# --- calibration and parameters, all during planning ----------------------------------------


def _calibration_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("make, needle", [
    (lambda t: str(t), "is a directory, not a file"),
    (lambda t: _calibration_file(t, "prep.py", "import os\n"), "is not calibration text"),
    (lambda t: _calibration_file(t, "empty.txt", "\n\n"), "holds no text"),
    (lambda t: _calibration_file(t, "bad.jsonl", '{"text": "ok"}\nnot json\n'), "bad.jsonl:2: not JSON"),
])
def test_calibration_problems_fail_during_planning(pair, tmp_path, make, needle):
    calibration = make(tmp_path)
    _refused_before_writing(
        _config([pair["path_a"], pair["path_b"]], calibration=calibration), tmp_path / "out", needle,
    )


def test_sequence_longer_than_the_positions_fails_during_planning(pair, tmp_path):
    _refused_before_writing(
        _config([pair["path_a"], pair["path_b"]], calibration_seq_len=65), tmp_path / "out",
        "`calibration_seq_len` 65 exceeds the model's 64 positions",
    )


def test_per_tensor_alignment_parameter_fails_during_planning(pair, tmp_path):
    config = _config([pair["path_a"], pair["path_b"]])
    config["parameters"]["alpha"] = [{"filter": "mlp", "value": 1.0}, {"value": 0.5}]
    _refused_before_writing(config, tmp_path / "out", "same for every tensor", "alpha 1.0 (first tensor: 0.5)")


def test_calibration_text_is_read_and_tokenized_once(pair, tmp_path, monkeypatch):
    calls = {"read": 0, "cut": 0}
    real_read, real_cut = engine.load_texts, engine.token_windows

    def read(*args, **kwargs):
        calls["read"] += 1
        return real_read(*args, **kwargs)

    def cut(*args, **kwargs):
        calls["cut"] += 1
        return real_cut(*args, **kwargs)

    monkeypatch.setattr(engine, "load_texts", read)
    monkeypatch.setattr(engine, "token_windows", cut)
    _merge(_config([pair["path_a"], pair["path_b"]], alpha=0.5), tmp_path / "out")
    assert calls == {"read": 1, "cut": 1}


# --- parameter names ------------------------------------------------------------------------


def test_misspelt_mudsc_parameter_is_reported(pair, tmp_path, caplog, monkeypatch):
    config = _config([pair["path_a"], pair["path_b"]], alpah=1.0)
    monkeypatch.setenv(UNKNOWN_PARAMETERS_ENV, "error")
    _refused_before_writing(config, tmp_path / "refused", "`alpah`", "did you mean `alpha`?")
    monkeypatch.delenv(UNKNOWN_PARAMETERS_ENV)
    with caplog.at_level(logging.WARNING, logger="mergekit_drm.checks"):
        _merge(config, tmp_path / "warned")
    assert "`alpah` under parameters is not a mudsc parameter" in caplog.text
    assert "did you mean `alpha`?" in caplog.text


def test_align_cli_names_the_closest_parameter(pair, tmp_path, capsys):
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump(_config([pair["path_a"], pair["path_b"]], alpah=1.0)))
    assert align_main([str(config), "--alignment-out", str(tmp_path / "al")]) == 2
    assert "`alpah` (did you mean `alpha`?)" in capsys.readouterr().err
    assert not (tmp_path / "al").exists()


@pytest.mark.parametrize("value, needle", [
    ("abc", "mudsc parameter `alpha` must be a number; got 'abc'"),
    (float("nan"), "mudsc parameter `alpha` must be in [0, 1]"),
])
def test_align_cli_names_the_parameter_of_a_bad_value(pair, tmp_path, capsys, value, needle):
    """Before: pydantic's 'validation error for function-after' frame around the message."""
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump(_config([pair["path_a"], pair["path_b"]], alpha=value)))
    assert align_main([str(config), "--alignment-out", str(tmp_path / "al")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "validation error" not in err, err
    assert not (tmp_path / "al").exists()
