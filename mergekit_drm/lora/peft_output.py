"""Writing the merged adapter: PEFT config and weights, the YAML and a model card.

Scaling is 1 for every module (``lora_alpha`` = rank, per-module ranks in
``rank_pattern``), so ``B @ A`` is the merged delta, ``lambda`` included.
Files are written to a temporary directory next to the output and moved into
place, so a failure leaves no half-written adapter.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import string
import tempfile
from typing import Dict, List, Optional, Sequence

import yaml

from mergekit_drm.lora.execute import LoraMergeResult
from mergekit_drm.lora.methods import LoraMergeError
from mergekit_drm.lora.plan import LoraMergePlan

CARD_TEMPLATE = os.path.join(os.path.dirname(__file__), "model_card.md")


def check_output_dir(path: str, force: bool) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise LoraMergeError(f"output path {path} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and not force:
        raise LoraMergeError(
            f"output directory {path} exists and is not empty; choose another path or "
            "pass --force to overwrite the adapter files in it"
        )


def _pattern_keys(names: Sequence[str]) -> Dict[str, str]:
    """rank_pattern/alpha_pattern keys that PEFT resolves to exactly one module."""
    from peft.utils.other import get_pattern_key

    plain = list(names)
    if all(get_pattern_key(plain, name) == name for name in names):
        return {name: name for name in names}
    escaped = {name: re.escape(name) for name in names}
    keys = list(escaped.values())
    for name, key in escaped.items():
        if get_pattern_key(keys, name) != key:  # pragma: no cover - cannot happen
            raise LoraMergeError(f"cannot build an unambiguous rank_pattern key for {name}")
    return escaped


def _target_modules(names: Sequence[str], base_modules: Optional[Sequence[str]]) -> List[str]:
    """Leaf names (q_proj, ...) when they select exactly these modules, else full names."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
    if base_modules is not None:
        selected = {
            module for module in base_modules if module.rsplit(".", 1)[-1] in leaves
        }
        if selected == set(names):
            return leaves
    return sorted(names)


def build_lora_config(plan: LoraMergePlan, result: LoraMergeResult):
    """The output ``peft.LoraConfig``: per-module rank, alpha = rank (scaling 1)."""
    from peft import LoraConfig

    ranks = {module.name: module.B.shape[1] for module in result.modules}
    counts = collections.Counter(ranks.values())
    default = max(counts, key=lambda r: (counts[r], r))
    others = [name for name, r in ranks.items() if r != default]
    keys = _pattern_keys(others) if others else {}
    return LoraConfig(
        r=default,
        lora_alpha=default,
        target_modules=_target_modules(list(ranks), plan.base_modules),
        rank_pattern={keys[name]: ranks[name] for name in others},
        alpha_pattern={keys[name]: ranks[name] for name in others},
        lora_dropout=0.0,
        bias="none",
        use_rslora=False,
        fan_in_fan_out=plan.fan_in_fan_out,
        task_type=plan.task_type,
        base_model_name_or_path=plan.base_name or plan.base_model,
        inference_mode=True,
    )


def _hub_id(path: str) -> Optional[str]:
    if os.path.exists(os.path.expanduser(path)):
        return None
    return path if re.fullmatch(r"[\w.-]+/[\w.-]+", path) else None


def _adapter_rows(plan: LoraMergePlan) -> List[str]:
    """One table row per source adapter: weight(s), modules, ranks, rsLoRA."""
    rows = []
    for index, entry in enumerate(plan.entries):
        weights = {module.weights[index] for module in plan.modules}
        weight = ", ".join(f"{w:g}" for w in sorted(weights)) if weights else "1"
        adapter = entry.adapter
        adapter_ranks = sorted(set(adapter.ranks.values()))
        rows.append(
            f"| `{entry.reference}` | {weight} | {len(adapter.modules)} | "
            f"{', '.join(map(str, adapter_ranks))} | "
            f"{'yes' if adapter.config.get('use_rslora') else 'no'} |"
        )
    return rows


def _size_text(plan: LoraMergePlan, result: LoraMergeResult) -> str:
    """What the saved ranks are: exact merged ranks, or a truncation and its error."""
    ranks = [m.B.shape[1] for m in result.modules]
    merged_ranks = [m.merged_rank for m in result.modules]
    name = plan.method.spec().pretty_name
    if result.rank is None:
        return (
            f"Ranks are the exact ranks of the {name}-merged deltas ({min(ranks)} to "
            f"{max(ranks)} per module, {plan.method.rank_bound}; `rank_pattern`), with "
            "`lora_alpha` equal to the rank, so the LoRA scaling is 1 and `B @ A` is the "
            "merged delta, `lambda` included. No truncation: applying this adapter gives "
            f"the same weights as the full-model `{plan.method.name}` merge of the same "
            "YAML, up to rounding."
        )
    worst, overall = result.truncation_summary()
    return (
        f"Truncated to rank {result.rank} by an SVD of each merged delta ({name} "
        f"ranks before truncation: {min(merged_ranks)} to {max(merged_ranks)}); "
        f"relative Frobenius truncation error: largest module {worst:.3g}, whole "
        f"adapter {overall:.3g}. `lora_alpha` = r, so the scaling is 1."
    )


def model_card(plan: LoraMergePlan, result: LoraMergeResult, name: str) -> str:
    """README.md of the adapter, from ``model_card.md``."""
    metadata = {"library_name": "peft", "tags": ["mergekit", "merge", "lora", plan.method.name]}
    base_hub = _hub_id(plan.base_model)
    if base_hub:
        metadata["base_model"] = base_hub
    shown = dict(plan.modules[0].kwargs) if plan.modules else {}
    if "compute_dtype" in shown:
        dtype = shown["compute_dtype"]
        shown["compute_dtype"] = "auto" if dtype is None else str(dtype).replace("torch.", "")
    if "scale" in shown:
        shown["lambda"] = shown.pop("scale")
    spec = plan.method.spec()
    with open(CARD_TEMPLATE, encoding="utf-8") as handle:
        template = string.Template(handle.read())
    return template.substitute(
        metadata=yaml.safe_dump(metadata, sort_keys=False).rstrip(),
        name=name,
        n_adapters=len(plan.entries),
        method=spec.pretty_name,
        url=spec.reference_url,
        base_model=plan.base_model,
        parameters=json.dumps(shown),
        n_modules=len(result.modules),
        size=_size_text(plan, result),
        rows="\n".join(_adapter_rows(plan)),
        load_base=plan.base_name or plan.base_model,
        config=plan.config_text.rstrip(),
    )


def write_adapter(
    plan: LoraMergePlan,
    result: LoraMergeResult,
    out_path: str,
    *,
    force: bool = False,
    write_card: bool = True,
) -> None:
    """Write the adapter into ``out_path`` (files first go to a temporary dir)."""
    from safetensors.torch import save_file

    check_output_dir(out_path, force)
    lora_config = build_lora_config(plan, result)
    parent = os.path.dirname(os.path.abspath(out_path)) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".drm-lora-", dir=parent)
    try:
        lora_config.save_pretrained(staging)
        tensors = {}
        for module in result.modules:
            prefix = f"base_model.model.{module.name}"
            tensors[f"{prefix}.lora_A.weight"] = module.A.to(plan.out_dtype).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = module.B.to(plan.out_dtype).contiguous()
        save_file(tensors, os.path.join(staging, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(staging, "mergekit_config.yml"), "w", encoding="utf-8") as handle:
            handle.write(plan.config_text)
        if write_card:
            name = os.path.basename(os.path.abspath(out_path))
            with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as handle:
                handle.write(model_card(plan, result, name))
        os.makedirs(out_path, exist_ok=True)
        for file in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, file), os.path.join(out_path, file))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
