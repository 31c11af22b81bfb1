"""``kvcompress bench``: the uncompressed baseline, transformers' QuantizedCache and each recipe, one process.

For every system: exact KV bytes per token, perplexity through the cache, passkey accuracy, and per
context the prefill time, decode tokens/s and peak memory. Speed runs of a recipe alternate with runs of
the baseline (warm-up runs first, not counted), so each speed ratio compares runs taken side by side and
slow drift of the machine cancels out.
"""

from __future__ import annotations

import importlib.util
import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache

import kvcompress
from kvcompress.errors import KVCompressError
from kvcompress.evaluate.passkey import make_prompts, passkey_accuracy
from kvcompress.evaluate.perplexity import blocked_perplexity, text_ids
from kvcompress.evaluate.speed import peak_generate, summarize, timed_generate
from kvcompress.memory import baseline_bytes_per_token

Progress = Callable[[str, int, int], None]


@dataclass
class BenchSettings:
    """What ``bench`` measures and how hard."""

    contexts: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    text: Path | None = None  # perplexity text; None skips perplexity
    ppl_context: int = 2048
    ppl_tokens: int = 4096
    block: int = 128
    passkey_depths: int = 5  # 0 skips passkey
    passkey_lengths: list[int] | None = None  # default: the contexts
    new_tokens: int = 32
    repeats: int = 3
    dtype: str | None = None  # default: float16 on CUDA, float32 on the CPU
    device: str | None = None  # default: CUDA if available
    peer: bool = True  # transformers' QuantizedCache (quanto, 2-bit) when optimum-quanto is installed


@dataclass
class System:
    """One row: a model and how to make its cache."""

    name: str
    kind: str  # "baseline", "peer" or "recipe"
    model: object
    new_cache: Callable[[], object]
    meta: dict = field(default_factory=dict)


def bench(model_path: str, recipes: list[str], settings: BenchSettings,
          progress: Progress | None = None) -> dict:
    """Run the benchmark; returns the results that ``results.json`` holds.

    Parameters
    ----------
    model_path : str
        Source model (anything ``kvcompress export`` reads).
    recipes : list of str
        Shipped recipe names or recipe files; each is exported, loaded and measured in turn.
    settings : BenchSettings
        Contexts, text, repeats, dtype, device.
    progress : callable, optional
        ``(phase, done, total)``.
    """
    from kvcompress.checkpoint.export import export
    from kvcompress.checkpoint.loading import load
    from kvcompress.recipe import load_recipe
    from kvcompress.skeleton import load_full
    from kvcompress.sources import open_source

    tick = progress or (lambda *_: None)
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = settings.dtype or ("float16" if device.type == "cuda" else "float32")
    parsed = [load_recipe(r) for r in recipes]  # fail on a bad recipe before any long work
    source = open_source(model_path)
    tokenizer = source.tokenizer()
    base_model = load_full(source).to(device=device, dtype=getattr(torch, dtype)).eval()
    baseline = System("baseline (DynamicCache)", "baseline", base_model,
                      lambda: DynamicCache(config=base_model.config))
    measure = _Measure(settings, tokenizer, baseline, settings.passkey_lengths or settings.contexts, tick)
    rows = [measure.quality(baseline)]
    if settings.peer:
        rows.append(_peer_row(measure, _quantized_cache_peer(base_model)))
    root = Path(tempfile.mkdtemp(prefix="kvcompress-bench-"))  # recipe checkpoints, one at a time
    try:
        for spec, recipe in zip(recipes, parsed, strict=True):
            out = root / f"ckpt-{len(rows)}"
            label = recipe.name or Path(spec).stem
            export(source, out, recipe, dtype=dtype, force=True,
                   progress=lambda phase, done, total, label=label: tick(f"{phase} {label}", done, total))
            model, _ = load(out, device=device)
            system = System(label, "recipe", model, partial(kvcompress.make_cache, model),
                            {"recipe": spec, "description": recipe.description})
            rows.append(measure.everything(system))
            del model, system
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows[0]["speed"] = measure.baseline_speed()
    fp16 = baseline_bytes_per_token(source.spec)
    for row in rows:
        _ratios(row, rows[0], fp16)
    return {"model": model_path, "device": _device_name(device), "dtype": dtype,
            "versions": {"kvcompress": kvcompress.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
            "fp16_kv_bytes_per_token": fp16, "rows": rows}


class _Measure:
    """Measures systems against one baseline with shared prompts and text."""

    def __init__(self, settings: BenchSettings, tokenizer, baseline: System, lengths: list[int], tick: Progress):
        self.s, self.tokenizer, self.baseline, self.tick = settings, tokenizer, baseline, tick
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.ids = text_ids(tokenizer, settings.text, settings.ppl_tokens) if settings.text else None
        self.prompts = make_prompts(tokenizer, lengths, settings.passkey_depths) if settings.passkey_depths else []
        longest = max(settings.contexts)
        self.speed_ids = torch.randint(100, min(len(tokenizer), 30000), (1, longest),
                                       generator=torch.Generator().manual_seed(0))
        self.base_runs: dict[int, list] = {c: [] for c in settings.contexts}

    def quality(self, system: System) -> dict:
        row = {"name": system.name, "kind": system.kind, **system.meta}
        if self.ids is not None:
            ppl = blocked_perplexity(system.model, self.ids, system.new_cache, self.s.ppl_context, self.s.block,
                                     lambda d, n: self.tick(f"ppl {system.name}", d, n))
            row |= {"ppl": ppl.ppl, "ppl_tokens": ppl.tokens, "kv_bytes_per_token": ppl.kv_bytes_per_token}
        if self.prompts:
            keys = passkey_accuracy(system.model, self.tokenizer, self.prompts, system.new_cache,
                                    lambda d, n: self.tick(f"passkey {system.name}", d, n))
            row |= {"passkey": keys["accuracy"], "passkey_correct": keys["correct"], "passkey_total": keys["total"],
                    "passkey_by_length": {k: v["accuracy"] for k, v in keys["by_length"].items()}}
        return row

    def everything(self, system: System) -> dict:
        row = self.quality(system)
        row["speed"] = {str(c): self._paired_speed(system, c) for c in self.s.contexts}
        return row

    def _paired_speed(self, system: System, context: int) -> dict:
        """Alternate runs of ``system`` and the baseline; the first pair warms up and is not counted."""
        ids, ours, base = self.speed_ids[:, :context], [], []
        for i in range(self.s.repeats + 1):
            self.tick(f"speed {system.name} @{context}", i, self.s.repeats + 1)
            pair = [timed_generate(sys.model, ids, sys.new_cache(), self.s.new_tokens, self.pad)
                    for sys in (system, self.baseline)]
            if i:
                ours.append(pair[0])
                base.append(pair[1])
        self.base_runs[context] += base
        result, paired = summarize(ours), summarize(base)
        result["peak_memory_bytes"] = self._peak(system, ids)
        result["decode_ratio"] = result["decode_tokens_per_second"] / paired["decode_tokens_per_second"]
        result["prefill_ratio"] = result["prefill_seconds"] / paired["prefill_seconds"]
        return result

    def baseline_speed(self) -> dict:
        """The baseline's own numbers: medians over every run it took beside the other systems."""
        if not all(self.base_runs.values()):  # no other system: time the baseline alone
            for c in self.s.contexts:
                ids = self.speed_ids[:, :c]
                runs = [timed_generate(self.baseline.model, ids, self.baseline.new_cache(), self.s.new_tokens,
                                       self.pad) for _ in range(self.s.repeats + 1)]
                self.base_runs[c] = runs[1:]
        return {str(c): summarize(runs) | {"peak_memory_bytes": self._peak(self.baseline, self.speed_ids[:, :c]),
                                           "decode_ratio": 1.0, "prefill_ratio": 1.0}
                for c, runs in self.base_runs.items()}

    def _peak(self, system: System, ids: torch.Tensor) -> int:
        phase = f"memory {system.name} @{ids.shape[1]}"
        self.tick(phase, 0, 1)
        peak = peak_generate(system.model, ids, system.new_cache, self.s.new_tokens, self.pad)
        self.tick(phase, 1, 1)
        return peak


QUANTO_MISSING = "optimum-quanto is not installed (pip install optimum-quanto)"


def _quanto_installed() -> bool:
    """Whether ``optimum.quanto`` can be found; False, not an error, when ``optimum`` itself is absent."""
    try:
        return importlib.util.find_spec("optimum.quanto") is not None
    except ImportError:  # find_spec imports the parent package, and there is no `optimum`
        return False


def _peer_row(measure: _Measure, peer: System) -> dict:
    """The peer measured, or its row with a one-line ``error`` saying why it could not run."""
    reason = QUANTO_MISSING
    if _quanto_installed():
        try:
            return measure.everything(peer)
        except (ImportError, ValueError, RuntimeError) as e:  # quanto too old, or rejects some shapes
            reason = str(e).partition("\n")[0] or type(e).__name__
    return {"name": peer.name, "kind": peer.kind, **peer.meta, "error": reason}


def _quantized_cache_peer(model) -> System:
    from transformers import QuantizedCache

    cfg = {"backend": "quanto", "nbits": 2, "q_group_size": 32, "residual_length": 128, "axis_key": -1,
           "axis_value": -1}
    return System("transformers QuantizedCache (quanto 2-bit)", "peer", model,
                  lambda: QuantizedCache(config=model.config, **cfg), {"cache": cfg})


def _ratios(row: dict, base: dict, fp16_bytes: int) -> None:
    if "kv_bytes_per_token" in row:
        row["x_smaller_than_fp16"] = fp16_bytes / row["kv_bytes_per_token"]
    if "ppl" in row and "ppl" in base:
        row["ppl_ratio"] = row["ppl"] / base["ppl"]
        row["ppl_delta_pct"] = 100 * (row["ppl_ratio"] - 1)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def check_settings(settings: BenchSettings) -> None:
    """Reject impossible settings before loading anything."""
    if not settings.contexts or min(settings.contexts) < 16:
        raise KVCompressError("contexts must be a list of lengths >= 16")
    if settings.text is not None and not Path(settings.text).is_file():
        raise KVCompressError(f"text file not found: {settings.text}")
    if settings.repeats < 1 or settings.new_tokens < 3:
        raise KVCompressError("need --repeats >= 1 and --new-tokens >= 3")
    if settings.dtype not in (None, "float16", "bfloat16", "float32"):
        raise KVCompressError(f"dtype must be float16, bfloat16 or float32, got {settings.dtype!r}")


def summary_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of the results table (rows that failed are left out)."""
    contexts = list(results["rows"][0].get("speed", {}))
    head = ["system", "KV bytes/token", "× smaller than fp16", "perplexity", "Δppl %", "passkey",
            *(f"decode tok/s @{c} (× baseline)" for c in contexts),
            *([f"peak MB @{contexts[-1]}"] if contexts else [])]
    rows = []
    for row in results["rows"]:
        if "error" in row:
            continue
        cells = [row["name"], f"{row['kv_bytes_per_token']:,.0f}" if "kv_bytes_per_token" in row else "-",
                 f"{row['x_smaller_than_fp16']:.2f}" if "x_smaller_than_fp16" in row else "-",
                 f"{row['ppl']:.3f}" if "ppl" in row else "-",
                 f"{row['ppl_delta_pct']:+.2f}" if "ppl_delta_pct" in row else "-",
                 f"{row['passkey_correct']}/{row['passkey_total']}" if "passkey" in row else "-"]
        for c in contexts:
            sp = row.get("speed", {}).get(c)
            cells.append(f"{sp['decode_tokens_per_second']:.1f} (×{sp['decode_ratio']:.2f})" if sp else "-")
        if contexts:
            sp = row.get("speed", {}).get(contexts[-1])
            cells.append(f"{sp['peak_memory_bytes'] / 1e6:.1f}" if sp else "-")
        rows.append(cells)
    return head, rows


def markdown_table(results: dict) -> str:
    """The results as a Markdown table (what the README's Results section shows)."""
    head, rows = summary_table(results)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"
