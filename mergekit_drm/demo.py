"""Offline demo: fine-tune a tiny Llama on three tasks, merge with mergekit.

Everything is built locally (no downloads): a small Llama "base" is trained
briefly on four digit-string tasks (copy, reverse, sort, increment), three
fine-tunes specialize it on reverse, sort and increment, and the fine-tunes
are merged with ``drm`` (both directions) and with mergekit's ``ties`` and
``task_arithmetic`` by running the ordinary ``mergekit-yaml`` on YAML files
written to the output folder. It prints the
per-task accuracy of every model, so one can see what merging kept.

Usage: ``mergekit-drm-demo [OUT_DIR] [--steps N]``
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import click
import torch

DIGITS = 10
SEP, BOS = 10, 11
TASKS = {"copy": 15, "reverse": 12, "sort": 13, "increment": 14}
LENGTH = 6


def _answer(task: str, digits: torch.Tensor) -> torch.Tensor:
    if task == "copy":
        return digits
    if task == "reverse":
        return digits.flip(1)
    if task == "sort":
        return digits.sort(dim=1).values
    return (digits + 1) % DIGITS


def make_batch(task: str, size: int, generator: torch.Generator):
    """[BOS, task, d1..d6, SEP, answer...]; the loss covers the answer only."""
    digits = torch.randint(0, DIGITS, (size, LENGTH), generator=generator)
    head = torch.tensor([BOS, TASKS[task]]).expand(size, 2)
    sep = torch.full((size, 1), SEP)
    tokens = torch.cat([head, digits, sep, _answer(task, digits)], dim=1)
    labels = tokens.clone()
    labels[:, : 2 + LENGTH + 1] = -100
    return tokens, labels


def new_model(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=16,
        max_position_embeddings=32, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config)


def train(model, tasks, steps: int, seed: int, lr: float, label: str):
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    bar = tqdm(range(steps), desc=f"train {label}", leave=False)
    for step in bar:
        task = tasks[step % len(tasks)]
        tokens, labels = make_batch(task, 64, generator)
        loss = model(input_ids=tokens, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model


@torch.no_grad()
def accuracy(model, task: str, samples: int = 512) -> float:
    """Per-token accuracy of the answer (teacher forcing), on fresh samples."""
    tokens, labels = make_batch(task, samples, torch.Generator().manual_seed(12345))
    logits = model(input_ids=tokens).logits[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    return float((logits.argmax(-1)[keep] == target[keep]).float().mean())


MERGES = {
    "drm-vertical": ("drm", {"direction": "vertical", "density": 0.2}),
    "drm-horizontal": ("drm", {"direction": "horizontal", "density": 0.2}),
    "ties": ("ties", {"density": 0.2, "weight": 1.0}),
    "task_arithmetic": ("task_arithmetic", {"weight": 0.5}),
}


def write_config(path: str, method: str, params: dict, base: str, finetunes) -> None:
    import yaml

    per_model = {k: v for k, v in params.items() if k in ("weight",)}
    shared = {k: v for k, v in params.items() if k not in per_model}
    if method == "ties":  # ties takes density per model
        per_model = dict(params)
        shared = {}
    config = {
        "merge_method": method,
        "base_model": base,
        "models": [
            {"model": ft, **({"parameters": per_model} if per_model else {})}
            for ft in finetunes
        ],
        "dtype": "float32",
    }
    if shared:
        config["parameters"] = shared
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)


@click.command("mergekit-drm-demo", help=__doc__.splitlines()[0],
               context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out_dir", metavar="[OUT]", required=False, default="./drm-demo")
@click.option("--steps", type=int, default=300, show_default=True, help="fine-tuning steps per task")
def demo(out_dir: str, steps: int) -> int:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out = os.path.abspath(out_dir)
    os.makedirs(out, exist_ok=True)
    started = time.time()

    tasks = ["reverse", "sort", "increment"]
    base_path = os.path.join(out, "base")
    if not os.path.exists(os.path.join(base_path, "config.json")):
        # The base has seen every task a little (like a pretrained LLM that
        # can follow many instructions badly); each fine-tune specializes it.
        base = train(new_model(), ["copy", *tasks], steps // 4, seed=0, lr=3e-3, label="base (all tasks, briefly)")
        base.save_pretrained(base_path)
    finetunes = []
    for index, task in enumerate(tasks):
        path = os.path.join(out, f"ft-{task}")
        if not os.path.exists(os.path.join(path, "config.json")):
            model = transformers.LlamaForCausalLM.from_pretrained(base_path)
            train(model, [task], steps, seed=1 + index, lr=1e-3, label=task)
            model.save_pretrained(path)
        finetunes.append(path)
    print(f"models ready in {time.time() - started:.0f} s: base + fine-tunes on {', '.join(tasks)}")

    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    merged = {}
    for name, (method, params) in MERGES.items():
        config_path = os.path.join(out, f"{name}.yml")
        write_config(config_path, method, params, base_path, finetunes)
        target = os.path.join(out, f"merged-{name}")
        shutil.rmtree(target, ignore_errors=True)
        tick = time.time()
        proc = subprocess.run(
            [exe, config_path, target, "--no-copy-tokenizer"],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            print(f"mergekit-yaml failed for {config_path}")
            return 1
        print(f"merged {name:16s} with `mergekit-yaml {os.path.relpath(config_path)}` "
              f"in {time.time() - tick:.1f} s")
        merged[name] = target

    rows = [("base", base_path)] + [(f"ft-{t}", p) for t, p in zip(tasks, finetunes)]
    rows += list(merged.items())
    print()
    print("answer-token accuracy (teacher forcing, 512 fresh samples per task)")
    print(f"| {'model':16s} | " + " | ".join(f"{t:9s}" for t in tasks) + " | mean  |")
    print("|" + "-" * 18 + "|" + "|".join("-" * 11 for _ in tasks) + "|-------|")
    for name, path in rows:
        model = transformers.LlamaForCausalLM.from_pretrained(path)
        scores = [accuracy(model, task) for task in tasks]
        cells = " | ".join(f"{s:9.3f}" for s in scores)
        print(f"| {name:16s} | {cells} | {sum(scores) / len(scores):.3f} |")
    print()
    print(f"YAML configs and merged models are in {out}; total {time.time() - started:.0f} s")
    return 0


def main(argv=None) -> int:
    """The console script; returns the exit status (2 for a usage error)."""
    try:
        return demo.main(args=argv, prog_name="mergekit-drm-demo", standalone_mode=False)
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except click.Abort:
        click.echo("Aborted!", err=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
