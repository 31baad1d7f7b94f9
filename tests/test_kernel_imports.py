"""The pure kernels import alone: no mergekit, pydantic or scipy behind them.

Each module is imported in a fresh interpreter (the installed .pth hook runs
at start-up as it does for a user) and the heavy top-level modules that came
with it are read from ``sys.modules``. Only the matching kernel (and the solver
built on it) may bring scipy, for ``linear_sum_assignment``; the package itself
and the registration table, which the hook loads at every start, bring nothing;
nor do the architecture table and the MuDSC specs built on it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("mergekit", "pydantic", "scipy", "transformers", "peft", "yaml", "click",
         "torch", "numpy")
TORCH = {"torch", "numpy"}  # torch imports numpy itself
KERNELS = {
    "mergekit_drm": set(),
    "mergekit_drm.registration": set(),
    "mergekit_drm.mudsc.specs": set(),
    "mergekit_drm.architectures": set(),
    "mergekit_drm.decompose": TORCH,
    "mergekit_drm.drm.kernel": TORCH,
    "mergekit_drm.lora.lowrank": TORCH,
    "mergekit_drm.lora.lowrank_subspace": TORCH,
    "mergekit_drm.subspace": TORCH,
    "mergekit_drm.tsv_m.kernel": TORCH,
    "mergekit_drm.iso.kernel": TORCH,
    "mergekit_drm.mudsc.similarity": TORCH,
    "mergekit_drm.mudsc.matching": TORCH | {"scipy"},
    "mergekit_drm.mudsc.solver": TORCH | {"scipy"},
}


@pytest.mark.parametrize("module", sorted(KERNELS))
def test_kernel_imports_no_framework(module, tmp_path):
    code = (
        f"import json, sys, {module}\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)) == KERNELS[module]
