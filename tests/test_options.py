"""The per-method parameter tables (method_options.py) drive specs, kernels, LoRA route and README."""

from __future__ import annotations

import inspect
import math
import os
import re

import pytest
import torch
from mergekit.config import MergeConfiguration

from mergekit_drm.checks import UNKNOWN_PARAMETERS_ENV, check_parameter_names, parameter_name_problems
from mergekit_drm.drm.kernel import drm_merge_matrix, elementwise_merge
from mergekit_drm.iso.kernel import iso_c_merge_matrix, iso_cts_merge_matrix
from mergekit_drm.lora.lowrank import LoraFactors, drm_merge_lowrank
from mergekit_drm.lora.lowrank_subspace import iso_c_merge_lowrank, iso_cts_merge_lowrank, tsv_merge_lowrank
from mergekit_drm.lora.methods import METHODS as LORA_METHODS
from mergekit_drm.method_options import GLOBAL, OPTIONS, PER_MODEL, unknown_parameters_mode
from mergekit_drm.mudsc.alignment import merge_tensor
from mergekit_drm.mudsc.engine import CalibrationOptions
from mergekit_drm.mudsc.solver import SolverOptions
from mergekit_drm.overflow import OutputOverflowError, checked_cast, plan_output_dtype
from mergekit_drm.registration import METHODS, load_method
from mergekit_drm.tsv_m.kernel import tsv_merge_matrix

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")

KERNELS = {
    "drm": (drm_merge_matrix, elementwise_merge, drm_merge_lowrank),
    "tsv_m": (tsv_merge_matrix, tsv_merge_lowrank),
    "iso_c": (iso_c_merge_matrix, iso_c_merge_lowrank),
    "iso_cts": (iso_cts_merge_matrix, iso_cts_merge_lowrank),
    "mudsc": (SolverOptions, CalibrationOptions, merge_tensor),
}
# Kernel arguments that are data, not parameters.
NOT_PARAMETERS = {"deltas", "adapters", "shape", "device", "base", "spec", "tensors", "alignment"}


# ------------------------------------------------------------------ README tables


def _section_table(text: str, heading: str):
    """Rows (list of cell lists) and header of the first table after ``heading``."""
    start = text.index(heading)
    lines = text[start:].splitlines()[1:]
    rows = []
    for line in lines:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    header, _rule, *body = rows
    return header, body


def _names(cell: str):
    return re.findall(r"`([a-z_]+)`", cell)


def _readme_rows(section: str):
    text = open(README, encoding="utf-8").read()
    heading = {
        "drm": "## DRM: Decom-Renorm-Merge",
        "subspace": "## TSV-M, Iso-C and Iso-CTS",
        "mudsc": "## MuDSC: merging",
    }[section]
    text = text[text.index(heading):]
    header, body = _section_table(text, "### Parameters")
    column = {name: index for index, name in enumerate(header)}
    rows = {}
    for cells in body:
        names = _names(cells[column["parameter"]])
        defaults = [d.strip() for d in cells[column["default"]].split(",")] if len(names) > 1 else [cells[column["default"]]]
        assert len(defaults) == len(names), cells
        scope = re.sub(r"\s*\(.*\)", "", cells[column["scope"]]).strip()
        methods = cells[column["methods"]] if "methods" in column else "all"
        for name, default in zip(names, defaults):
            rows[name] = (scope, default, methods)
    return rows


@pytest.mark.parametrize("method", ["drm", "tsv_m", "iso_c", "iso_cts", "mudsc"])
def test_readme_parameter_table_matches_the_options(method):
    section = method if method in ("drm", "mudsc") else "subspace"
    rows = _readme_rows(section)
    if section == "subspace":
        rows = {n: r for n, r in rows.items() if r[2] == "all" or f"`{method}`" in r[2]}
    options = OPTIONS[method]
    assert set(rows) == set(options.names()), (method, set(rows) ^ set(options.names()))
    for param in options.params:
        scope, default, _ = rows[param.name]
        assert scope == param.scope, (method, param.name, scope)
        assert default == param.documented_default(), (method, param.name, default)


# ------------------------------------------------------------------ kernels


@pytest.mark.parametrize("method", sorted(KERNELS))
def test_kernel_defaults_equal_the_options_defaults(method):
    """Every kernel argument a parameter feeds defaults to the parameter's default."""
    options = OPTIONS[method]
    compared = 0
    for kernel in KERNELS[method]:
        signature = inspect.signature(kernel).parameters
        for param in options.params:
            if not param.takes(kernel) or param.adapter_resolves or param.name == "weight":
                continue  # weights default to None = 1 each; compute dtype is resolved
            default = signature[param.kernel].default
            if default is inspect.Parameter.empty:
                continue
            assert default == param.to_kernel(param.default), (kernel.__name__, param.name, default)
            compared += 1
    assert compared >= 2


@pytest.mark.parametrize("method", sorted(KERNELS))
def test_every_kernel_argument_is_fed_by_exactly_one_parameter(method):
    """Mapping complete both ways: no parameter names a missing argument, no
    argument of a kernel is left without its parameter."""
    options = OPTIONS[method]
    for param in options.params:
        if param.kernel is not None:
            assert any(param.takes(k) for k in KERNELS[method]), (method, param.name, param.kernel)
    for kernel in KERNELS[method]:
        for argument in inspect.signature(kernel).parameters:
            if argument in NOT_PARAMETERS or (method, argument) == ("mudsc", "compute_dtype"):
                continue  # mudsc has no compute_dtype parameter: merge_tensor's default is used
            feeding = [p.name for p in options.params if p.takes(kernel) and p.kernel == argument]
            assert len(feeding) == 1, (kernel.__name__, argument, feeding)


def _planted(param):
    """A valid non-default value for the parameter."""
    if param.rule is not None and hasattr(param.rule, "options"):
        return next(o for o in param.rule.options if o != param.default)
    if param.value_kind is bool:
        return not param.default
    if param.value_kind is str:
        return ""
    if param.value_kind is int:
        return param.default + 3
    if param.name in ("weight", "lambda"):
        return 2.5
    return 0.37 if param.default != 0.37 else 0.5


@pytest.mark.parametrize("method", ["drm", "tsv_m", "iso_c", "iso_cts"])
def test_lora_route_passes_each_parameter_to_its_kernel_argument(method):
    """A planted value of every kernel-mapped parameter reaches the LoRA kernel's keyword."""
    options = OPTIONS[method]
    merge = LORA_METHODS[method].merge
    shared = {p.name: _planted(p) for p in options.params if not p.set_per_model}
    shared["compute_dtype"] = "float64"
    per_model = [{p.name: _planted(p) for p in options.params if p.set_per_model}] * 2
    kwargs = LORA_METHODS[method].options(shared, per_model, "m.weight")
    assert kwargs["compute_dtype"] is torch.float64
    for param in options.params:
        if param.name == "weight" or param.adapter_resolves or not param.takes(merge):
            continue
        expected = per_model[0][param.name] if param.set_per_model else shared[param.name]
        assert kwargs[param.kernel] == expected, (param.name, kwargs)
    if method == "drm":
        assert kwargs["scale"] == 2.5  # lambda is the factors' scale on this route


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_registered_specs_are_built_from_the_options(method):
    spec = load_method(METHODS[method]).spec
    options = OPTIONS[method]
    assert [p.name for p in spec.parameters] == list(options.names())
    for spec_param, param in zip(spec.parameters, options.params):
        assert spec_param.default == param.default
        assert (spec_param.scope.value != "shared") == param.set_per_model
        assert spec_param.validate(param.default) == param.default


def test_one_value_parameter_refuses_disagreeing_models():
    values = {"density": {"a": 0.3, "b": 0.5}}
    with pytest.raises(ValueError, match=r"must be one value for layer.q.*\[0.3, 0.5\]"):
        OPTIONS["drm"].kernel_kwargs(values, drm_merge_matrix, models=["a", "b"], where="layer.q",
                                     skip=("weight", "lambda", "direction", "rank_tol", "renorm",
                                           "sign_election", "disjoint", "svd", "isotropic", "norm_target"),
                                     compute_dtype=torch.float32)


# ------------------------------------------------------------------ refusals name what and where


@pytest.mark.parametrize(
    "method, name, value, says",
    [
        ("drm", "density", "abc", "must be a number"),
        ("drm", "weight", "heavy", "must be a number"),
        ("drm", "decompose", "maybe", "must be true or false"),
        ("drm", "weight", math.nan, "must be a finite number"),
        ("drm", "lambda", math.inf, "must be a finite number"),
        ("iso_c", "weight", math.nan, "must be a finite number"),
        ("tsv_m", "weight", math.inf, "must be a finite number"),
        ("tsv_m", "rank_fraction", math.nan, "must be in (0, 1]"),
        ("iso_cts", "common_space_fraction", math.inf, "must be in [0, 1]"),
        ("mudsc", "alpha", math.nan, "must be in [0, 1]"),
        ("mudsc", "max_stats_gib", math.inf, "must be a finite number > 0"),
        ("mudsc", "weight", -1.0, "must not be negative"),
        ("mudsc", "iterations", 2.5, "must be an integer"),
    ],
)
def test_spec_validation_names_method_and_parameter(method, name, value, says):
    spec = next(p for p in load_method(METHODS[method]).spec.parameters if p.name == name)
    with pytest.raises(ValueError) as info:
        spec.validate(value)
    message = str(info.value)
    assert f"{method} parameter `{name}`" in message and says in message, message


def _merge_config(method, per_model=None, **params):
    models = [{"model": "/models/ft-a", "parameters": per_model or {}}, {"model": "/models/ft-b"}]
    config = {"merge_method": method, "models": models, "parameters": params}
    if method != "mudsc":
        config["base_model"] = "/models/base"
    return MergeConfiguration.model_validate(config)


@pytest.mark.parametrize(
    "method, per_model, params, needles",
    [
        ("drm", {"weight": "heavy"}, {}, ["`weight`", "/models/ft-a", "must be a number"]),
        ("drm", {}, {"density": "abc"}, ["`density`", "under parameters", "must be a number"]),
        ("drm", {}, {"decompose": [{"filter": "mlp", "value": "maybe"}, {"value": True}]}, ["`decompose`", "true or false"]),
        ("drm", {}, {"lambda": [1.0, math.inf]}, ["`lambda`", "finite"]),
        ("iso_c", {"weight": math.nan}, {}, ["iso_c parameter `weight`", "/models/ft-a"]),
        ("tsv_m", {"weight": math.inf}, {}, ["tsv_m parameter `weight`", "/models/ft-a"]),
        ("mudsc", {"weight": -0.5}, {}, ["mudsc parameter `weight`", "not be negative", "/models/ft-a"]),
    ],
)
def test_planning_check_names_parameter_and_model(method, per_model, params, needles, monkeypatch):
    monkeypatch.delenv(UNKNOWN_PARAMETERS_ENV, raising=False)
    config = _merge_config(method, per_model, **params)
    with pytest.raises(ValueError) as info:
        check_parameter_names(config, load_method(METHODS[method]).spec)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_valid_values_pass_the_planning_check(monkeypatch):
    monkeypatch.delenv(UNKNOWN_PARAMETERS_ENV, raising=False)
    config = _merge_config("drm", {"weight": 0.7, "density": "0.3"}, decompose=[{"filter": "mlp", "value": False}, {"value": True}], svd="gram")
    check_parameter_names(config, load_method(METHODS["drm"]).spec)


@pytest.mark.parametrize("value", ["eror", "off", "1"])
def test_unknown_parameters_switch_refuses_an_unknown_setting(value, monkeypatch):
    monkeypatch.setenv(UNKNOWN_PARAMETERS_ENV, value)
    with pytest.raises(ValueError, match=r"use warn .* or error"):
        unknown_parameters_mode()
    with pytest.raises(ValueError, match=UNKNOWN_PARAMETERS_ENV):
        check_parameter_names(_merge_config("drm"), load_method(METHODS["drm"]).spec)


@pytest.mark.parametrize("value, mode", [("", "warn"), ("warn", "warn"), (" ERROR ", "error")])
def test_unknown_parameters_switch_accepts_warn_and_error(value, mode, monkeypatch):
    monkeypatch.setenv(UNKNOWN_PARAMETERS_ENV, value)
    assert unknown_parameters_mode() == mode


def test_unknown_name_message_uses_an_before_a_vowel():
    config = _merge_config("iso_c", densty=0.2)
    (problem,) = parameter_name_problems(config, load_method(METHODS["iso_c"]).spec)
    assert "is not an iso_c parameter" in problem
    (problem,) = parameter_name_problems(_merge_config("drm", densty=0.2), load_method(METHODS["drm"]).spec)
    assert "is not a drm parameter" in problem


@pytest.mark.parametrize(
    "kernel",
    [
        lambda w: iso_c_merge_matrix([torch.randn(6, 5), torch.randn(6, 5)], w),
        lambda w: iso_cts_merge_matrix([torch.randn(6, 5), torch.randn(6, 5)], w),
        lambda w: tsv_merge_matrix([torch.randn(6, 5), torch.randn(6, 5)], w),
        lambda w: drm_merge_matrix(torch.randn(2, 6, 5), w),
        lambda w: iso_c_merge_lowrank(
            [LoraFactors(torch.randn(6, 2), torch.randn(2, 5)), LoraFactors(torch.randn(6, 2), torch.randn(2, 5))],
            w, shape=(6, 5),
        ),
    ],
)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_kernels_refuse_non_finite_weights_by_name(kernel, bad):
    """Before: NaN/inf weights ended in an unnamed LinAlgError or a NaN merge."""
    with pytest.raises(ValueError, match=r"weights must be finite.*weights\[1\]"):
        kernel([1.0, bad])


# ------------------------------------------------------------------ output overflow


def test_checked_cast_returns_the_cast_when_finite():
    merged = torch.randn(4, 3, dtype=torch.float64)
    out = checked_cast(merged, torch.float16, method="drm", tensor_name="w")
    assert out.dtype is torch.float16 and torch.equal(out, merged.to(torch.float16))


def test_checked_cast_names_the_dtype_that_overflowed():
    merged = torch.tensor([[1.0, 7.0e4], [-2.0, 3.0]])  # float16's largest is 65504
    with pytest.raises(OutputOverflowError) as info:
        checked_cast(merged, torch.float16, method="tsv_m", tensor_name="layer.q", params={"lambda": 1.0})
    message = str(info.value)
    assert "layer.q" in message and "float16" in message and "7e+04" in message
    assert "dtype: bfloat16" in message and "dtype: float32" in message


def test_checked_cast_names_lambda_when_the_merge_itself_overflowed():
    delta = torch.tensor([1.0, -2.0])
    merged = delta * 1e39 + 0.5  # float32: inf, as drm's merge_group computes it
    with pytest.raises(OutputOverflowError) as info:
        checked_cast(merged, torch.bfloat16, method="drm", tensor_name="layer.k", params={"lambda": 1e39})
    message = str(info.value)
    assert "layer.k" in message and "lambda 1e+39" in message and "smaller `lambda`" in message


def test_checked_cast_covers_the_out_dtype_mergekit_writes():
    """mergekit returns float32 here and casts to `out_dtype: float16` when writing."""
    merged = torch.tensor([1.0, -7.0e4])
    plan_output_dtype("iso_c", "float16")
    try:
        with pytest.raises(OutputOverflowError, match=r"out_dtype: float16.*Use `out_dtype: bfloat16`"):
            checked_cast(merged, torch.float32, method="iso_c", tensor_name="layer.v")
        small = torch.tensor([1.0, -6.0e4])
        assert torch.equal(checked_cast(small, torch.float32, method="iso_c", tensor_name="layer.v"), small)
    finally:
        plan_output_dtype("iso_c", None)
    assert torch.equal(checked_cast(merged, torch.float32, method="iso_c", tensor_name="layer.v"), merged)
