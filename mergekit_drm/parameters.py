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
from typing import Any, Optional, Tuple, Union


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
        if math.isinf(self.high):
            return f"must be {'>' if self.low_open else '>='} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"must be in {left}{self.low:g}, {self.high:g}{right}"

    def admits(self, value) -> bool:
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


def typed(owner: str, name: str, rule: Rule, *, optional: bool = False):
    """The rule as a pydantic-validated type for a mergekit ``ParameterSpec``.

    ``optional``: None passes too (the parameter's default means "the
    method's own rule", e.g. TSV-M's rank share 1/T).
    """
    from pydantic import AfterValidator
    from typing_extensions import Annotated

    def validate(value):
        if value is None and optional:
            return value
        return check(rule, name, value, owner)

    kind = Optional[rule.kind] if optional else rule.kind
    return Annotated[kind, AfterValidator(validate)]


def check_weights(weights, n_models: int) -> None:
    """Per-model weights (a sequence or a tensor) are one number per model."""
    shape = tuple(weights.shape) if hasattr(weights, "shape") else (len(weights),)
    if shape != (n_models,):
        raise ValueError(f"expected {n_models} weights, got {shape}")


# ----------------------------------------------------------------- the rules

RANK_TOL_MEANING = (
    "singular values below rank_tol * sigma_max are dropped, so 0 keeps every "
    "direction above rounding, 0.01 (default) the directions above 1% of the largest, "
    "and 1 or more would drop every direction: it would drop them all and return the "
    "base model unchanged"
)

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
SVD = Choice(("auto", "full", "gram"))
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
