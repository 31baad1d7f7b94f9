"""``mergekit-drm-lora CONFIG OUT``: merge LoRA adapters into one LoRA adapter.

CONFIG is the YAML one would give ``mergekit-yaml`` for a full-model merge
(``merge_method:`` drm, tsv_m, iso_c or iso_cts, ``base_model``, ``models`` as ``base+adapter`` or
adapter paths, ``parameters`` and per-model ``weight``). The output is a PEFT
adapter whose scaled ``B @ A`` equals the full-model merge's change to each
target matrix (exactly, up to rounding, unless ``--rank`` truncates).
Every input is read and checked before anything is written.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

import click

from mergekit_drm.lora.execute import execute_plan
from mergekit_drm.lora.methods import DTYPES, LoraMergeError
from mergekit_drm.lora.peft_output import check_output_dir, write_adapter
from mergekit_drm.lora.plan import plan_lora_merge


def check_rank(rank: int, shapes, warn) -> None:
    """``--rank`` above a matrix's full rank min(n, m) only pads zeros: refused when
    it exceeds every target matrix's, reported when it exceeds some."""
    full = [min(shape) for shape in shapes]
    if not full:
        return
    if rank > max(full):
        raise LoraMergeError(
            f"--rank {rank} exceeds the full rank of every target matrix (at most "
            f"{max(full)} here): the factors would only be padded with zeros to rank {rank}. "
            f"Use --rank {max(full)} or less, or leave --rank out for each module's exact merged rank."
        )
    padded = sum(1 for value in full if rank > value)
    if padded:
        warn(
            f"Warning: --rank {rank} exceeds the full rank of {padded} of {len(full)} target "
            f"matrices (smallest {min(full)}); those are stored zero-padded to rank {rank}",
            err=True,
        )


@click.command("mergekit-drm-lora")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_path", type=click.Path())
@click.option(
    "--rank",
    type=click.IntRange(min=1),
    default=None,
    help="Fixed output rank: truncate each merged delta by SVD (reports the "
    "relative error) and zero-pad lower ranks, so every module has rank R. "
    "Default: the exact merged rank per module (rank_pattern), no truncation.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Overwrite the adapter files in a non-empty output directory.",
)
@click.option("--device", default="cpu", show_default=True, help="Device for the math (cpu, cuda, cuda:1, ...).")
@click.option(
    "--out-dtype",
    type=click.Choice(sorted(DTYPES)),
    default=None,
    help="dtype of the saved factors (default: the YAML's out_dtype, else dtype, else float32).",
)
@click.option(
    "--allow-base-mismatch",
    is_flag=True,
    help="Merge adapters whose base_model_name_or_path differ (e.g. a local copy and "
    "a Hub id of the same weights). Matrix shapes are still checked.",
)
@click.option(
    "--write-model-card/--no-write-model-card",
    default=True,
    show_default=True,
    help="Write README.md (model card) into the output directory.",
)
@click.option("--quiet", "-q", is_flag=True, help="Only print errors.")
def main(
    config_file: str,
    out_path: str,
    rank: Optional[int],
    force: bool,
    device: str,
    out_dtype: Optional[str],
    allow_base_mismatch: bool,
    write_model_card: bool,
    quiet: bool,
) -> None:
    """Merge the LoRA adapters listed in CONFIG_FILE into one adapter in OUT_PATH.

    The YAML's merge_method (drm, tsv_m, iso_c or iso_cts) runs on the adapters'
    factors."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")

    def say(message: str) -> None:
        if not quiet:
            click.echo(message, err=True)

    try:
        check_output_dir(out_path, force)
        with open(config_file, encoding="utf-8") as handle:
            config_text = handle.read()
        plan = plan_lora_merge(
            config_text,
            allow_base_mismatch=allow_base_mismatch,
            out_dtype=out_dtype,
        )
        for warning in plan.warnings:
            click.echo(f"Warning: {warning}", err=True)
        say(
            f"Merging {len(plan.entries)} adapters over {len(plan.modules)} target "
            f"matrices with {plan.method.name}"
        )
        if rank is not None:
            check_rank(rank, [module.shape for module in plan.modules], click.echo)
        result = execute_plan(plan, rank=rank, device=device)
        write_adapter(plan, result, out_path, force=force, write_card=write_model_card)
    except LoraMergeError as exc:
        raise click.ClickException(str(exc)) from exc
    ranks = [m.B.shape[1] for m in result.modules]
    merged = [m.merged_rank for m in result.modules]
    say(
        f"Wrote {out_path}: {len(ranks)} modules, merged ranks {min(merged)}-{max(merged)}, "
        f"saved ranks {min(ranks)}-{max(ranks)} ({result.seconds:.2f} s)"
    )
    if rank is not None:
        worst, overall = result.truncation_summary()
        say(
            f"Truncation to rank {rank}: relative Frobenius error {overall:.4g} over the "
            f"adapter, {worst:.4g} for the worst module"
        )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
