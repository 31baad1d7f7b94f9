"""Cost of a MuDSC alignment: wall time and peak memory of `mergekit-mudsc-align`
and of the `mergekit-yaml` merge that applies it, on two Llamas from
different random initializations (the case mudsc is for).

    python -m benchmarks.perf.bench_mudsc                # 1024 hidden, 8 layers
    python -m benchmarks.perf.bench_mudsc --quick        # tiny, for CI
    python -m benchmarks.perf.bench_mudsc --hidden 2048 --layers 16

Writes benchmarks/results/mudsc_scale.md (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import torch
import yaml

BIN = os.path.dirname(sys.executable)


def build_pair(root, hidden, layers, inter, heads, kv, vocab):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from mergekit_drm.mudsc.calibration import load_texts

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(load_texts(None), trainers.BpeTrainer(vocab_size=min(vocab, 2000), special_tokens=["[UNK]", "[SEP]"]))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[SEP]")
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
        tie_word_embeddings=False, max_position_embeddings=512,
    )
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
        path = os.path.join(root, f"llama_seed{seed}")
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
        paths.append(path)
        params = sum(p.numel() for p in model.parameters())
        del model
    return paths, params


def timed(cmd):
    """Run under /usr/bin/time -v: (seconds, peak RSS MiB, stdout+stderr)."""
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024
    return seconds, rss, proc.stdout + proc.stderr


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--inter", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--alphas", default="1.0,0.5")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/mudsc_scale.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.inter, args.heads, args.kv, args.vocab = 64, 2, 128, 4, 2, 512
        args.samples, args.seq_len = 8, 32
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
        os.environ.update(env)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        paths, params = build_pair(root, args.hidden, args.layers, args.inter, args.heads, args.kv, args.vocab)
        for alpha in [float(a) for a in args.alphas.split(",")]:
            parameters = {"alpha": alpha, "calibration_samples": args.samples, "calibration_seq_len": args.seq_len}
            config = {"merge_method": "mudsc", "models": [{"model": p} for p in paths], "parameters": parameters, "dtype": "float32"}
            cfg_path = os.path.join(root, f"mudsc_{alpha}.yml")
            with open(cfg_path, "w") as handle:
                yaml.safe_dump(config, handle)
            saved = os.path.join(root, f"alignment_{alpha}")
            align_s, align_rss, _ = timed([os.path.join(BIN, "mergekit-mudsc-align"), cfg_path, "--alignment-out", saved])
            with open(os.path.join(saved, "alignment.json")) as handle:
                meta = json.load(handle)
            reuse = dict(config, parameters=dict(parameters, alignment=saved))
            reuse_path = os.path.join(root, f"reuse_{alpha}.yml")
            with open(reuse_path, "w") as handle:
                yaml.safe_dump(reuse, handle)
            merge_s, merge_rss, _ = timed([os.path.join(BIN, "mergekit-yaml"), reuse_path, os.path.join(root, f"out_{alpha}"), "--no-copy-tokenizer"])
            rows.append(dict(alpha=alpha, align_s=align_s, align_rss=align_rss, sweeps=meta["sweeps"],
                             solve_s=meta["solve_seconds"], merge_s=merge_s, merge_rss=merge_rss))
            print(rows[-1], flush=True)
        linear = {"merge_method": "linear", "models": [{"model": p, "parameters": {"weight": 1.0}} for p in paths], "dtype": "float32"}
        lin_path = os.path.join(root, "linear.yml")
        with open(lin_path, "w") as handle:
            yaml.safe_dump(linear, handle)
        lin_s, lin_rss, _ = timed([os.path.join(BIN, "mergekit-yaml"), lin_path, os.path.join(root, "out_linear"), "--no-copy-tokenizer"])
    size_mib = params * 4 / 2**20
    lines = [
        "# MuDSC alignment cost",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {args.threads or torch.get_num_threads()}; {time.strftime('%Y-%m-%d')}. "
        f"Command: `python -m benchmarks.perf.bench_mudsc {' '.join(sys.argv[1:] if argv is None else argv)}`.",
        "",
        f"Two Llamas from different random inits: hidden {args.hidden}, {args.layers} layers, "
        f"intermediate {args.inter}, {args.heads} heads / {args.kv} KV heads, vocab {args.vocab}: "
        f"{params / 1e6:.1f} M parameters ({size_mib:.0f} MiB float32 each). Calibration: "
        f"{args.samples} x {args.seq_len} tokens of the bundled corpus (alpha < 1). One run each.",
        "",
        "| alpha | align wall (s) | of which search (s) | sweeps | align peak RSS (MiB) | merge with saved alignment (s) | merge peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['alpha']} | {r['align_s']:.1f} | {r['solve_s']:.1f} | {r['sweeps']} | {r['align_rss']:.0f} | {r['merge_s']:.1f} | {r['merge_rss']:.0f} |")
    lines += ["", f"`linear` merge of the same pair: {lin_s:.1f} s, {lin_rss:.0f} MiB peak RSS.", ""]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        handle.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
