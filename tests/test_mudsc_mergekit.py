"""mudsc inside mergekit: YAML runs, card, saved alignments, the align CLI,
and bad input failing during planning with nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch
import yaml

from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge

import mergekit_drm
from mergekit_drm.mudsc import engine
from mergekit_drm.mudsc.alignment import Alignment
from mergekit_drm.mudsc.cli import main as align_main
from tests.mudsc_models import (
    build_model,
    make_tokenizer,
    model_class,
    outputs,
    plant_permutation,
    recovered,
    sample_inputs,
    save,
    spec_of,
)

mergekit_drm.register()  # in-process merges, with or without the .pth hook

FAST = {"calibration_samples": 8, "calibration_seq_len": 32}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tok = make_tokenizer()
    root = tmp_path_factory.mktemp("mudsc_mk")
    out = {}
    for arch in ("llama", "gpt2", "bert"):
        a = build_model(arch)
        state = {k: v.detach().clone() for k, v in a.state_dict().items()}
        state_b, planted = plant_permutation(spec_of(a), state, seed=4)
        b = build_model(arch, seed=1)
        b.load_state_dict(state_b)
        out[arch] = dict(
            a=a, planted=planted,
            path_a=save(a, str(root / f"{arch}_a"), tok),
            path_b=save(b, str(root / f"{arch}_b"), tok),
        )
    # an unsupported architecture and a llama of another width
    torch.manual_seed(0)
    import transformers

    neox = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=128, max_position_embeddings=64))
    out["neox"] = [save(neox, str(root / f"neox{i}"), tok) for i in range(2)]
    wide = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False))
    out["wide"] = save(wide, str(root / "wide"), tok)
    return out


def merge(config: dict, out: str) -> None:
    engine.clear_cache()
    run_merge(
        MergeConfiguration.model_validate(config), out,
        options=MergeOptions(copy_tokenizer=True, write_model_card=True),
        config_source=yaml.safe_dump(config),
    )


def yaml_config(paths, **parameters):
    return {
        "merge_method": "mudsc",
        "models": [{"model": p} for p in paths],
        "parameters": {**FAST, **parameters},
        "dtype": "float32",
    }


@pytest.mark.parametrize("arch,mode", [("llama", "align"), ("gpt2", "zip"), ("bert", "align")])
def test_yaml_merge_of_a_permuted_pair_equals_the_model(models, tmp_path, arch, mode):
    m = models[arch]
    out = str(tmp_path / "out")
    merge(yaml_config([m["path_a"], m["path_b"]], alpha=0.5, mode=mode), out)
    merged = model_class(arch).from_pretrained(out).eval()
    ids = sample_inputs(arch)
    assert torch.allclose(outputs(merged, ids), outputs(m["a"], ids), atol=1e-5, rtol=1e-4)
    card = open(os.path.join(out, "README.md")).read()
    assert "[MuDSC](https://arxiv.org/abs/2403.01753)" in card


@pytest.mark.slow
def test_mergekit_yaml_command(models, tmp_path):
    m = models["llama"]
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump(yaml_config([m["path_a"], m["path_b"]], alpha=1.0)))
    out = tmp_path / "out"
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    proc = subprocess.run([exe, str(config), str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = model_class("llama").from_pretrained(str(out)).eval()
    ids = sample_inputs("llama")
    assert torch.allclose(outputs(merged, ids), outputs(m["a"], ids), atol=1e-5, rtol=1e-4)


def test_per_model_weights_change_a_real_merge(models, tmp_path):
    # a and an unrelated model (different init): weights must matter
    m = models["llama"]
    tok = make_tokenizer()
    c = build_model("llama", seed=7)
    path_c = save(c, str(tmp_path / "c"), tok)
    outs = []
    for w in (1.0, 3.0):
        out = str(tmp_path / f"out{w}")
        cfg = yaml_config([m["path_a"], path_c], alpha=1.0)
        cfg["models"][0]["parameters"] = {"weight": w}
        merge(cfg, out)
        outs.append(model_class("llama").from_pretrained(out).state_dict()["model.norm.weight"])
    assert not torch.allclose(outs[0], outs[1])


BAD = [
    ("alpha", lambda m: yaml_config([m["llama"]["path_a"], m["llama"]["path_b"]], alpha=1.5), "alpha"),
    ("mode", lambda m: yaml_config([m["llama"]["path_a"], m["llama"]["path_b"]], mode="zipper"), "mode"),
    ("calibration", lambda m: yaml_config([m["llama"]["path_a"], m["llama"]["path_b"]], calibration="/nonexistent/calib.txt"), "calibration"),
    ("saved", lambda m: yaml_config([m["llama"]["path_a"], m["llama"]["path_b"]], alignment="/nonexistent/dir"), "alignment"),
    ("unsupported", lambda m: yaml_config(m["neox"]), "supported: llama"),
    ("shapes", lambda m: yaml_config([m["llama"]["path_a"], m["wide"]]), "different shapes"),
    ("single", lambda m: yaml_config([m["llama"]["path_a"]]), ""),
    ("base", lambda m: {**yaml_config([m["llama"]["path_a"], m["llama"]["path_b"]]), "base_model": m["llama"]["path_a"]}, "base"),
]


@pytest.mark.parametrize("case,build,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_fails_before_writing(models, tmp_path, case, build, needle):
    out = tmp_path / "out"
    with pytest.raises(Exception) as info:
        merge(build(models), str(out))
    assert needle.lower() in str(info.value).lower()
    assert not out.exists()


def test_alignment_parameters_must_be_global(models, tmp_path):
    m = models["llama"]
    cfg = yaml_config([m["path_a"], m["path_b"]])
    cfg["parameters"]["alpha"] = [{"filter": "mlp", "value": 1.0}, {"value": 0.5}]
    with pytest.raises(Exception, match="same for every tensor"):
        merge(cfg, str(tmp_path / "out"))


def test_alignment_is_computed_once_across_threads(models, monkeypatch):
    m = models["gpt2"]
    engine.clear_cache()
    calls = []
    real = engine.compute_alignment

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "compute_alignment", counted)
    from mergekit_drm.mudsc.solver import SolverOptions

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(engine.cached_alignment(
            [m["path_a"], m["path_b"]], SolverOptions(alpha=1.0), engine.CalibrationOptions(), None, "cpu")))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 4
    assert all(r is results[0] for r in results)
    engine.clear_cache()


def test_align_cli_saves_alignment_and_permuted_copies_for_any_method(models, tmp_path):
    m = models["llama"]
    config = tmp_path / "align.yml"
    config.write_text(yaml.safe_dump(yaml_config([m["path_a"], m["path_b"]], alpha=0.5)))
    saved, copies = tmp_path / "alignment", tmp_path / "aligned"
    assert align_main([str(config), "--alignment-out", str(saved), "--permuted-out", str(copies)]) == 0
    alignment = Alignment.load(str(saved))
    assert recovered(alignment, m["planted"])
    (copy,) = [p for p in copies.iterdir()]
    # the permuted copy of B is A, tensor for tensor
    from safetensors.torch import load_file

    a_state = load_file(os.path.join(m["path_a"], "model.safetensors"))
    b_aligned = load_file(str(copy / "model.safetensors"))
    assert set(a_state) == set(b_aligned)
    for name in a_state:
        assert torch.equal(a_state[name], b_aligned[name]), name
    assert (copy / "tokenizer.json").exists() and (copy / "config.json").exists()
    # any mergekit method can now merge the aligned pair: linear gives A back
    out = str(tmp_path / "linear")
    merge({"merge_method": "linear", "models": [{"model": m["path_a"], "parameters": {"weight": 1.0}},
                                                  {"model": str(copy), "parameters": {"weight": 1.0}}],
           "dtype": "float32"}, out)
    ids = sample_inputs("llama")
    merged = model_class("llama").from_pretrained(out).eval()
    assert torch.allclose(outputs(merged, ids), outputs(m["a"], ids), atol=1e-5, rtol=1e-4)
    # mudsc reuses the saved alignment without a search or calibration
    out2 = str(tmp_path / "reuse")
    merge(yaml_config([m["path_a"], m["path_b"]], alignment=str(saved), calibration="/dev/null"[:0]), out2)
    merged2 = model_class("llama").from_pretrained(out2).eval()
    assert torch.allclose(outputs(merged2, ids), outputs(m["a"], ids), atol=1e-5, rtol=1e-4)


def test_align_cli_refuses_before_writing(models, tmp_path, capsys):
    m = models["llama"]
    config = tmp_path / "align.yml"
    config.write_text(yaml.safe_dump(yaml_config([m["path_a"], m["path_b"]], mode="zip")))
    saved, copies = tmp_path / "alignment", tmp_path / "aligned"
    assert align_main([str(config), "--alignment-out", str(saved), "--permuted-out", str(copies)]) == 2
    assert "mode: align" in capsys.readouterr().err
    assert not saved.exists() and not copies.exists()
    config.write_text(yaml.safe_dump(yaml_config([m["path_a"], models["wide"]])))
    assert align_main([str(config), "--alignment-out", str(saved)]) == 2
    assert "different shapes" in capsys.readouterr().err
    assert not saved.exists()
    # an existing non-empty output is never overwritten without --force
    saved.mkdir()
    (saved / "keep.txt").write_text("mine")
    config.write_text(yaml.safe_dump(yaml_config([m["path_a"], m["path_b"]], alpha=1.0)))
    assert align_main([str(config), "--alignment-out", str(saved)]) == 2
    assert (saved / "keep.txt").read_text() == "mine" and not (saved / "alignment.json").exists()


def test_successive_merges_in_one_process_may_change_parameters(models, tmp_path):
    """The alignment cache lives for one merge: a later merge of the same models
    with other parameters (mergekit-multi, notebooks) must not be refused."""
    m = models["gpt2"]
    engine.clear_cache()
    for i, alpha in enumerate((1.0, 0.0, 1.0)):
        config = yaml_config([m["path_a"], m["path_b"]], alpha=alpha)
        out = str(tmp_path / f"out{i}")
        run_merge(MergeConfiguration.model_validate(config), out, options=MergeOptions(), config_source=yaml.safe_dump(config))
        merged = model_class("gpt2").from_pretrained(out).eval()
        ids = sample_inputs("gpt2")
        assert torch.allclose(outputs(merged, ids), outputs(m["a"], ids), atol=1e-5, rtol=1e-4)


def test_alpha_one_needs_no_data_and_no_forward_pass(models, monkeypatch):
    m = models["llama"]

    def refuse(*args, **kwargs):
        raise AssertionError("a model was run although alpha = 1.0 is data-free")

    monkeypatch.setattr(engine, "_hf_model", refuse)
    monkeypatch.setattr(engine, "_activations", refuse)
    from mergekit_drm.mudsc.solver import SolverOptions

    result = engine.compute_alignment(
        [m["path_a"], m["path_b"]], SolverOptions(alpha=1.0),
        engine.CalibrationOptions(path="/nonexistent/never-read.txt"),
    )
    assert recovered(result.alignment, m["planted"])


def test_statistics_split_into_passes_give_the_same_similarities(models):
    """A memory cap below one tap's statistics runs one calibration pass per
    tap; the similarities must not change."""
    import transformers

    m = models["gpt2"]
    sources = engine.describe_models([m["path_a"], m["path_b"]])
    spec = engine.check_models(sources)
    nets = [transformers.GPT2LMHeadModel.from_pretrained(s.path).eval() for s in sources]
    tokens = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    for full in (False, True):
        one = engine.activation_similarity(nets, spec, tokens, full=full, batch_size=4)
        many = engine.activation_similarity(nets, spec, tokens, full=full, batch_size=4, max_stats_bytes=1)
        assert one.keys() == many.keys()
        for group in one:
            for space in one[group]:
                assert torch.allclose(one[group][space], many[group][space], atol=1e-6)
