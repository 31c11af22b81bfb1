"""``kvcompress bench``: the uncompressed baseline, transformers' QuantizedCache and each recipe, one process.

For every system: exact KV bytes per token, perplexity through the cache, passkey accuracy, and per
context the prefill time, decode tokens/s and peak memory. Speed runs of a recipe alternate with runs of
the baseline (warm-up runs first, not counted), so each speed ratio compares runs taken side by side and
slow drift of the machine cancels out.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import math
import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, QuantizedCache

import kvcompress
from kvcompress.errors import KVCompressError
from kvcompress.evaluate.passkey import make_prompts, passkey_accuracy
from kvcompress.evaluate.perplexity import agreement, blocked_perplexity, text_ids
from kvcompress.evaluate.speed import peak_generate, summarize, summarize_against, timed_generate
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
    peer: bool = True  # the rows of PEERS (transformers' QuantizedCache, quanto and HQQ) and llama.cpp's
    peers: tuple[str, ...] | None = None  # which of them, by PEER_KEYS; None: all
    parts: tuple[str, ...] = ("quality", "speed")  # run one part at a time: ("quality",) or ("speed",)


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
    rows = [measure.quality(baseline)]  # only the row's name when quality is not a part of this run
    if settings.peer:
        rows += [_peer_row(measure, peer) for peer in PEERS if settings.peers is None or peer.key in settings.peers]
        if settings.peers is None or LLAMA_KEY in settings.peers:
            rows += _llama_rows(measure, model_path, source.spec, device)
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
    if "speed" in settings.parts:
        rows[0]["speed"] = measure.baseline_speed()
    fp16 = baseline_bytes_per_token(source.spec)
    for row in rows:
        _ratios(row, rows[0], fp16)
    results = {"model": model_path, "device": _device_name(device), "dtype": dtype,
               "versions": {"kvcompress": kvcompress.__version__, "torch": torch.__version__,
                            "transformers": transformers.__version__, **_peer_versions()},
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
               "fp16_kv_bytes_per_token": fp16, "rows": rows}
    return results | {"growth": growth_slopes(results)}


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
        if "quality" not in self.s.parts:
            return row
        if self.ids is not None and system is self.baseline:
            ppl = blocked_perplexity(system.model, self.ids, system.new_cache, self.s.ppl_context, self.s.block,
                                     lambda d, n: self.tick(f"ppl {system.name}", d, n))
            row |= {"ppl": ppl.ppl, "ppl_tokens": ppl.tokens, "kv_bytes_per_token": ppl.kv_bytes_per_token}
        elif self.ids is not None:  # beside the baseline in lockstep: also the KL and top-1 agreement
            both = agreement(system.model, self.baseline.model, self.ids, system.new_cache, self.baseline.new_cache,
                             self.s.ppl_context, self.s.block, lambda d, n: self.tick(f"ppl {system.name}", d, n))
            ppl = both.compressed
            row |= {"ppl": ppl.ppl, "ppl_tokens": ppl.tokens, "kv_bytes_per_token": ppl.kv_bytes_per_token,
                    "kl": both.kl, "top1": both.top1, "by_position": both.buckets}
        if self.prompts:
            keys = passkey_accuracy(system.model, self.tokenizer, self.prompts, system.new_cache,
                                    lambda d, n: self.tick(f"passkey {system.name}", d, n))
            row |= {"passkey": keys["accuracy"], "passkey_correct": keys["correct"], "passkey_total": keys["total"],
                    "passkey_by_length": {k: v["accuracy"] for k, v in keys["by_length"].items()}}
        return row

    def everything(self, system: System) -> dict:
        row = self.quality(system)
        if "speed" in self.s.parts:
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
        return summarize_against(ours, base) | {"peak_memory_bytes": self._peak(system, ids)}

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
HQQ_MISSING = "hqq is not installed (pip install hqq)"


@dataclass(frozen=True)
class Peer:
    """One setting of transformers' ``QuantizedCache``, passed to it as is.

    What the axes mean depends on the backend, for a ``[batch, kv_heads, tokens, head_dim]`` state:

    - quanto (``optimum.quanto.tensor.grouped.group``): ``0`` groups ``q_group_size`` consecutive
      elements, i.e. along ``head_dim`` within one token (per token); ``-1`` groups ``q_group_size``
      consecutive tokens of one channel (per channel), and so needs ``kv_heads * tokens`` to be a
      multiple of ``q_group_size`` each time it quantizes (the prompt, then every residual flush).
    - HQQ (``hqq.core.quantize.Quantizer.quantize``): ``1`` reshapes to ``[-1, q_group_size]``, per
      token like quanto's ``0``; ``0`` reshapes to ``[q_group_size, -1]``, which groups elements
      ``numel / q_group_size`` apart rather than the tokens of a channel.
    """

    backend: str  # QuantizedCache's `backend`: "quanto" or "hqq"
    nbits: int
    q_group_size: int
    axis_key: int
    axis_value: int
    residual_length: int = 128
    why: str = ""  # what the setting is, for the row's `description`
    tag: str = ""  # appended to the name in parentheses

    @property
    def key(self) -> str:
        """How ``bench --peers`` names this row."""
        return f"{self.backend}-{self.nbits}bit-g{self.q_group_size}-axis{self.axis_key}/{self.axis_value}"

    @property
    def name(self) -> str:
        name = (f"QuantizedCache {self.backend} {self.nbits}-bit g{self.q_group_size} axis_key={self.axis_key} "
                f"axis_value={self.axis_value} residual={self.residual_length}")
        return f"{name} ({self.tag})" if self.tag else name

    def config(self) -> dict:
        """The keyword arguments given to ``QuantizedCache`` besides the model config."""
        return {"backend": self.backend, "nbits": self.nbits, "q_group_size": self.q_group_size,
                "residual_length": self.residual_length, "axis_key": self.axis_key, "axis_value": self.axis_value}


PEERS = (
    Peer("quanto", 4, 64, -1, 0, why="keys per channel, values per token (KIVI's layout)"),
    Peer("quanto", 2, 64, -1, 0, why="keys per channel, values per token (KIVI's layout)"),
    Peer("quanto", 4, 64, 0, 0, why="keys and values per token (transformers' docs recommend axis 0 for quanto)"),
    Peer("quanto", 2, 32, -1, -1, why="keys and values per channel", tag="the old default row"),
    Peer("hqq", 4, 64, 1, 1, why="keys and values per token (transformers' docs recommend axis 1 for HQQ)"),
)
"""The peer rows ``bench`` measures, in order; each backend's rows are skipped when it is not installed."""

LLAMA_KEY = "llama.cpp"
PEER_KEYS = (*(p.key for p in PEERS), LLAMA_KEY)
"""What ``bench --peers`` takes: one key per QuantizedCache row, and one for all of llama.cpp's rows."""

BACKENDS = {"quanto": ("optimum.quanto", QUANTO_MISSING), "hqq": ("hqq", HQQ_MISSING)}
"""Per backend: the module ``QuantizedCache`` needs, and the error of its rows when it cannot be found."""

PEER_ERRORS = (ImportError, ValueError, RuntimeError, AssertionError)
"""What a backend raises when it cannot run: too old or broken (ImportError), settings or shapes it rejects
(ValueError, HQQ's AssertionError), an operation missing on this device (RuntimeError, NotImplementedError)."""


def _installed(module: str) -> bool:
    """Whether ``module`` can be found; False, not an error, when a parent package (``optimum``) is absent."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # find_spec imports the parent package, and there is none
        return False


def _peer_system(model, peer: Peer) -> System:
    cfg = peer.config()
    return System(peer.name, "peer", model, lambda: QuantizedCache(config=model.config, **cfg),
                  {"cache": cfg, "description": f"transformers' QuantizedCache: {peer.why}"})


def _peer_row(measure: _Measure, peer: Peer) -> dict:
    """The peer measured, or its row with a one-line ``error`` saying why it could not run."""
    module, reason = BACKENDS[peer.backend]
    system = _peer_system(measure.baseline.model, peer)
    if _installed(module):
        try:
            return measure.everything(system)
        except PEER_ERRORS as e:
            reason = str(e).strip().partition("\n")[0] or type(e).__name__
            if isinstance(e, ValueError) and peer.backend == "quanto" and -1 in (peer.axis_key, peer.axis_value):
                reason += (f" (quanto's axis -1 needs KV heads x tokens to be a multiple of {peer.q_group_size} "
                           "each time it quantizes: use contexts, passkey lengths and --ppl-context that are)")
    return {"name": system.name, "kind": system.kind, **system.meta, "error": reason}


def _llama_rows(measure: _Measure, model_path: str, spec, device: torch.device) -> list[dict]:
    """llama.cpp's rows (``kvcompress.evaluate.llamacpp``), or one row with the ``error`` saying why there are none."""
    from kvcompress.evaluate import llamacpp

    gguf = llamacpp.gguf_file(model_path)
    if not llamacpp.installed():
        reason = llamacpp.LLAMA_MISSING
    elif gguf is None:
        reason = "llama.cpp reads GGUF files, and MODEL is not one (nor a folder holding one)"
    elif device.type != "cpu":
        reason = f"llama.cpp runs on the CPU here, and this bench runs on {device.type}"
    else:
        s = measure.s
        runs = llamacpp.LlamaBench(
            gguf, spec.num_layers, spec.kv_width, measure.ids if "quality" in s.parts else None, s.ppl_context,
            s.block, measure.speed_ids if "speed" in s.parts else None, s.contexts, s.new_tokens, s.repeats,
            measure.tick)
        try:
            return runs.rows()
        except (ValueError, RuntimeError) as e:  # a GGUF or a cache type this build cannot load
            reason = str(e).strip().partition("\n")[0] or type(e).__name__
    return [{"name": "llama.cpp", "kind": "peer", "cache": {"backend": "llama.cpp"}, "error": reason}]


def skipped_lines(rows: list[dict]) -> list[str]:
    """One line per reason a row could not run: rows of one peer backend that failed alike share a line."""
    groups: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        if "error" in row:
            family = row.get("cache", {}).get("backend", row["name"])
            groups.setdefault((family, row["error"]), []).append(row["name"])
    return [f"{names[0]} skipped: {error}" if len(names) == 1 else
            f"{len(names)} QuantizedCache {family} rows skipped: {error}" for (family, error), names in groups.items()]


def _peer_versions() -> dict[str, str]:
    """Versions of the installed peer packages, by distribution name."""
    found = {}
    for dist in ("optimum-quanto", "hqq", "llama-cpp-python"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[dist] = importlib.metadata.version(dist)
    return found


def _ratios(row: dict, base: dict, fp16_bytes: int) -> None:
    """Size against fp16, and perplexity against ``base``, or against the row's own ``reference_ppl`` (what
    llama.cpp's rows are measured against)."""
    if "kv_bytes_per_token" in row:
        row["x_smaller_than_fp16"] = fp16_bytes / row["kv_bytes_per_token"]
    if "ppl" in row and "reference_ppl" in row:
        base = {"ppl": row["reference_ppl"]}
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
    if not settings.parts or set(settings.parts) - {"quality", "speed"}:
        raise KVCompressError(f"the parts of a bench run are quality and speed, got {', '.join(settings.parts)}")
    unknown = set(settings.peers or ()) - set(PEER_KEYS)
    if unknown:
        raise KVCompressError(f"unknown peer {', '.join(sorted(unknown))}: choose from {', '.join(PEER_KEYS)}")
    if settings.dtype not in (None, "float16", "bfloat16", "float32"):
        raise KVCompressError(f"dtype must be float16, bfloat16 or float32, got {settings.dtype!r}")


def summary_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of the results table (rows that failed are left out)."""
    contexts = list(results["rows"][0].get("speed", {}))
    kl = any("kl" in row for row in results["rows"])  # runs before KL was measured have no such columns
    head = ["system", "KV bytes/token", "× smaller than fp16", "perplexity", "Δppl %",
            *(["KL (nats)", "top-1"] if kl else []), "passkey",
            *(f"decode tok/s @{c} (× baseline)" for c in contexts),
            *([f"peak MB @{contexts[-1]}"] if contexts else [])]
    rows = []
    for row in results["rows"]:
        if "error" in row:
            continue
        cells = [row["name"], f"{row['kv_bytes_per_token']:,.0f}" if "kv_bytes_per_token" in row else "-",
                 f"{row['x_smaller_than_fp16']:.2f}" if "x_smaller_than_fp16" in row else "-",
                 f"{row['ppl']:.3f}" if "ppl" in row else "-",
                 _delta(row),
                 *([f"{row['kl']:.4f}" if "kl" in row else "-", f"{row['top1']:.1%}" if "top1" in row else "-"]
                   if kl else []),
                 f"{row['passkey_correct']}/{row['passkey_total']}" if "passkey" in row else "-"]
        for c in contexts:
            sp = row.get("speed", {}).get(c)
            ratio = f" (×{sp['decode_ratio']:.2f})" if sp and "decode_ratio" in sp else ""
            cells.append(f"{sp['decode_tokens_per_second']:.1f}{ratio}" if sp else "-")
        if contexts:
            sp = row.get("speed", {}).get(contexts[-1], {})
            cells.append(f"{sp['peak_memory_bytes'] / 1e6:.1f}" if "peak_memory_bytes" in sp else "-")
        rows.append(cells)
    return head, rows


def _delta(row: dict) -> str:
    """The perplexity change, saying what it is against when that is not the baseline row."""
    if "ppl_delta_pct" not in row:
        return "-"
    against = f" vs {row['reference']}" if row.get("reference") else ""
    return f"{row['ppl_delta_pct']:+.2f}{against}"


GROWTH = (("decode_tokens_per_second", "decode tok/s"), ("prefill_seconds", "prefill s"),
          ("peak_memory_bytes", "peak memory"))
"""The speed entries whose growth with context :func:`growth_slopes` fits, and their column names."""


def growth_slopes(results: dict) -> dict[str, dict[str, float]]:
    """Per system and entry of :data:`GROWTH`, the least-squares slope of ``log y`` on ``log context``: ``y``
    grows as ``context ** slope`` (1 is linear, 2 quadratic, -1 halves when the context doubles). Only
    systems timed at two contexts or more have slopes."""
    slopes: dict[str, dict[str, float]] = {}
    for row in results["rows"]:
        for key, _ in GROWTH:
            points = [(math.log(int(c)), math.log(sp[key])) for c, sp in row.get("speed", {}).items()
                      if sp.get(key, 0) > 0]
            if len(points) < 2:
                continue
            mx = sum(x for x, _ in points) / len(points)
            my = sum(y for _, y in points) / len(points)
            slope = (sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points))
            slopes.setdefault(row["name"], {})[key] = slope
    return slopes


def slope_table(results: dict) -> str:
    """:func:`growth_slopes` as a Markdown table, or an empty string when no system has slopes."""
    slopes = growth_slopes(results)
    if not slopes:
        return ""
    lines = ["| system | " + " | ".join(f"{name} ∝ context^" for _, name in GROWTH) + " |", "|" + "---|" * 4]
    for name, fits in slopes.items():
        lines.append(f"| {name} | " + " | ".join(f"{fits[k]:+.2f}" if k in fits else "-" for k, _ in GROWTH) + " |")
    return "\n".join(lines) + "\n"


def markdown_table(results: dict) -> str:
    """The results as a Markdown table (what the README's Results section shows)."""
    head, rows = summary_table(results)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    slopes = slope_table(results)
    return "\n".join(lines) + "\n" + (f"\nGrowth with context (fitted log-log slope):\n\n{slopes}" if slopes else "")
