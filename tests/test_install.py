"""End to end: install the project into a fresh venv, then merge with plain
`mergekit-yaml` and with `mergekit.merge.run_merge`, never importing
mergekit_drm by hand, once from a regular wheel and once editable (`-e`).

The fresh venv gets its dependencies (torch, mergekit, ...) without
downloading them: a `.pth` in it appends a directory of symlinks to the test
interpreter's site-packages entries, minus everything this project installed
there. A path added by a `.pth` line is not itself scanned for `.pth` files,
so nothing of the test interpreter's own install of this project can leak in:
whatever registers `drm` in the fresh venv comes from the install under test.
The build backend is fetched by pip's build isolation, as for a user.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CARD_LINE = "[DRM](https://arxiv.org/abs/2505.23117)"
# What this project puts in site-packages (wheel or editable), left out of
# the dependency farm.
OURS = re.compile(
    r"^(mergekit_drm(\.pth|-[^/]*\.dist-info)?"
    r"|_editable_impl_mergekit_drm\.pth|__editable__.*mergekit_drm.*|__pycache__)$",
    re.I,
)


def _env():
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def dependency_farm(tmp_path_factory):
    import mergekit
    import torch
    import transformers

    farm = tmp_path_factory.mktemp("deps")
    site_dirs = []
    for module in (mergekit, torch, transformers, pytest):
        site_dir = Path(module.__file__).resolve().parents[1]
        if site_dir not in site_dirs:
            site_dirs.append(site_dir)
    for site_dir in site_dirs:
        for entry in site_dir.iterdir():
            link = farm / entry.name
            if not OURS.match(entry.name) and not link.exists():
                link.symlink_to(entry)
    return farm


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny Llama base and two fine-tunes (base plus small random deltas)."""
    import torch
    import transformers

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    paths = []
    for index, name in enumerate(["base", "ft0", "ft1"]):
        if index:
            model.load_state_dict(
                {k: v + 0.01 * torch.randn_like(v) for k, v in base.items()}
            )
        model.save_pretrained(root / name, safe_serialization=True)
        paths.append(str(root / name))
    config_file = root / "drm.yml"
    config_file.write_text(
        textwrap.dedent(
            f"""\
            merge_method: drm
            base_model: {paths[0]}
            models:
              - model: {paths[1]}
              - model: {paths[2]}
            dtype: float32
            """
        )
    )
    return config_file


@pytest.fixture(scope="module", params=["wheel", "editable"])
def fresh_venv(request, tmp_path_factory, dependency_farm):
    venv = tmp_path_factory.mktemp(f"venv-{request.param}")
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], venv)
    python = venv / "bin" / "python"
    site_dir = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
             venv).stdout.strip()
    )
    (site_dir / "zz_test_dependencies.pth").write_text(f"{dependency_farm}\n")

    editable = ["-e"] if request.param == "editable" else []
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", *editable, str(REPO)], venv)

    # The console script pip would have written had it installed mergekit here.
    script = Path(sys.executable).parent / "mergekit-yaml"
    body = script.read_text().split("\n", 1)[1]
    (venv / "bin" / "mergekit-yaml").write_text(f"#!{python}\n{body}")
    (venv / "bin" / "mergekit-yaml").chmod(0o755)
    return request.param, venv, site_dir


def test_hook_files_installed(fresh_venv):
    mode, venv, site_dir = fresh_venv
    assert (site_dir / "mergekit_drm.pth").read_text() == (REPO / "mergekit_drm.pth").read_text()
    out = _run(
        [str(venv / "bin" / "python"), "-c",
         "import sys; print('torch' in sys.modules, 'mergekit' in sys.modules, "
         "sys.modules['mergekit_drm._hook'].__file__)"],
        venv,
    ).stdout.split()
    assert out[:2] == ["False", "False"]
    # The hook loaded at start-up is the one of the install under test.
    expected_root = REPO if mode == "editable" else site_dir
    assert Path(out[2]) == expected_root / "mergekit_drm" / "_hook.py"


def test_mergekit_yaml(fresh_venv, tiny_models, tmp_path):
    mode, venv, site_dir = fresh_venv
    out = tmp_path / "out"
    _run(
        [str(venv / "bin" / "mergekit-yaml"), str(tiny_models), str(out),
         "--no-copy-tokenizer", "--quiet"],
        tmp_path,
    )
    assert (out / "model.safetensors").is_file()
    assert CARD_LINE in (out / "README.md").read_text()


def test_run_merge_api(fresh_venv, tiny_models, tmp_path):
    mode, venv, site_dir = fresh_venv
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import sys, yaml
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        text = open({str(tiny_models)!r}).read()
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)),
                  {str(out)!r}, options=MergeOptions(copy_tokenizer=False, quiet=True),
                  config_source=text)
        # Imported by the hook when mergekit loaded its method registry.
        print(sys.modules["mergekit_drm"].__file__)
        """
    )
    proc = _run([str(venv / "bin" / "python"), "-c", script], tmp_path)
    package_file = Path(proc.stdout.strip().splitlines()[-1])
    # The method came from the install under test, not from the test's own.
    expected_root = REPO if mode == "editable" else site_dir
    assert package_file == expected_root / "mergekit_drm" / "__init__.py"
    assert (out / "model.safetensors").is_file()
    assert CARD_LINE in (out / "README.md").read_text()
