"""Every parameter rule declared once: its range or choices, its meaning, its message.

A rule checks one value and raises ``ValueError`` naming the parameter, the
allowed values, what the parameter means and the value given:
``drm parameter `density` must be in (0, 1] (...); got 1.5``. The mergekit
methods turn a rule into a validated type (``typed``), so a bad YAML fails
while mergekit reads the configuration, before anything is written; the
kernels call ``check`` with plain arguments (no ``owner``: the message names
the argument). Methods that share a parameter share its rule here.

Standard library only at import (kernels use it; pydantic loads in ``typed``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple, Union


@dataclass(frozen=True)
class Interval:
    """low <= value <= high, each end open or closed; ``high`` may be infinite."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    meaning: str = ""
    kind: type = float

    def allowed(self) -> str:
        number = "an integer" if self.kind is int else "a finite number"
        if math.isinf(self.high) and math.isinf(self.low):
            return f"must be {number}"
        if math.isinf(self.high):
            return f"must be {number} {'>' if self.low_open else '>='} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"must be in {left}{self.low:g}, {self.high:g}{right}"

    def admits(self, value) -> bool:
        # NaN fails every comparison; inf would pass an open-ended range, but a
        # parameter of inf makes every merged value inf or NaN.
        try:
            if not math.isfinite(value):
                return False
        except TypeError:
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


@dataclass(frozen=True)
class Choice:
    """One of ``options``."""

    options: Tuple[str, ...]
    meaning: str = ""
    kind: type = str

    def allowed(self) -> str:
        return f"must be one of {', '.join(self.options)}"

    def admits(self, value) -> bool:
        return value in self.options


Rule = Union[Interval, Choice]


def check(rule: Rule, name: str, value: Any, owner: str = "") -> Any:
    """``value`` if the rule admits it, else a ValueError with the rule's message.

    ``owner`` is the method for a YAML parameter ("drm": "drm parameter
    `density` ..."), empty for a kernel argument ("density ...").
    """
    if rule.admits(value):
        return value
    subject = f"{owner} parameter `{name}`" if owner else name
    meaning = f" ({rule.meaning})" if rule.meaning else ""
    raise ValueError(f"{subject} {rule.allowed()}{meaning}; got {value!r}")


KIND_TEXT = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def convert(kind: type, name: str, value: Any, owner: str = "") -> Any:
    """``value`` as ``kind`` (pydantic's lax rules, as mergekit: "0.5" -> 0.5,
    "true" -> True), else a ValueError naming the parameter and the type."""
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(kind).validate_python(value)
    except ValidationError:
        subject = f"{owner} parameter `{name}`" if owner else name
        raise ValueError(f"{subject} must be {KIND_TEXT.get(kind, kind.__name__)}; got {value!r}") from None


def validated(
    owner: str, name: str, value: Any, rule: Optional[Rule] = None, *, kind: Optional[type] = None,
    optional: bool = False,
) -> Any:
    """``value`` converted to the parameter's type and checked by its rule."""
    if value is None and optional:
        return value
    if isinstance(rule, Choice):
        return check(rule, name, value, owner)
    value = convert(kind or rule.kind, name, value, owner)
    return check(rule, name, value, owner) if rule is not None else value


def typed(
    owner: str, name: str, rule: Optional[Rule] = None, *, kind: Optional[type] = None,
    optional: bool = False, extra: Optional[Callable[[Any], Any]] = None,
):
    """The rule as a pydantic-validated type for a mergekit ``ParameterSpec``.

    The validator converts and checks itself, so a wrong type is reported like
    a wrong value, naming the method and the parameter (pydantic's own message
    names neither). ``optional``: None passes too (the parameter's default
    means "the method's own rule", e.g. TSV-M's rank share 1/T). ``extra``
    runs on the converted value (e.g. a file must exist).
    """
    from pydantic import PlainValidator
    from typing_extensions import Annotated

    def validate(value):
        value = validated(owner, name, value, rule, kind=kind, optional=optional)
        return extra(value) if extra is not None and value is not None else value

    base = kind or rule.kind
    return Annotated[Optional[base] if optional else base, PlainValidator(validate)]


def check_weights(weights, n_models: int) -> None:
    """Per-model weights (a sequence or a tensor) are one finite number per model.

    A NaN or inf weight would make the merged tensor NaN/inf everywhere (or
    end in an unnamed ``LinAlgError`` inside an SVD), so it is refused here.
    """
    shape = tuple(weights.shape) if hasattr(weights, "shape") else (len(weights),)
    if shape != (n_models,):
        raise ValueError(f"expected {n_models} weights, got {shape}")
    values = weights.tolist() if hasattr(weights, "tolist") else list(weights)
    bad = [(index, value) for index, value in enumerate(values) if not math.isfinite(value)]
    if bad:
        listed = ", ".join(f"weights[{index}] = {value}" for index, value in bad)
        raise ValueError(f"weights must be finite numbers; got {listed}")


# ----------------------------------------------------------------- the rules

RANK_TOL_MEANING = (
    "singular values below rank_tol * sigma_max are dropped, so 0 keeps every "
    "direction above rounding, 0.01 (default) the directions above 1% of the largest, "
    "and 1 or more would drop every direction: it would drop them all and return the "
    "base model unchanged"
)

# Any finite number: per-model `weight`, the merged delta's scale `lambda`.
FINITE = Interval(-math.inf, math.inf)

# drm (the dense kernel, the LoRA kernel, the mergekit method, mergekit-drm-lora)
DENSITY = Interval(0, 1, low_open=True, meaning="fraction of joint-space coordinates kept, jointly over all models")
NONLINEAR_DENSITY = Interval(
    0, 1, low_open=True, meaning="fraction of each model's entries kept on the elementwise path"
)
RANK_TOL = Interval(0, 1, high_open=True, meaning=RANK_TOL_MEANING)
DIRECTION = Choice(("vertical", "horizontal"))
NORM_TARGET = Choice(("none", "mean", "sum", "total"))

# Parameters a method no longer has, and why: a YAML that still sets one is told
# so (checks.parameter_name_problems) instead of offered the nearest other name.
DID_NOT_WIN = "it did not improve merges (see benchmarks/results/drm_options.md)"
REMOVED = {"drm": {"whiten": DID_NOT_WIN, "rank_budget": DID_NOT_WIN}}

# drm, tsv_m, iso_c, iso_cts
SVD = Choice(("auto", "full", "gram", "lowrank"))
COMPUTE_DTYPE = Choice(("auto", "float32", "float64"))

# tsv_m, iso_cts
RANK_FRACTION = Interval(
    0, 1, low_open=True, meaning="share of each matrix's rank kept per task; unset = 1 / number of models"
)
COMMON_SPACE_FRACTION = Interval(0, 1, meaning="share of each matrix's rank given to the common subspace")

# mudsc
ALPHA = Interval(0, 1, meaning="1 = weight space only, 0 = activations only")
MUDSC_MODE = Choice(("align", "zip"))
AT_LEAST_ONE = Interval(1, kind=int)
NON_NEGATIVE = Interval(0, kind=int)
POSITIVE = Interval(0, low_open=True)
MUDSC_WEIGHT = Interval(0, meaning="each model's share of the (aligned) average; weights must not be negative")
