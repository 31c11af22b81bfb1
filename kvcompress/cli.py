"""The ``kvcompress`` command line: parse, call the library, print (rich tables or ``--json``)."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvcompress.errors import KVCompressError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make the KV cache of Hugging Face causal LMs several times smaller.")
out = Console()
err = Console(stderr=True)


@app.callback(invoke_without_command=False)
def main(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    """Make the KV cache of Hugging Face causal LMs several times smaller."""
    if version:
        from kvcompress import __version__

        out.print(__version__)
        raise typer.Exit()


def friendly(fn):
    """Turn user errors into one line on stderr and a non-zero exit; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KVCompressError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def progress_bar(quiet: bool) -> Progress:
    """A rich progress bar on stderr (hidden when ``quiet``)."""
    return Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, disable=quiet, transient=True)


def tracker(bar: Progress):
    """A ``(phase, done, total)`` callback driving one bar task per phase."""
    tasks: dict[str, int] = {}

    def tick(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=total)
        bar.update(tasks[phase], completed=done)

    return tick


def emit_json(obj: dict) -> None:
    """Print one JSON object on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


@app.command()
@friendly
def analyze(
    model: Annotated[str, typer.Argument(help="HF folder, GGUF file (or folder holding one), or hub id.")],
    recipe: Annotated[str | None, typer.Option(help="Recipe file or shipped recipe name to fill in.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the filled recipe here.")] = None,
    svd: Annotated[str | None, typer.Option(help="whitened | weight")] = None,
    schedule: Annotated[str | None, typer.Option(help="progressive | uniform | energy")] = None,
    target_ratio: Annotated[float | None, typer.Option(help="Mean kept K/V width, in (0, 1].")] = None,
    energy: Annotated[float | None, typer.Option(help="Spectrum energy kept by --schedule energy.")] = None,
    head_group: Annotated[int | None, typer.Option(help="KV heads per latent; 0 = all, 1 = per head.")] = None,
    rank_multiple: Annotated[int | None, typer.Option(help="Round ranks to this multiple.")] = None,
    avg_bits: Annotated[float | None, typer.Option(help="Average K/V bits for the allocation.")] = None,
    calib: Annotated[Path | None, typer.Option(help="Calibration text file (never the eval text).")] = None,
    context: Annotated[int, typer.Option(help="Context at which KV bytes/token are reported.")] = 2048,
    sensitivity: Annotated[bool, typer.Option(help="Measure per-layer KL sensitivity for bits.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """SVD spectra, a rank schedule and bit allocation per layer; writes a recipe."""
    from kvcompress.analysis.analyze import analyze as run_analysis
    from kvcompress.recipe import Recipe, load_recipe
    from kvcompress.sources import open_source

    rec = load_recipe(recipe) if recipe else Recipe(name="analyzed")
    overrides = {"svd": svd, "schedule": schedule, "target_ratio": target_ratio, "energy": energy,
                 "head_group": head_group, "rank_multiple": rank_multiple}
    for key, value in overrides.items():
        if value is not None:
            setattr(rec.lowrank, key, value)
    if avg_bits is not None:
        rec.quant.avg_bits = avg_bits
    if calib is not None:
        rec.calibration.text = str(calib)
    rec.validate()
    source = open_source(model)
    with progress_bar(as_json) as bar:
        result = run_analysis(source, source.tokenizer(), rec, context=context, sensitivity=sensitivity,
                              progress=tracker(bar))
    if output is not None:
        result.recipe.save(output)
    if as_json:
        emit_json(result.to_json())
        return
    print_analysis(result, output)


def print_analysis(result, output: Path | None) -> None:
    """The per-layer table and a summary."""
    lr = result.recipe.lowrank
    table = Table(title=f"{result.model}: {lr.svd} SVD, {lr.schedule} schedule, target {lr.target_ratio}")
    for col in ("layer", "rank K", "rank V", "κ K", "κ V", "energy K", "energy V", "bits K", "bits V",
                "sensitivity (KL)"):
        table.add_column(col, justify="right")
    for r in result.layers:
        table.add_row(str(r.layer), str(r.rank_k), str(r.rank_v), f"{r.kappa_k:.3g}", f"{r.kappa_v:.3g}",
                      f"{r.energy_k:.3f}", f"{r.energy_v:.3f}", str(r.bits_k), str(r.bits_v),
                      f"{r.sensitivity:.4g}")
    out.print(table)
    kv = result.kv_bytes_per_token
    quant = "on" if result.recipe.quant.enabled else "off (bits shown are the allocation if enabled)"
    out.print(f"head group: {result.head_group} KV heads (width {result.group_width}); quantization {quant}")
    out.print(f"sensitivity: {result.sensitivity_method}")
    out.print(f"KV bytes/token at {result.context} tokens: {kv['baseline']:.0f} -> {kv['compressed']:.0f} "
              f"({result.compression_ratio:.2f}x smaller); {result.seconds:.1f} s")
    if output is not None:
        out.print(f"recipe written to {output}")
