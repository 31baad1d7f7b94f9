"""Each method's parameters, declared once: name, default, rule, scope, meaning, kernel argument.

One ``MethodOptions`` table per method (``DRM``, ``TSV_M``, ``ISO_C``,
``ISO_CTS``, ``MUDSC``; ``OPTIONS`` by name) is the only place a parameter is
declared. From it come

* the mergekit ``ParameterSpec``s (``parameter_specs``), whose validators
  convert and check a value and name the method and parameter when it is wrong;
* the keyword arguments of a kernel (``kernel_kwargs``), used by the mergekit
  adapters and by ``mergekit-drm-lora`` alike: a parameter with ``kernel``
  set reaches every kernel whose signature has that argument (``kernels``
  narrows it where two parameters feed one argument name of different kernels);
* the planning-time check of every value a YAML sets, naming parameter, place
  and model (``check_values``), before mergekit's own parsing;
* the README's parameter tables, which ``tests/test_options.py`` compares with
  these tables (name, scope, default), and the kernels' defaults, which it
  compares with the defaults here.

Adding a parameter is one ``Param`` here (plus the kernel argument it feeds).
Standard library at import; mergekit and pydantic load when specs are built.
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

from mergekit_drm.parameters import (
    ALPHA,
    AT_LEAST_ONE,
    COMMON_SPACE_FRACTION,
    COMPUTE_DTYPE,
    DENSITY,
    DIRECTION,
    FINITE,
    MUDSC_MODE,
    MUDSC_WEIGHT,
    NON_NEGATIVE,
    NONLINEAR_DENSITY,
    NORM_TARGET,
    POSITIVE,
    RANK_FRACTION,
    RANK_TOL,
    SVD,
    Rule,
    typed,
    validated,
)

# Scopes as the README states them. A per-model parameter is set per model
# (mergekit's NON_BASE, or INPUT for methods without a base); a global one
# once for the merge (filters and gradients may still vary it per tensor); a
# per-tensor one is meant to be varied by tensor with filters.
PER_MODEL = "per model"
GLOBAL = "global"
PER_TENSOR = "per tensor"
SCOPES = (PER_MODEL, GLOBAL, PER_TENSOR)


@dataclass(frozen=True)
class Param:
    """One parameter of one method."""

    name: str
    default: Any
    scope: str
    meaning: str
    rule: Optional[Rule] = None  # range or choices (parameters.py); None: any value of ``kind``
    kind: type = bool  # the value's type when there is no rule
    kernel: Optional[str] = None  # the kernel argument it becomes; None: the adapter uses it
    kernels: Optional[Tuple[str, ...]] = None  # only these kernels (by __name__) take it
    optional: bool = False  # None is allowed (and means "the method's own rule")
    one_value: str = ""  # set per model in mergekit, but must agree: why (for the message)
    adapter_resolves: bool = False  # the adapter computes the kernel value (e.g. a dtype)
    empty_is_none: bool = False  # "" reaches the kernel as None
    doc_default: Optional[str] = None  # the README's default, where it is not the value itself

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"{self.name}: scope must be one of {SCOPES}, got {self.scope!r}")

    @property
    def value_kind(self) -> type:
        return self.rule.kind if self.rule is not None else self.kind

    @property
    def set_per_model(self) -> bool:
        """Declared per model to mergekit (a per-model value, or one that must agree)."""
        return self.scope == PER_MODEL or bool(self.one_value)

    def documented_default(self) -> str:
        """The default as the README's tables write it."""
        if self.doc_default is not None:
            return self.doc_default
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        if isinstance(self.default, str):
            return f"`{self.default}`"
        return repr(self.default)

    def takes(self, kernel: Callable[..., Any]) -> bool:
        """Whether ``kernel`` has this parameter's argument (and may take it)."""
        if self.kernel is None:
            return False
        if self.kernels is not None and getattr(kernel, "__name__", "") not in self.kernels:
            return False
        return self.kernel in _arguments(kernel)

    def to_kernel(self, value: Any) -> Any:
        if self.empty_is_none and value == "":
            return None
        return value


@functools.lru_cache(maxsize=None)
def _arguments(kernel: Callable[..., Any]) -> frozenset:
    """A kernel's argument names (cached: asked for every merged tensor)."""
    return frozenset(inspect.signature(kernel).parameters)


@dataclass(frozen=True)
class MethodOptions:
    """A method's parameter table."""

    method: str
    params: Tuple[Param, ...]
    per_model_scope: str = "non_base"  # mergekit's ParameterScope value for per-model parameters

    def __post_init__(self):
        names = [p.name for p in self.params]
        if len(names) != len(set(names)):
            raise ValueError(f"{self.method}: a parameter is declared twice")

    def __getitem__(self, name: str) -> Param:
        for param in self.params:
            if param.name == name:
                return param
        raise KeyError(f"{name!r} is not {article(self.method)} {self.method} parameter")

    def names(self) -> Tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def defaults(self) -> Dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def validate(self, name: str, value: Any) -> Any:
        """One value, converted and checked; a ValueError names method and parameter."""
        param = self[name]
        return validated(self.method, name, value, param.rule, kind=param.value_kind, optional=param.optional)

    def parameter_specs(self, extra: Optional[Mapping[str, Callable[[Any], Any]]] = None) -> tuple:
        """mergekit ``ParameterSpec``s; ``extra`` adds a check to a parameter (e.g. a path exists)."""
        from mergekit.merge_methods.base import ParameterScope, ParameterSpec

        extra = dict(extra or {})
        unknown = set(extra) - set(self.names())
        if unknown:
            raise KeyError(f"extra checks for undeclared {self.method} parameters {sorted(unknown)}")
        specs = []
        for param in self.params:
            value_type = typed(
                self.method, param.name, param.rule, kind=param.value_kind,
                optional=param.optional, extra=extra.get(param.name),
            )
            scope = ParameterScope(self.per_model_scope) if param.set_per_model else ParameterScope.SHARED
            specs.append(ParameterSpec(param.name, value_type, scope, default=param.default, description=param.meaning))
        return tuple(specs)

    def one_value(self, name: str, values: Iterable[Any], where: str) -> Any:
        """The single value of a parameter that must agree over models; raises naming ``where``."""
        param = self[name]
        distinct = set(values)
        if len(distinct) > 1:
            raise ValueError(
                f"{param.one_value}, so `{name}` must be one value for {where}; got "
                f"{sorted(distinct)}. Set it once under `parameters:`."
            )
        return distinct.pop() if distinct else param.default

    def kernel_kwargs(
        self,
        values: Mapping[str, Any],
        kernel: Callable[..., Any],
        *,
        models: Optional[Sequence[Any]] = None,
        where: str = "<tensor>",
        skip: Iterable[str] = (),
        **resolved: Any,
    ) -> Dict[str, Any]:
        """The keyword arguments ``kernel`` takes from the resolved parameter ``values``.

        ``values``: global parameters by name, per-model ones as a mapping
        model -> value (as mergekit binds them); ``models``: the order of a
        per-model list. ``skip``: parameters the adapter applies itself (e.g.
        ``lambda`` after adding an elementwise path). ``resolved``: arguments
        the adapter computed (a dtype from the inputs); they win.
        """
        skip = set(skip)
        kwargs: Dict[str, Any] = {}
        for param in self.params:
            if param.name in skip or not param.takes(kernel) or param.kernel in resolved:
                continue
            if param.adapter_resolves:
                raise TypeError(
                    f"{self.method}: the adapter must resolve `{param.name}` for {kernel.__name__}"
                )
            value = values[param.name]
            if param.set_per_model:
                if models is None:
                    raise TypeError(f"{self.method}: per-model `{param.name}` needs the models' order")
                per_model = [value[model] for model in models]
                if param.one_value:
                    value = self.one_value(param.name, per_model, where)
                else:
                    value = per_model
            kwargs[param.kernel] = param.to_kernel(value)
        kwargs.update(resolved)
        return kwargs

    def check_values(self, config: Any) -> None:
        """Every value a merge configuration sets for this method, checked at planning.

        mergekit validates a value only when it resolves it per tensor, and its
        message names neither the parameter nor the model. Here each scalar,
        gradient point and filtered value is checked where the YAML sets it.
        """
        from mergekit_drm.checks import parameter_scopes

        declared = set(self.names())
        for where, _per_model, settings in parameter_scopes(config):
            for key, setting in settings.items():
                if key not in declared:
                    continue  # unknown names are reported by checks.parameter_name_problems
                for value in _setting_values(setting):
                    try:
                        self.validate(key, value)
                    except ValueError as exc:
                        raise ValueError(f"{exc} (set under {where})") from None


def _setting_values(setting: Any) -> Iterable[Any]:
    """Every scalar in a mergekit ``ParameterSetting`` (scalar, gradient, filters)."""
    if isinstance(setting, (list, tuple)):
        for item in setting:
            yield from _setting_values(item)
    elif hasattr(setting, "value") and hasattr(setting, "filter"):
        yield from _setting_values(setting.value)
    elif isinstance(setting, Mapping) and "value" in setting:
        yield from _setting_values(setting["value"])
    else:
        yield setting


def unknown_parameters_mode() -> str:
    """MERGEKIT_DRM_UNKNOWN_PARAMETERS: ``warn`` (default) or ``error``; anything else is refused
    (a typo such as ``eror`` must not quietly mean warn)."""
    from mergekit_drm.checks import UNKNOWN_PARAMETERS_ENV

    raw = os.environ.get(UNKNOWN_PARAMETERS_ENV, "")
    mode = raw.strip().lower() or "warn"
    if mode not in ("warn", "error"):
        raise ValueError(
            f"{UNKNOWN_PARAMETERS_ENV}={raw!r} is not a known setting: use warn (report unknown "
            "parameter names, the default) or error (refuse a configuration that has one)"
        )
    return mode


def article(word: str) -> str:
    """'an' before a vowel sound ("an iso_c parameter"), else 'a'."""
    return "an" if word[:1].lower() in "aeiou" else "a"


# ---------------------------------------------------------------- the tables

_WEIGHT_AFTER_ELECTION = "per-model coefficient, applied after sign election"
_COMPUTE_DTYPE = "auto = the inputs' precision, at least float32 (float64 checkpoints compute in float64)"
_SVD = "decomposition route: full SVD, float64 Gram eigendecomposition, or the cheaper (auto)"

DRM = MethodOptions(
    "drm",
    (
        Param("weight", 1.0, PER_MODEL, _WEIGHT_AFTER_ELECTION, FINITE, kernel="weights"),
        Param(
            "density", 0.2, GLOBAL, "fraction of renormalized coordinates kept (paper: drop rate 0.8)",
            DENSITY, kernel="density", kernels=("drm_merge_matrix", "drm_merge_lowrank"),
            one_value="drm prunes jointly over all models",
        ),
        Param(
            "direction", "vertical", GLOBAL, "vertical = DRM-V (shared input basis), horizontal = DRM-H",
            DIRECTION, kernel="direction",
        ),
        Param("rank_tol", 0.01, GLOBAL, "singular values <= rank_tol * sigma_max are dropped", RANK_TOL, kernel="rank_tol"),
        Param("lambda", 1.0, GLOBAL, "scale of the merged delta", FINITE, kernel="scale"),
        Param(
            "nonlinear_density", 1.0, PER_MODEL, "magnitude trim of each model's delta on the elementwise path",
            NONLINEAR_DENSITY, kernel="density", kernels=("elementwise_merge",),
        ),
        Param("renorm", True, GLOBAL, "renormalize each model's coordinates (ablation switch)", kernel="renorm"),
        Param("sign_election", True, GLOBAL, "TIES sign election by mass (ablation switch)", kernel="sign_election"),
        Param("disjoint", True, GLOBAL, "divide by the number of non-zero contributors", kernel="disjoint"),
        Param("decompose", True, PER_TENSOR, "false sends a tensor (use a filter) to the elementwise path"),
        Param("svd", "auto", GLOBAL, _SVD, SVD, kernel="svd"),
        Param("compute_dtype", "auto", GLOBAL, _COMPUTE_DTYPE, COMPUTE_DTYPE, kernel="compute_dtype", adapter_resolves=True),
        # Opt-in additions beyond the paper (drm/options.py); defaults = the paper.
        Param(
            "isotropic", False, GLOBAL,
            "flatten the merged matrix's singular values to their mean (Iso-C after DRM)", kernel="isotropic",
        ),
        Param(
            "norm_target", "none", GLOBAL,
            "rescale each merged delta to the mean task-vector norm, the norm of their sum, or the sum of their norms",
            NORM_TARGET, kernel="norm_target",
        ),
    ),
)


def _subspace(method: str, *extra: Param) -> MethodOptions:
    """TSV-M, Iso-C and Iso-CTS share five parameters (subspace_method.py) and add their own."""
    return MethodOptions(
        method,
        (
            Param("weight", 1.0, PER_MODEL, "per-model coefficient on the task vector, before the merge", FINITE, kernel="weights"),
            Param("lambda", 1.0, GLOBAL, "scale of the merged task vector (the papers' alpha)", FINITE, kernel="scale"),
            Param("decompose", True, PER_TENSOR, "false sends a tensor (use a filter) to the mean path"),
            Param("svd", "auto", GLOBAL, _SVD, SVD, kernel="svd"),
            Param(
                "compute_dtype", "auto", GLOBAL, "auto = the inputs' precision, at least float32 (as drm)",
                COMPUTE_DTYPE, kernel="compute_dtype", adapter_resolves=True,
            ),
        )
        + extra,
    )


TSV_M = _subspace(
    "tsv_m",
    Param(
        "rank_fraction", None, GLOBAL, "per-task kept rank as a fraction of min(rows, cols) (paper: 1/T)",
        RANK_FRACTION, kernel="rank_fraction", optional=True, doc_default="unset = 1/T",
    ),
)
ISO_C = _subspace("iso_c")
ISO_CTS = _subspace(
    "iso_cts",
    Param(
        "common_space_fraction", 0.8, GLOBAL, "common subspace size / min(rows, cols) (paper: 0.8)",
        COMMON_SPACE_FRACTION, kernel="common_space_fraction",
    ),
)

# mudsc's kernels are the alignment search (mudsc.solver.SolverOptions) and
# the calibration reader (mudsc.engine.CalibrationOptions); their fields are
# the kernel arguments.
MUDSC = MethodOptions(
    "mudsc",
    (
        Param("weight", 1.0, PER_MODEL, "per-model coefficient of the (aligned) average", MUDSC_WEIGHT, kernel="weights"),
        Param("alpha", 0.5, GLOBAL, "weight on weight-space similarity; 1 = data-free", ALPHA, kernel="alpha"),
        Param("mode", "align", GLOBAL, "align: permute, then average; zip: ZipIt-style merge/unmerge", MUDSC_MODE, kernel="mode"),
        Param("iterations", 100, GLOBAL, "coordinate-descent sweeps at most", AT_LEAST_ONE, kernel="iterations"),
        Param("patience", 5, GLOBAL, "non-improving sweeps before stopping", AT_LEAST_ONE, kernel="patience"),
        Param("seed", 0, GLOBAL, "order of the groups within a sweep", NON_NEGATIVE, kernel="seed"),
        Param(
            "calibration", "", GLOBAL, ".txt or .jsonl; empty = bundled English corpus", kind=str,
            kernel="path", empty_is_none=True, doc_default="bundled",
        ),
        Param("calibration_samples", 64, GLOBAL, "windows of tokens fed to every model", AT_LEAST_ONE, kernel="samples"),
        Param("calibration_seq_len", 128, GLOBAL, "tokens per window", AT_LEAST_ONE, kernel="seq_len"),
        Param("calibration_batch_size", 8, GLOBAL, "windows per forward pass", AT_LEAST_ONE, kernel="batch_size"),
        Param(
            "calibration_tokenizer", "", GLOBAL, "tokenizer path; empty = the first model's", kind=str,
            kernel="tokenizer", empty_is_none=True, doc_default="first model's",
        ),
        Param(
            "max_stats_gib", 4.0, GLOBAL, "activation statistics held at once; more passes if exceeded",
            POSITIVE, kernel="max_stats_gib",
        ),
        Param(
            "alignment", "", GLOBAL, "directory written by mergekit-mudsc-align; skips the search",
            kind=str, doc_default="none",
        ),
    ),
    per_model_scope="input",
)

OPTIONS: Dict[str, MethodOptions] = {o.method: o for o in (DRM, TSV_M, ISO_C, ISO_CTS, MUDSC)}
