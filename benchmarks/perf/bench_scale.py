"""Merge cost at the shapes users merge (issue 20): Llama-3.2-1B whole merges, 8B per tensor.

Three measurements, all offline (random init, generated deltas, no download):

* whole-model ``mergekit-yaml`` merges of a Llama-3.2-1B-shaped checkpoint
  (hidden 2048, intermediate 8192, 16 layers, 32 heads / 8 KV heads, vocabulary
  128256, untied lm_head; bf16 safetensors shards + index, as on the Hub) with
  3 fine-tunes, ``dtype: bfloat16``: wall time and peak RSS (``/usr/bin/time``;
  polling /proc where it is missing) per method, ratios to ``ties``;
* one Llama-3.1-8B layer (q, k, v, o, gate, up, down, a norm) and the 8B
  vocabulary matrix (128256 x 4096: the embedding; lm_head has the same shape
  and path and is counted twice), per tensor, through each method's mergekit
  merge function on a ``TensorGroup`` (bf16 in, as ``mergekit-yaml`` hands
  them over), with the whole 8B merge projected from it. The same per-tensor
  timing on the 1B checkpoint's own tensors, projected to the 1B model, is
  checked against the measured 1B whole merge;
* N = 2, 3, 5, 8 fine-tunes for one 8B layer.

Two kinds of fine-tune, 3 of each (``KINDS``): ``dense`` (full fine-tunes: a
sum of 256 rank-one terms with exponentially decaying weights plus iid noise
carrying 30 % of the delta's norm, 2 % of the weight's norm; norms and the
vocabulary matrices get the same kind of delta, norms 1 % iid) and ``lora``
(B @ A of rank 16, 32, 64 for fine-tunes 0, 1, 2, 1 % of the weight's norm,
added in float32 then rounded to bf16, on the 7 attention and MLP projections
only: embeddings, lm_head and norms are the base's, as in most LoRA folds).
``ties`` and ``della`` use density 0.2 (della epsilon 0.15, mergekit's default),
weight 1.0; the package's methods their defaults (drm density 0.2).

Every result (whole merge: kind, method, rep; per-tensor: scale, kind, N,
method) is cached in a JSON file with the git commit, whether the package's
source had uncommitted changes, load averages before and after, and a
timestamp; a killed run resumes where it stopped. Checkpoints are cached
outside the repository (``--cache``, env ``MERGEKIT_DRM_BENCH_CACHE``, default
``~/.cache/mergekit-drm-bench``), each written to a ``.tmp`` folder renamed
when complete. The report is rewritten after every result.

    python -m benchmarks.perf.bench_scale                  # the full plan: many hours on 2 cores
    python -m benchmarks.perf.bench_scale --max-minutes 60 # stop starting jobs after an hour
    python -m benchmarks.perf.bench_scale --rerun drm-V    # forget drm-V's results, measure again
    python -m benchmarks.perf.bench_scale --only whole     # only jobs whose key contains 'whole'
    python -m benchmarks.perf.bench_scale --only 'tensor|8B|dense|3|drm-V$'  # that job alone, not drm-V-iso-total
    python -m benchmarks.perf.bench_scale --report         # rewrite the report from the cache
    python -m benchmarks.perf.bench_scale --quick          # tiny shapes, < 60 s (the smoke test)

Writes ``benchmarks/results/scale.json`` and ``scale.md`` (``--quick``: under
the cache folder). ``--quick`` runs the whole merges in-process through
mergekit's ``run_merge`` (a ``mergekit-yaml`` process costs 5-20 s to start).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import zlib

import torch

from benchmarks.perf import bench_drm

ROOT = bench_drm.ROOT

SHAPES = {
    "full": {
        "1B": dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256),
        "8B": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256),
    },
    "quick": {
        "1B": dict(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=512),
        "8B": dict(hidden=96, intermediate=224, layers=4, heads=4, kv_heads=2, vocab=640),
    },
}
KINDS = ("dense", "lora")
N_FINETUNES = 3
DENSE_REL, DENSE_TERMS, DENSE_NOISE, NORM_REL = 0.02, 256, 0.3, 0.01
LORA_REL, LORA_RANKS = 0.01, (16, 32, 64)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

# label -> (merge_method, shared parameters, per-model parameters); run in this order.
METHODS = {
    "ties": ("ties", {}, {"density": 0.2, "weight": 1.0}),
    "drm-V": ("drm", {"direction": "vertical"}, {}),
    "drm-H": ("drm", {"direction": "horizontal"}, {}),
    "drm-V-iso-total": ("drm", {"direction": "vertical", "isotropic": True, "norm_target": "total"}, {}),
    "drm-H-iso-total": ("drm", {"direction": "horizontal", "isotropic": True, "norm_target": "total"}, {}),
    "tsv_m": ("tsv_m", {}, {}),
    "iso_c": ("iso_c", {}, {}),
    "iso_cts": ("iso_cts", {}, {}),
    "task_arithmetic": ("task_arithmetic", {}, {"weight": 1.0}),
    "della": ("della", {}, {"density": 0.2, "weight": 1.0}),
}
SWEEP_METHODS = ("ties", "drm-V", "drm-H", "tsv_m", "iso_c")
# methods of mergekit-drm-lora (route 2: the lora fine-tunes' adapters merged on their factors)
ADAPTER_METHODS = ("drm-V", "drm-H", "drm-V-iso-total", "drm-H-iso-total", "tsv_m", "iso_c", "iso_cts")
SWEEP_N = {"full": (2, 3, 5, 8), "quick": (2, 3)}


# ------------------------------------------------------------------ model layout and generation



def _secs(value: float) -> str:
    """Seconds with 3 significant digits below 10 s (a 0.04 s quick-mode merge is not 0.0)."""
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"

def llama_tensors(shape: dict) -> list:
    """(name, shape) of a LlamaForCausalLM state dict in Hugging Face order."""
    hidden, inter = shape["hidden"], shape["intermediate"]
    kv = shape["kv_heads"] * (hidden // shape["heads"])
    out = [("model.embed_tokens.weight", (shape["vocab"], hidden))]
    dims = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
            "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
            "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
            "mlp.down_proj": (hidden, inter)}
    for layer in range(shape["layers"]):
        prefix = f"model.layers.{layer}."
        out.append((prefix + "input_layernorm.weight", (hidden,)))
        out += [(prefix + p + ".weight", dims[p]) for p in PROJECTIONS[:4]]
        out.append((prefix + "post_attention_layernorm.weight", (hidden,)))
        out += [(prefix + p + ".weight", dims[p]) for p in PROJECTIONS[4:]]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (shape["vocab"], hidden))]
    return out


def is_vocab(name: str) -> bool:
    return "embed_tokens" in name or "lm_head" in name


def _gen(*parts) -> torch.Generator:
    """A generator seeded from names (zlib.crc32: the same in every process, unlike hash)."""
    return torch.Generator().manual_seed(zlib.crc32("|".join(map(str, parts)).encode()))


def base_tensor(name: str, shape: tuple) -> torch.Tensor:
    """Llama's init: norms 1, everything else N(0, 0.02); bf16."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=_gen("base", name)) * 0.02).to(torch.bfloat16)


def _chunks(rows: int, cols: int):
    step = max(1, (1 << 24) // max(cols, 1))  # ~64 MB of float32 per block
    return [(i, min(rows, i + step)) for i in range(0, rows, step)]


def finetune_tensor(base: torch.Tensor, name: str, kind: str, index: int) -> torch.Tensor:
    """base + a generated delta (float32), rounded to bf16, built in row blocks.

    dense: sum of ``DENSE_TERMS`` rank-one terms with weights exp(-4 i / terms)
    plus iid noise with ``DENSE_NOISE`` of the delta's norm (no O(n^3) step);
    lora: B @ A of rank ``LORA_RANKS[index % 3]``. Norms are fixed from the
    expected norms of the Gaussian factors, so blocks need no second pass.
    """
    gen = _gen(kind, index, name)
    if base.dim() == 1:
        if kind == "lora":
            return base.clone()
        return (base.float() + NORM_REL * torch.randn(base.shape, generator=gen)).to(torch.bfloat16)
    if kind == "lora" and is_vocab(name):
        return base.clone()
    rows, cols = base.shape
    weight_norm = float(torch.linalg.vector_norm(base, dtype=torch.float32))
    out = torch.empty_like(base)
    if kind == "dense":
        terms = min(DENSE_TERMS, rows, cols)
        sigma = torch.exp(-4.0 * torch.arange(terms, dtype=torch.float32) / terms)
        right = torch.randn(terms, cols, generator=gen)
        low_scale = DENSE_REL * weight_norm * math.sqrt(1 - DENSE_NOISE**2) / math.sqrt(
            rows * cols * float((sigma**2).sum()))
        noise_scale = DENSE_REL * weight_norm * DENSE_NOISE / math.sqrt(rows * cols)
        right *= low_scale
        for lo, hi in _chunks(rows, cols):
            left = torch.randn(hi - lo, terms, generator=gen) * sigma
            block = torch.randn(hi - lo, cols, generator=gen).mul_(noise_scale)
            block.addmm_(left, right).add_(base[lo:hi].float())
            out[lo:hi] = block.to(torch.bfloat16)
    elif kind == "lora":
        b, a = lora_factors(base, name, index)
        for lo, hi in _chunks(rows, cols):
            out[lo:hi] = (base[lo:hi].float() + b[lo:hi] @ a).to(torch.bfloat16)
    else:
        raise ValueError(f"unknown fine-tune kind {kind!r}; use one of {KINDS}")
    return out


def lora_rank(index: int) -> int:
    return LORA_RANKS[index % len(LORA_RANKS)]


def lora_factors(base: torch.Tensor, name: str, index: int):
    """B (rows, r) and A (r, cols) of lora fine-tune ``index`` on matrix ``name``:
    the folded checkpoint holds bf16(base + B @ A), its adapter B and A themselves."""
    gen = _gen("lora", index, name)
    rows, cols = base.shape
    weight_norm = float(torch.linalg.vector_norm(base, dtype=torch.float32))
    rank = lora_rank(index)
    a = torch.randn(rank, cols, generator=gen) * (LORA_REL * weight_norm / math.sqrt(rows * cols * rank))
    b = torch.cat([torch.randn(hi - lo, rank, generator=gen) for lo, hi in _chunks(rows, cols)])
    return b, a


def write_adapter(path: str, base_path: str, shape: dict, index: int) -> None:
    """PEFT adapter of lora fine-tune ``index`` (float32 factors, lora_alpha = r: scale 1); atomic."""
    from safetensors.torch import save_file

    reader = CheckpointReader(base_path)
    tensors = {}
    for name, dims in llama_tensors(shape):
        if len(dims) == 2 and not is_vocab(name):
            b, a = lora_factors(reader.get(name), name, index)
            module = "base_model.model." + name[: -len(".weight")]
            tensors[module + ".lora_A.weight"] = a.contiguous()
            tensors[module + ".lora_B.weight"] = b.contiguous()
    rank = lora_rank(index)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
              "target_modules": [p.split(".")[1] for p in PROJECTIONS], "bias": "none",
              "lora_dropout": 0.0, "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "init_lora_weights": True, "base_model_name_or_path": base_path}
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"))
    with open(os.path.join(tmp, "adapter_config.json"), "w") as handle:
        json.dump(config, handle, indent=2)
    shutil.rmtree(path, ignore_errors=True)
    os.rename(tmp, path)


def _write_config(path: str, shape: dict) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": shape["hidden"], "intermediate_size": shape["intermediate"],
        "num_hidden_layers": shape["layers"], "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"], "head_dim": shape["hidden"] // shape["heads"],
        "vocab_size": shape["vocab"], "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 128000, "eos_token_id": 128001,
    }
    with open(os.path.join(path, "config.json"), "w") as handle:
        json.dump(config, handle, indent=2)


def write_checkpoint(path: str, shape: dict, make, shard_bytes: int) -> None:
    """HF-style sharded bf16 safetensors, one shard in memory at a time; atomic via rename."""
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shards, size = [[]], 0
    for name, dims in llama_tensors(shape):
        nbytes = 2 * math.prod(dims)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, 1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: make(name, dims) for name, dims in shard}
        save_file(tensors, os.path.join(tmp, filename), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({name: filename for name in tensors})
        del tensors
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=2)
    _write_config(tmp, shape)
    os.rename(tmp, path)


def checkpoint_complete(path: str) -> bool:
    """The index and every shard it names exist (a renamed folder is complete; this guards the rest)."""
    try:
        with open(os.path.join(path, "model.safetensors.index.json")) as handle:
            files = set(json.load(handle)["weight_map"].values())
    except (OSError, ValueError, KeyError):
        return False
    return all(os.path.exists(os.path.join(path, f)) for f in files | {"config.json"})


class CheckpointReader:
    """Reads single tensors of a sharded checkpoint (safe_open per shard, kept open)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        with open(os.path.join(path, "model.safetensors.index.json")) as handle:
            self.weight_map = json.load(handle)["weight_map"]
        self.files = {f: safe_open(os.path.join(path, f), "pt") for f in set(self.weight_map.values())}

    def get(self, name: str) -> torch.Tensor:
        return self.files[self.weight_map[name]].get_tensor(name)


# ------------------------------------------------------------------ measuring


class PeakRSS:
    """Peak RSS of one process (this one by default), polled every 20 ms.

    Reads /proc/PID/statm: cheap, so the poller does not slow the merge it watches.
    """

    def __init__(self, pid=None, interval=0.02):
        self.path = f"/proc/{pid or 'self'}/statm"
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _rss(self) -> int:
        try:
            with open(self.path) as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.start_rss = self.peak = self._rss()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.peak = max(self.peak, self._rss())
        self._stop.set()
        self._thread.join()


def _process_measured(argv: list, out: str):
    """Wall s and peak RSS KiB of one process that writes ``out`` (removed before and after)."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with PeakRSS(proc.pid) as peak:
        _, err = proc.communicate()
    wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(err[-3000:])
    return wall, peak.peak // 1024


def _script(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def run_yaml_measured(config_path: str, out: str):
    """Wall s and peak RSS KiB of one ``mergekit-yaml`` process (bench_drm's /usr/bin/time run)."""
    if os.path.exists("/usr/bin/time"):
        return bench_drm.run_merge_measured(config_path, out)
    return _process_measured([_script("mergekit-yaml"), config_path, out, "--no-copy-tokenizer",
                              "--no-write-model-card"], out)


def run_lora_cli_measured(config_path: str, out: str):
    """Wall s and peak RSS KiB of one ``mergekit-drm-lora`` process (the adapter route)."""
    return _process_measured([_script("mergekit-drm-lora"), config_path, out, "-q",
                              "--no-write-model-card"], out)


def run_lora_cli_inprocess(config_path: str, out: str):
    """The same adapter merge in this process (--quick: no process start-up)."""
    from mergekit_drm.lora import cli

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    with PeakRSS() as peak:
        cli.main.main([config_path, out, "-q", "--no-write-model-card"], standalone_mode=False)
    wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return wall, peak.peak // 1024


def run_inprocess_measured(config_path: str, out: str):
    """The same merge through mergekit's run_merge in this process (--quick)."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    with open(config_path) as handle:
        config = MergeConfiguration.model_validate(yaml.safe_load(handle))
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    with PeakRSS() as peak:
        run_merge(config, out, MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return wall, peak.peak // 1024


def _calibration_state():
    from mergekit_drm import linalg_backends

    try:
        with open(linalg_backends.cache_path(), "rb") as handle:
            return handle.read()
    except OSError:
        return None


def tensor_job(spec: dict) -> dict:
    """Merge each named tensor once with one method; seconds, extra peak RSS, DRM stages.

    When a one-off library race ran during a tensor's merge (the calibration
    cache changed), that time is kept as ``first_s`` and the merge is timed again.
    """
    import mergekit_drm  # noqa: F401  (registers the package's methods)
    from mergekit import merge_methods
    from mergekit.merge_methods import TensorGroup

    from mergekit_drm import linalg_backends

    method_name, shared, per_model = METHODS[spec["method"]]
    method = merge_methods.get(method_name)
    params = {**shared, **per_model}
    ids = ["base"] + [f"ft{i}" for i in range(spec["n"])]

    def merge(tensors, name):
        group = TensorGroup.from_tensors(tensors, ids=ids, base_index=0, name=name,
                                         vocabulary_axis=0 if is_vocab(name) else None)
        return method((group,), parameters=params)[0]

    warm = [torch.randn(8, 8).to(torch.bfloat16) for _ in ids]  # imports, first-call setup
    merge(warm, "model.layers.0.mlp.up_proj.weight")
    results = {}
    for name in spec["tensors"]:
        tensors = load_inputs(spec, name)
        entry = {}
        for attempt in range(2):
            before = _calibration_state()
            with linalg_backends.record_stages() as stages, PeakRSS() as peak:
                start = time.perf_counter()
                merged = merge(tensors, name)
                seconds = time.perf_counter() - start
            if not torch.isfinite(merged).all():
                entry["nonfinite"] = True
            del merged
            entry.update(s=seconds, peak_extra_mib=(peak.peak - peak.start_rss) / 2**20,
                         stages={k: round(v, 3) for k, v in stages.items()})
            if attempt == 0 and _calibration_state() != before:
                entry["first_s"] = seconds  # a race ran: time it again, warm
                continue
            break
        results[name] = entry
        del tensors
    return results


def load_inputs(spec: dict, name: str) -> list:
    if spec["source"] == "checkpoint":
        readers = [CheckpointReader(p) for p in spec["paths"][: spec["n"] + 1]]
        return [r.get(name) for r in readers]
    return [load_tensor_file(p) for p in tensor_paths(spec["root"], spec["kind"], name, spec["n"])]


def tensor_paths(root: str, kind: str, name: str, n: int) -> list:
    return [os.path.join(root, "base", name + ".safetensors")] + [
        os.path.join(root, kind, f"ft{i}", name + ".safetensors") for i in range(n)]


def load_tensor_file(path: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(path)["t"]


def save_tensor_file(path: str, tensor: torch.Tensor) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({"t": tensor.contiguous()}, path + ".tmp")
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------ the plan


def git_state() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short=12", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--", "mergekit_drm"))}


def _load() -> list:
    return [round(x, 2) for x in os.getloadavg()]


class Bench:
    def __init__(self, args):
        self.args = args
        self.mode = "quick" if args.quick else "full"
        self.shapes = SHAPES[self.mode]
        self.cache = os.path.abspath(args.cache or os.environ.get("MERGEKIT_DRM_BENCH_CACHE")
                                     or os.path.expanduser("~/.cache/mergekit-drm-bench"))
        if args.quick:
            self.cache = os.path.join(self.cache, "quick")
        default = (os.path.join(self.cache, "scale-quick.json") if args.quick
                   else os.path.join(ROOT, "benchmarks", "results", "scale.json"))
        self.results_path = args.results or default
        self.shard_bytes = (2 << 30) if not args.quick else (1 << 20)
        self.data = {"rows": {}, "machines": []}
        if os.path.exists(self.results_path):
            with open(self.results_path) as handle:
                self.data = json.load(handle)
        self.merges_run = 0

    # -- paths
    def ckpt(self, kind: str, index: int) -> str:
        return os.path.join(self.cache, "1B", "base" if kind == "base" else f"{kind}-ft{index}")

    def ckpt_paths(self, kind: str, n: int) -> list:
        return [self.ckpt("base", 0)] + [self.ckpt(kind, i) for i in range(n)]

    # -- results
    def save(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.results_path)), exist_ok=True)
        tmp = self.results_path + ".tmp"
        with open(tmp, "w") as handle:
            json.dump(self.data, handle, indent=1, sort_keys=True)
        os.replace(tmp, self.results_path)
        with open(os.path.splitext(self.results_path)[0] + ".md", "w") as handle:
            handle.write(report(self.data, self.mode))

    def record(self, key: str, row: dict) -> None:
        row.update(git_state(), timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   machine=len(self.data["machines"]) - 1)
        self.data["rows"][key] = row
        self.save()

    # -- jobs
    def job_checkpoint(self, kind: str, index: int):
        path = self.ckpt(kind, index)
        if checkpoint_complete(path):
            return
        shutil.rmtree(path, ignore_errors=True)
        shape = self.shapes["1B"]
        start = time.perf_counter()
        if kind == "base":
            write_checkpoint(path, shape, base_tensor, self.shard_bytes)
        else:
            reader = CheckpointReader(self.ckpt("base", 0))
            write_checkpoint(path, shape, lambda name, dims: finetune_tensor(
                reader.get(name), name, kind, index), self.shard_bytes)
        print(f"  wrote {path} in {time.perf_counter() - start:.0f} s", flush=True)

    def _merge_job(self, key: str, label: str, base: str, models: list, name: str, measure,
                   out: str, digits: int):
        """Write the YAML for METHODS[label] over ``models``, run ``measure`` on it, record the row."""
        method, shared, per_model = METHODS[label]
        work = os.path.join(self.cache, "work")
        os.makedirs(work, exist_ok=True)
        config_path = os.path.join(work, f"{label}-{name}.yml")
        bench_drm.write_merge_config(config_path, method, base, models, shared, per_model, "bfloat16")
        load_before = _load()
        try:
            wall, peak_kib = measure(config_path, os.path.join(work, out))
            row = {"wall_s": round(wall, digits), "peak_rss_kib": peak_kib}
        except Exception as exc:  # a failing method is recorded, the plan goes on
            row = {"error": str(exc)[-2000:]}
        self.merges_run += 1
        row.update(load_before=load_before, load_after=_load())
        self.record(key, row)
        return row

    def job_whole(self, key: str, kind: str, label: str):
        base, *fts = self.ckpt_paths(kind, N_FINETUNES)
        measure = run_inprocess_measured if self.args.quick else run_yaml_measured
        return self._merge_job(key, label, base, fts, kind, measure, "out", 2)

    def adapter_path(self, index: int) -> str:
        return os.path.join(self.cache, "1B", f"lora-adapter{index}")

    def job_adapter(self, index: int):
        path = self.adapter_path(index)
        if not os.path.exists(os.path.join(path, "adapter_config.json")):
            write_adapter(path, self.ckpt("base", 0), self.shapes["1B"], index)
        return None

    def job_adapter_merge(self, key: str, label: str):
        """The lora fine-tunes merged as adapters: ``mergekit-drm-lora`` (route 2)."""
        adapters = [self.adapter_path(i) for i in range(N_FINETUNES)]
        measure = run_lora_cli_inprocess if self.args.quick else run_lora_cli_measured
        return self._merge_job(key, label, self.ckpt("base", 0), adapters, "adapters", measure,
                               "out-adapter", 4)

    def job_generate(self, kind: str, n: int, vocab: bool):
        """The 8B tensors (bf16 files, one per tensor and model) for N fine-tunes of ``kind``."""
        root = os.path.join(self.cache, "8B")
        parts = ("layer", "vocab") if vocab else ("layer",)
        for name, dims in [t for part in parts for t in eight_b_tensors(self.shapes["8B"], part)]:
            paths = tensor_paths(root, kind, name, n)
            if all(os.path.exists(p) for p in paths):
                continue
            if not os.path.exists(paths[0]):
                save_tensor_file(paths[0], base_tensor(name, dims))
            base = load_tensor_file(paths[0])
            for index, path in enumerate(paths[1:]):
                if not os.path.exists(path):
                    save_tensor_file(path, finetune_tensor(base, name, kind, index))
            del base

    def job_tensors(self, key: str, scale: str, kind: str, n: int, label: str, part: str):
        """One method on layer 0's tensors (part 'layer') or the vocabulary matrix ('vocab')."""
        names = [name for name, _ in eight_b_tensors(self.shapes[scale], part)]
        if scale == "8B":
            spec = dict(source="files", root=os.path.join(self.cache, "8B"), kind=kind, tensors=names)
        else:
            spec = dict(source="checkpoint", paths=self.ckpt_paths(kind, n), tensors=names)
        spec.update(method=label, n=n)
        load_before = _load()
        start = time.perf_counter()
        try:
            if self.args.quick:
                row = {"tensors": tensor_job(spec)}
            else:
                proc = subprocess.run(
                    [sys.executable, "-m", "benchmarks.perf.bench_scale", "--worker", json.dumps(spec)],
                    cwd=ROOT, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"rc {proc.returncode}: {proc.stderr[-2000:]}")
                row = {"tensors": json.loads(proc.stdout.strip().splitlines()[-1])}
        except Exception as exc:
            row = {"error": str(exc)[-2000:]}
        self.merges_run += 1
        row.update(job_s=round(time.perf_counter() - start, 1), load_before=load_before,
                   load_after=_load())
        self.record(key, row)
        return row

    def plan(self) -> list:
        """(key, function) in the order of the issue: dense first, ties first."""
        jobs = [(f"ckpt|base", lambda: self.job_checkpoint("base", 0))]
        for kind in KINDS:
            jobs += [(f"ckpt|{kind}|{i}", lambda k=kind, i=i: self.job_checkpoint(k, i))
                     for i in range(N_FINETUNES)]

        def whole(kind, rep):
            return [(f"whole|{kind}|{m}|{rep}", lambda k=kind, m=m, r=rep: self.job_whole(
                f"whole|{k}|{m}|{r}", k, m)) for m in METHODS]

        def tensors(scale, kind, n, methods, vocab):
            """Layer jobs for every method first, then the vocabulary matrix (the memory risk)."""
            out = [] if scale == "1B" else [(f"gen|8B|{kind}|{n}", lambda: self.job_generate(kind, n, vocab))]
            for part in ("layer", "vocab") if vocab else ("layer",):
                prefix = "tensor" if part == "layer" else "vocab"
                out += [(f"{prefix}|{scale}|{kind}|{n}|{m}", lambda p=part, m=m, key=f"{prefix}|{scale}|{kind}|{n}|{m}":
                         self.job_tensors(key, scale, kind, n, m, p)) for m in methods]
            return out

        jobs += [(f"adapter|{i}", lambda i=i: self.job_adapter(i)) for i in range(N_FINETUNES)]
        for kind in KINDS:
            jobs += whole(kind, 0)
            if kind == "lora":
                jobs += [(f"adapters|1B|{m}", lambda m=m: self.job_adapter_merge(f"adapters|1B|{m}", m))
                         for m in ADAPTER_METHODS]
            jobs += tensors("8B", kind, N_FINETUNES, METHODS, True)
            jobs += tensors("1B", kind, N_FINETUNES, METHODS, True)
        for n in SWEEP_N[self.mode]:
            if n != N_FINETUNES:
                jobs += tensors("8B", "dense", n, SWEEP_METHODS, False)
        for rep in range(1, self.args.reps or (1 if self.args.quick else 3)):
            for kind in KINDS:
                jobs += whole(kind, rep)
        if not self.args.quick:
            for n in SWEEP_N[self.mode]:
                if n != N_FINETUNES:
                    jobs += tensors("8B", "lora", n, SWEEP_METHODS, False)
        return jobs

    def run(self) -> int:
        for label in self.args.rerun or []:
            if label not in METHODS:
                raise SystemExit(f"--rerun {label}: unknown method; use one of {', '.join(METHODS)}")
            self.data["rows"] = {k: v for k, v in self.data["rows"].items()
                                 if label not in k.split("|")}
        self.data["machines"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                      "machine": bench_drm.machine(), **git_state()})
        self.save()
        started = time.time()
        for key, fn in self.plan():
            if self.args.only and not any(_matches(key, o) for o in self.args.only):
                continue
            if key in self.data["rows"] and "error" not in self.data["rows"][key]:
                continue  # done (a failed job is kept for the record and tried again next session)
            if self.args.max_minutes and time.time() - started > 60 * self.args.max_minutes:
                print(f"--max-minutes {self.args.max_minutes} reached; stopping before {key}", flush=True)
                break
            print(f"[{time.strftime('%H:%M:%S')}] {key} (load {_load()})", flush=True)
            job_start = time.time()
            result = fn()
            summary = summarize(result) + "; " if isinstance(result, dict) else ""
            print(f"  {summary}job {time.time() - job_start:.0f} s", flush=True)
        self.save()
        print(report(self.data, self.mode))
        print(f"merges run this session: {self.merges_run}", flush=True)
        return 0


def _matches(key: str, text: str) -> bool:
    """--only: 'drm-V' also picks drm-V-iso-total; 'drm-V$' picks drm-V alone."""
    return key.endswith(text[:-1]) if text.endswith("$") else text in key


def eight_b_tensors(shape: dict, part: str = "all") -> list:
    """(name, shape) of layer 0's tensors (a norm, 7 projections: part 'layer'), the
    embedding (part 'vocab'; lm_head has the same shape and path), or both ('all')."""
    layer = [(n, d) for n, d in llama_tensors(shape)
             if n.startswith("model.layers.0.") and "post_attention" not in n]
    vocab = [("model.embed_tokens.weight", (shape["vocab"], shape["hidden"]))]
    return {"layer": layer, "vocab": vocab, "all": layer + vocab}[part]


def summarize(row: dict) -> str:
    if "error" in row:
        return "ERROR " + row["error"].strip().splitlines()[-1][:300]
    if "wall_s" in row:
        return f"{row['wall_s']:.1f} s, {row['peak_rss_kib'] / 1024:.0f} MiB"
    return ", ".join(f"{n.split('.')[-2]} {e['s']:.2f}s" for n, e in row["tensors"].items())


# ------------------------------------------------------------------ the report


def _short(name: str) -> str:
    return "vocabulary (embed = lm_head)" if is_vocab(name) else name.split(".")[-2]


def projection(tensors: dict, shape: dict) -> float:
    """Whole-model seconds: layers x (7 projections + 2 norms) + final norm + embed + lm_head."""
    layer = sum(e["s"] for n, e in tensors.items() if n.endswith("proj.weight"))
    norm = sum(e["s"] for n, e in tensors.items() if n.endswith("layernorm.weight"))
    vocab = sum(e["s"] for n, e in tensors.items() if is_vocab(n))
    return shape["layers"] * (layer + 2 * norm) + norm + 2 * vocab


def _med(values):
    return statistics.median(values) if values else float("nan")


def report(data: dict, mode: str) -> str:
    rows, shapes = data["rows"], SHAPES[mode]
    machines = data.get("machines") or [{"machine": "unknown"}]
    lines = ["# Merge cost at real LLM shapes (issue 20)", "",
             "`python -m benchmarks.perf.bench_scale` (resumable; results cached in `scale.json`). "
             "Fine-tunes: dense = 256 decaying rank-one terms + iid noise (30 % of the norm), 2 % of "
             "the weight's norm (norms 1 %); lora = B @ A of rank 16/32/64, 1 % of the weight's norm, "
             "projections only (embeddings, lm_head, norms unchanged), rounded to bf16. ties and della: "
             "density 0.2, weight 1 (della epsilon 0.15); drm, tsv_m, iso_c, iso_cts: defaults (drm "
             "density 0.2); `-iso-total` = `isotropic: true, norm_target: total`. Load averages are "
             "1-minute values before -> after each run (the CPU is shared); `*` = the package's "
             "source had uncommitted changes when measured.", "",
             f"Machine (latest session): {machines[-1]['machine']}", ""]
    s1 = shapes["1B"]
    for kind in KINDS:
        whole = {m: [r for k, r in rows.items() if k.startswith(f"whole|{kind}|{m}|") and "wall_s" in r]
                 for m in METHODS}
        errors = {m: r["error"] for k, r in rows.items() for m in [k.split("|")[2]]
                  if k.startswith(f"whole|{kind}|") and "error" in r}
        if not any(whole.values()) and not errors:
            continue
        lines += [f"## 1B-shaped whole merge, {kind} fine-tunes (mergekit-yaml, hidden {s1['hidden']}, "
                  f"intermediate {s1['intermediate']}, {s1['layers']} layers, vocab {s1['vocab']}, "
                  f"{N_FINETUNES} fine-tunes, bf16)", "",
                  "| method | runs | median wall s | / ties | runs (s) | median peak RSS MiB | / ties | load | commit |",
                  "|---|---|---|---|---|---|---|---|---|"]
        ties_w = _med([r["wall_s"] for r in whole["ties"]])
        ties_m = _med([r["peak_rss_kib"] for r in whole["ties"]])
        for m, runs in whole.items():
            if not runs:
                if m in errors:
                    lines.append(f"| {m} | failed: {errors[m].strip().splitlines()[-1][:120]} |||||||")
                continue
            wall, rss = _med([r["wall_s"] for r in runs]), _med([r["peak_rss_kib"] for r in runs])
            load = "; ".join(f"{r['load_before'][0]:.1f}->{r['load_after'][0]:.1f}" for r in runs)
            commits = ", ".join(sorted({r["commit"] + ("*" if r.get("dirty") else "") for r in runs}))
            walls = ", ".join(f"{r['wall_s']:.0f}" for r in runs)
            lines.append(f"| {m} | {len(runs)} | {_secs(wall)} | {wall / ties_w:.2f} | "
                         f"{walls} | {rss / 1024:.0f} | "
                         f"{rss / ties_m:.2f} | {load} | {commits} |")
        lines.append("")
    lines += _adapter_table(rows)
    for kind in KINDS:
        lines += _tensor_tables(rows, kind, shapes)
    lines += _sweep_table(rows, shapes)
    lines += _superseded(data.get("superseded") or {})
    return "\n".join(lines) + "\n"


def _adapter_table(rows: dict) -> list:
    """The lora fine-tunes as adapters (mergekit-drm-lora) against the folded checkpoints' ties."""
    done = {m: rows.get(f"adapters|1B|{m}") for m in ADAPTER_METHODS}
    done = {m: r for m, r in done.items() if r}
    if not done:
        return []
    ties = rows.get("whole|lora|ties|0") or {}
    lines = ["## The same lora fine-tunes merged as adapters (`mergekit-drm-lora`, route 2: one merged "
             "adapter, computed on the factors; no full weights loaded)", "",
             "`/ ties` compares with `ties` on the folded checkpoints (the whole-merge table above); the "
             "adapters hold the exact factors of the folded fine-tunes (float32, before bf16 rounding).", "",
             "| method | wall s | / ties (folded) | peak RSS MiB | / ties | load | commit |",
             "|---|---|---|---|---|---|---|"]
    for m, r in done.items():
        if "error" in r:
            lines.append(f"| {m} | failed: {r['error'].strip().splitlines()[-1][:120]} ||||||")
            continue
        ratio = lambda a, b: f"{a / b:.3f}" if b else "-"  # noqa: E731
        lines.append(f"| {m} | {_secs(r['wall_s'])} | {ratio(r['wall_s'], ties.get('wall_s'))} | "
                     f"{r['peak_rss_kib'] / 1024:.0f} | {ratio(r['peak_rss_kib'], ties.get('peak_rss_kib'))} | "
                     f"{r['load_before'][0]:.1f}->{r['load_after'][0]:.1f} | "
                     f"{r['commit']}{'*' if r.get('dirty') else ''} |")
    return lines + [""]


def _superseded(old: dict) -> list:
    """Whole merges measured again after a code change: the earlier runs, for the record."""
    runs = [(key, r) for key, rs in sorted(old.items()) for r in rs if "wall_s" in r]
    if not runs:
        return []
    lines = ["## Superseded whole-merge runs (measured again with later code; kept for the record)", "",
             "| job | wall s | peak RSS MiB | load | commit | measured |", "|---|---|---|---|---|---|"]
    for key, r in runs:
        lines.append(f"| {key.replace('|', ' ')} | {r['wall_s']:.0f} | {r['peak_rss_kib'] / 1024:.0f} | "
                     f"{r['load_before'][0]:.1f}->{r['load_after'][0]:.1f} | "
                     f"{r['commit']}{'*' if r.get('dirty') else ''} | {r.get('timestamp', '')} |")
    return lines + [""]


def _tensor_rows(rows, scale, kind, n):
    """method -> the layer row, its tensors joined with the vocabulary row's (if measured)."""
    out = {}
    for m in METHODS:
        row = rows.get(f"tensor|{scale}|{kind}|{n}|{m}")
        if row and "tensors" in row:
            out[m] = dict(row, tensors=dict(row["tensors"]))
            vocab = rows.get(f"vocab|{scale}|{kind}|{n}|{m}")
            if vocab and "tensors" in vocab:
                out[m]["tensors"].update(vocab["tensors"])
    return out


def _tensor_tables(rows, kind, shapes) -> list:
    lines = []
    per = _tensor_rows(rows, "8B", kind, N_FINETUNES)
    if per:
        s8 = shapes["8B"]
        methods = list(per)
        lines += [f"## 8B per tensor, {kind} fine-tunes, N = {N_FINETUNES} (seconds; merge call only, "
                  "bf16 in; `r` = a one-off library race ran, the warm rerun is shown)", "",
                  "| tensor (out x in) | " + " | ".join(methods) + " |",
                  "|---|" + "---|" * len(methods)]
        dims = dict(eight_b_tensors(s8))
        for name in dims:
            cells = []
            for m in methods:
                e = per[m]["tensors"].get(name)
                cells.append("" if e is None else f"{e['s']:.2f}" + (" r" if "first_s" in e else ""))
            shape_txt = "x".join(map(str, dims[name]))
            lines.append(f"| {_short(name)} ({shape_txt}) | " + " | ".join(cells) + " |")
        vocab = [n for n in dims if is_vocab(n)][0]
        proj = {m: projection(per[m]["tensors"], s8) for m in methods}
        ties = proj.get("ties", float("nan"))
        # a method whose vocabulary job has not run is projected from its layers alone: say so
        lines.append("| **projected 8B merge, h** | " + " | ".join(
            f"**{proj[m] / 3600:.2f}**" + ("" if vocab in per[m]["tensors"] else " (layers only)")
            for m in methods) + " |")
        lines.append("| / ties | " + " | ".join(f"{proj[m] / ties:.2f}" for m in methods) + " |")
        lines.append("| vocabulary tensor extra peak RSS GiB | " + " | ".join(
            f"{per[m]['tensors'][vocab]['peak_extra_mib'] / 1024:.1f}" if vocab in per[m]["tensors"] else ""
            for m in methods) + " |")
        lines.append("| load before->after | " + " | ".join(
            f"{per[m]['load_before'][0]:.1f}->{per[m]['load_after'][0]:.1f}" for m in methods) + " |")
        lines.append("")
        races = [f"{m} {_short(n)} {e['first_s']:.1f} s" for m in methods
                 for n, e in per[m]["tensors"].items() if "first_s" in e]
        if races:
            lines += ["First calls that ran a library race (s, incl. the race): " + "; ".join(races), ""]
        stage_methods = [m for m in methods if any(e.get("stages") for e in per[m]["tensors"].values())]
        if stage_methods:
            stages = sorted({k for m in stage_methods for e in per[m]["tensors"].values() for k in e["stages"]})
            lines += [f"Stages of one 8B layer's 7 projections ({kind}, s): ", "",
                      "| method | " + " | ".join(stages) + " | other | layer total |",
                      "|---|" + "---|" * (len(stages) + 2)]
            for m in stage_methods:
                ents = [e for n, e in per[m]["tensors"].items() if n.endswith("proj.weight")]
                total = sum(e["s"] for e in ents)
                vals = [sum(e["stages"].get(k, 0.0) for e in ents) for k in stages]
                lines.append(f"| {m} | " + " | ".join(f"{v:.1f}" for v in vals)
                             + f" | {total - sum(vals):.1f} | {total:.1f} |")
            lines.append("")
    small = _tensor_rows(rows, "1B", kind, N_FINETUNES)
    if small:
        lines += [f"## Check of the projection: 1B per tensor ({kind}) projected vs the measured 1B whole merge", "",
                  "| method | projected merge compute s | measured whole merge (median) s | measured / projected |",
                  "|---|---|---|---|"]
        for m, row in small.items():
            proj = projection(row["tensors"], shapes["1B"])
            walls = [r["wall_s"] for k, r in rows.items() if k.startswith(f"whole|{kind}|{m}|") and "wall_s" in r]
            meas = _med(walls)
            lines.append(f"| {m} | {_secs(proj)} | {_secs(meas)} | {meas / proj:.2f} |")
        lines += ["", "The measured merge also reads and writes the checkpoints and starts mergekit-yaml, "
                  "which the projection leaves out.", ""]
    return lines


def _sweep_table(rows, shapes) -> list:
    lines = []
    for kind in KINDS:
        cols = [n for n in (2, 3, 5, 8) if any(f"tensor|8B|{kind}|{n}|" in k for k in rows)]
        if len(cols) < 2:
            continue
        lines += [f"## One 8B layer (7 projections + a norm), {kind} fine-tunes, by N (seconds)", "",
                  "| method | " + " | ".join(f"N = {n}" for n in cols) + " |", "|---|" + "---|" * len(cols)]
        for m in SWEEP_METHODS:
            cells = []
            for n in cols:
                row = rows.get(f"tensor|8B|{kind}|{n}|{m}")
                ok = row and "tensors" in row
                cells.append(_secs(sum(e['s'] for x, e in row['tensors'].items() if not is_vocab(x)))
                             if ok else "")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


# ------------------------------------------------------------------ entry point


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, in-process merges (< 60 s)")
    parser.add_argument("--cache", default=None, help="checkpoints (default $MERGEKIT_DRM_BENCH_CACHE "
                        "or ~/.cache/mergekit-drm-bench)")
    parser.add_argument("--results", default=None, help="results JSON (the report is written next to it as .md)")
    parser.add_argument("--reps", type=int, default=None,
                        help="whole-merge runs per method and kind (default 3; --quick 1)")
    parser.add_argument("--rerun", action="append", metavar="METHOD", help="forget METHOD's results first")
    parser.add_argument("--only", action="append", metavar="TEXT",
                        help="only jobs whose key contains TEXT (a trailing $ anchors it to the key's end)")
    parser.add_argument("--max-minutes", type=float, default=None, help="start no job after this long")
    parser.add_argument("--report", action="store_true", help="rewrite the report from the cache and exit")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(tensor_job(json.loads(args.worker))))
        return 0
    bench = Bench(args)
    if args.report:
        bench.save()
        print(report(bench.data, bench.mode))
        return 0
    if not args.quick:
        with contextlib.suppress(OSError):  # this run (and its children) goes first if memory runs out
            with open("/proc/self/oom_score_adj", "w") as handle:
                handle.write("1000")
    os.makedirs(bench.cache, exist_ok=True)
    lock_path = os.path.join(bench.cache, "run.lock")  # one run per cache (it writes checkpoints)
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SystemExit(f"another run holds {lock_path}; one run at a time")
        return bench.run()


if __name__ == "__main__":
    sys.exit(main())
