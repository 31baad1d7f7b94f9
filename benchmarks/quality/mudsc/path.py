"""Loss along the interpolation path between the two endpoints of pair 0+1,
before and after mudsc alignment (align, alpha 0.5), and the mean matched
correlation per group kind: where does the merged model lose?

    python -m benchmarks.quality.mudsc.path      (after `python -m benchmarks.quality.mudsc.run`)
"""

import glob
import os
import sys

import numpy as np
import torch
import transformers

from benchmarks.quality.mudsc import data as D
from benchmarks.quality.mudsc.evaluate import evaluate_models
from mergekit_drm.mudsc.alignment import Alignment, merge_tensor
from mergekit_drm.mudsc.engine import CalibrationOptions, compute_alignment
from mergekit_drm.mudsc.solver import SolverOptions

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    torch.set_num_threads(1)
    paths = sorted(glob.glob(os.path.join(HERE, "cache", "checkpoints", "*", "*", "st800-b16-L128-*", "seed[01]")))
    if len(paths) != 2:
        sys.exit("train the endpoints first: python -m benchmarks.quality.mudsc.run")
    test = D.blocks(D.load_corpus().streams["test"], 128, 200)
    calib = os.path.join(HERE, "cache", "work", "calibration.txt")
    states = [transformers.AutoModelForCausalLM.from_pretrained(p).state_dict() for p in paths]
    result = compute_alignment(paths, SolverOptions(alpha=0.5), CalibrationOptions(path=calib))
    identity = Alignment(2, {g: {s: [torch.arange(len(v[0]))] * 2 for s, v in sp.items()}
                             for g, sp in result.alignment.maps.items()})
    kinds = {}
    for group, score in result.alignment.metadata["group_scores"].items():
        kinds.setdefault(group.split(".")[-1], []).append(score)
    print("mean matched similarity (alpha 0.5 blend) per group kind:",
          {k: round(float(np.mean(v)), 3) for k, v in kinds.items()})
    print("t | loss, unaligned | loss, mudsc-aligned")
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        row = []
        for alignment in (identity, result.alignment):
            merged = {k: merge_tensor(result.spec.tensors[k], [s[k] for s in states], [1 - t + 1e-12, t + 1e-12], alignment)
                      for k in states[0]}
            model = transformers.AutoModelForCausalLM.from_pretrained(paths[0]).eval()
            model.load_state_dict(merged)
            row.append(evaluate_models([model], test, ensemble=False)["models"][0]["loss"])
        print(f"{t:.2f} | {row[0]:.3f} | {row[1]:.3f}", flush=True)


if __name__ == "__main__":
    main()
