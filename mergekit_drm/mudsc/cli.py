"""``mergekit-mudsc-align``: align once, merge with anything.

Reads an ordinary mergekit YAML (the ``models:`` list, in order, and the mudsc
parameters under ``parameters:``), computes the MuDSC alignment, saves it
(``alignment.safetensors`` with int64 maps + ``alignment.json``), and
optionally writes permuted copies of models 2..N in model 1's unit order, so
that ``ties``, ``drm`` or any other method can merge the aligned models.
Everything is checked and computed before any directory is created.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from typing import Any, Dict, List, Optional

import click
import yaml

from mergekit_drm.mudsc.alignment import permute_tensor
from mergekit_drm.mudsc.engine import AlignmentResult, compute_alignment

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _options(parameters: Dict[str, Any]):
    from mergekit_drm.mudsc.method import PARAMETERS, alignment_options
    from pydantic import ValidationError

    known = {p.name: p for p in PARAMETERS}
    values = {}
    for name, spec in known.items():
        raw = parameters.get(name, spec.default)
        if isinstance(raw, (list, dict)):
            raise ValueError(f"mudsc parameter `{name}` must be one value for the whole model; got {raw!r}")
        try:  # the specs (method_options.MUDSC) name parameter and rule; drop pydantic's frame
            values[name] = spec.validate(raw)
        except ValidationError as exc:
            raise ValueError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None
    unknown = sorted(set(parameters) - set(known) - {"weight"})
    if unknown:
        from mergekit_drm.checks import closest

        named = ", ".join(
            f"`{name}`" + (f" (did you mean `{guess}`?)" if (guess := closest(name, known)) else "")
            for name in unknown
        )
        raise ValueError(f"unknown mudsc parameter(s): {named}; known: {', '.join(sorted(known))}")
    return alignment_options(values)


def _refuse_existing(path: Optional[str], force: bool) -> None:
    if path and os.path.exists(path) and os.listdir(path) and not force:
        raise FileExistsError(f"{path} exists and is not empty; pass --force to write into it")


def write_permuted_copies(result: AlignmentResult, out_dir: str) -> List[str]:
    """Models 2..N moved into model 1's unit order; returns their directories."""
    from safetensors.torch import save_file

    written = []
    for i, source in enumerate(result.sources[1:], start=1):
        target = os.path.join(out_dir, f"model_{i}_{os.path.basename(os.path.normpath(source.path))}")
        os.makedirs(target, exist_ok=True)
        loader = source.ref.lazy_loader()
        tensors = {}
        for name in source.names:
            tensor = loader.get_tensor(name)
            spec = result.spec.tensors.get(name)
            if spec is not None:
                tensor = permute_tensor(spec, tensor, result.alignment, i)
            tensors[name] = tensor.contiguous()
        save_file(tensors, os.path.join(target, "model.safetensors"), metadata={"format": "pt"})
        for entry in os.listdir(source.path):
            full = os.path.join(source.path, entry)
            if os.path.isfile(full) and not entry.endswith(WEIGHT_SUFFIXES) and not entry.endswith(".index.json"):
                shutil.copy2(full, os.path.join(target, entry))
        written.append(target)
    return written


@click.command(
    "mergekit-mudsc-align",
    help="Compute a MuDSC alignment for the models of a mergekit YAML and save it.\n\n"
    "CONFIG: mergekit YAML (models in order; mudsc parameters under `parameters:`)",
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.argument("config_file", metavar="CONFIG")
@click.option("--alignment-out", required=True, help="directory for alignment.safetensors + alignment.json")
@click.option("--permuted-out", help="also write models 2..N permuted into model 1's order here (mode: align)")
@click.option("--device", default="cpu", show_default=True,
              help="torch device for the search and calibration (e.g. cuda)")
@click.option("--cuda", is_flag=True, help="same as --device cuda")
@click.option("--force", is_flag=True, help="write into non-empty output directories")
def align(config_file: str, alignment_out: str, permuted_out: Optional[str], device: str,
          cuda: bool, force: bool) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        with open(config_file) as handle:
            config = yaml.safe_load(handle)
        models = [entry["model"] if isinstance(entry, dict) else entry for entry in config.get("models") or []]
        if config.get("base_model"):
            raise ValueError("mudsc merges models without a common base: remove `base_model:`")
        solver, calibration = _options(config.get("parameters") or {})
        if permuted_out and solver.mode != "align":
            raise ValueError("--permuted-out needs mode: align (zip does not produce a permutation)")
        _refuse_existing(alignment_out, force)
        _refuse_existing(permuted_out, force)
        result = compute_alignment(models, solver, calibration, device="cuda" if cuda else device,
                                   progress=True)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as error:
        click.echo(f"mergekit-mudsc-align: error: {error}", err=True)
        return 2
    result.alignment.save(alignment_out)
    click.echo(f"alignment written to {alignment_out} ({result.seconds:.1f} s)")
    if permuted_out:
        written = write_permuted_copies(result, permuted_out)
        click.echo("aligned models (use these in any mergekit YAML):")
        for path in [result.sources[0].path] + written:
            click.echo(f"  - model: {path}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The console script: the exit status (0; 2 for bad input or usage, as
    argparse had it) is returned, not raised, so callers can run it in-process."""
    try:
        return align.main(args=argv, prog_name="mergekit-mudsc-align", standalone_mode=False)
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except click.Abort:
        click.echo("Aborted!", err=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
