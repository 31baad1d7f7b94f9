"""Ablation on the benchmark's pair 0+1 (run `python -m benchmarks.quality.mudsc.run` first):
residual-stream activations averaged over every norm output (mudsc's default) vs
the final norm only (the reference's single location), and 256 vs 64 calibration
windows. Prints the test loss (first 200 test blocks) of each merge.

    python -m benchmarks.quality.mudsc.ablation
"""
import sys, dataclasses, torch, transformers
torch.set_num_threads(1)
from benchmarks.quality.mudsc import data as D
from benchmarks.quality.mudsc.evaluate import evaluate_models
from mergekit_drm.mudsc import specs, engine
from mergekit_drm.mudsc.engine import compute_alignment, CalibrationOptions
from mergekit_drm.mudsc.solver import SolverOptions
from mergekit_drm.mudsc.alignment import merge_tensor
import glob, os
HERE = os.path.dirname(os.path.abspath(__file__))
found = sorted(glob.glob(os.path.join(HERE, "cache", "checkpoints", "*", "*", "st800-b16-L128-*", "seed[01]")))
if len(found) != 2:
    sys.exit("train the endpoints first: python -m benchmarks.quality.mudsc.run")
paths = found
corpus = D.load_corpus()
test = D.blocks(corpus.streams["test"], 128, 200)
calib = os.path.join(HERE, "cache", "work", "calibration.txt")
orig = specs.build_spec
def final_only(config, names):
    sp = orig(config, names)
    g = sp.groups["residual"]
    sp.groups["residual"] = dataclasses.replace(g, taps=g.taps[-1:])
    return sp
A = transformers.AutoModelForCausalLM.from_pretrained(paths[0]).eval()
sds = [transformers.AutoModelForCausalLM.from_pretrained(p).state_dict() for p in paths]
def run(label, alpha, mode, samples=64):
    r = compute_alignment(paths, SolverOptions(alpha=alpha, mode=mode), CalibrationOptions(path=calib, samples=samples, seq_len=128))
    merged = {k: merge_tensor(r.spec.tensors[k], [s[k] for s in sds], [1,1], r.alignment) for k in sds[0]}
    M = transformers.AutoModelForCausalLM.from_pretrained(paths[0]).eval(); M.load_state_dict(merged)
    print(label, alpha, mode, round(evaluate_models([M], test, ensemble=False)["models"][0]["loss"], 3), r.alignment.metadata["sweeps"], flush=True)
for mode in ("align",):
    for alpha in (0.0, 0.5):
        run("all-taps", alpha, mode)
engine.build_spec = final_only
for mode in ("align",):
    for alpha in (0.0, 0.5):
        run("final-tap", alpha, mode)
engine.build_spec = orig
run("all-taps 256 samples", 0.5, "align", samples=256)
