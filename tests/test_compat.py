"""compat.py: the host boundary with mergekit (issue 21, point 1).

A changed mergekit is simulated with monkeypatch (a renamed ``run_merge``
local, a missing private method, a missing class); each must produce a
warning naming the feature that is off, the internal and the mergekit
version, and an error under MERGEKIT_DRM_STRICT_HOST=1. A grep keeps every
use of mergekit internals inside compat.py.
"""

from __future__ import annotations

import ast
import os
import re
import sys
import warnings
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import mergekit_drm
from mergekit_drm import compat

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mergekit_drm"


@pytest.fixture
def fresh_probe():
    """Probe results as they were before the test (the host is restored by monkeypatch)."""
    saved = dict(compat._checked)
    yield
    compat._checked.clear()
    compat._checked.update(saved)


def _declared() -> Requirement:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (spec,) = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "mergekit"]
    return spec


def test_installed_mergekit_is_in_the_declared_range_and_passes_the_probe(fresh_probe, monkeypatch):
    spec = _declared()
    assert spec.specifier, "pyproject.toml must bound mergekit's version"
    assert Version(compat.mergekit_version()) in spec.specifier
    assert spec.specifier == Requirement(compat.SUPPORTED).specifier
    # An upper bound: a later mergekit must be re-checked before it is allowed.
    assert not spec.specifier.contains("99.0")
    monkeypatch.setenv(compat.STRICT_ENV, "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error", compat.HostCompatibilityWarning)
        results = compat.check_host(force=True)
    assert set(results) == {internal.name for internal in compat.INTERNALS}
    assert all(problem is None for problem in results.values()), results


def _warned(feature_words: str, internal_words: str):
    with pytest.warns(compat.HostCompatibilityWarning) as record:
        compat.check_host(force=True)
    text = " ".join(str(w.message) for w in record)
    assert feature_words in text and internal_words in text, text
    assert f"installed mergekit {compat.mergekit_version()}" in text, text
    return text


def _strict_error(monkeypatch, *words):
    monkeypatch.setenv(compat.STRICT_ENV, "1")
    with pytest.raises(compat.HostCompatibilityError) as info:
        compat.check_host(force=True)
    for word in words:
        assert word in str(info.value)
    assert compat.STRICT_ENV in str(info.value)


def test_renamed_run_merge_local_turns_the_output_guard_off_loudly(fresh_probe, monkeypatch):
    import mergekit.merge

    def run_merge(merge_config, out_path, options, config_source=None):  # cfg_out renamed
        out_config = None
        return out_config

    monkeypatch.setattr(mergekit.merge, "run_merge", run_merge)
    _warned("cleanup of partial output", "no local variable cfg_out")
    assert not compat.available(compat.RUN_MERGE_LOCALS)
    _strict_error(monkeypatch, "cleanup of partial output", "cfg_out")


def test_missing_private_execute_is_reported(fresh_probe, monkeypatch):
    from mergekit.merge_methods.base import GroupMergeMethod, MergeMethod

    monkeypatch.delattr(GroupMergeMethod, "_execute")
    monkeypatch.delattr(MergeMethod, "_execute")
    _warned("cleanup of partial output", "GroupMergeMethod has no method _execute")
    _strict_error(monkeypatch, "_execute")


def test_missing_planner_class_turns_parameter_name_checks_off_loudly(fresh_probe, monkeypatch):
    import mergekit.plan

    monkeypatch.delattr(mergekit.plan, "MergePlanner")
    _warned("parameter-name checks", "mergekit.plan.MergePlanner is missing")
    assert compat.planned_configuration() is None  # the feature is off, not crashing
    _strict_error(monkeypatch, "parameter-name checks", "MergePlanner")


def test_changed_slice_naming_is_reported(fresh_probe, monkeypatch):
    import mergekit.plan

    class Planner(mergekit.plan.MergePlanner):
        def normalize_config(self):  # validates slices under another group name
            for index, _ in enumerate(self.config.slices or ()):
                self._method.validate_inputs([], None, group_name=f"slice {index}")

    monkeypatch.setattr(mergekit.plan, "MergePlanner", Planner)
    _warned("parameter-name checks", "`<module>.slices[<i>]`")


def test_missing_task_field_is_reported(fresh_probe, monkeypatch):
    import mergekit.io.tasks

    class Gather:  # GatherTensors without weight_info
        dtype: str

    monkeypatch.setattr(mergekit.io.tasks, "GatherTensors", Gather)
    _warned("per-tensor planning checks", "GatherTensors has no field weight_info")


def test_registration_probes_once_and_strict_refuses(fresh_probe, monkeypatch):
    import mergekit.merge

    monkeypatch.setattr(mergekit.merge, "run_merge", lambda *a, **k: None)
    compat._checked.clear()
    with pytest.warns(compat.HostCompatibilityWarning, match="cleanup of partial output"):
        mergekit_drm.register()
    with warnings.catch_warnings():  # probed once: no second warning
        warnings.simplefilter("error", compat.HostCompatibilityWarning)
        mergekit_drm.register()
    compat._checked.clear()
    monkeypatch.setenv(compat.STRICT_ENV, "1")
    with pytest.raises(compat.HostCompatibilityError, match="run_merge"):
        mergekit_drm.register()


def test_probe_waits_while_mergekit_is_mid_import(fresh_probe, monkeypatch):
    """Under mergekit-yaml, registration runs while mergekit.merge is still
    executing: its probe must wait for planning instead of reporting a
    half-built module."""
    import mergekit.merge

    compat._checked.clear()
    monkeypatch.setattr(mergekit.merge.__spec__, "_initializing", True, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", compat.HostCompatibilityWarning)
        results = compat.check_host()
    assert compat.RUN_MERGE_LOCALS not in results
    monkeypatch.setattr(mergekit.merge.__spec__, "_initializing", False)
    assert compat.check_host()[compat.RUN_MERGE_LOCALS] is None


# ---------------------------------------------------------------- the boundary holds

# What any module may import from mergekit (compat.py's docstring says why).
PUBLIC = {
    "mergekit": {"merge_methods"},
    "mergekit.merge_methods": None,  # any public name
    "mergekit.merge_methods.base": None,
    "mergekit.config": None,
    "mergekit.common": {"ModelReference"},
    "mergekit.merge": {"run_merge", "MergeOptions"},  # entry points, as a user calls them
    "mergekit.options": {"MergeOptions"},
}
NOT_PUBLIC_NAMES = {"ConfigReader"}
STACK = re.compile(r"\b(_getframe|f_locals|f_back|f_globals|co_varnames|co_names)\b|\._execute\b|def _execute\b")


def _violations(text: str) -> list:
    """(line, what) for each use of a mergekit internal in a module's source."""
    found = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if STACK.search(line)]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.module and (
            node.module == "mergekit" or node.module.startswith("mergekit.")
        ):
            allowed = PUBLIC.get(node.module, set())
            for alias in node.names:
                name = alias.name
                if (allowed is not None and name not in allowed) or name.startswith("_") \
                        or name in NOT_PUBLIC_NAMES:
                    found.append((node.lineno, f"from {node.module} import {name}"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mergekit.") and alias.name not in PUBLIC:
                    found.append((node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and re.fullmatch(r"mergekit(\.\w+)+", node.value) and node.value not in PUBLIC:
            found.append((node.lineno, f"looks up {node.value!r}"))
    return found


def test_only_compat_touches_mergekit_internals():
    problems = [
        f"{path.relative_to(ROOT)}:{line}: {what}"
        for path in sorted(PACKAGE.rglob("*.py")) if path.name != "compat.py"
        for line, what in _violations(path.read_text())
    ]
    assert not problems, "mergekit internals outside compat.py:\n" + "\n".join(problems)


@pytest.mark.parametrize("sample", [
    "import sys\nframe = sys._getframe(1)\n",
    "x = frame.f_locals['cfg_out']\n",
    "from mergekit.plan import MergePlanner\n",
    "from mergekit.config import ConfigReader\n",
    "import mergekit.io.tasks\n",
    "import sys\nplan = sys.modules.get('mergekit.plan')\n",
    "class M:\n    def _execute(self):\n        return super()._execute()\n",
])
def test_the_boundary_check_catches_each_kind_of_use(sample):
    assert _violations(sample), sample


def test_a_merge_probes_what_registration_left_for_planning(fresh_probe, tmp_path):
    """Probes left for later (mergekit.merge mid-import at registration) run
    at the merge's first planning call: after one merge every guard's
    internal has been probed."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from tests.tiny_models import build_finetunes

    base, ft = build_finetunes("llama", str(tmp_path), count=1)
    compat._checked.clear()
    run_merge(
        MergeConfiguration.model_validate({
            "merge_method": "drm", "base_model": base, "models": [{"model": ft}], "dtype": "float32",
        }),
        str(tmp_path / "out"), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True),
    )
    probed = {name for name, problem in compat._checked.items() if problem is None}
    assert probed >= {i.name for i in compat.INTERNALS if i.feature != compat.LORA}, compat._checked
