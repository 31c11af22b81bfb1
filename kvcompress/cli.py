"""The ``kvcompress`` command line: parse, call the library, print (rich tables or ``--json``)."""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

from kvcompress.errors import KVCompressError
from kvcompress.recipe import DEFAULT_RECIPE, LowRank, Quant, shipped_recipe_names

INSPECT_CONTEXT = 2048  # tokens at which `inspect` reports bytes per token


def _default(name: str, section: object = LowRank()) -> str:
    """``[default: the recipe's; X]``, X read from the recipe section's own default."""
    return f"[default: the recipe's; {getattr(section, name)}]"


SHIPPED = "shipped: " + ", ".join(shipped_recipe_names())

# typer raises click's exceptions (its own vendored copy in newer releases): find the base class through
# the public BadParameter instead of importing either click
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class _OneLineErrors(TyperGroup):
    """Usage errors (a bad option value, a missing argument) as one line on stderr, like our own errors."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except _ClickException as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `kvcompress`: the help, as typer shows it
                e.show()
                sys.exit(e.exit_code)
            ctx = getattr(e, "ctx", None)
            command = " ".join(["kvcompress", *(ctx.command_path.split()[1:] if ctx else [])])
            err.print(f"[bold red]error:[/] {escape(e.format_message())} (see {command} --help)", highlight=False,
                      soft_wrap=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            err.print("interrupted")
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=_OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make the KV cache of Hugging Face causal LMs several times smaller.")
out = Console(width=None if Console().is_terminal else 1000)  # piped: full-width tables, not cut at 80 columns
err = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from kvcompress import __version__

        out.print(f"kvcompress {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Make the KV cache of Hugging Face causal LMs several times smaller."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the process is so that cleanup runs as it does for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_interrupted(signum: int, _frame) -> None:
    for sig in _STOPS:  # the cleanup that follows must not be cut short by a second stop
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


@contextlib.contextmanager
def _signals_interrupt():
    """Turn Ctrl-C, SIGTERM and SIGHUP into :class:`Interrupted` while a command runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.signal(sig, _raise_interrupted) for sig in _STOPS}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def friendly(fn):
    """Turn user errors into one line on stderr and a non-zero exit; Ctrl-C, SIGTERM and SIGHUP into a
    clean stop (exit 128 + signal number) after every ``finally`` and ``except`` on the way has run."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with _signals_interrupt():
                return fn(*args, **kwargs)
        except KVCompressError as e:
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as e:
            signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
            err.print(f"interrupted ({signal.Signals(signum).name})", highlight=False)
            raise typer.Exit(128 + signum) from None

    return wrapper


def progress_bar(quiet: bool) -> Progress:
    """A rich progress bar on stderr (hidden when ``quiet`` or when stderr is not a terminal)."""
    return Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, disable=quiet or not err.is_terminal, transient=True)


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
    recipe: Annotated[str | None, typer.Option(help=f"Recipe file or shipped recipe name to fill in "
                                                    f"({SHIPPED}).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the filled recipe here.")] = None,
    svd: Annotated[str | None, typer.Option(help=f"whitened | weight {_default('svd')}")] = None,
    schedule: Annotated[str | None, typer.Option(
        help=f"progressive | uniform | energy | greedy {_default('schedule')}")] = None,
    target_ratio: Annotated[float | None, typer.Option(
        help=f"Mean kept K/V width, in (0, 1] {_default('target_ratio')}")] = None,
    energy: Annotated[float | None, typer.Option(
        help=f"Spectrum energy kept by --schedule energy {_default('energy')}")] = None,
    head_group: Annotated[int | None, typer.Option(
        help=f"KV heads per latent; 0 = all, 1 = per head {_default('head_group')}")] = None,
    rank_multiple: Annotated[int | None, typer.Option(
        help=f"Round ranks to this multiple {_default('rank_multiple')}")] = None,
    avg_bits: Annotated[float | None, typer.Option(
        help=f"Average K/V bits; turns quantization on {_default('avg_bits', Quant())}")] = None,
    allocation: Annotated[str | None, typer.Option(
        help="Bits per stream | per channel segment: stream | channels; turns quantization on "
             f"{_default('allocation', Quant())}")] = None,
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
        rec.quant.enabled, rec.quant.avg_bits = True, avg_bits
    if allocation is not None:
        rec.quant.enabled, rec.quant.allocation = True, allocation
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
    from kvcompress.methods.channels import describe

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
    recipe: Annotated[str, typer.Option(help=f"Recipe file or shipped recipe name ({SHIPPED}).")] = DEFAULT_RECIPE,
    target_ratio: Annotated[float | None, typer.Option(
        help="Override the recipe's low-rank K/V width budget (recipes with [lowrank] on).")] = None,
    dtype: Annotated[str | None, typer.Option(
        help="float16 | bfloat16 | float32 [default: float16 for a quantized GGUF, else the source's]")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Write a compressed checkpoint: factorized K/V, config, tokenizer and kvcompress.json."""
    from kvcompress.checkpoint.export import export as run_export
    from kvcompress.recipe import load_recipe
    from kvcompress.sources import open_source

    rec = load_recipe(recipe)
    if target_ratio is not None:
        if not rec.lowrank.enabled:
            raise KVCompressError(f"--target-ratio sets the low-rank width, and recipe {rec.name} has [lowrank] "
                                  "off; pick a low-rank recipe (e.g. --recipe greedy-50) or drop --target-ratio")
        rec.lowrank.target_ratio = target_ratio
        rec.layers = []  # ranks must be re-derived for the new budget
    rec.validate()
    source = open_source(model)
    with progress_bar(as_json) as bar:
        result = run_export(source, output, rec, dtype=dtype, force=force, progress=tracker(bar))
    summary = {"path": str(result.path), "recipe": rec.name, "dtype": result.dtype, "dtype_reason": result.dtype_reason,
               "shards": result.shards, "bytes": result.bytes,
               "layers": [{"layer": x.layer, "rank_k": x.rank_k, "rank_v": x.rank_v} for x in result.recipe.layers]}
    if as_json:
        emit_json(summary)
    else:
        out.print(f"wrote {result.path}: recipe {rec.name}, {result.dtype} weights ({result.dtype_reason}), "
                  f"{result.bytes / 2**20:.1f} MiB in {result.shards} shard(s)", highlight=False)


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
    from kvcompress.checkpoint.loading import load
    from kvcompress.runtime.generation import check_settings
    from kvcompress.runtime.generation import generate as run_generate

    if (prompt is None) == (prompt_file is None):
        raise KVCompressError("give exactly one of --prompt or --prompt-file")
    check_settings(max_new_tokens, temperature)
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise KVCompressError(f"prompt file not found: {prompt_file}")
        prompt = prompt_file.read_text()
    model, tokenizer = load(checkpoint)

    def echo(text: str) -> None:  # the prompt, dimmed, so the streamed text continues it
        out.print(escape(text), style="dim", end="\n" if chat else "", highlight=False, soft_wrap=True)

    report = run_generate(model, tokenizer, prompt, max_new_tokens, temperature, seed, chat, stream=not as_json,
                          echo=None if as_json else echo)
    if as_json:
        emit_json(report.to_json())
        return
    r = report.to_json()
    out.print(f"\n[dim]prompt {r['prompt_tokens']} tokens, generated {r['generated_tokens']} tokens, "
              f"{r['tokens_per_second']:.1f} tokens/s[/]", highlight=False)
    out.print(f"[dim]KV cache held {r['kv_bytes']:,} bytes: {r['x_smaller_than_fp16']:.2f}x smaller than an fp16 "
              f"cache of this model ({r['kv_bytes_fp16']:,} bytes)[/]", highlight=False)
    if 2 * r["window_tokens"] > r["held_tokens"]:
        out.print(f"[dim]{r['window_tokens']} of the {r['held_tokens']} tokens held are still in the 16-bit "
                  "residual window, so a prompt this short shows less than the long-context ratio "
                  "(`kvcompress inspect` gives it)[/]", highlight=False)


@app.command()
@friendly
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="Folder written by `kvcompress export`.")],
    verify: Annotated[bool, typer.Option(help="Check file checksums.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Summarize a checkpoint's manifest and per-layer settings."""
    from kvcompress.checkpoint.manifest import read_checkpoint
    from kvcompress.memory import baseline_bytes_per_token, compressed_bytes_per_token
    from kvcompress.methods.channels import describe

    ckpt = read_checkpoint(checkpoint, verify=verify)
    m, plan, spec = ckpt.manifest, ckpt.plan, ckpt.spec
    held, fp16 = compressed_bytes_per_token(spec, plan, INSPECT_CONTEXT), baseline_bytes_per_token(spec)
    summary = {"schema_version": m["schema_version"], "kvcompress_version": m.get("kvcompress_version"),
               "recipe": plan.recipe, "model_type": plan.model_type, "dtype": plan.dtype,
               "head_group": plan.head_group, "key_rope": plan.key_rope, "key_rotation": plan.key_rotation,
               "key_axes": plan.key_axes,
               "values_predicted_from_keys": sum(lay.predicts_values for lay in plan.layers),
               "method": sorted({s.method for lay in plan.layers for s in (lay.keys, lay.values) if s.quantized}),
               "eviction": None if plan.eviction is None else asdict(plan.eviction),
               "source": m["source"]["model"], "files": len(m.get("files", {})), "verified": verify,
               f"kv_bytes_per_token_at_{INSPECT_CONTEXT}": round(held, 1), "fp16_kv_bytes_per_token": fp16,
               "x_smaller_than_fp16": round(fp16 / held, 3), "layers": [asdict(lay) for lay in plan.layers]}
    if as_json:
        emit_json(summary)
        return
    for key, value in summary.items():
        if key != "layers":
            out.print(f"{key}: {value}", highlight=False)
    evicted = " before eviction" if plan.eviction else ""
    out.print(f"KV cache at {INSPECT_CONTEXT} tokens: {held:,.0f} bytes/token{evicted}, "
              f"{summary['x_smaller_than_fp16']:.2f}x smaller than an fp16 cache of this model "
              f"({fp16:,} bytes/token)", highlight=False)
    table = Table()
    for col in ("layer", "rank_k", "rank_v", "bits_k", "bits_v", "key group", "value group", "residual_length"):
        table.add_column(col, justify="right")
    for lay in plan.layers:
        bits = [describe(s.bits, s.rank, s.segment) for s in (lay.keys, lay.values)]
        table.add_row(str(lay.layer), str(lay.keys.rank), str(lay.values.rank), *bits, str(lay.keys.group),
                      str(lay.values.group), str(lay.residual_length))
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
    from kvcompress.evaluate.perplexity import check_window, compare

    if text is None and not passkey:
        raise KVCompressError("give --text FILE (perplexity), --passkey, or both")
    if text is not None:
        if not text.is_file():
            raise KVCompressError(f"text file not found: {text}")
        check_window(context, block, max_tokens)
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
        out.print(f"perplexity x{ppl['ratios']['ppl']:.4f} of the baseline; KV cache "
                  f"{ppl['compressed']['kv_bytes_per_token']:,.0f} bytes/token, {ppl['x_smaller_than_fp16']:.2f}x "
                  f"smaller than an fp16 cache of this model ({ppl['fp16_kv_bytes_per_token']:,} bytes/token)",
                  highlight=False)
        buckets = Table(title=f"against the source model, by position in the window: mean KL {ppl['kl']:.4f} nats, "
                              f"top-1 agreement {ppl['top1']:.1%}")
        for col in ("positions", "tokens", "KL (nats)", "top-1", "ppl ratio"):
            buckets.add_column(col, justify="right")
        for b in ppl["by_position"]:
            if b["tokens"]:
                buckets.add_row(f"{b['from']}-{b['to']}", str(b["tokens"]), f"{b['kl']:.4f}", f"{b['top1']:.1%}",
                                f"x{b['ppl_ratio']:.4f}")
        out.print(buckets)
    if keys is not None:
        base, comp = keys["baseline"], keys["compressed"]
        table = Table(title=f"passkey retrieval: {digits}-digit keys, {len(keys['depths'])} depths, seed {seed}")
        for col in ("length", "tokens", "base acc", "comp acc", "KV/tok base", "KV/tok comp", "x smaller than fp16"):
            table.add_column(col, justify="right")
        for key, c in comp["by_length"].items():
            b, used = base["by_length"][key], c["tokens"]
            span = str(used[0]) if min(used) == max(used) else f"{min(used)}-{max(used)}"
            table.add_row(key, span, f"{b['correct']}/{b['total']}", f"{c['correct']}/{c['total']}",
                          f"{b['kv_bytes_per_token']:.0f}", f"{c['kv_bytes_per_token']:.0f}",
                          f"{keys['x_smaller_than_fp16'][key]:.2f}")
        out.print(table)
        off = max(abs(p["depth_actual"] - p["depth"]) for p in keys["prompts"])
        out.print(f"accuracy: baseline {base['accuracy']:.1%}, compressed {comp['accuracy']:.1%} "
                  f"({comp['total']} prompts); an fp16 cache of this model holds "
                  f"{keys['fp16_kv_bytes_per_token']:,} bytes/token", highlight=False)
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
    peer: Annotated[bool, typer.Option(help="Include the peer rows: transformers' QuantizedCache with quanto and "
                                            "HQQ at their settings, and llama.cpp, where installed.")] = True,
    peers: Annotated[str | None, typer.Option(help="Comma-separated peer rows to run (default: all): "
                                                   "quanto-4bit-g64-axis-1/0 style keys, or llama.cpp.")] = None,
    only: Annotated[str | None, typer.Option(help="Run one part: quality (bytes, perplexity, passkey) or speed "
                                                  "(prefill, decode, peak memory).")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Where results.json and the plots go.")] = Path("bench"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as one JSON object.")] = False,
) -> None:
    """Baseline vs recipes: KV bytes, perplexity, passkey, prefill and decode speed; results.json/.md, plots."""

    from kvcompress.evaluate.bench import BenchSettings, check_settings, markdown_table, skipped_lines
    from kvcompress.evaluate.bench import bench as run_bench
    from kvcompress.evaluate.passkey import parse_lengths

    settings = BenchSettings(contexts=parse_lengths(contexts), text=text, ppl_context=ppl_context,
                             ppl_tokens=ppl_tokens, passkey_depths=passkey_depths, new_tokens=new_tokens,
                             passkey_lengths=parse_lengths(passkey_lengths) if passkey_lengths else None,
                             repeats=repeats, dtype=dtype, device=device, peer=peer,
                             peers=tuple(p.strip() for p in peers.split(",") if p.strip()) if peers else None,
                             parts=(only,) if only else ("quality", "speed"))
    check_settings(settings)
    names = [r.strip() for r in recipes.split(",") if r.strip()]
    with progress_bar(as_json) as bar:
        results = run_bench(model, names, settings, progress=tracker(bar))
    for line in skipped_lines(results["rows"]):  # on stderr: stdout holds the report, or only the JSON
        err.print(escape(line), style="yellow", highlight=False, soft_wrap=True)
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
