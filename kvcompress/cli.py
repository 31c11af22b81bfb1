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

from kvcompress.cache.channels import describe
from kvcompress.errors import KVCompressError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make the KV cache of Hugging Face causal LMs several times smaller.")
out = Console(width=None if Console().is_terminal else 1000)  # piped: full-width tables, not cut at 80 columns
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
    schedule: Annotated[str | None, typer.Option(help="progressive | uniform | energy | greedy")] = None,
    target_ratio: Annotated[float | None, typer.Option(help="Mean kept K/V width, in (0, 1].")] = None,
    energy: Annotated[float | None, typer.Option(help="Spectrum energy kept by --schedule energy.")] = None,
    head_group: Annotated[int | None, typer.Option(help="KV heads per latent; 0 = all, 1 = per head.")] = None,
    rank_multiple: Annotated[int | None, typer.Option(help="Round ranks to this multiple.")] = None,
    avg_bits: Annotated[float | None, typer.Option(help="Average K/V bits for the allocation.")] = None,
    allocation: Annotated[str | None, typer.Option(help="Bits per stream | per channel segment: stream | channels.")
                          ] = None,
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
    if allocation is not None:
        rec.quant.allocation = allocation
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
    lr, q = result.recipe.lowrank, result.recipe.quant
    table = Table(title=f"{result.model}: {lr.svd} SVD, {lr.schedule} schedule, target {lr.target_ratio}")
    for col in ("layer", "rank K", "rank V", "κ K", "κ V", "energy K", "energy V", "bits K", "bits V",
                "KL K", "KL V"):
        table.add_column(col, justify="right")
    for r in result.layers:
        table.add_row(str(r.layer), str(r.rank_k), str(r.rank_v), f"{r.kappa_k:.3g}", f"{r.kappa_v:.3g}",
                      f"{r.energy_k:.3f}", f"{r.energy_v:.3f}", describe(r.bits_k, r.rank_k, q.segment_size("k")),
                      describe(r.bits_v, r.rank_v, q.segment_size("v")),
                      f"{r.sensitivity_k:.3g}", f"{r.sensitivity_v:.3g}")
    out.print(table)
    kv = result.kv_bytes_per_token
    quant = "on" if result.recipe.quant.enabled else "off (bits shown are the allocation if enabled)"
    out.print(f"head group: {result.head_group} KV heads (width {result.group_width}); quantization {quant}")
    out.print(f"sensitivity: {result.sensitivity_method}")
    out.print(f"KV bytes/token at {result.context} tokens: {kv['baseline']:.0f} -> {kv['compressed']:.0f} "
              f"({result.compression_ratio:.2f}x smaller); {result.seconds:.1f} s")
    if output is not None:
        out.print(f"recipe written to {output}")


@app.command()
@friendly
def export(
    model: Annotated[str, typer.Argument(help="HF folder, GGUF file (or folder holding one), or hub id.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint folder to write.")],
    recipe: Annotated[str | None, typer.Option(help="Recipe file or shipped recipe name.")] = None,
    target_ratio: Annotated[float | None, typer.Option(help="Override the recipe's K/V width budget.")] = None,
    dtype: Annotated[str | None, typer.Option(help="float16 | bfloat16 | float32 (default: source's).")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Write a compressed checkpoint: factorized K/V, config, tokenizer and kvcompress.json."""
    from kvcompress.export import export as run_export
    from kvcompress.recipe import Recipe, load_recipe
    from kvcompress.sources import open_source

    rec = load_recipe(recipe) if recipe else Recipe(name="default")
    if target_ratio is not None:
        rec.lowrank.target_ratio = target_ratio
        rec.layers = []  # ranks must be re-derived for the new budget
    rec.validate()
    source = open_source(model)
    with progress_bar(as_json) as bar:
        result = run_export(source, output, rec, dtype=dtype, force=force, progress=tracker(bar))
    summary = {"path": str(result.path), "dtype": result.dtype, "shards": result.shards, "bytes": result.bytes,
               "layers": [{"layer": x.layer, "rank_k": x.rank_k, "rank_v": x.rank_v} for x in result.recipe.layers]}
    if as_json:
        emit_json(summary)
    else:
        out.print(f"wrote {result.path} ({result.bytes / 2**20:.1f} MiB, {result.shards} shard(s), {result.dtype})")


@app.command()
@friendly
def generate(
    checkpoint: Annotated[Path, typer.Argument(help="Folder written by `kvcompress export`.")],
    prompt: Annotated[str | None, typer.Option(help="Prompt text.")] = None,
    prompt_file: Annotated[Path | None, typer.Option(help="Read the prompt from a file.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the chat template.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Run a prompt on an exported model and report the KV memory it held."""
    from kvcompress.errors import KVCompressError
    from kvcompress.generation import generate as run_generate
    from kvcompress.loading import load

    if (prompt is None) == (prompt_file is None):
        raise KVCompressError("give exactly one of --prompt or --prompt-file")
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise KVCompressError(f"prompt file not found: {prompt_file}")
        prompt = prompt_file.read_text()
    model, tokenizer = load(checkpoint)
    report = run_generate(model, tokenizer, prompt, max_new_tokens, temperature, seed, chat, stream=not as_json)
    if as_json:
        emit_json(report.to_json())
        return
    r = report.to_json()
    out.print(f"\n[dim]prompt {r['prompt_tokens']} tokens, generated {r['generated_tokens']} tokens, "
              f"{r['tokens_per_second']:.1f} tokens/s[/]")
    out.print(f"[dim]KV cache held {r['kv_bytes']:,} bytes vs {r['kv_bytes_uncompressed']:,} uncompressed "
              f"({r['kv_ratio']:.2f}x smaller)[/]")


@app.command()
@friendly
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="Folder written by `kvcompress export`.")],
    verify: Annotated[bool, typer.Option(help="Check file checksums.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Summarize a checkpoint's manifest and per-layer settings."""
    from kvcompress.manifest import read_manifest

    m = read_manifest(checkpoint, verify=verify)
    summary = {key: m.get(key) for key in ("schema_version", "kvcompress_version", "format", "model_type",
                                            "dtype", "head_group", "quant", "eviction", "kernel_backend")}
    summary |= {"source": m["source"]["model"], "files": len(m.get("files", {})), "layers": m["layers"],
                "verified": verify}
    if as_json:
        emit_json(summary)
        return
    for key, value in summary.items():
        if key != "layers":
            out.print(f"{key}: {value}", highlight=False)
    table = Table()
    for col in ("layer", "rank_k", "rank_v", "bits_k", "bits_v", "group_size", "residual_length"):
        table.add_column(col, justify="right")
    for lay in m["layers"]:
        segments = {"k": lay.get("key_segment", 16), "v": lay["group_size"]}
        bits = [describe(lay[f"bits_{s}"], lay[f"rank_{s}"], segments[s]) for s in ("k", "v")]
        table.add_row(str(lay["layer"]), str(lay["rank_k"]), str(lay["rank_v"]), *bits, str(lay["group_size"]),
                      str(lay["residual_length"]))
    out.print(table)


@app.command(name="eval")
@friendly
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="Folder written by `kvcompress export`.")],
    text: Annotated[Path | None, typer.Option(help="Evaluation text file (perplexity).")] = None,
    context: Annotated[int, typer.Option(help="Window length in tokens.")] = 2048,
    block: Annotated[int, typer.Option(help="Tokens read per step through the cache.")] = 128,
    max_tokens: Annotated[int, typer.Option(help="Evaluate the first N tokens of the text.")] = 16384,
    source: Annotated[str | None, typer.Option(help="Source model (default: the manifest's).")] = None,
    passkey: Annotated[bool, typer.Option("--passkey", help="Passkey retrieval accuracy (no text needed).")] = False,
    lengths: Annotated[str, typer.Option(help="Passkey prompt lengths in tokens, comma-separated.")] = "1024,2048,4096",
    depths: Annotated[int, typer.Option(help="Passkey depths per length, evenly spaced 0%..100%.")] = 10,
    digits: Annotated[int, typer.Option(help="Passkey digits (5 to 64).")] = 5,
    seed: Annotated[int, typer.Option(help="Seed for the passkeys.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Perplexity (--text) and/or passkey retrieval (--passkey), compressed vs source model, same run."""
    from kvcompress.evaluate.passkey import check_digits, compare_passkey, depth_fractions, parse_lengths
    from kvcompress.evaluate.perplexity import compare

    if text is None and not passkey:
        raise KVCompressError("give --text FILE (perplexity), --passkey, or both")
    if text is not None and not text.is_file():
        raise KVCompressError(f"text file not found: {text}")
    if passkey:  # check the cheap things before loading any model
        targets = parse_lengths(lengths)
        check_digits(digits)
        depth_fractions(depths)
    ppl = keys = None
    with progress_bar(as_json) as bar:
        if passkey:
            keys = compare_passkey(checkpoint, targets, depths, digits, seed, source, progress=tracker(bar))
        if text is not None:
            ppl = compare(checkpoint, text, context, block, max_tokens, source, progress=tracker(bar))
    if as_json:
        emit_json(keys if ppl is None else ppl if keys is None else {"perplexity": ppl, "passkey": keys})
        return
    if ppl is not None:
        table = Table(title=f"perplexity through the cache: {ppl['tokens']} tokens, context {context}, "
                            f"block {block}")
        for col in ("model", "perplexity", "KV bytes/token"):
            table.add_column(col, justify="right")
        for name in ("baseline", "compressed"):
            table.add_row(name, f"{ppl[name]['ppl']:.3f}", f"{ppl[name]['kv_bytes_per_token']:.0f}")
        out.print(table)
        out.print(f"ratios: perplexity x{ppl['ratios']['ppl']:.4f}, KV bytes x{ppl['ratios']['kv_bytes']:.3f}")
    if keys is not None:
        base, comp = keys["baseline"], keys["compressed"]
        table = Table(title=f"passkey retrieval: {digits}-digit keys, {len(keys['depths'])} depths, seed {seed}")
        for col in ("length", "tokens", "base acc", "comp acc", "KV/tok base", "KV/tok comp", "KV ratio"):
            table.add_column(col, justify="right")
        for key, c in comp["by_length"].items():
            b, used = base["by_length"][key], c["tokens"]
            span = str(used[0]) if min(used) == max(used) else f"{min(used)}-{max(used)}"
            table.add_row(key, span, f"{b['correct']}/{b['total']}", f"{c['correct']}/{c['total']}",
                          f"{b['kv_bytes_per_token']:.0f}", f"{c['kv_bytes_per_token']:.0f}",
                          f"x{keys['ratios']['by_length'][key]:.3f}")
        out.print(table)
        off = max(abs(p["depth_actual"] - p["depth"]) for p in keys["prompts"])
        out.print(f"accuracy: baseline {base['accuracy']:.1%}, compressed {comp['accuracy']:.1%} "
                  f"({comp['total']} prompts); KV bytes x{keys['ratios']['kv_bytes']:.3f}", highlight=False)
        out.print("depths: " + ", ".join(f"{d:.0%}" for d in keys["depths"])
                  + f" of the filler (measured within {off:.1%})", highlight=False)


@app.command()
@friendly
def bench(
    model: Annotated[str, typer.Argument(help="Source model (HF folder, GGUF, or hub id).")],
    recipes: Annotated[str, typer.Option(help="Comma-separated shipped recipe names or files.")] = (
        "minikv-2bit,full-stack,lagkv-4x,greedy-50"),
    contexts: Annotated[str, typer.Option(help="Speed contexts (and passkey lengths), comma-separated.")] = (
        "1024,2048,4096"),
    text: Annotated[Path | None, typer.Option(help="Perplexity text file (omit to skip perplexity).")] = None,
    ppl_tokens: Annotated[int, typer.Option(help="Tokens of --text scored.")] = 4096,
    ppl_context: Annotated[int, typer.Option(help="Perplexity window.")] = 2048,
    passkey_depths: Annotated[int, typer.Option(help="Passkey depths per length (0 = no passkey).")] = 5,
    passkey_lengths: Annotated[str | None, typer.Option(help="Passkey prompt lengths (default: --contexts).")] = None,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per speed run.")] = 32,
    repeats: Annotated[int, typer.Option(help="Timed runs per context (after one warm-up).")] = 3,
    dtype: Annotated[str | None, typer.Option(help="float16 | bfloat16 | float32 (default: fp16 on CUDA, "
                                                   "fp32 on CPU).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if available).")] = None,
    peer: Annotated[bool, typer.Option(help="Include transformers' QuantizedCache when quanto is installed.")] = True,
    out_dir: Annotated[Path, typer.Option("--out", help="Where results.json and the plots go.")] = Path("bench"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as one JSON object.")] = False,
) -> None:
    """Baseline vs recipes: KV bytes, perplexity, passkey, prefill and decode speed; results.json/.md, plots."""
    from rich.markup import escape

    from kvcompress.evaluate.bench import BenchSettings, check_settings, markdown_table
    from kvcompress.evaluate.bench import bench as run_bench
    from kvcompress.evaluate.passkey import parse_lengths

    settings = BenchSettings(contexts=parse_lengths(contexts), text=text, ppl_context=ppl_context,
                             ppl_tokens=ppl_tokens, passkey_depths=passkey_depths, new_tokens=new_tokens,
                             passkey_lengths=parse_lengths(passkey_lengths) if passkey_lengths else None,
                             repeats=repeats, dtype=dtype, device=device, peer=peer)
    check_settings(settings)
    names = [r.strip() for r in recipes.split(",") if r.strip()]
    with progress_bar(as_json) as bar:
        results = run_bench(model, names, settings, progress=tracker(bar))
    for row in results["rows"]:  # on stderr: stdout holds the report, or only the JSON
        if "error" in row:
            err.print(f"[yellow]{escape(row['name'])} skipped:[/] {escape(row['error'])}", highlight=False,
                      soft_wrap=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown_table(results))
    try:
        from kvcompress.evaluate.plots import write_plots

        plots = write_plots(results, out_dir)
    except KVCompressError as e:
        plots = []
        err.print(f"[yellow]no plots:[/] {e}", highlight=False)
    if as_json:
        emit_json(results)
        return
    print_bench(results)
    out.print(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}" + "".join(f", {p}" for p in plots),
              highlight=False)


def print_bench(results: dict) -> None:
    """The results table: bytes, size ratio, perplexity, passkey, and decode speed ratio per context."""
    from kvcompress.evaluate.bench import summary_table

    head, rows = summary_table(results)
    table = Table(title=f"{results['model']} on {results['device']}, {results['dtype']}")
    for col in head:
        table.add_column(col, justify="right")
    for cells in rows:
        table.add_row(*cells)
    out.print(table)
