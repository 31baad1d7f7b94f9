"""mergekit-drm-demo's pieces that need no training: tasks, YAMLs, the 'kept' score."""

import pytest
import torch
import yaml

from mergekit_drm import demo


def test_tasks_answers():
    digits = torch.tensor([[3, 1, 4, 1, 5, 9]])
    assert demo._answer("reverse", digits).tolist() == [[9, 5, 1, 4, 1, 3]]
    assert demo._answer("sort", digits).tolist() == [[1, 1, 3, 4, 5, 9]]
    assert demo._answer("swap", digits).tolist() == [[1, 3, 1, 4, 9, 5]]
    assert demo._answer("copy", digits).tolist() == digits.tolist()
    tokens, labels = demo.make_batch("swap", 5, torch.Generator().manual_seed(0))
    # only the answer is scored: BOS, task, 6 digits, SEP are masked
    assert (labels[:, : 2 + demo.LENGTH + 1] == -100).all()
    assert torch.equal(tokens[:, -demo.LENGTH:], demo._answer("swap", tokens[:, 2:2 + demo.LENGTH]))


def test_kept_score():
    base, own = [0.5, 0.2], [0.9, 0.6]
    assert demo.kept(own, base, own) == pytest.approx(1.0)
    assert demo.kept(base, base, own) == pytest.approx(0.0)
    # half of one gain, a quarter below the base on the other: (0.5 - 0.25) / 2
    assert demo.kept([0.7, 0.1], base, own) == pytest.approx(0.125)


def test_recommended_setting_yaml(tmp_path):
    method, params = demo.MERGES["drm-recommended"]
    cfg = demo.write_config(str(tmp_path / "c.yml"), method, params, "/b", ["/f1", "/f2"])
    assert yaml.safe_load((tmp_path / "c.yml").read_text()) == cfg
    assert cfg["merge_method"] == "drm" and cfg["parameters"] == {"isotropic": True, "norm_target": "total"}
    assert [m["parameters"] for m in cfg["models"]] == [{"weight": 1.0}] * 2
    assert demo.MERGES["iso_c"] == ("iso_c", {"lambda": 2.0})


def _readme_filter_block() -> dict:
    """The README's YAML that restricts norm_target to the decomposed matrices."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "filter: embed_tokens" in b]
    assert len(blocks) == 1, "README should show the norm_target filter once"
    return yaml.safe_load(blocks[0])["parameters"]


def test_readme_filter_sends_only_matrices_to_norm_target_total():
    from mergekit.config import ConditionalParameter, evaluate_setting

    setting = [ConditionalParameter.model_validate(c) for c in _readme_filter_block()["norm_target"]]
    value = lambda name: evaluate_setting(name, setting, validate=str)  # noqa: E731
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.3.input_layernorm.weight", "model.layers.3.post_attention_layernorm.weight"):
        assert value(name) == "none", name
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert value(f"model.layers.3.{proj}.weight") == "total", proj


def test_finetunes_train_projections_unless_full():
    model = demo.new_model()
    names = [n for n, _ in model.named_parameters()]
    trained = [n for n in names if demo.trains(n, full=False)]
    assert trained and all(n.split(".")[-2].endswith("_proj") for n in trained)
    assert any("embed_tokens" in n for n in names) and not any("embed_tokens" in n for n in trained)
    assert all(demo.trains(n, full=True) for n in names)


@pytest.mark.slow
def test_demo_claims_hold(tmp_path):
    """What the README says of the demo: projection fine-tunes leave the embeddings
    alone and every merge is above the base on every task; with --full-finetune the
    recommended setting is not, and the README's filter puts it back above."""
    import safetensors.torch
    import transformers

    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    scores = demo.run_demo(str(out))
    assert torch.get_num_threads() == threads  # the caller's setting is restored
    base = scores["base"]
    for name in demo.MERGES:
        assert all(m > b for m, b in zip(scores[name], base)), (name, scores[name], base)
    load = lambda d: safetensors.torch.load_file(str(out / d / "model.safetensors"))  # noqa: E731
    base_w, ft_w = load("base"), load("ft-sort")
    assert torch.equal(base_w["model.embed_tokens.weight"], ft_w["model.embed_tokens.weight"])
    assert not torch.equal(base_w["model.layers.0.mlp.up_proj.weight"], ft_w["model.layers.0.mlp.up_proj.weight"])

    full = demo.run_demo(str(out), full_finetune=True)
    assert full["base"] == base  # the same base, reused
    assert not all(m > b for m, b in zip(full["drm-recommended"], base))
    config = out / "filtered.yml"
    demo.write_config(str(config), "drm", _readme_filter_block(), str(out / "base"),
                      [str(out / f"ft-full-{t}") for t in ("reverse", "sort", "swap")])
    demo.run_yaml(str(config), str(out / "merged-filtered"))
    model = transformers.LlamaForCausalLM.from_pretrained(str(out / "merged-filtered"))
    filtered = [demo.accuracy(model, t) for t in ("reverse", "sort", "swap")]
    assert all(m > b for m, b in zip(filtered, base)), (filtered, base)
