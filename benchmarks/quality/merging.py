"""One mergekit YAML per merge, run with ``mergekit.merge.run_merge`` exactly
as a user would (``mergekit-yaml config.yml out --random-seed 0
--no-copy-tokenizer`` does the same)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict, Optional, Sequence

import yaml

# How each method's hyperparameters enter the YAML.
#   mean_like: the merge is a (disjoint) mean at lambda 1 -> lambda grid > 1
#   sum_like: the merge is a sum of task vectors at lambda 1
MEAN_LIKE = {"ties", "della", "drm", "linear"}


def model_reference(model) -> str:
    """An absolute path, or a ``BASE+ADAPTER`` reference (a LoRA adapter folded
    into its base by mergekit; each side made absolute)."""
    return "+".join(str(Path(part).resolve()) for part in str(model).split("+"))


def merge_config(method: str, base: Path, models: Sequence[Path], params: Dict) -> Dict:
    """The mergekit config dict for one merge. ``params`` holds the global
    parameters (``lambda``, ``density``, drm switches ...); ``weight: 1`` is
    given per model for every method."""
    params = dict(params)
    models_cfg = [{"model": model_reference(m), "parameters": {"weight": 1.0}} for m in models]
    cfg: Dict = {"merge_method": method}
    if method == "linear":
        cfg["models"] = models_cfg
        params.setdefault("normalize", True)
    else:
        cfg["base_model"] = str(Path(base).resolve())
        cfg["models"] = models_cfg
    if params:
        cfg["parameters"] = params
    cfg["dtype"] = "float32"
    return cfg


def write_yaml(cfg: Dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_yaml(config_path: Path, out_dir: Path, random_seed: int = 0,
             lora_merge_cache: Optional[Path] = None) -> Path:
    """``mergekit-yaml <config> <out> --random-seed <s> --no-copy-tokenizer
    --no-write-model-card [--lora-merge-cache <dir>]`` in-process."""
    import mergekit_drm
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    mergekit_drm.register()  # the .pth hook does this too; explicit is harmless

    text = Path(config_path).read_text()
    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    run_merge(
        config,
        str(out_dir),
        options=MergeOptions(
            random_seed=random_seed,
            copy_tokenizer=False,
            write_model_card=False,
            lazy_unpickle=False,
            quiet=True,
            lora_merge_cache=str(lora_merge_cache) if lora_merge_cache else None,
            lora_merge_dtype="float32" if lora_merge_cache else None,
        ),
        config_source=text,
    )
    return out_dir
