"""Peak memory of whole merges where the vocabulary tensors dominate.

A 1-layer Llama with hidden 256 and the real Llama-3 vocabulary (128256) in
bf16, as checkpoints are on disk: the embeddings and lm_head (128256 x 256
each) are most of the model, so any extra N-sized copy of a vocabulary tensor
(the elementwise path, the mean of the subspace methods) shows in the peak
RSS, which a 4096 vocabulary hides. Base plus N generated fine-tunes (random
init, generated deltas, no download), one ``mergekit-yaml`` process per merge,
peak RSS from ``/usr/bin/time`` (``bench_scale.run_yaml_measured``: /proc polling where it is missing),
methods interleaved.

    python -m benchmarks.perf.bench_memory              # ~5 min on 2 cores
    python -m benchmarks.perf.bench_memory --runs 1 --out /tmp/x.md

Writes ``benchmarks/results/memory.md`` (the table after the machine line).
To measure another checkout of the package (the "before" column), run with
``PYTHONPATH=<that checkout>``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

from benchmarks.perf.bench_drm import ROOT, finetune_like, machine, write_merge_config
from benchmarks.perf.bench_scale import run_yaml_measured

# label: (merge_method, shared parameters, per-model parameters)
METHODS = {
    "ties": ("ties", {}, {"density": 0.2, "weight": 1.0}),
    "task_arithmetic": ("task_arithmetic", {}, {"weight": 1.0}),
    "della": ("della", {}, {"density": 0.2, "epsilon": 0.1, "weight": 1.0}),
    "drm (vertical, defaults)": ("drm", {}, {}),
    "drm (vertical, isotropic + norm_target total)": (
        "drm", {"isotropic": True, "norm_target": "total"}, {}),
    "drm (horizontal, isotropic + norm_target total)": (
        "drm", {"direction": "horizontal", "isotropic": True, "norm_target": "total"}, {}),
    "tsv_m": ("tsv_m", {}, {}),
    "iso_c": ("iso_c", {}, {}),
    "iso_cts": ("iso_cts", {}, {}),
}


def build_model(root: str, hidden: int, intermediate: int, layers: int, vocab: int, n_ft: int):
    """Base and ``n_ft`` fine-tunes in bf16: dense decaying-spectrum deltas on the
    matrices, small dense noise on the vocabulary tensors and vectors."""
    import transformers
    from safetensors.torch import load_file, save_file

    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
        vocab_size=vocab, tie_word_embeddings=False, torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    base = os.path.join(root, "base")
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(base)
    state = load_file(os.path.join(base, "model.safetensors"))
    paths = [base]
    for index in range(n_ft):
        gen = torch.Generator().manual_seed(index + 1)
        tuned = {}
        for name, tensor in state.items():
            weight = tensor.float()
            scale = float(weight.std()) if weight.numel() > 1 else 1.0
            if tensor.dim() == 2 and "embed" not in name and "lm_head" not in name:
                delta = finetune_like(1, *tensor.shape, seed=1000 * index + len(name))[0]
                delta *= 0.1 * scale / float(delta.std())
            else:
                delta = 0.01 * scale * torch.randn(tensor.shape, generator=gen)
            tuned[name] = (weight + delta).to(torch.bfloat16)
        path = os.path.join(root, f"ft{index}")
        shutil.copytree(base, path, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file(tuned, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        paths.append(path)
    return paths


def write_configs(paths, workdir: str, methods):
    base, *fts = paths
    configs = {}
    for index, (label, (method, shared, per_model)) in enumerate(methods.items()):
        path = os.path.join(workdir, f"{index}-{method}.yml")
        write_merge_config(path, method, base, fts, shared, per_model, "bfloat16")
        configs[label] = path
    return configs


def measure(configs, runs: int, workdir: str):
    samples = {label: [] for label in configs}
    for run in range(runs):  # interleaved, so load drifts hit every method alike
        for label, path in configs.items():
            samples[label].append(run_yaml_measured(path, os.path.join(workdir, "out")))
            wall, kib = samples[label][-1]
            print(f"run {run + 1}/{runs} {label}: {wall:.1f} s, {kib / 1024:.0f} MiB", flush=True)
    return {
        label: (statistics.median(w for w, _ in s), statistics.median(k for _, k in s))
        for label, s in samples.items()
    }


def table(results) -> list:
    ties_wall, ties_kib = results["ties"]
    lines = ["| method | median wall s | / ties | median peak RSS MiB | / ties |", "|---|---|---|---|---|"]
    for label, (wall, kib) in results.items():
        lines.append(f"| {label} | {wall:.1f} | {wall / ties_wall:.2f} | {kib / 1024:.0f} | "
                     f"{kib / ties_kib:.2f} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=704)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--n-ft", type=int, default=3)
    parser.add_argument("--methods", default=None,
                        help="labels separated by ';' (default all; ties is always run, for the ratios)")
    parser.add_argument("--out", default=None, help="markdown file (default benchmarks/results/memory.md)")
    args = parser.parse_args(argv)
    methods = METHODS
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(";")]
        unknown = sorted(set(wanted) - set(METHODS))
        if unknown:
            parser.error(f"unknown method label(s) {unknown}; known: {sorted(METHODS)}")
        # ties last: a filtered run's own methods come first.
        methods = {k: METHODS[k] for k in wanted if k != "ties"}
        methods["ties"] = METHODS["ties"]
    started = time.time()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        print("building the benchmark model ...", flush=True)
        paths = build_model(tmp, args.hidden, args.intermediate, args.layers, args.vocab, args.n_ft)
        configs = write_configs(paths, tmp, methods)
        results = measure(configs, args.runs, tmp)
    lines = [
        f"Machine: {machine()}",
        "",
        f"Llama, hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layer(s), "
        f"vocab {args.vocab}, untied, bf16 on disk and out, base + {args.n_ft} dense fine-tunes; "
        f"median of {args.runs} interleaved `mergekit-yaml` runs; peak RSS of the process.",
        "",
        *table(results),
        "",
        f"Total benchmark time: {time.time() - started:.0f} s.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or os.path.join(ROOT, "benchmarks", "results", "memory.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as handle:
        handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
