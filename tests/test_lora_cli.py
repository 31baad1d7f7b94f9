"""End to end with real PEFT adapters: `mergekit-drm-lora` and mergekit's own
`base+adapter` route.

Adapters are built offline with PEFT on tiny models (tests/tiny_models.py),
with random A and B (PEFT initialises B to zero), different ranks, alphas,
rsLoRA, rank/alpha patterns and different target-module sets, so some deltas
are exactly zero for some models. References:

* the DRM kernel (``drm_merge_matrix``) on the deltas PEFT itself folds
  (``get_delta_weight``), times ``lambda``;
* route 1: ``mergekit`` with ``model: base+adapter`` and ``merge_method: drm``
  (``--lora-merge-cache``), whose merged checkpoint must equal the base with
  the merged adapter applied, weights and logits.

Precision: float64 models with ``compute_dtype: float64`` agree to 1e-8
(relative Frobenius error of each merged delta); float32 to 1e-5.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys

import peft
import pytest
import torch
import transformers
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import mergekit_drm
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from mergekit_drm.architectures import matrix_layout
from mergekit_drm.drm.kernel import drm_merge_matrix
from mergekit_drm.lora.cli import main
from tests.tiny_models import CONFIGS, build_base

mergekit_drm.register()  # in-process merges, with or without the .pth hook


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices gain nothing from BLAS threads, and on a busy 2-core
    machine two threads stall each other (10x and more); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TOL = {torch.float64: 1e-8, torch.float32: 1e-5}

# name -> LoraConfig keyword arguments. Different ranks, alphas, rsLoRA,
# patterns, and target sets (a4 only touches layer 1), so several modules get
# an exactly-zero delta from some adapters.
LLAMA_ADAPTERS = {
    "a1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "a2": dict(r=8, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"]),
    "a3": dict(
        r=2, lora_alpha=4, target_modules=["q_proj", "gate_proj", "v_proj"],
        rank_pattern={"model.layers.0.self_attn.q_proj": 6}, alpha_pattern={"gate_proj": 3},
    ),
    "a4": dict(r=3, lora_alpha=5, target_modules=["o_proj", "down_proj"], layers_to_transform=[1]),
}


def _load_base(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path)


def make_adapter(base_path, out, seed, scale=0.1, **lora_kwargs):
    """A PEFT adapter with random (non-zero) A and B, saved as PEFT saves it."""
    model = _load_base(base_path)
    config_cls = lora_kwargs.pop("config_cls", peft.LoraConfig)
    pm = peft.get_peft_model(model, config_cls(**lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in pm.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float64)
                param.copy_((noise * scale).to(param.dtype))
    pm.save_pretrained(out)
    return out


def build_set(root, arch="llama", dtype=torch.float32, adapters=None):
    """Base (in ``dtype``) and adapters under ``root``; returns (base, {name: path})."""
    base = os.path.join(root, f"{arch}-base")
    model = build_base(arch, base)
    if dtype != torch.float32:
        model.to(dtype).save_pretrained(base)
    paths = {}
    for seed, (name, kwargs) in enumerate((adapters or LLAMA_ADAPTERS).items()):
        paths[name] = make_adapter(base, os.path.join(root, name), seed=seed + 1, **dict(kwargs))
    return base, paths


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    return build_set(str(tmp_path_factory.mktemp("llama64")), dtype=torch.float64)


@pytest.fixture(scope="module")
def llama32(tmp_path_factory):
    return build_set(str(tmp_path_factory.mktemp("llama32")), dtype=torch.float32)


def yaml_config(base, adapters, weights, params, dtype="float32", plus=True):
    return {
        "merge_method": "drm",
        "base_model": base,
        "models": [
            {"model": f"{base}+{path}" if plus else path, "parameters": {"weight": w}}
            for path, w in zip(adapters, weights)
        ],
        "parameters": params,
        "dtype": dtype,
    }


def run_cli(tmp_path, config, *args, name="merged", expect_ok=True):
    cfg = tmp_path / f"{name}.yml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    out = tmp_path / name
    result = CliRunner().invoke(main, [str(cfg), str(out), *args])
    if expect_ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return out, result


@functools.lru_cache(maxsize=None)
def peft_deltas(base, adapter):
    """{module: delta} as PEFT folds it (scaling from PEFT's own config handling)."""
    model = peft.PeftModel.from_pretrained(_load_base(base), adapter)
    out = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            out[name] = module.get_delta_weight("default").detach().clone()
    return out


def applied_state(base, adapter):
    model = peft.PeftModel.from_pretrained(_load_base(base), adapter)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def kernel_expectation(base, adapters, weights, params, compute_dtype):
    """lambda * drm_merge_matrix of the folded deltas, per targeted module."""
    folded = [peft_deltas(base, a) for a in adapters]
    modules = sorted(set().union(*folded))
    shapes = {m: next(f[m].shape for f in folded if m in f) for m in modules}
    expected = {}
    for module in modules:
        deltas = [f.get(module, torch.zeros(shapes[module], dtype=torch.float64)).double() for f in folded]
        merged = drm_merge_matrix(
            deltas, weights,
            direction=params.get("direction", "vertical"),
            density=params.get("density", 0.2),
            rank_tol=params.get("rank_tol", 0.01),
            compute_dtype=compute_dtype,
        )
        expected[module] = params.get("lambda", 1.0) * merged.double()
    return expected


def rel(x, ref):
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def check_applied(base, out, expected, tol):
    """Base + merged adapter = base + expected delta; nothing else changes."""
    base_state = load_file(os.path.join(base, "model.safetensors"))
    applied = applied_state(base, str(out))
    worst = 0.0
    for name, tensor in applied.items():
        module = name[: -len(".weight")]
        if module in expected:
            err = rel(tensor.double() - base_state[name].double(), expected[module])
            worst = max(worst, err)
            assert err < tol, f"{module}: relative error {err:.2e}"
        elif name in base_state:
            assert torch.equal(tensor, base_state[name]), f"{name} changed"
    return worst


# ---------------------------------------------------------------------------
# Route 2 (the CLI) against the kernel on PEFT's folded deltas
# ---------------------------------------------------------------------------

GRID = [
    ("vertical", dict(density=0.2), (1.0, 1.0, 1.0, 1.0)),
    ("vertical", dict(density=0.5, **{"lambda": 1.5}), (1.0, 0.5, 2.0, 0.7)),
    ("horizontal", dict(density=0.1), (0.3, 1.0, 1.0, 1.2)),
    ("horizontal", dict(density=0.9, rank_tol=0.0), (1.0, 2.0, 0.5, 1.0)),
]


@pytest.mark.parametrize("case", range(len(GRID)))
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_cli_adapter_equals_kernel_on_folded_deltas(tmp_path, llama64, llama32, case, precision):
    base, paths = llama64 if precision == "float64" else llama32
    dtype = getattr(torch, precision)
    direction, params, weights = GRID[case]
    params = dict(params, direction=direction, compute_dtype=precision)
    adapters = list(paths.values())
    out, _ = run_cli(tmp_path, yaml_config(base, adapters, weights, params, dtype=precision))
    expected = kernel_expectation(base, adapters, weights, params, dtype)
    check_applied(base, out, expected, TOL[dtype])
    config = json.loads((out / "adapter_config.json").read_text())
    # scaling is 1 for every module: alpha equals the rank everywhere
    assert config["lora_alpha"] == config["r"] and not config["use_rslora"]
    assert config["alpha_pattern"] == config["rank_pattern"]
    state = load_file(str(out / "adapter_model.safetensors"))
    assert all(t.dtype == dtype for t in state.values())
    targeted = {m for a in adapters for m in peft_deltas(base, a)}
    assert {k.split(".lora_")[0][len("base_model.model."):] for k in state} == targeted


def test_plain_adapter_paths_and_gradients(tmp_path, llama64):
    """Models may be plain adapter paths; filters and gradients resolve per matrix
    exactly as in the full-model route (checked against route 1 below)."""
    base, paths = llama64
    adapters = list(paths.values())
    params = {"density": [0.15, 0.6], "compute_dtype": "float64"}
    config = yaml_config(base, adapters, [1.0] * 4, params, dtype="float64", plus=False)
    config["models"][1]["parameters"]["weight"] = [{"filter": "mlp", "value": 0.25}, {"value": 1.5}]
    out, _ = run_cli(tmp_path, config)
    folded = [peft_deltas(base, a) for a in adapters]
    applied = applied_state(base, str(out))
    base_state = load_file(os.path.join(base, "model.safetensors"))
    for module in sorted(set().union(*folded)):
        layer = int(module.split(".")[2])
        density = 0.15 + (0.6 - 0.15) * layer  # two layers: t = 0, 1
        weights = [1.0, 0.25 if ".mlp." in module else 1.5, 1.0, 1.0]
        shape = next(f[module].shape for f in folded if module in f)
        deltas = [f.get(module, torch.zeros(shape, dtype=torch.float64)) for f in folded]
        ref = drm_merge_matrix(deltas, weights, density=density, compute_dtype=torch.float64)
        name = module + ".weight"
        assert rel(applied[name] - base_state[name], ref) < 1e-8


# ---------------------------------------------------------------------------
# Route 1 (mergekit base+adapter) against route 2
# ---------------------------------------------------------------------------


def run_route1(tmp_path, config, name="route1"):
    out = str(tmp_path / name)
    run_merge(
        MergeConfiguration.model_validate(config),
        out,
        MergeOptions(
            copy_tokenizer=False, write_model_card=False, quiet=True,
            lora_merge_cache=str(tmp_path / f"{name}-lora-cache"),
        ),
    )
    return out


def assert_route1_equal(base, route1, out, tol, same_names=True):
    """Base + the CLI adapter equals route 1's checkpoint tensor by tensor (relative
    error < tol where route 1 moved a tensor, bit-equal elsewhere); the moved deltas.
    ``same_names=False`` where the two name sets may differ (GPT-2's tied head)."""
    base_state = load_file(os.path.join(base, "model.safetensors"))
    full = load_file(os.path.join(route1, "model.safetensors"))
    applied = applied_state(base, str(out))
    if same_names:
        assert set(full) == set(applied)
    moved = {}
    for name, tensor in full.items():
        delta = tensor.double() - base_state[name].double()
        if float(delta.norm()) == 0:
            if name in applied:
                assert torch.equal(applied[name], base_state[name]), name
            continue
        moved[name] = delta
        assert rel(applied[name].double() - base_state[name].double(), delta) < tol, name
    return moved


def _logits(model):
    ids = torch.tensor([[1, 5, 7, 9, 11, 2, 40, 3]])
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(
    "precision, params",
    [
        ("float64", {"direction": "vertical", "density": [0.15, 0.6], "lambda": 1.3}),
        ("float32", {"direction": "horizontal", "density": 0.3}),
    ],
)
def test_route1_mergekit_equals_merged_adapter(tmp_path, llama64, llama32, precision, params):
    base, paths = llama64 if precision == "float64" else llama32
    params = dict(params, compute_dtype=precision)
    config = yaml_config(base, list(paths.values()), [1.0, 0.6, 1.4, 1.0], params, dtype=precision)
    config["models"][1]["parameters"]["weight"] = [{"filter": "mlp", "value": 0.25}, {"value": 0.6}]
    route1 = run_route1(tmp_path, config)
    out, _ = run_cli(tmp_path, config)
    tol = TOL[getattr(torch, precision)]

    moved = assert_route1_equal(base, route1, out, tol)
    assert len(moved) == 14  # 7 matrices x 2 layers are targeted by some adapter

    # Logits of the base with the (unmerged) adapter vs the route-1 checkpoint.
    adapted = peft.PeftModel.from_pretrained(_load_base(base), str(out))
    reference = transformers.AutoModelForCausalLM.from_pretrained(route1)
    assert rel(_logits(adapted), _logits(reference)) < 10 * tol


FUSED_ADAPTERS = {
    "phi3": {
        "f1": dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"]),
        "f2": dict(r=6, lora_alpha=6, target_modules=["qkv_proj", "o_proj", "down_proj"]),
    },
    "gpt2": {
        "g1": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
        "g2": dict(r=3, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    },
}


@pytest.mark.parametrize("method", ["drm", "tsv_m"])
@pytest.mark.parametrize("arch", ["phi3", "gpt2"])
def test_route1_fused_and_conv1d(tmp_path, arch, method):
    """Fused projections (Phi-3 qkv/gate_up, GPT-2 c_attn) are merged part by
    part and GPT-2 Conv1D is transposed in route 1; the adapter must agree."""
    base, paths = build_set(str(tmp_path), arch=arch, dtype=torch.float64, adapters=FUSED_ADAPTERS[arch])
    params = {"compute_dtype": "float64"}
    if method == "drm":
        params.update(direction="vertical", density=0.3)
    config = yaml_config(base, list(paths.values()), [1.0, 0.8], params, dtype="float64")
    config["merge_method"] = method
    route1 = run_route1(tmp_path, config)
    out, _ = run_cli(tmp_path, config)
    moved = assert_route1_equal(base, route1, out, 1e-8, same_names=False)
    fused = [name for name, delta in moved.items()
             if matrix_layout(name, arch, CONFIGS[arch](), tuple(delta.shape)).parts is not None]
    assert len(fused) >= 2


# ---------------------------------------------------------------------------
# Fixed rank, card, output directory, entry point
# ---------------------------------------------------------------------------


def test_fixed_rank_truncates_and_reports(tmp_path, llama64):
    base, paths = llama64
    adapters = list(paths.values())
    params = {"density": 0.4, "compute_dtype": "float64"}
    config = yaml_config(base, adapters, [1.0] * 4, params, dtype="float64")
    exact, _ = run_cli(tmp_path, config, name="exact")
    cut, result = run_cli(tmp_path, config, "--rank", "5", name="cut")
    assert "Truncation to rank 5" in result.output
    cfg = json.loads((cut / "adapter_config.json").read_text())
    assert cfg["r"] == 5 and cfg["lora_alpha"] == 5 and not cfg["rank_pattern"]
    assert all(
        t.shape[0 if k.endswith("lora_A.weight") else 1] == 5
        for k, t in load_file(str(cut / "adapter_model.safetensors")).items()
    )
    base_state = load_file(os.path.join(base, "model.safetensors"))
    full, trunc = applied_state(base, str(exact)), applied_state(base, str(cut))
    cut_any = False
    for name in full:
        delta = full[name] - base_state[name]
        if float(delta.norm()) == 0:
            continue
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        best = (u[:, :5] * s[:5]) @ vh[:5]
        assert rel(trunc[name] - base_state[name], best) < 1e-8, name
        cut_any |= bool(s[5] > 1e-10 * s[0])
    assert cut_any
    assert "Truncated to rank 5" in (cut / "README.md").read_text()


def test_model_card_and_saved_config(tmp_path, llama32):
    base, paths = llama32
    config = yaml_config(base, list(paths.values()), [1.0] * 4, {"density": 0.3})
    out, _ = run_cli(tmp_path, config)
    card = (out / "README.md").read_text()
    assert "[DRM](https://arxiv.org/abs/2505.23117)" in card
    for path in paths.values():
        assert path in card
    assert "biases, norms" in card.lower().replace("\n", " ")
    assert yaml.safe_load((out / "mergekit_config.yml").read_text()) == config
    assert "library_name: peft" in card


def test_existing_output_needs_force(tmp_path, llama32):
    base, paths = llama32
    config = yaml_config(base, list(paths.values())[:2], [1.0, 1.0], {"density": 0.3})
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    _, result = run_cli(tmp_path, config, expect_ok=False)
    assert result.exit_code != 0 and "--force" in result.output
    assert sorted(os.listdir(out)) == ["keep.txt"]
    run_cli(tmp_path, config, "--force")
    assert (out / "keep.txt").read_text() == "user data"
    assert (out / "adapter_model.safetensors").exists()
    # an empty existing directory is fine without --force
    empty = tmp_path / "empty"
    empty.mkdir()
    run_cli(tmp_path, config, name="empty")


@pytest.mark.slow
def test_console_entry_point_subprocess(tmp_path, llama32):
    base, paths = llama32
    config = yaml_config(base, list(paths.values()), [1.0] * 4, {"density": 0.3})
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(config))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-m", "mergekit_drm.lora.cli", str(cfg), str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = peft.PeftModel.from_pretrained(_load_base(base), str(tmp_path / "o"))
    assert torch.isfinite(_logits(model)).all()


# ---------------------------------------------------------------------------
# Errors, all before anything is written
# ---------------------------------------------------------------------------


def _other_base(root):
    path = os.path.join(root, "other-base")
    torch.manual_seed(7)
    config = CONFIGS["llama"]()
    config.hidden_size, config.intermediate_size = 48, 64
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def _bad_inputs(root, base, good):
    """name -> (models list for the YAML, extra CLI args, expected message)."""
    cases = {}

    def adapter(name, **kwargs):
        return make_adapter(base, os.path.join(root, name), seed=50, **kwargs)

    other = _other_base(root)
    foreign = make_adapter(other, os.path.join(root, "foreign"), seed=3, r=2, lora_alpha=2, target_modules=["q_proj"])
    cases["different_base_name"] = ([good, foreign], [], "different base models")
    cases["different_base_shapes"] = ([good, foreign], ["--allow-base-mismatch"], "different base model")
    cases["dora"] = ([good, adapter("dora", r=2, lora_alpha=2, target_modules=["q_proj"], use_dora=True)], [], "DoRA")
    cases["ia3"] = (
        [good, adapter("ia3", config_cls=peft.IA3Config, target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])],
        [], "only LoRA",
    )
    cases["embedding"] = ([good, adapter("emb", r=2, lora_alpha=2, target_modules=["embed_tokens"])], [], "Embedding LoRA")
    cases["modules_to_save"] = (
        [good, adapter("mts", r=2, lora_alpha=2, target_modules=["q_proj"], modules_to_save=["lm_head"])],
        [], "modules_to_save",
    )
    head = adapter("head", r=2, lora_alpha=2, target_modules=["lm_head"])
    # PEFT also saves the output layer's own weight next to its LoRA; without
    # it the adapter is a plain LoRA on a vocabulary matrix.
    state = load_file(os.path.join(head, "adapter_model.safetensors"))
    state = {k: v for k, v in state.items() if "lora_" in k}
    save_file(state, os.path.join(head, "adapter_model.safetensors"))
    cases["lm_head"] = ([good, head], [], "vocabulary matrix")
    cases["head_with_weights"] = (
        [good, adapter("head2", r=2, lora_alpha=2, target_modules=["lm_head"])], [], "not LoRA A/B weights",
    )
    no_weights = os.path.join(root, "no-weights")
    shutil.copytree(good, no_weights)
    os.remove(os.path.join(no_weights, "adapter_model.safetensors"))
    cases["missing_weights"] = ([good, no_weights], [], "no adapter weights")
    no_config = os.path.join(root, "no-config")
    shutil.copytree(good, no_config)
    os.remove(os.path.join(no_config, "adapter_config.json"))
    cases["missing_config"] = ([good, no_config], [], "adapter_config.json is missing")
    cases["missing_dir"] = ([good, os.path.join(root, "nowhere")], [], "does not exist")
    bad_rank = os.path.join(root, "bad-rank")
    shutil.copytree(good, bad_rank)
    state = load_file(os.path.join(bad_rank, "adapter_model.safetensors"))
    key = next(k for k in state if k.endswith("lora_A.weight"))
    state[key] = state[key][:1]
    save_file(state, os.path.join(bad_rank, "adapter_model.safetensors"))
    cases["inconsistent_factors"] = ([good, bad_rank], [], "different ranks")
    cases["full_model"] = ([good, ("full", base)], [], "full model")
    truncated = os.path.join(root, "truncated")
    shutil.copytree(good, truncated)
    weights = os.path.join(truncated, "adapter_model.safetensors")
    with open(weights, "r+b") as handle:  # an interrupted copy: the header promises more bytes
        handle.truncate(os.path.getsize(weights) // 2)
    cases["truncated_weights"] = ([good, truncated], [], f"cannot read the adapter weights {weights}")
    return cases


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, llama32):
    base, paths = llama32
    root = str(tmp_path_factory.mktemp("bad"))
    return _bad_inputs(root, base, paths["a1"])


@pytest.mark.parametrize(
    "case",
    [
        "different_base_name", "different_base_shapes", "dora", "ia3", "embedding",
        "modules_to_save", "lm_head", "head_with_weights", "missing_weights", "missing_config",
        "missing_dir", "inconsistent_factors", "full_model", "truncated_weights",
    ],
)
def test_errors_before_writing(tmp_path, llama32, bad_inputs, case):
    base, _ = llama32
    models, args, message = bad_inputs[case]
    config = {"merge_method": "drm", "base_model": base, "models": [], "parameters": {"density": 0.3}}
    for entry in models:
        if isinstance(entry, tuple):  # a plain model path, not an adapter
            config["models"].append({"model": _full_model_copy(tmp_path, entry[1])})
        else:
            config["models"].append({"model": f"{base}+{entry}"})
    out, result = run_cli(tmp_path, config, *args, expect_ok=False)
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert not out.exists()


def _full_model_copy(tmp_path, base):
    path = tmp_path / "full"
    shutil.copytree(base, path)
    return str(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["parameters"].update(density=1.5), "density"),
        (lambda c: c["parameters"].update(direction="diagonal"), "direction"),
        (lambda c: c.update(merge_method="ties"), "drm, tsv_m, iso_c, iso_cts only"),
        (lambda c: c.pop("base_model"), "base_model"),
        (lambda c: c["parameters"].update(decompose=False), "decompose"),
        (lambda c: c["models"][0]["parameters"].update(density=0.9), "one value"),
        # Before: a raw LinAlgError (iso_c) naming no parameter.
        (lambda c: (c.update(merge_method="iso_c"), c["parameters"].pop("density"),
                    c["models"][0]["parameters"].update(weight=float("nan"))),
         "iso_c parameter `weight` must be a finite number"),
        (lambda c: c["parameters"].update(density="abc"), "drm parameter `density` must be a number"),
        (lambda c: c["parameters"].update(decompose="maybe"), "drm parameter `decompose` must be true or false"),
    ],
)
def test_config_errors_before_writing(tmp_path, llama32, edit, message):
    base, paths = llama32
    config = yaml_config(base, list(paths.values())[:2], [1.0, 1.0], {"density": 0.3})
    edit(config)
    out, result = run_cli(tmp_path, config, expect_ok=False)
    assert result.exit_code != 0 and message in result.output, result.output
    assert not out.exists()


def test_adapter_on_another_model_is_refused(tmp_path, llama32):
    base, paths = llama32
    other = shutil.copytree(base, tmp_path / "elsewhere")
    config = yaml_config(base, [paths["a1"]], [1.0], {"density": 0.3})
    config["models"][0]["model"] = f"{other}+{paths['a1']}"
    out, result = run_cli(tmp_path, config, expect_ok=False)
    assert "not to base_model" in result.output and not out.exists()


# ---------------------------------------------------------------------------
# tsv_m, iso_c, iso_cts: the CLI adapter equals mergekit's dense merge
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, params",
    [
        ("tsv_m", {"lambda": 1.2}),
        ("tsv_m", {"rank_fraction": 0.05}),
        ("iso_c", {"lambda": 0.8}),
        ("iso_cts", {"common_space_fraction": 0.8}),
        ("iso_cts", {"common_space_fraction": 0.1, "lambda": 1.1}),
    ],
)
def test_subspace_methods_adapter_equals_dense_merge(tmp_path, llama64, method, params):
    """Route 1 (mergekit, base+adapter, dense SVDs) against the CLI's factored
    merge; the saved rank stays within the method's bound: TSV-M sum_t min(k, r_t),
    Iso-C sum_t r_t, Iso-CTS min(k, sum_t r_t) + sum_t min(s, r_t) (common size k,
    per-task size s; a module's adapters only)."""
    base, paths = llama64
    config = yaml_config(base, list(paths.values()), [1.0, 0.6, 1.4, 1.0], dict(params, compute_dtype="float64"), dtype="float64")
    config["merge_method"] = method
    route1 = run_route1(tmp_path, config)
    out, result = run_cli(tmp_path, config)
    assert f"with {method}" in result.output
    moved = assert_route1_equal(base, route1, out, 1e-8)
    folded = [peft_deltas(base, a) for a in paths.values()]
    ranks = {k.split(".lora_")[0][len("base_model.model."):]: v.shape[0]
             for k, v in load_file(str(out / "adapter_model.safetensors")).items() if k.endswith("lora_A.weight")}
    for name, delta in moved.items():
        module = name[: -len(".weight")]
        adapter_ranks = [int(torch.linalg.matrix_rank(f[module])) for f in folded if module in f]
        k = max(1, int(0.05 * min(delta.shape))) if "rank_fraction" in params else min(delta.shape) // 4
        bound = sum(min(k, r) for r in adapter_ranks) if method == "tsv_m" else sum(adapter_ranks)
        if method == "iso_cts":
            r = min(delta.shape)
            per_task = min(round((r - int(params["common_space_fraction"] * r)) / 4), r // 4)
            bound = min(r - 4 * per_task, bound) + sum(min(per_task, a) for a in adapter_ranks)
        assert int(torch.linalg.matrix_rank(delta)) <= ranks[module] <= bound, module
    assert len(moved) == 14
    assert f"[{'TSV-M' if method == 'tsv_m' else method.replace('iso_c', 'Iso-C').replace('Iso-Cts', 'Iso-CTS')}]" in (out / "README.md").read_text()


def test_rank_above_every_module_full_rank_is_refused(tmp_path, llama32):
    """Before: --rank 1000 on 32-wide matrices saved factors zero-padded to rank 1000."""
    base, paths = llama32
    config = yaml_config(base, [paths["a1"]], [1.0], {"density": 0.3})
    out, result = run_cli(tmp_path, config, "--rank", "1000", expect_ok=False)
    assert result.exit_code != 0 and "--rank 1000 exceeds the full rank of every target matrix" in result.output
    assert "at most 32" in result.output and not out.exists()


def test_rank_above_some_modules_full_rank_is_reported():
    from mergekit_drm.lora.cli import check_rank

    said = []
    check_rank(40, [(32, 32), (48, 64), (64, 48)], lambda text, err: said.append(text))
    assert len(said) == 1 and "1 of 3 target matrices" in said[0] and "smallest 32" in said[0]
    said.clear()
    check_rank(32, [(32, 32), (48, 64)], lambda text, err: said.append(text))
    assert not said


def test_unknown_parameters_switch_with_a_typo_is_refused(tmp_path, llama32, monkeypatch):
    """Before: MERGEKIT_DRM_UNKNOWN_PARAMETERS=eror quietly meant warn."""
    monkeypatch.setenv("MERGEKIT_DRM_UNKNOWN_PARAMETERS", "eror")
    base, paths = llama32
    config = yaml_config(base, [paths["a1"]], [1.0], {"density": 0.3, "densty": 0.2})
    out, result = run_cli(tmp_path, config, expect_ok=False)
    assert result.exit_code != 0 and "'eror' is not a known setting" in result.output
    assert "use warn" in result.output and "or error" in result.output and not out.exists()
