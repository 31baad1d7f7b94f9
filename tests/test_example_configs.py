"""Every shipped example YAML parses as a mergekit config and uses only
parameters its method declares (mergekit silently ignores misspelt ones)."""

from pathlib import Path

import pytest
import yaml

from mergekit import merge_methods
from mergekit.config import MergeConfiguration

import mergekit_drm

mergekit_drm.register()  # in-process merges, with or without the .pth hook

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "example_configs").glob("*.yml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_is_valid(path):
    data = yaml.safe_load(path.read_text())
    config = MergeConfiguration.model_validate(data)
    method = merge_methods.get(config.merge_method)
    known = {p.name for p in method.spec.parameters}
    used = set(data.get("parameters") or {})
    for model in data.get("models") or []:
        used |= set((model.get("parameters") or {}) if isinstance(model, dict) else {})
    assert used <= known, f"{path.name}: unknown parameter(s) {sorted(used - known)}"
    for name, value in (data.get("parameters") or {}).items():
        spec = next(p for p in method.spec.parameters if p.name == name)
        spec._adapter.validate_python(value)


def test_there_are_examples_for_both_methods():
    methods = {yaml.safe_load(p.read_text())["merge_method"] for p in EXAMPLES}
    assert {"drm", "mudsc"} <= methods
