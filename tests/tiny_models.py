"""Tiny checkpoints built from transformers configs (no downloads).

A "fine-tune" is the base plus a structured low-rank delta on every matrix
(rank 2, distinct scales per model) and a small dense delta on vectors, so
task vectors have the shape DRM is designed for.
"""

from __future__ import annotations

import os
from typing import Dict, List

import torch
import transformers

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
        tie_word_embeddings=False,
    ),
    "gpt2": lambda: transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64,
    ),
    "phi3": lambda: transformers.Phi3Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, vocab_size=96, max_position_embeddings=16,
    ),
    "falcon": lambda: transformers.FalconConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_kv_heads=2, new_decoder_architecture=True, vocab_size=96,
        tie_word_embeddings=False,
    ),
}


def build_base(arch: str, path: str, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path, safe_serialization=True)
    return model


def finetune_state(base: Dict[str, torch.Tensor], seed: int, scale: float = 0.02):
    """Base plus a rank-2 delta per matrix and a small delta per vector."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in base.items():
        if not tensor.is_floating_point():
            out[name] = tensor.clone()
            continue
        if tensor.dim() == 2:
            rows, cols = tensor.shape
            left = torch.randn(rows, 2, generator=gen)
            right = torch.randn(2, cols, generator=gen)
            strengths = torch.tensor([1.0, 0.3]) * (1 + seed % 3)
            delta = (left * strengths) @ right / (rows * cols) ** 0.25
        else:
            delta = torch.randn(tensor.shape, generator=gen)
        out[name] = tensor + scale * delta
    return out


def _add_neox_buffers(path: str, config) -> None:
    """Real GPT-NeoX checkpoints (Pythia) store attention buffers that current
    transformers no longer saves, and mergekit's gpt-neox definition requires
    them; add them so the tiny model looks like the real thing."""
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    state = load_file(file)
    n = config.max_position_embeddings
    d = config.hidden_size // config.num_attention_heads
    for layer in range(config.num_hidden_layers):
        prefix = f"gpt_neox.layers.{layer}.attention."
        state[prefix + "bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
        state[prefix + "masked_bias"] = torch.tensor(-1e9)
        state[prefix + "rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    save_file(state, file, metadata={"format": "pt"})


def build_finetunes(arch: str, root: str, count: int = 2) -> List[str]:
    """Write base and ``count`` fine-tunes under ``root``; return their paths."""
    base_path = os.path.join(root, f"{arch}-base")
    model = build_base(arch, base_path)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    paths = [base_path]
    for index in range(count):
        path = os.path.join(root, f"{arch}-ft{index}")
        model.load_state_dict(finetune_state(state, seed=100 + index))
        model.save_pretrained(path, safe_serialization=True)
        paths.append(path)
    if arch == "gpt_neox":
        for path in paths:
            _add_neox_buffers(path, model.config)
    model.load_state_dict(state)
    return paths
