"""The global alignment pass for checkpoints on disk.

mergekit calls a method one tensor at a time, but one residual-stream
permutation couples every layer. This module computes the whole alignment
once per merge, before the first tensor is merged: it reads the models'
weights through mergekit's lazy loader, runs the models with transformers on
calibration text for activation statistics (unless ``alpha`` is 1), and runs
the solver. Results are cached per (models, options) and computed under a
lock, so mergekit's ``--multi-gpu`` threads wait for one computation.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from mergekit_drm.mudsc.alignment import Alignment
from mergekit_drm.mudsc.calibration import check_calibration_path, load_texts, token_windows
from mergekit_drm.mudsc.similarity import Comoments
from mergekit_drm.mudsc.solver import SolverOptions, solve
from mergekit_drm.mudsc.specs import PermutationSpec, build_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationOptions:
    path: Optional[str] = None  # None: the bundled English corpus
    samples: int = 64
    seq_len: int = 128
    batch_size: int = 8
    tokenizer: Optional[str] = None  # None: model 0's tokenizer
    max_stats_gib: float = 4.0  # activation statistics held at once


# --- reading models -------------------------------------------------------------


def _reference(model: Any):
    from mergekit.common import ModelReference

    if isinstance(model, ModelReference):
        ref = model
    else:
        ref = ModelReference.parse(str(model))
    if ref.lora is not None:
        raise ValueError(
            f"mudsc aligns full models; {ref} carries a LoRA adapter. Fold it first "
            "(e.g. `mergekit-yaml` with `merge_method: passthrough`, or PEFT's merge_and_unload)."
        )
    return ref


@dataclass
class ModelSource:
    ref: Any
    config: Any
    names: List[str]
    shapes: Dict[str, Tuple[int, ...]]

    @property
    def path(self) -> str:
        return self.ref.model.path


def describe_models(models: Sequence[Any]) -> List[ModelSource]:
    """Config, tensor names and shapes of each model (headers only)."""
    from mergekit_drm.preflight import stored_shape

    out = []
    for model in models:
        ref = _reference(model)
        if not os.path.isdir(ref.model.path):
            raise FileNotFoundError(
                f"mudsc: model {ref.model.path!r} is not a local directory (it needs the "
                "checkpoint on disk to read weights and run calibration)"
            )
        config = ref.config(trust_remote_code=False)
        index = ref.tensor_index()
        names = sorted(index.tensor_paths)
        shapes = {}
        for name in names:
            shape = stored_shape(ref, name)
            if shape is not None:
                shapes[name] = shape
        out.append(ModelSource(ref, config, names, shapes))
    return out


def check_models(sources: Sequence[ModelSource]) -> PermutationSpec:
    """The shared permutation spec, or an error naming model and tensor."""
    if len(sources) < 2:
        raise ValueError("mudsc merges at least 2 models: list two or more under `models:`")
    first = sources[0]
    spec = build_spec(first.config, first.names)
    for source in sources[1:]:
        if getattr(source.config, "model_type", None) != spec.architecture:
            raise ValueError(
                f"mudsc: {source.path} is a {source.config.model_type!r} model and "
                f"{first.path} a {first.config.model_type!r} model; all models must share one architecture"
            )
        missing = sorted(set(first.names) ^ set(source.names))
        if missing:
            raise ValueError(
                f"mudsc: {source.path} and {first.path} do not have the same tensors "
                f"(e.g. {missing[0]}); models must share one architecture and size"
            )
        for name, shape in first.shapes.items():
            other = source.shapes.get(name)
            if other is not None and other != shape:
                raise ValueError(
                    f"mudsc: tensor {name} has shape {list(shape)} in {first.path} but "
                    f"{list(other)} in {source.path}; models of different shapes cannot be aligned"
                )
    return spec


def load_weights(source: ModelSource, spec: PermutationSpec, device) -> Dict[str, torch.Tensor]:
    loader = source.ref.lazy_loader()
    return {
        name: loader.get_tensor(name).to(device=device, dtype=torch.float32)
        for name in spec.tensors
    }


def _hf_model(source: ModelSource, device):
    import transformers

    arch = (getattr(source.config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModel
    model = cls.from_pretrained(source.path, torch_dtype=torch.float32)
    return model.to(device).eval()


def _max_positions(config) -> Optional[int]:
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


# --- activation statistics ------------------------------------------------------------


def activation_similarity(
    models: Sequence[torch.nn.Module],
    spec: PermutationSpec,
    tokens: torch.Tensor,
    full: bool,
    batch_size: int = 8,
    max_stats_bytes: float = 4 * 2**30,
    device=None,
    progress: bool = False,
) -> Dict[str, Dict[str, torch.Tensor]]:
    """Per group and space: the mean over its taps of the Pearson correlation
    of the N models' unit activations on the same tokens."""
    n = len(models)
    taps = [(group, tap) for group in spec.groups.values() for tap in group.taps]
    sizes = {(g.name, t.space): g.space_sizes[t.space] for g, t in taps}

    def tap_bytes(item):
        group, tap = item
        o = sizes[(group.name, tap.space)]
        return 8 * ((n * o) ** 2 if full else max(n - 1, 1) * o * o)

    passes: List[List[Tuple[Any, Any]]] = [[]]
    used = 0
    for item in taps:
        size = tap_bytes(item)
        if passes[-1] and used + size > max_stats_bytes:
            passes.append([])
            used = 0
        passes[-1].append(item)
        used += size

    sums: Dict[str, Dict[str, torch.Tensor]] = {}
    counts: Dict[Tuple[str, str], int] = {}
    batches = tokens.split(batch_size)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(passes) * len(batches) * n, desc="mudsc calibration", unit="fwd")
    for chosen in passes:
        moments = [Comoments(n, sizes[(g.name, t.space)], full, device=device) for g, t in chosen]
        captured: List[Dict[int, torch.Tensor]] = [dict() for _ in chosen]
        for batch in batches:
            batch = batch.to(device)
            for m, model in enumerate(models):
                handles = []
                for k, (group, tap) in enumerate(chosen):
                    module = model.get_submodule(tap.module)

                    def hook(mod, args, output, k=k, tap=tap, m=m):
                        value = args[0] if tap.where == "input" else output
                        if isinstance(value, tuple):
                            value = value[0]
                        value = value.detach()[..., tap.start:tap.stop]
                        captured[k][m] = value.reshape(-1, value.shape[-1])

                    handles.append(module.register_forward_hook(hook))
                try:
                    with torch.no_grad():
                        model(input_ids=batch)
                finally:
                    for handle in handles:
                        handle.remove()
                if bar is not None:
                    bar.update(1)
            for k in range(len(chosen)):
                moments[k].add([captured[k][m] for m in range(n)])
                captured[k].clear()
        for (group, tap), moment in zip(chosen, moments):
            corr = moment.correlation().cpu()
            slot = sums.setdefault(group.name, {})
            if tap.space in slot:
                slot[tap.space] += corr
            else:
                slot[tap.space] = corr
            counts[(group.name, tap.space)] = counts.get((group.name, tap.space), 0) + 1
        del moments
    if bar is not None:
        bar.close()
    for group_name, spaces in sums.items():
        for space in spaces:
            spaces[space] /= counts[(group_name, space)]
    return sums


# --- the whole pass -------------------------------------------------------------------------


@dataclass
class AlignmentResult:
    spec: PermutationSpec
    alignment: Alignment
    seconds: float
    sources: List[ModelSource] = field(repr=False, default_factory=list)


def compute_alignment(
    models: Sequence[Any],
    solver: SolverOptions,
    calibration: CalibrationOptions = CalibrationOptions(),
    device: Any = "cpu",
    progress: bool = False,
) -> AlignmentResult:
    started = time.perf_counter()
    sources = describe_models(models)
    spec = check_models(sources)
    if solver.alpha < 1.0:
        check_calibration_path(calibration.path)
    activation = None
    if solver.alpha < 1.0:
        # before the weights are loaded: the calibration models are freed first
        activation = _activations(sources, spec, solver, calibration, device, progress)
    weights = [load_weights(source, spec, device) for source in sources]
    say = (lambda message: log.info(message)) if progress else None
    alignment = solve(spec, weights, activation, solver, progress=say)
    alignment.metadata["models"] = [s.path for s in sources]
    alignment.metadata["calibration"] = None if solver.alpha >= 1.0 else {
        "path": calibration.path or "bundled:calibration_en.txt",
        "samples": calibration.samples,
        "seq_len": calibration.seq_len,
        "tokenizer": calibration.tokenizer or sources[0].path,
    }
    seconds = time.perf_counter() - started
    alignment.metadata["total_seconds"] = seconds
    return AlignmentResult(spec, alignment, seconds, sources)


def _activations(sources, spec, solver, calibration, device, progress):
    from transformers import AutoTokenizer

    tokenizer_path = calibration.tokenizer or sources[0].path
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    except Exception as error:
        raise ValueError(
            f"mudsc: no tokenizer could be loaded from {tokenizer_path!r} ({type(error).__name__}); "
            "save one with the model or set `calibration_tokenizer`, or use alpha: 1.0 (no data)"
        ) from None
    limit = _max_positions(sources[0].config)
    if limit is not None and calibration.seq_len > limit:
        raise ValueError(
            f"mudsc `calibration_seq_len` {calibration.seq_len} exceeds the model's "
            f"{limit} positions: lower it"
        )
    tokens = token_windows(tokenizer, load_texts(calibration.path), calibration.samples, calibration.seq_len)
    vocab = getattr(sources[0].config, "vocab_size", None)
    if vocab is not None and int(tokens.max()) >= vocab:
        raise ValueError(
            f"mudsc: the calibration tokenizer ({tokenizer_path}) produced token id {int(tokens.max())} "
            f"but the models have {vocab} embeddings: set `calibration_tokenizer` to the models' tokenizer"
        )
    models = [_hf_model(source, device) for source in sources]
    try:
        return activation_similarity(
            models, spec, tokens, full=solver.mode == "zip",
            batch_size=calibration.batch_size,
            max_stats_bytes=calibration.max_stats_gib * 2**30,
            device=device, progress=progress,
        )
    finally:
        del models


# --- cache for mergekit's per-tensor calls ---------------------------------------------------

_cache_lock = threading.Lock()
_cache: Dict[Tuple, AlignmentResult] = {}
_errors: Dict[Tuple, BaseException] = {}
_first_key: Dict[Tuple, Tuple] = {}


def cached_alignment(
    models: Sequence[Any],
    solver: SolverOptions,
    calibration: CalibrationOptions,
    saved: Optional[str],
    device: Any,
) -> AlignmentResult:
    """One alignment per (models, options), whichever thread asks first computes it."""
    names = tuple(str(m) for m in models)
    key = (names, solver, calibration, saved)
    with _cache_lock:
        first = _first_key.setdefault(names, key)
        if first != key:
            raise ValueError(
                "mudsc: alignment parameters (alpha, mode, iterations, patience, seed, "
                "calibration*, alignment) must be the same for every tensor, since one "
                "alignment couples the whole model; set them once under `parameters:` "
                "without filters or gradients"
            )
        if key in _cache:
            return _cache[key]
        if key in _errors:
            raise _errors[key]
        try:
            if saved:
                result = load_saved(models, saved)
            else:
                result = compute_alignment(models, solver, calibration, device=device, progress=True)
        except BaseException as error:
            _errors[key] = error
            raise
        _cache[key] = result
        return result


def begin_merge(models: Sequence[Any]) -> None:
    """Forget alignments of these models: a new merge (planning) starts.

    Called from the method's planning hook, so parameters may differ between
    merges in one process (``mergekit-multi``, notebooks) while they must stay
    fixed within one merge, and edited checkpoints are never served stale.
    """
    names = tuple(str(m) for m in models)
    with _cache_lock:
        _first_key.pop(names, None)
        for key in [k for k in _cache if k[0] == names]:
            del _cache[key]
        for key in [k for k in _errors if k[0] == names]:
            del _errors[key]


def load_saved(models: Sequence[Any], directory: str) -> AlignmentResult:
    sources = describe_models(models)
    spec = check_models(sources)
    alignment = Alignment.load(directory)
    if alignment.num_models != len(sources):
        raise ValueError(
            f"mudsc: saved alignment {directory!r} is for {alignment.num_models} models, "
            f"this merge has {len(sources)}"
        )
    alignment.check_against(spec)
    return AlignmentResult(spec, alignment, 0.0, sources)


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()
        _errors.clear()
        _first_key.clear()
