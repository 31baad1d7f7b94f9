"""Calibration text -> token batches for activation statistics.

Every model must see the same tokens at the same positions (correlations pair
model A's token t with model B's token t), so the text is tokenized once, with
one tokenizer (model 0's unless ``calibration_tokenizer`` names another), and
cut into equal windows: no padding, no masks.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from typing import List, Optional

import torch

DEFAULT_CORPUS = "calibration_en.txt"


def default_corpus_path() -> str:
    return str(resources.files("mergekit_drm.mudsc") / "data" / DEFAULT_CORPUS)


TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
_WHAT = (
    "give a .txt or .md file (paragraphs separated by blank lines) or a .jsonl file "
    "(objects with a \"text\" field), or leave it empty for the bundled English corpus"
)


def check_calibration_path(path: Optional[str]) -> None:
    if not path:
        return
    if os.path.isdir(path):
        raise ValueError(f"mudsc `calibration` {path!r} is a directory, not a file: {_WHAT}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mudsc `calibration` file {path!r} does not exist: {_WHAT}")
    if not path.lower().endswith(TEXT_SUFFIXES):
        raise ValueError(
            f"mudsc `calibration` file {path!r} is not calibration text (its name does not "
            f"end in {', '.join(TEXT_SUFFIXES)}): {_WHAT}"
        )


def load_texts(path: Optional[str] = None) -> List[str]:
    """Paragraphs of a .txt file, or the ``text`` fields of a .jsonl file."""
    path = path or default_corpus_path()
    check_calibration_path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            raw = handle.read()
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"mudsc calibration file {path!r} is not UTF-8 text (byte {exc.start} cannot be "
            f"decoded: a binary file?): {_WHAT}"
        ) from None
    if path.endswith(".jsonl"):
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"mudsc calibration {path}:{number}: not JSON ({error})") from None
            text = item if isinstance(item, str) else item.get("text") if isinstance(item, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"mudsc calibration {path}:{number}: expected a string or an object with a \"text\" string")
            texts.append(text)
    else:
        texts = [p.strip() for p in raw.split("\n\n") if p.strip()]
    if not texts:
        raise ValueError(f"mudsc calibration file {path!r} holds no text")
    return texts


def token_windows(tokenizer, texts: List[str], samples: int, seq_len: int) -> torch.Tensor:
    """(samples, seq_len) token ids: the texts joined (separator token between) and cut."""
    separator = tokenizer.eos_token_id
    if separator is None:
        separator = tokenizer.sep_token_id
    stream: List[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if separator is not None:
            stream.append(separator)
        if len(stream) >= samples * seq_len:
            break
    windows = len(stream) // seq_len
    if windows == 0:
        raise ValueError(
            f"mudsc calibration text has {len(stream)} tokens, fewer than one window of "
            f"seq_len={seq_len}: lower `calibration_seq_len` or give more text"
        )
    windows = min(windows, samples)
    return torch.tensor(stream[: windows * seq_len], dtype=torch.long).reshape(windows, seq_len)
