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

import hashlib
import json
import logging
import os
import struct
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from mergekit_drm.checks import check_finite
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
    weights = {}
    for name in spec.tensors:
        tensor = loader.get_tensor(name)
        check_finite(tensor, method="mudsc", tensor_name=name, model=source.path)
        weights[name] = tensor.to(device=device, dtype=torch.float32)
    return weights


# --- what an alignment was computed for ---------------------------------------------

FINGERPRINT_TENSORS = 3
FINGERPRINT_BYTES = 4096


def model_identity(source: ModelSource) -> Dict[str, Any]:
    """Tensor names and shapes (hashed) and a content fingerprint of one model.

    The fingerprint hashes the first and middle ``FINGERPRINT_BYTES`` of
    ``FINGERPRINT_TENSORS`` matrices spread over the sorted tensor names: read
    straight from safetensors files (a few KiB), from the loader otherwise.
    """
    listing = "\n".join(f"{name} {list(source.shapes.get(name, ()))}" for name in source.names)
    matrices = [name for name in source.names if len(source.shapes.get(name, ())) >= 2]
    count = min(FINGERPRINT_TENSORS, len(matrices))
    picked = [matrices[(2 * k + 1) * len(matrices) // (2 * count)] for k in range(count)]
    digest = hashlib.sha256()
    index = source.ref.tensor_index()
    for name in picked:
        digest.update(name.encode())
        digest.update(_sampled_bytes(index, source, name))
    return {
        "path": source.path,
        "tensors": hashlib.sha256(listing.encode()).hexdigest(),
        "fingerprint": digest.hexdigest(),
    }


def _sampled_bytes(index, source: ModelSource, name: str) -> bytes:
    if index.is_safetensors:
        path = os.path.join(index.base_path, index.tensor_paths[name])
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            begin, end = json.loads(handle.read(length))[name]["data_offsets"]
            start = 8 + length + begin
            chunks = []
            for offset in (start, start + (end - begin) // 2):
                handle.seek(offset)
                chunks.append(handle.read(min(FINGERPRINT_BYTES, end - begin)))
        return b"".join(chunks)
    flat = source.ref.lazy_loader().get_tensor(name).reshape(-1)
    step = max(1, flat.numel() // 1024)
    return flat[::step][:1024].to(torch.float32).numpy().tobytes()


# Parameters that change an alignment (batch size and the statistics budget do not).
SHAPING = ("alpha", "mode", "iterations", "patience", "seed")
CALIBRATION_SHAPING = ("calibration", "calibration_samples", "calibration_seq_len", "calibration_tokenizer")


def shaping_parameters(solver: SolverOptions, calibration: CalibrationOptions, first_path: str) -> Dict[str, Any]:
    values: Dict[str, Any] = {name: getattr(solver, name) for name in SHAPING}
    if solver.alpha < 1.0:
        values.update(
            calibration=os.path.realpath(calibration.path) if calibration.path else "bundled:calibration_en.txt",
            calibration_samples=calibration.samples,
            calibration_seq_len=calibration.seq_len,
            calibration_tokenizer=os.path.realpath(calibration.tokenizer or first_path),
        )
    return values


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


def _stat_passes(taps, sizes, n: int, full: bool, max_stats_bytes: float) -> List[List[Tuple[Any, Any]]]:
    """Taps packed into passes over the calibration data, each within ``max_stats_bytes``."""

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
    return passes


def _forward_taps(model, m: int, chosen, batch: torch.Tensor, captured: List[Dict[int, torch.Tensor]]) -> None:
    """One forward pass of model ``m``; tap k's activations land in ``captured[k][m]``."""
    handles = []
    for k, (group, tap) in enumerate(chosen):
        module = model.get_submodule(tap.module)

        def hook(mod, args, output, k=k, tap=tap):
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


def activation_similarity(
    models: Sequence[torch.nn.Module],
    spec: PermutationSpec,
    tokens: torch.Tensor,
    full: bool,
    batch_size: int = 8,
    max_stats_bytes: float = 4 * 2**30,
    device=None,
    progress: bool = False,
    labels: Optional[Sequence[str]] = None,
) -> Dict[str, Dict[str, torch.Tensor]]:
    """Per group and space: the mean over its taps of the Pearson correlation
    of the N models' unit activations on the same tokens.

    Non-finite activations fail naming the model (``labels``) and, if one of
    its weights is not finite, that tensor.
    """
    n = len(models)
    taps = [(group, tap) for group in spec.groups.values() for tap in group.taps]
    sizes = {(g.name, t.space): g.space_sizes[t.space] for g, t in taps}

    passes = _stat_passes(taps, sizes, n, full, max_stats_bytes)
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
                _forward_taps(model, m, chosen, batch, captured)
                if bar is not None:
                    bar.update(1)
            for k, (group, tap) in enumerate(chosen):
                for m in range(n):
                    if not bool(torch.isfinite(captured[k][m]).all()):
                        _non_finite_activation(models[m], labels[m] if labels else f"{m} (0-based)", tap.module)
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


def _non_finite_activation(model: torch.nn.Module, label: str, module: str) -> None:
    for name, tensor in model.state_dict().items():
        check_finite(tensor, method="mudsc", tensor_name=name, model=label)
    raise FloatingPointError(
        f"mudsc: the calibration activations at {module} of model {label} are not finite "
        "although its weights are (an overflow?); use alpha: 1.0 (weights only) or other "
        "calibration text"
    )


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
    alignment.metadata["identities"] = [model_identity(s) for s in sources]
    alignment.metadata["parameters"] = shaping_parameters(solver, calibration, sources[0].path)
    alignment.metadata["calibration"] = None if solver.alpha >= 1.0 else {
        "path": calibration.path or "bundled:calibration_en.txt",
        "samples": calibration.samples,
        "seq_len": calibration.seq_len,
        "tokenizer": calibration.tokenizer or sources[0].path,
    }
    seconds = time.perf_counter() - started
    alignment.metadata["total_seconds"] = seconds
    return AlignmentResult(spec, alignment, seconds, sources)


_tokens_lock = threading.Lock()
_tokens: Dict[Tuple, torch.Tensor] = {}


def calibration_tokens(
    sources: Sequence[ModelSource], calibration: CalibrationOptions, keep: bool = False
) -> torch.Tensor:
    """The calibration windows, read, tokenized and checked once per merge.

    The method calls this with ``keep`` while mergekit plans, so an empty or
    invalid file, a missing tokenizer or too long a sequence fail before the
    output exists; the alignment pass then takes the kept windows.
    """
    from transformers import AutoTokenizer

    tokenizer_path = calibration.tokenizer or sources[0].path
    key = (calibration.path, tokenizer_path, calibration.samples, calibration.seq_len)
    with _tokens_lock:
        cached = _tokens.get(key) if keep else _tokens.pop(key, None)
    if cached is not None:
        return cached
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
    if keep:
        with _tokens_lock:
            _tokens[key] = tokens
    return tokens


def _activations(sources, spec, solver, calibration, device, progress):
    tokens = calibration_tokens(sources, calibration)
    models = [_hf_model(source, device) for source in sources]
    try:
        return activation_similarity(
            models, spec, tokens, full=solver.mode == "zip",
            batch_size=calibration.batch_size,
            max_stats_bytes=calibration.max_stats_gib * 2**30,
            device=device, progress=progress, labels=[source.path for source in sources],
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
                result = load_saved(models, saved, solver, calibration, _explicit.get(names))
            else:
                result = compute_alignment(models, solver, calibration, device=device, progress=True)
        except BaseException as error:
            _errors[key] = error
            raise
        _cache[key] = result
        return result


_explicit: Dict[Tuple, Optional[frozenset]] = {}


def begin_merge(models: Sequence[Any], explicit: Optional[Sequence[str]] = None) -> None:
    """Forget alignments of these models: a new merge (planning) starts.

    Called from the method's planning hook, so parameters may differ between
    merges in one process (``mergekit-multi``, notebooks) while they must stay
    fixed within one merge, and edited checkpoints are never served stale.
    ``explicit`` names the parameters the configuration sets (None: unknown).
    """
    names = tuple(str(m) for m in models)
    with _tokens_lock:
        _tokens.clear()
    with _cache_lock:
        _explicit[names] = None if explicit is None else frozenset(explicit)
        _first_key.pop(names, None)
        for key in [k for k in _cache if k[0] == names]:
            del _cache[key]
        for key in [k for k in _errors if k[0] == names]:
            del _errors[key]


def _options_differ(first: Tuple, key: Tuple) -> str:
    (_, solver_a, calib_a, saved_a), (_, solver_b, calib_b, saved_b) = first, key
    a = dict(asdict(solver_a), **{f"calibration.{k}": v for k, v in asdict(calib_a).items()}, alignment=saved_a)
    b = dict(asdict(solver_b), **{f"calibration.{k}": v for k, v in asdict(calib_b).items()}, alignment=saved_b)
    return ", ".join(f"{name} {b[name]!r} (first tensor: {a[name]!r})" for name in a if a[name] != b[name])


def plan_alignment(
    models: Sequence[Any],
    solver: SolverOptions,
    calibration: CalibrationOptions,
    saved: Optional[str],
    tensor_name: str,
) -> None:
    """Planning-time part of a merge, run for every tensor mergekit plans.

    The first tensor fixes the options (a later one with other options is
    refused, naming it) and verifies the saved alignment or prepares the
    calibration tokens; so these errors come before the output exists.
    """
    names = tuple(str(m) for m in models)
    key = (names, solver, calibration, saved)
    with _cache_lock:
        first = _first_key.get(names)
        if first is None:
            _first_key[names] = key
        explicit = _explicit.get(names)
    if first is not None:
        if first != key:
            raise ValueError(
                f"mudsc: alignment parameters must be the same for every tensor, since one "
                f"alignment couples the whole model; {tensor_name} gets {_options_differ(first, key)}. "
                "Set them once under `parameters:` without filters or gradients"
            )
        return
    if saved:
        result = load_saved(models, saved, solver, calibration, explicit)
        with _cache_lock:
            _cache[key] = result
    elif solver.alpha < 1.0:
        calibration_tokens(describe_models(models), calibration, keep=True)


def load_saved(
    models: Sequence[Any],
    directory: str,
    solver: Optional[SolverOptions] = None,
    calibration: Optional[CalibrationOptions] = None,
    explicit: Optional[frozenset] = None,
) -> AlignmentResult:
    """A saved alignment, verified to be for these models (re-keyed if only
    their order differs) and not contradicted by the merge's parameters."""
    sources = describe_models(models)
    spec = check_models(sources)
    alignment = Alignment.load(directory)
    if alignment.num_models != len(sources):
        raise ValueError(
            f"mudsc: saved alignment {directory!r} is for {alignment.num_models} models, "
            f"this merge has {len(sources)}"
        )
    alignment = _match_models(alignment, sources, directory)
    if solver is not None:
        _check_parameters(alignment, solver, calibration or CalibrationOptions(), sources, explicit, directory)
    alignment.check_against(spec)
    return AlignmentResult(spec, alignment, 0.0, sources)


def _match_models(alignment: Alignment, sources: Sequence[ModelSource], directory: str) -> Alignment:
    recorded = alignment.metadata["identities"]
    listed = ", ".join(r["path"] for r in recorded)
    order: List[int] = []
    for i, source in enumerate(sources):
        ident = model_identity(source)
        same = [
            j for j, r in enumerate(recorded)
            if r["tensors"] == ident["tensors"] and r["fingerprint"] == ident["fingerprint"]
            and j not in order
        ]
        if not same:
            shaped = any(r["tensors"] == ident["tensors"] for r in recorded)
            why = (
                "its weights differ from each of those models" if shaped
                else "its tensor names or shapes differ from those models'"
            )
            raise ValueError(
                f"mudsc: saved alignment {directory!r} was computed for {listed}, not for "
                f"{source.path} ({why}). Recompute it for these models with "
                "`mergekit-mudsc-align`, or merge the models it was computed for"
            )
        order.append(i if i in same else same[0])
    if order != list(range(len(sources))):
        log.info("mudsc: saved alignment %s lists the models in another order; re-keyed", directory)
        alignment = alignment.reordered(order)
    return alignment


def _check_parameters(alignment, solver, calibration, sources, explicit, directory) -> None:
    recorded = alignment.metadata["parameters"]
    wanted = shaping_parameters(solver, calibration, sources[0].path)
    if explicit is None:
        # The configuration is not visible: treat values other than the defaults as set.
        defaults = shaping_parameters(SolverOptions(alpha=solver.alpha), CalibrationOptions(), sources[0].path)
        defaults["alpha"] = SolverOptions().alpha
        explicit = frozenset(name for name in wanted if wanted[name] != defaults.get(name))
    conflicts = [
        f"{name}: {wanted[name]!r} (saved: {recorded[name]!r})"
        for name in (*SHAPING, *CALIBRATION_SHAPING)
        if name in explicit and name in wanted and name in recorded and wanted[name] != recorded[name]
    ]
    if conflicts:
        raise ValueError(
            f"mudsc: saved alignment {directory!r} was computed with other parameters than this "
            f"merge sets ({'; '.join(conflicts)}). Remove them from the YAML (the saved "
            "alignment fixes them), or recompute the alignment with these parameters"
        )


def clear_cache() -> None:
    with _tokens_lock:
        _tokens.clear()
    with _cache_lock:
        _cache.clear()
        _errors.clear()
        _first_key.clear()
        _explicit.clear()
