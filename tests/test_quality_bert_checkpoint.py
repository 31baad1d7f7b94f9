"""BERT encoder <-> BertForMaskedLM-named checkpoint conversion (the mergekit
0.1.5 BertModel workaround of the quality benchmark)."""

import json

import pytest
import torch

from benchmarks.quality import bert_checkpoint as B


def _tiny_bert(seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    return cfg, BertModel(cfg)


def test_round_trip_in_memory_is_exact():
    cfg, model = _tiny_bert()
    state = model.state_dict()
    mlm = B.to_masked_lm_state(state, cfg.vocab_size)
    assert all(k.startswith("bert.") or k.startswith("cls.") for k in mlm)
    assert "cls.predictions.bias" in mlm and torch.all(mlm["cls.predictions.bias"] == 0)
    assert "bert.embeddings.position_ids" not in mlm
    back = B.from_masked_lm_state(mlm)
    expected = {k: v for k, v in state.items() if k != "embeddings.position_ids"}
    assert set(back) == set(expected)
    for k in expected:
        assert torch.equal(back[k], expected[k]), k


def test_round_trip_on_disk_and_loads_into_bertmodel(tmp_path):
    from transformers import BertModel

    cfg, model = _tiny_bert()
    B.save_encoder_checkpoint(tmp_path / "ckpt", model.state_dict(), cfg)
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["architectures"] == ["BertForMaskedLM"]
    state = B.load_encoder_state(tmp_path / "ckpt")
    fresh = BertModel(cfg)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and all(m.endswith("position_ids") for m in missing)
    for k, v in model.state_dict().items():
        if k in state:
            assert torch.equal(state[k], v)


def test_bad_names_rejected():
    with pytest.raises(ValueError):
        B.to_masked_lm_state({"bert.embeddings.word_embeddings.weight": torch.zeros(2, 2)}, 2)
    with pytest.raises(ValueError):
        B.from_masked_lm_state({"embeddings.word_embeddings.weight": torch.zeros(2, 2)})


@pytest.mark.parametrize("method", ["drm", "ties"])
def test_converted_checkpoints_merge_through_mergekit(tmp_path, method):
    """The converted checkpoints merge with run_merge; the merged encoder reads back."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    cfg, base = _tiny_bert(0)
    paths = []
    for i in range(3):
        state = {k: v.clone() for k, v in base.state_dict().items()}
        if i:
            g = torch.Generator().manual_seed(i)
            for k, v in state.items():
                if v.is_floating_point():
                    state[k] = v + 0.01 * torch.randn(v.shape, generator=g)
        paths.append(B.save_encoder_checkpoint(tmp_path / f"m{i}", state, cfg))
    config = {"merge_method": method, "base_model": str(paths[0]),
              "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths[1:]],
              "parameters": {"density": 0.5}, "dtype": "float32"}
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "out"),
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, random_seed=0))
    merged = B.load_encoder_state(tmp_path / "out")
    ref = B.load_encoder_state(paths[0])
    assert set(merged) == set(ref)
    diff = sum(float((merged[k] - ref[k]).abs().sum()) for k in ref)
    assert diff > 0  # the fine-tunes' deltas arrived
