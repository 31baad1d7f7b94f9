"""Tiny models and planted permutations for the mudsc tests (no downloads).

``plant_permutation`` draws a random function-preserving permutation of a
model (residual stream, MLP units, KV heads with their query heads, query
heads inside a KV group, V dims inside a head, and Q/K dims inside a head
where there is no rotary embedding) and returns the permuted state dict with
the maps that produced it. Tests check the permuted model's logits against
the original, so the planting itself is verified independently of mudsc.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch
import transformers

from mergekit_drm.mudsc.alignment import Alignment, permute_tensor
from mergekit_drm.mudsc.matching import HeadMatch, head_maps
from mergekit_drm.mudsc.solver import identity_maps
from mergekit_drm.mudsc.specs import PermutationSpec, build_spec

VOCAB = 128

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=False, max_position_embeddings=64,
    ),
    "mistral": lambda: transformers.MistralConfig(
        hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, vocab_size=VOCAB, tie_word_embeddings=True, max_position_embeddings=64,
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=False, max_position_embeddings=64,
    ),
    "qwen3": lambda: transformers.Qwen3Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, tie_word_embeddings=False,
        max_position_embeddings=64,
    ),
    "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64),
    "bert": lambda: transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        vocab_size=VOCAB, max_position_embeddings=64, num_labels=3,
    ),
}

CONFIGS["bert_mlm"] = CONFIGS["bert"]  # BertForMaskedLM: decoder tied to the word embeddings

MODEL_CLASSES = {
    "bert": transformers.BertForSequenceClassification,
    "bert_mlm": transformers.BertForMaskedLM,
}


def model_class(arch: str):
    return MODEL_CLASSES.get(arch, transformers.AutoModelForCausalLM)


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from mergekit_drm.mudsc.calibration import load_texts

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["[UNK]", "[SEP]"], limit_alphabet=70)
    tok.train_from_iterator(load_texts(None), trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", eos_token="[SEP]")


def build_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    if arch in MODEL_CLASSES:
        return MODEL_CLASSES[arch](config).eval()
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    # Random init leaves norm scales at 1 and biases at 0: make them distinct
    # so every tensor carries information (and a wrong map shows).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.2)
    return model


def save(model, path: str, tokenizer=None) -> str:
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def plant_permutation(spec: PermutationSpec, state: Dict[str, torch.Tensor], seed: int) -> Tuple[Dict[str, torch.Tensor], Alignment]:
    gen = torch.Generator().manual_seed(seed)
    perm = lambda n: torch.randperm(n, generator=gen).numpy()
    maps = identity_maps(spec, 2)
    for group in spec.groups.values():
        if group.is_attention:
            lay = group.heads
            d = lay.head_dim
            match = HeadMatch(
                kv=perm(lay.num_kv_heads),
                query=[perm(lay.group_size) for _ in range(lay.num_kv_heads)],
                qk=[np.arange(d) if lay.rope else perm(d) for _ in range(lay.num_kv_heads)],
                v=[perm(d) for _ in range(lay.num_kv_heads)],
                score=0.0,
            )
            for space, index in head_maps(match, lay).items():
                maps[group.name][space][1] = index
        else:
            for space, size in group.spaces:
                maps[group.name][space][1] = torch.randperm(size, generator=gen)
    planted = Alignment(2, maps)
    permuted = {
        name: permute_tensor(spec.tensors[name], t, planted, 1) if name in spec.tensors else t.clone()
        for name, t in state.items()
    }
    return permuted, planted


def recovered(found: Alignment, planted: Alignment, model: int = 1) -> bool:
    """found maps model 1 back onto model 0: found[planted[u]] == u for every space."""
    for group, spaces in planted.maps.items():
        for space, indices in spaces.items():
            p = indices[model]
            if not torch.equal(found.maps[group][space][model][p], torch.arange(len(p))):
                return False
    return True


def spec_of(model) -> PermutationSpec:
    return build_spec(model.config, model.state_dict().keys())


def sample_inputs(arch: str, seed: int = 3) -> torch.Tensor:
    return torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def outputs(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits
