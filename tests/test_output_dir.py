"""The output directory (issue 21, points 3 and 6).

A failing merge removes only the unfinished shards it wrote: a user's file and
another merge's finished model that appear during the merge survive
byte-for-byte; Ctrl-C cleans the same way and is re-raised. A directory that
already holds a model is refused at planning, unless
MERGEKIT_DRM_REPLACE_OUTPUT=1, which removes the old model's files (only those).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergekit_drm
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from mergekit_drm.checks import NonFiniteError
from mergekit_drm.drm.method import DRMMerge
from mergekit_drm.output_guard import REPLACE_ENV, OutputExistsError
from tests.tiny_models import build_finetunes

mergekit_drm.register()

LATE = "model.layers.1.mlp.down_proj.weight"  # merged after shards were written


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("outdir")
    base, ft1, ft2 = build_finetunes("llama", str(root), count=2)
    bad = str(root / "bad-ft")
    shutil.copytree(ft2, bad)
    state = load_file(f"{bad}/model.safetensors")
    state[LATE][1, 2] = float("nan")
    save_file(state, f"{bad}/model.safetensors", metadata={"format": "pt"})
    finished = root / "finished"  # another merge's complete, sharded model
    _run(_config(base, [ft1, ft2]), finished)
    return base, ft1, ft2, bad, finished


def _config(base, fts):
    return {
        "merge_method": "drm",
        "base_model": base,
        "models": [{"model": p} for p in fts],
        "parameters": {"density": 0.3},
        "dtype": "float32",
    }


def _run(config, out):
    run_merge(
        MergeConfiguration.model_validate(config), str(out),
        MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, out_shard_size=4096),
    )


def _contents(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _during_execution(monkeypatch, action):
    """Run ``action(tensor name)`` at each drm merge_group call (execution, after planning)."""
    original = DRMMerge.merge_group

    def merge_group(self, group, /, **params):
        action(group.metadata.name)
        return original(self, group, **params)

    monkeypatch.setattr(DRMMerge, "merge_group", merge_group)


def test_failure_spares_files_that_appeared_during_the_merge(models, tmp_path, monkeypatch):
    base, ft1, _, bad, finished = models
    out = tmp_path / "out"
    assert len(list(finished.glob("model-*-of-*.safetensors"))) > 1  # a sharded finished model
    placed = {}

    def place(_name):
        if not placed:  # once, after planning, before the NaN is read
            out.mkdir(exist_ok=True)
            for path in finished.iterdir():
                shutil.copy(path, out / path.name)
            (out / "notes.txt").write_text("mine")
            placed.update(_contents(out))

    _during_execution(monkeypatch, place)
    with pytest.raises(NonFiniteError) as info:
        _run(_config(base, [ft1, bad]), out)
    notes = " ".join(info.value.__notes__)
    removed = int(notes.split("so the ")[1].split(" unfinished shard")[0])
    assert removed >= 1, notes  # our shards were written, and removed
    assert "no other file there was touched" in notes
    assert _contents(out) == placed  # byte-for-byte, nothing added, nothing lost


def test_ctrl_c_during_execution_cleans_and_reraises(models, tmp_path, monkeypatch):
    base, ft1, ft2, _, _ = models
    out = tmp_path / "out"

    def interrupt(name):
        if name == LATE:
            raise KeyboardInterrupt

    _during_execution(monkeypatch, interrupt)
    with pytest.raises(KeyboardInterrupt) as info:
        _run(_config(base, [ft1, ft2]), out)
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "unfinished shard file(s)" in notes and "which it had created" in notes, notes
    assert not out.exists()


def test_a_directory_holding_a_model_is_refused_at_planning(models, tmp_path, monkeypatch):
    base, ft1, ft2, _, finished = models
    monkeypatch.delenv(REPLACE_ENV, raising=False)
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    (out / "notes.txt").write_text("mine")
    before = _contents(out)
    merged = []
    _during_execution(monkeypatch, merged.append)
    with pytest.raises(OutputExistsError) as info:
        _run(_config(base, [ft1, ft2]), out)
    message = str(info.value)
    assert str(out) in message and "config.json" in message and REPLACE_ENV in message
    assert merged == []  # refused while planning: nothing was merged
    assert _contents(out) == before


def test_replace_output_removes_only_the_old_model(models, tmp_path, monkeypatch):
    base, ft1, ft2, _, finished = models
    out = tmp_path / "out"
    out.mkdir()
    old_shards = [f"model-{k:05d}-of-00099.safetensors" for k in (1, 2, 99)]
    for name in old_shards:
        save_file({LATE: torch.full((4,), 7.0)}, str(out / name))
    (out / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (out / "config.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    (out / "data.csv").write_text("1,2")
    monkeypatch.setenv(REPLACE_ENV, "1")
    _run(_config(base, [ft1, ft2]), out)
    names = {p.name for p in out.iterdir()}
    assert not names & set(old_shards)  # no stale weights next to the new ones
    assert (out / "notes.txt").read_text() == "mine" and (out / "data.csv").read_text() == "1,2"
    # The new model is the same as the one merged into an empty directory.
    assert {n for n in names if n.endswith(".safetensors")} == \
        {p.name for p in finished.glob("*.safetensors")}
    for path in finished.glob("*.safetensors"):
        fresh, replaced = load_file(str(path)), load_file(str(out / path.name))
        assert fresh.keys() == replaced.keys()
        assert all(torch.equal(fresh[k], replaced[k]) for k in fresh)


def test_replace_output_refuses_an_unknown_value(models, tmp_path, monkeypatch):
    base, ft1, ft2, _, finished = models
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    monkeypatch.setenv(REPLACE_ENV, "maybe")
    with pytest.raises(ValueError, match=REPLACE_ENV):
        _run(_config(base, [ft1, ft2]), out)
    assert {p.name for p in out.iterdir()} == {p.name for p in finished.iterdir()}
