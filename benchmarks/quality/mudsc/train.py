"""Tiny Llama language models trained from scratch on the benchmark corpus.

Every endpoint has the same architecture and sees the same batches in the same
order (``data_seed``); only the initialization seed differs. That isolates what
model merging of *independently initialized* networks has to undo: the
permutation (and more general) symmetry between their hidden units.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Dict

from .data import Corpus, EOS, blocks


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # GQA: 2 query heads per KV head
    intermediate_size: int = 344
    max_position_embeddings: int = 256

    def llama_config(self, vocab_size: int, eos_id: int):
        import transformers

        return transformers.LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=False,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
        )


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    steps: int = 800
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    data_seed: int = 0  # the same batch order for every endpoint
    val_blocks: int = 64

    def tag(self) -> str:
        return (f"st{self.steps}-b{self.batch_size}-L{self.seq_len}-lr{self.lr:g}"
                f"-d{self.data_seed}")


def checkpoint_dir(cache: Path, corpus: Corpus, model: ModelSpec, train: TrainSpec, seed: int) -> Path:
    m = model
    arch = (f"llama-h{m.hidden_size}-l{m.num_hidden_layers}-a{m.num_attention_heads}"
            f"-kv{m.num_key_value_heads}-i{m.intermediate_size}")
    return (Path(cache) / "checkpoints" / f"{corpus.fingerprint}-v{corpus.vocab_size}"
            / arch / train.tag() / f"seed{seed}")


def _lr_at(step: int, spec: TrainSpec) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    frac = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return spec.lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * cos)


@dataclasses.dataclass
class TrainResult:
    path: Path
    seed: int
    n_params: int
    train_seconds: float
    final_train_loss: float  # mean over the last 10 % of steps
    val_loss: float
    cached: bool = False

    def to_json(self) -> Dict:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        return d


def train_endpoint(corpus: Corpus, out: Path, seed: int, model: ModelSpec = ModelSpec(),
                   spec: TrainSpec = TrainSpec(), log=print) -> TrainResult:
    """Train one model from scratch (init seed ``seed``) and save it, with the
    corpus tokenizer, to ``out`` (safetensors)."""
    import torch
    import transformers

    tokenizer = corpus.tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    torch.manual_seed(seed)
    net = transformers.LlamaForCausalLM(model.llama_config(corpus.vocab_size, eos_id))
    n_params = sum(p.numel() for p in net.parameters())
    decay = [p for n, p in net.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in net.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr, betas=(0.9, 0.95),
    )
    train = corpus.streams["train"]
    gen = torch.Generator().manual_seed(spec.data_seed)
    max_start = train.numel() - spec.seq_len - 1
    losses = []
    net.train()
    t0 = time.time()
    for step in range(spec.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, spec)
        starts = torch.randint(0, max_start, (spec.batch_size,), generator=gen)
        x = torch.stack([train[s: s + spec.seq_len] for s in starts.tolist()])
        loss = net(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), spec.grad_clip)
        opt.step()
        losses.append(loss.item())
        if log and (step + 1) % max(1, spec.steps // 8) == 0:
            log(f"  seed {seed} step {step + 1}/{spec.steps} loss {losses[-1]:.3f} "
                f"({time.time() - t0:.0f} s)")
    seconds = time.time() - t0
    net.eval()
    from .evaluate import evaluate_models

    val = evaluate_models([net], blocks(corpus.streams["validation"], spec.seq_len, spec.val_blocks),
                          ensemble=False)["models"][0]
    tail = losses[-max(1, len(losses) // 10):]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    res = TrainResult(path=out, seed=seed, n_params=n_params, train_seconds=seconds,
                      final_train_loss=sum(tail) / len(tail), val_loss=val["loss"])
    (out / "train_log.json").write_text(json.dumps(
        {**res.to_json(), "model": dataclasses.asdict(model), "train": dataclasses.asdict(spec),
         "losses": losses}, indent=1))
    return res


def cached_endpoint(cache: Path, corpus: Corpus, seed: int, model: ModelSpec = ModelSpec(),
                    spec: TrainSpec = TrainSpec(), log=print) -> TrainResult:
    path = checkpoint_dir(cache, corpus, model, spec, seed)
    logf = path / "train_log.json"
    if logf.exists() and (path / "model.safetensors").exists():
        d = json.loads(logf.read_text())
        return TrainResult(path=path, seed=seed, n_params=d["n_params"],
                           train_seconds=d["train_seconds"], final_train_loss=d["final_train_loss"],
                           val_loss=d["val_loss"], cached=True)
    if log:
        log(f"training endpoint seed {seed} -> {path}")
    return train_endpoint(corpus, path, seed, model, spec, log=log)


def load_model(path: Path):
    import torch
    import transformers

    net = transformers.LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    net.eval()
    return net
