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


def _hub_ids(data) -> set:
    """Model references that are Hub ids (org/name), not local paths."""
    refs = [data.get("base_model")] + [
        m.get("model") if isinstance(m, dict) else m for m in data.get("models") or []
    ]
    ids = set()
    for ref in filter(None, refs):
        for part in str(ref).split("+"):
            if not part.startswith((".", "/", "~")) and part.count("/") == 1:
                ids.add(part)
    return ids


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_hub_examples_say_so_in_their_header(path):
    """A config that downloads from the Hub says so (and the size) before its first key."""
    text = path.read_text()
    header = text.split("\nmerge_method:")[0]
    if _hub_ids(yaml.safe_load(text)):
        assert "NEEDS THE HUGGING FACE HUB" in header, path.name
        assert "GB" in header, f"{path.name}: the header should state the download size"
    else:
        assert "NEEDS THE HUGGING FACE HUB" not in header, path.name


def test_hub_id_detection():
    assert _hub_ids({"base_model": "meta-llama/Llama-3.1-8B", "models": [{"model": "./x"}]}) == {
        "meta-llama/Llama-3.1-8B"
    }
    assert _hub_ids({"models": [{"model": "./drm-demo/ft"}, "/abs/path"]}) == set()
    assert _hub_ids({"models": [{"model": "org/base+./adapters/a"}]}) == {"org/base"}


def test_tiny_demo_example_names_the_models_the_demo_writes():
    """The offline example points at the folders mergekit-drm-demo creates."""
    import inspect

    from mergekit_drm import demo

    data = yaml.safe_load((EXAMPLES[0].parent / "tiny-demo-drm.yml").read_text())
    source = inspect.getsource(demo)
    tasks = [m["model"].rsplit("ft-", 1)[1] for m in data["models"]]
    assert f"tasks = {tasks!r}".replace("'", '"') in source.replace("'", '"')
    assert data["base_model"] == "./drm-demo/base"
    assert demo.MERGES["drm-recommended"][1] == data["parameters"]
