"""The real-shape benchmark (benchmarks/perf/bench_scale.py): layout, generated deltas, --quick, resume."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.perf import bench_scale

ROOT = bench_scale.ROOT


def _params(shape, tied):
    return sum(math.prod(d) for n, d in bench_scale.llama_tensors(shape)
               if not (tied and n == "lm_head.weight"))


def test_layout_matches_the_published_llama_sizes():
    # Llama-3.2-1B: 1,235,814,400 parameters (tied embeddings); Llama-3.1-8B: 8,030,261,248.
    assert _params(bench_scale.SHAPES["full"]["1B"], tied=True) == 1_235_814_400
    assert _params(bench_scale.SHAPES["full"]["8B"], tied=False) == 8_030_261_248
    layer = dict(bench_scale.eight_b_tensors(bench_scale.SHAPES["full"]["8B"]))
    assert layer["model.layers.0.self_attn.k_proj.weight"] == (1024, 4096)
    assert layer["model.layers.0.mlp.down_proj.weight"] == (4096, 14336)
    assert layer["model.embed_tokens.weight"] == (128256, 4096)


def test_generated_deltas_have_the_planted_rank_and_size():
    base = bench_scale.base_tensor("model.layers.0.mlp.up_proj.weight", (384, 256))
    w = base.float()
    for index, rank in enumerate(bench_scale.LORA_RANKS[:2]):
        tuned = bench_scale.finetune_tensor(base, "model.layers.0.mlp.up_proj.weight", "lora", index)
        delta = tuned.float() - w
        sv = torch.linalg.svdvals(delta)
        # rank r plus bf16 rounding of the sum: a cliff right after the r-th value
        assert sv[rank] < 0.2 * sv[rank - 1]
        assert abs(float(delta.norm() / w.norm()) - bench_scale.LORA_REL) < 0.25 * bench_scale.LORA_REL
    dense = bench_scale.finetune_tensor(base, "model.layers.0.mlp.up_proj.weight", "dense", 0).float() - w
    sv = torch.linalg.svdvals(dense)
    assert abs(float(dense.norm() / w.norm()) - bench_scale.DENSE_REL) < 0.25 * bench_scale.DENSE_REL
    assert sv[-1] > 0.01 * sv[0]  # full rank above drm's default rank_tol cut
    assert sv[0] > 5 * sv[200]  # and a decaying spectrum
    # deterministic across calls (seeded from names, not hash())
    again = bench_scale.finetune_tensor(base, "model.layers.0.mlp.up_proj.weight", "dense", 0).float() - w
    assert torch.equal(dense, again)
    norm = bench_scale.base_tensor("model.norm.weight", (64,))
    assert torch.equal(bench_scale.finetune_tensor(norm, "model.norm.weight", "lora", 0), norm)


def _quick(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.perf.bench_scale", "--quick", "--cache", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _table(text, heading):
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return lines[start], rows


@pytest.mark.slow  # end to end: 2 x (20 whole merges + 65 per-tensor jobs), ~40 s CPU
def test_quick_run_reports_every_method_and_resumes(tmp_path):
    out = _quick(tmp_path)
    assert "merges run this session: 0" not in out
    report = (tmp_path / "quick" / "scale-quick.md").read_text()
    data = json.loads((tmp_path / "quick" / "scale-quick.json").read_text())
    assert not [k for k, r in data["rows"].items() if "error" in r]
    for kind in bench_scale.KINDS:
        _, rows = _table(report, f"## 1B-shaped whole merge, {kind} fine-tunes")
        assert [r[0] for r in rows] == list(bench_scale.METHODS)
        for r in rows:
            assert all(math.isfinite(float(x)) and float(x) > 0 for x in (r[2], r[3], r[5], r[6]))
        header, rows = _table(report, f"## 8B per tensor, {kind} fine-tunes")
        assert [c.strip() for c in header.strip("|").split("|")][1:] == list(bench_scale.METHODS)
        projected = next(r for r in rows if "projected" in r[0])
        assert all(math.isfinite(float(x.strip("*"))) for x in projected[1:])
        _, rows = _table(report, f"## Check of the projection: 1B per tensor ({kind})")
        assert [r[0] for r in rows] == list(bench_scale.METHODS)
        assert all(float(r[3]) > 0 for r in rows)
    _, rows = _table(report, "## One 8B layer (7 projections + a norm), dense fine-tunes, by N")
    assert [r[0] for r in rows] == list(bench_scale.SWEEP_METHODS)
    assert all(float(x) > 0 for r in rows for x in r[1:])
    # the merged output is deleted after each run; checkpoints are complete (no .tmp left)
    assert not os.path.exists(tmp_path / "quick" / "work" / "out")
    assert not list((tmp_path / "quick" / "1B").glob("*.tmp"))
    # the checkpoints load as a transformers Llama
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "quick" / "1B" / "lora-ft1")
    assert model.config.num_key_value_heads == bench_scale.SHAPES["quick"]["1B"]["kv_heads"]
    # the adapter route: every method merged the adapters, and each adapter folds
    # into the base to exactly the lora checkpoint's bf16 weights
    _, rows = _table(report, "## The same lora fine-tunes merged as adapters")
    assert [r[0] for r in rows] == list(bench_scale.ADAPTER_METHODS)
    assert all(float(r[1]) > 0 for r in rows)
    from safetensors.torch import load_file

    root = tmp_path / "quick" / "1B"
    base, ft = (bench_scale.CheckpointReader(str(root / d)) for d in ("base", "lora-ft2"))
    factors = load_file(str(root / "lora-adapter2" / "adapter_model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    b = factors[f"base_model.model.{name[:-7]}.lora_B.weight"]
    a = factors[f"base_model.model.{name[:-7]}.lora_A.weight"]
    assert b.shape[1] == bench_scale.LORA_RANKS[2]
    assert torch.equal((base.get(name).float() + b @ a).to(torch.bfloat16), ft.get(name))
    # resume: every result is cached, so a second run merges nothing
    again = _quick(tmp_path)
    assert "merges run this session: 0" in again


def test_report_keeps_superseded_runs():
    """A whole merge measured again after a code change keeps its earlier run in the report."""
    from benchmarks.perf import bench_scale

    old = {"wall_s": 961.1, "peak_rss_kib": 8531000, "load_before": [1.4], "load_after": [1.8],
           "commit": "d55f1b58a5b1", "dirty": False, "timestamp": "2026-12-06T05:46:00Z"}
    text = bench_scale.report({"rows": {}, "machines": [], "superseded": {"whole|dense|drm-V|0": [old]}}, "full")
    line = next(l for l in text.splitlines() if l.startswith("| whole dense drm-V 0 |"))
    assert "| 961 | 8331 |" in line and "d55f1b58a5b1" in line
    assert "Superseded" not in bench_scale.report({"rows": {}, "machines": []}, "full")


def test_only_matches_a_substring_or_an_anchored_end():
    """--only 'drm-V' picks drm-V-iso-total too; 'drm-V$' picks the one job (a session ran both)."""
    keys = ["tensor|8B|dense|3|drm-V", "tensor|8B|dense|3|drm-V-iso-total", "whole|dense|drm-V|0"]
    assert [k for k in keys if bench_scale._matches(k, "dense|3|drm-V")] == keys[:2]
    assert [k for k in keys if bench_scale._matches(k, "dense|3|drm-V$")] == keys[:1]
    assert [k for k in keys if bench_scale._matches(k, "drm-V|0$")] == keys[2:]
    assert not any(bench_scale._matches(k, "iso_c$") for k in keys)
