"""Memory bounds of the paths that see vocabulary-sized tensors.

Embeddings and output heads (128256 x 4096 at 8B) go to drm's elementwise
path and to the subspace methods' mean. An N-sized stack of their deltas in
the compute dtype (or a copy of it) is several GB there, so these tests run
one merge of a large 1-D tensor in a fresh process and bound its extra peak
RSS (``ru_maxrss`` over the RSS before the call, inputs already in memory) in
units of ONE model's delta in the compute dtype. Streaming needs about two of
them (the merged delta and the output; measured 1.6-2.2); the stacking code
this replaced needed 8 (iso_c's mean) to 26 (drm) at N = 4. A magnitude trim
(``nonlinear_density`` < 1) also finds each model's threshold on its whole
delta, whose selection transients on bf16-quantized values reach a few more
deltas (measured 5.3, was 24), so it gets a looser bound.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

_PROBE = r"""
import resource, sys
import torch
import mergekit_drm
from mergekit.merge_methods import TensorGroup

what, n_models, numel, density = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
torch.set_num_threads(1)
gen = torch.Generator().manual_seed(0)
step = 1 << 16  # inputs made slice by slice: no transient peak before the measurement
base = torch.empty(numel, dtype=torch.bfloat16)
for start in range(0, numel, step):
    base[start:start + step] = torch.randn(min(step, numel - start), generator=gen)
tensors = [base]
for _ in range(n_models):
    tuned = torch.empty_like(base)
    for start in range(0, numel, step):
        piece = base[start:start + step].float()
        tuned[start:start + step] = piece + 0.01 * torch.randn(piece.shape, generator=gen)
    tensors.append(tuned)


def rss_kib():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() // 1024


def run(tensors):
    if what == "kernel":
        from mergekit_drm.drm.kernel import elementwise_merge
        return elementwise_merge(tensors[1:], [1.0, 0.5, 2.0, 1.0][:n_models], density=density,
                                 norm_target="total", base=tensors[0])
    from mergekit_drm.drm.method import drm_merge_method
    from mergekit_drm.iso.method import iso_c_merge_method
    from mergekit_drm.tsv_m.method import tsv_m_merge_method
    method = {"drm": drm_merge_method, "iso_c": iso_c_merge_method, "tsv_m": tsv_m_merge_method}[what]
    group = TensorGroup.from_tensors(tensors, base_index=0, name="model.norm.weight")
    params = {"isotropic": True, "norm_target": "total"} if what == "drm" else {}
    return method([group], parameters=params)

run([t[:4096].clone() for t in tensors])  # warm-up: thread pools, lazy imports
before = max(rss_kib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
out = run(tensors)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(max(peak - before, 0) * 1024)
"""

N_MODELS = 4
NUMEL = 1 << 23  # 32 MiB per model in float32


def _extra_peak(what: str, density: float) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, what, str(N_MODELS), str(NUMEL), str(density)],
        capture_output=True, text=True, check=True,
    )
    return int(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "what, density, bound",
    [("kernel", 1.0, 3), ("drm", 1.0, 3), ("iso_c", 1.0, 3), ("kernel", 0.5, 2 * N_MODELS)],
)
def test_vocabulary_sized_merge_holds_no_stack_of_deltas(what, density, bound):
    one_delta = NUMEL * 4  # one model's task vector in float32
    extra = _extra_peak(what, density)
    # Merged delta + bf16 output + slice temporaries: under 3 deltas; a stack
    # of N = 4 deltas plus one copy of it is 8.
    assert extra < bound * one_delta, (
        f"{what}: extra peak {extra / 2**20:.0f} MiB = {extra / one_delta:.1f} deltas"
    )
