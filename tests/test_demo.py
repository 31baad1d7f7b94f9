"""mergekit-drm-demo's pieces that need no training: tasks, YAMLs, the 'kept' score."""

import pytest
import torch
import yaml

from mergekit_drm import demo


def test_tasks_answers():
    digits = torch.tensor([[3, 1, 4, 1, 5, 9]])
    assert demo._answer("reverse", digits).tolist() == [[9, 5, 1, 4, 1, 3]]
    assert demo._answer("sort", digits).tolist() == [[1, 1, 3, 4, 5, 9]]
    assert demo._answer("swap", digits).tolist() == [[1, 3, 1, 4, 9, 5]]
    assert demo._answer("copy", digits).tolist() == digits.tolist()
    tokens, labels = demo.make_batch("swap", 5, torch.Generator().manual_seed(0))
    # only the answer is scored: BOS, task, 6 digits, SEP are masked
    assert (labels[:, : 2 + demo.LENGTH + 1] == -100).all()
    assert torch.equal(tokens[:, -demo.LENGTH:], demo._answer("swap", tokens[:, 2:2 + demo.LENGTH]))


def test_kept_score():
    base, own = [0.5, 0.2], [0.9, 0.6]
    assert demo.kept(own, base, own) == pytest.approx(1.0)
    assert demo.kept(base, base, own) == pytest.approx(0.0)
    # half of one gain, a quarter below the base on the other: (0.5 - 0.25) / 2
    assert demo.kept([0.7, 0.1], base, own) == pytest.approx(0.125)


def test_recommended_setting_yaml(tmp_path):
    method, params = demo.MERGES["drm-recommended"]
    cfg = demo.write_config(str(tmp_path / "c.yml"), method, params, "/b", ["/f1", "/f2"])
    assert yaml.safe_load((tmp_path / "c.yml").read_text()) == cfg
    assert cfg["merge_method"] == "drm" and cfg["parameters"] == {"isotropic": True, "norm_target": "total"}
    assert [m["parameters"] for m in cfg["models"]] == [{"weight": 1.0}] * 2
    assert demo.MERGES["iso_c"] == ("iso_c", {"lambda": 2.0})
