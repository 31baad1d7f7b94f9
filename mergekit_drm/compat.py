"""The one module that touches mergekit internals.

mergekit 0.1.5 gives a merge method no handle on the merge it runs in: no
configuration, no output directory, no hook for a failure. The checks and
the output guard need those, so they are taken from mergekit's internals,
and all of that happens here and nowhere else (``tests/test_compat.py``
greps the package to keep it so).

Public, usable anywhere: ``mergekit.merge_methods`` (``register``,
``registered_methods``, ``get``) and ``mergekit.merge_methods.base``'s method
API (``GroupMergeMethod`` with ``validate_inputs`` / ``merge_group``,
``MergeMethodSpec``, ``ParameterSpec``, ``ParameterScope``, ``InputContract``,
``BasePolicy``, ``TensorGroup`` / ``TensorEntry`` / ``TensorMetadata``);
``mergekit.config``'s configuration models (``MergeConfiguration``,
``ConditionalParameter``, ...); ``mergekit.common.ModelReference`` and its
methods; ``mergekit.merge.run_merge`` / ``MergeOptions`` as entry points.

Internal, used only here: the call stack and frame locals; private names
(``_execute``); ``run_merge``'s local variables; ``MergePlanner``,
``ExecuteMergeMethodTask``, ``GatherTensors``, ``LoaderCache``,
``ShardedTensorIndex``; the architecture classes, ``ConfigReader`` and
``resolve_parameters`` that ``mergekit-drm-lora`` uses to re-derive what the
planner would compute; the format of slice group names.

Each internal is probed once (``check_host``): by ``register()`` if mergekit
has loaded its module by then, else at the first planning call (under
``mergekit-yaml``, ``mergekit.merge`` is still being imported when
registration runs; importing more from there could cycle). A missing or
changed internal switches its feature off with a warning that names the
feature, the internal and the installed mergekit version; with
``MERGEKIT_DRM_STRICT_HOST=1`` it is an error instead. Never silent.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import threading
import warnings
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

STRICT_ENV = "MERGEKIT_DRM_STRICT_HOST"
SUPPORTED = "mergekit>=0.1.5,<0.1.6"  # as in pyproject.toml; tests/test_compat.py checks both


class HostCompatibilityError(RuntimeError):
    """An internal of mergekit that a guard needs is missing (strict mode)."""


class HostCompatibilityWarning(RuntimeWarning):
    """An internal of mergekit that a guard needs is missing; the guard is off."""


def mergekit_version() -> str:
    try:
        from importlib.metadata import version

        return version("mergekit")
    except Exception:
        return "unknown"


# ---------------------------------------------------------------- probes

GUARD = "cleanup of partial output when a merge fails, and the refusal of an output directory that holds a model"
NAMES = "parameter-name checks (misspelt or ignored parameters) and mudsc's per-merge alignment reset"
TASKS = "per-tensor planning checks (missing tensors, drm's single density, mudsc's alignment options)"
SHAPES = "tensor shape and presence checks at planning"
LORA = "mergekit-drm-lora's parameter resolution (per-module values and gradients, as mergekit-yaml resolves them)"


@dataclass(frozen=True)
class Internal:
    name: str  # what of mergekit is used
    feature: str  # what is off without it
    modules: Tuple[str, ...]  # what must be imported to probe it
    probe: Callable[[], Optional[str]]  # None if present as expected, else what differs


def _attr(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(sys.modules[module], name, None)


def _code_strings(code: CodeType) -> List[str]:
    out = []
    for const in code.co_consts:
        if isinstance(const, str):
            out.append(const)
        elif isinstance(const, CodeType):
            out.extend(_code_strings(const))
    return out


def _probe_run_merge() -> Optional[str]:
    run_merge = _attr("mergekit.merge.run_merge")
    code = getattr(run_merge, "__code__", None)
    if code is None:
        return "mergekit.merge.run_merge is missing"
    missing = [n for n in ("cfg_out", "out_path") if n not in code.co_varnames]
    if missing:
        return f"mergekit.merge.run_merge has no local variable {', '.join(missing)}"
    return None


def _probe_execute() -> Optional[str]:
    from mergekit.merge_methods.base import GroupMergeMethod

    if not callable(getattr(GroupMergeMethod, "_execute", None)):
        return "mergekit.merge_methods.base.GroupMergeMethod has no method _execute"
    return None


def _probe_planner() -> Optional[str]:
    planner = _attr("mergekit.plan.MergePlanner")
    if planner is None:
        return "mergekit.plan.MergePlanner is missing"
    normalize = getattr(planner, "normalize_config", None)
    if normalize is None or not hasattr(normalize, "__code__"):
        return "mergekit.plan.MergePlanner has no method normalize_config"
    init = getattr(planner.__init__, "__code__", None)
    if init is None or "config" not in init.co_names:
        return "mergekit.plan.MergePlanner no longer sets the attribute config"
    if "validate_inputs" not in normalize.__code__.co_names:
        return "MergePlanner.normalize_config no longer calls validate_inputs"
    if not any(".slices[" in s for s in _code_strings(normalize.__code__)):
        return "MergePlanner.normalize_config no longer names slices `<module>.slices[<i>]`"
    return None


def _fields(cls: Any) -> set:
    return set(getattr(cls, "model_fields", None) or getattr(cls, "__annotations__", {}))


def _probe_task() -> Optional[str]:
    task = _attr("mergekit.merge_methods.task_adapter.ExecuteMergeMethodTask")
    if task is None:
        return "mergekit.merge_methods.task_adapter.ExecuteMergeMethodTask is missing"
    missing = {"gather_tensors", "parameters", "input_parameters"} - _fields(task)
    if missing:
        return f"ExecuteMergeMethodTask has no field {', '.join(sorted(missing))}"
    gather = _attr("mergekit.io.tasks.GatherTensors")
    if gather is None or "weight_info" not in _fields(gather):
        return "mergekit.io.tasks.GatherTensors has no field weight_info"
    return None


def _probe_index() -> Optional[str]:
    cache = _attr("mergekit.io.tasks.LoaderCache")
    if cache is None or not callable(getattr(cache, "get", None)):
        return "mergekit.io.tasks.LoaderCache.get is missing"
    index = _attr("mergekit.io.lazy_tensor_loader.ShardedTensorIndex")
    missing = {"base_path", "is_safetensors", "tensor_paths"} - (_fields(index) if index else set())
    if index is None or missing or not callable(getattr(index, "from_disk", None)):
        return "mergekit.io.lazy_tensor_loader.ShardedTensorIndex (from_disk, base_path, " \
               "is_safetensors, tensor_paths) is missing or changed"
    return None


def _probe_lora() -> Optional[str]:
    needed = {
        "mergekit.architecture.arch_info_for_config": (),
        "mergekit.architecture.base.ConfiguredModuleArchitecture": (
            "pre_weights", "layer_weights", "post_weights", "num_layers"),
        "mergekit.config.ConfigReader": ("with_t", "parameter_sources"),
        "mergekit.parameter_resolver.resolve_parameters": (),
    }
    for path, methods in needed.items():
        obj = _attr(path)
        if obj is None:
            return f"{path} is missing"
        absent = [m for m in methods if not hasattr(obj, m)]
        if absent:
            return f"{path} has no {', '.join(absent)}"
    return None


RUN_MERGE_LOCALS = "run_merge's locals cfg_out / out_path"
INTERNALS: Tuple[Internal, ...] = (
    Internal(RUN_MERGE_LOCALS, GUARD, ("mergekit.merge",), _probe_run_merge),
    Internal("GroupMergeMethod._execute", GUARD, ("mergekit.merge_methods.base",), _probe_execute),
    Internal("MergePlanner (config, normalize_config's slice calls)", NAMES, ("mergekit.plan",), _probe_planner),
    Internal("ExecuteMergeMethodTask / GatherTensors fields", TASKS,
             ("mergekit.merge_methods.task_adapter", "mergekit.io.tasks"), _probe_task),
    Internal("LoaderCache / ShardedTensorIndex", SHAPES,
             ("mergekit.io.tasks", "mergekit.io.lazy_tensor_loader"), _probe_index),
    Internal("architecture classes, ConfigReader, resolve_parameters", LORA,
             ("mergekit.architecture", "mergekit.architecture.base", "mergekit.config",
              "mergekit.parameter_resolver"), _probe_lora),
)

_checked: Dict[str, Optional[str]] = {}  # Internal.name -> None (present) or the problem
_check_lock = threading.RLock()


def _mid_import(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False)


def _host_importing() -> bool:
    """Whether some mergekit module is executing right now (importing more could cycle)."""
    return any(
        (n == "mergekit" or n.startswith("mergekit.")) and _mid_import(n) for n in list(sys.modules)
    )


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes", "error")


def check_host(*, force: bool = False, load: bool = False) -> Dict[str, Optional[str]]:
    """Probe every internal not probed yet; warn (or, strict, raise) for each one missing.

    A probe runs once its modules are loaded: registration probes what
    mergekit has loaded by then, and the first planning call the rest (a
    merge has loaded them all). ``load`` imports what is missing first
    (``mergekit-drm-lora``, tests), unless a mergekit import is in progress;
    ``force`` probes everything again and implies ``load``.
    """
    if not force and len(_checked) == len(INTERNALS):
        return dict(_checked)  # the usual case: every validate_inputs call comes here
    with _check_lock:
        if force:
            _checked.clear()
        load = (load or force) and not _host_importing()
        found = []
        for internal in INTERNALS:
            if internal.name in _checked:
                continue
            problem = _run_probe(internal, load)
            if problem is _LATER:
                continue
            _checked[internal.name] = problem
            if problem is not None:
                found.append((internal, problem))
        if found:
            _report(found)
        return dict(_checked)


_LATER = object()


def _run_probe(internal: Internal, load: bool):
    """None (present), the problem, or _LATER (its modules are not loaded yet)."""
    for name in internal.modules:
        if _mid_import(name):
            return _LATER
        if name in sys.modules:
            continue
        if not load:
            return _LATER
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
                return f"module {name} is missing"
            return _LATER  # a dependency of it: mergekit itself cannot load, not ours to report
        except Exception:  # e.g. a warning turned into an error; the host's import will say
            return _LATER
    try:
        return internal.probe()
    except Exception as exc:  # an attribute that moved or changed type
        return f"{type(exc).__name__}: {exc}"


def _report(found: Sequence[Tuple[Internal, str]]) -> None:
    version = mergekit_version()
    lines = [
        f"{internal.feature} is off: {problem} (installed mergekit {version}; "
        f"mergekit-drm supports {SUPPORTED})"
        for internal, problem in found
    ]
    if strict():
        raise HostCompatibilityError(
            "mergekit-drm: " + "; ".join(lines) + f". Install a supported mergekit, or unset "
            f"{STRICT_ENV} to merge with these checks off."
        )
    for line in lines:
        message = (f"mergekit-drm: {line}. Install a supported mergekit, or set "
                   f"{STRICT_ENV}=1 to refuse merges without these checks.")
        warnings.warn(message, HostCompatibilityWarning, stacklevel=3)
        log.warning("%s", message)


def available(feature_internal: str) -> bool:
    """Whether the internal named ``feature_internal`` probed as present (unprobed: True)."""
    return _checked.get(feature_internal) is None


# ---------------------------------------------------------------- call stack


def _find_frame(match: Callable[[FrameType], bool], depth: int, skip: int = 0) -> Optional[FrameType]:
    """The first of ``depth`` frames for which ``match`` holds, searching up from
    the caller of this module's function after skipping ``skip`` frames."""
    frame = sys._getframe(2 + skip)
    for _ in range(depth):
        if frame is None:
            return None
        if match(frame):
            return frame
        frame = frame.f_back
    return None


def _caller_self(kind: type, depth: int) -> Optional[Any]:
    frame = _find_frame(lambda f: isinstance(f.f_locals.get("self"), kind), depth, skip=1)
    return None if frame is None else frame.f_locals["self"]


_RUN_MERGE = ("mergekit.merge", "run_merge")
_RUN_MERGE_DEPTH = 80  # run_merge is ~10-30 frames above a method's hooks


def current_run() -> Optional[Tuple[object, str]]:
    """(the run's identity object, its absolute output path), if ``run_merge`` is on the stack.

    The identity is ``run_merge``'s ``cfg_out``: created fresh by each call and
    alive until it returns, so it tells one run from the next.
    """
    frame = _find_frame(
        lambda f: (f.f_globals.get("__name__"), f.f_code.co_name) == _RUN_MERGE, _RUN_MERGE_DEPTH
    )
    if frame is None:
        return None
    run, out_path = frame.f_locals.get("cfg_out"), frame.f_locals.get("out_path")
    if run is None or not isinstance(out_path, (str, os.PathLike)):
        return None
    return run, os.path.abspath(os.fspath(out_path))


def planned_configuration() -> Optional[Any]:
    """The ``MergeConfiguration`` mergekit is planning, if a planner is on the stack.

    None outside ``MergePlanner`` (e.g. a method called directly), so callers
    treat the configuration as optional.
    """
    planner_type = _attr("mergekit.plan.MergePlanner") if "mergekit.plan" in sys.modules else None
    if planner_type is None:
        return None
    planner = _caller_self(planner_type, depth=12)
    return None if planner is None else getattr(planner, "config", None)


_SLICE_CALL = re.compile(r"\.slices\[\d+\]$")


def is_slice_call(group_name: Optional[str]) -> bool:
    """mergekit calls ``validate_inputs`` once per output slice while planning
    (group_name ``<module>.slices[<i>]``), then once per tensor task."""
    return group_name is not None and _SLICE_CALL.search(group_name) is not None


@dataclass(frozen=True)
class InputTensor:
    name: str
    aliases: Tuple[str, ...]
    optional: bool


@dataclass(frozen=True)
class PlannedTensor:
    """What mergekit planned for one output tensor: resolved parameters and inputs."""

    parameters: Mapping[str, Any]
    input_parameters: Mapping[Any, Mapping[str, Any]]
    inputs: Optional[Dict[Any, InputTensor]]  # model -> the tensor it reads


def planned_task() -> Optional[PlannedTensor]:
    """The tensor task whose validator is calling the method, if any.

    The per-tensor ``validate_inputs`` call comes from that task's own
    validator; its ``self`` holds each model's tensor name, aliases and
    optionality and the parameters resolved for this tensor.
    """
    task_type = (_attr("mergekit.merge_methods.task_adapter.ExecuteMergeMethodTask")
                 if "mergekit.merge_methods.task_adapter" in sys.modules else None)
    if task_type is None:
        return None
    task = _caller_self(task_type, depth=8)
    if task is None:
        return None
    return PlannedTensor(task.parameters, task.input_parameters, _task_inputs(task))


def _task_inputs(task: Any) -> Optional[Dict[Any, InputTensor]]:
    gather = getattr(task, "gather_tensors", None)
    while gather is not None and not hasattr(gather, "weight_info") and hasattr(gather, "gather_tensors"):
        gather = gather.gather_tensors
    weights = getattr(gather, "weight_info", None)
    if weights is None:
        return None
    return {
        model: InputTensor(
            info.name,
            tuple(info.aliases or ()) + tuple(getattr(info, "tied_names", None) or ()),
            bool(info.optional),
        )
        for model, info in weights.items()
    }


# ---------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class TensorIndex:
    base_path: str
    is_safetensors: bool
    tensor_paths: Mapping[str, str]  # tensor name -> shard file, relative to base_path


def _index(raw: Any) -> TensorIndex:
    return TensorIndex(raw.base_path, bool(raw.is_safetensors), raw.tensor_paths)


def model_index(model: Any) -> Optional[TensorIndex]:
    """Where each tensor of a mergekit ``ModelReference`` is stored (mergekit's own loader)."""
    try:
        from mergekit.io.tasks import LoaderCache

        return _index(LoaderCache().get(model).index)
    except Exception:  # not a ModelReference, or not loadable: nothing to check
        return None


def directory_index(path: str) -> TensorIndex:
    """The index of a local checkpoint directory, as mergekit reads it (raises if none)."""
    from mergekit.io.lazy_tensor_loader import ShardedTensorIndex

    return _index(ShardedTensorIndex.from_disk(path))


# ---------------------------------------------------------------- planner re-derivations (LoRA)


def weight_positions(config: Any) -> Optional[Dict[str, Tuple[float, Any]]]:
    """Each weight's gradient position t (and its ``WeightInfo``), exactly as
    mergekit's planner sets it; None for an architecture mergekit does not know."""
    from mergekit.architecture import arch_info_for_config
    from mergekit.architecture.base import ConfiguredModuleArchitecture

    arch = arch_info_for_config(config)
    if arch is None:
        return None
    out: Dict[str, Tuple[float, Any]] = {}

    def add(weight, t):
        for name in [weight.name] + list(weight.aliases or ()):
            out.setdefault(name, (t, weight))

    for module_def in arch.modules.values():
        module = ConfiguredModuleArchitecture(
            info=module_def.architecture,
            config=config,
            weight_prefix=module_def.weight_prefix,
        )
        for weight in module.pre_weights():
            add(weight, 0.0)
        layers = module.num_layers()
        for index in range(layers):
            t = index / (layers - 1) if layers > 1 else 1.0
            for weight in module.layer_weights(index=index):
                add(weight, t)
        for weight in module.post_weights():
            add(weight, 0.0)
    return out


class ParameterResolver:
    """Resolves a method's parameters for one tensor as mergekit's planner does,
    from a ``ConfigReader`` over the given models (one slice, as the planner
    builds for a ``models:`` configuration)."""

    def __init__(self, config: Any, models: Sequence[Tuple[Any, Any]]):
        """``models``: (ModelReference, its ``parameters:`` mapping) per input."""
        from mergekit.config import ConfigReader, InputSliceDefinition, OutputSliceDefinition

        sources = [
            InputSliceDefinition(model=model, layer_range=(0, 1), parameters=parameters)
            for model, parameters in models
        ]
        self._config = config
        self._reader = ConfigReader(
            config=config, t=0.0, slice_out=OutputSliceDefinition(sources=sources)
        )

    def resolve(self, spec: Any, tensor_name: str, inputs: Sequence[Any], t: float):
        """(shared values, model -> per-model values) for ``tensor_name`` at position ``t``."""
        from mergekit.parameter_resolver import resolve_parameters

        return resolve_parameters(
            spec,
            tensor_name=tensor_name,
            inputs={model: tensor_name for model in inputs},
            sources=self._reader.with_t(t).parameter_sources,
            base_model=self._config.base_model,
            t=t,
        )


# ---------------------------------------------------------------- method hooks


class CleansPartialOutput:
    """Mixin for our mergekit methods (before ``GroupMergeMethod`` in the bases).

    While planning: probe the host (once), check and snapshot the output
    directory. While executing: if the method raises (or Ctrl-C lands in
    it), remove what this run wrote, then re-raise. ``_execute`` is
    mergekit's private per-tensor entry point; ``check_host`` reports it
    if it is gone (this override is then never called).
    """

    def validate_inputs(self, *args, **kwargs):
        from mergekit_drm import output_guard

        check_host()
        if available(RUN_MERGE_LOCALS):
            current = current_run()
            if current is not None:
                output_guard.remember_output(*current)
        return super().validate_inputs(*args, **kwargs)

    def _execute(self, *args, **kwargs):
        try:
            return super()._execute(*args, **kwargs)
        except (Exception, KeyboardInterrupt) as exc:
            from mergekit_drm import output_guard

            current = current_run()
            if current is not None:
                output_guard.remove_partial_output(exc, *current)
            raise
