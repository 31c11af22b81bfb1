"""Perplexity measured *through* a cache: text streams in blocks, so later blocks see only what is stored.

A single teacher-forced forward would attend to exact K/V of every earlier token and bypass whatever
the cache does (latents, quantized codes, evicted tokens). Here, within each window of ``context``
tokens, the model reads blocks of ``block`` tokens; each block attends to earlier blocks only through
the cache. The baseline takes the same path with an uncompressed cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from kvcompress.compat import CACHE_ARG
from kvcompress.errors import KVCompressError


@dataclass
class PerplexityResult:
    """Perplexity and the cache's size at the end of a full window."""

    ppl: float
    nll: float
    tokens: int
    kv_bytes_per_token: float


def check_window(context: int, block: int, max_tokens: int) -> None:
    """Refuse windows that cannot measure a cache: the cache is only read once a second block comes.

    Raises
    ------
    KVCompressError
        ``block`` < 1, ``context`` or ``max_tokens`` not above ``block``.
    """
    if block < 1:
        raise KVCompressError(f"--block must be >= 1, got {block}")
    for name, value in (("--context", context), ("--max-tokens", max_tokens)):
        if value <= block:
            raise KVCompressError(f"{name} ({value}) must be larger than --block ({block}): tokens after the first "
                                  "block are the ones that read the cache")


def text_ids(tokenizer, path: str | Path, max_tokens: int, block: int = 1) -> torch.Tensor:
    """The first ``max_tokens`` token ids of a text file, ``[1, N]``; it must give more than ``block``."""
    p = Path(path)
    if not p.is_file():
        raise KVCompressError(f"text file not found: {p}")
    text = p.read_text(errors="replace").replace("\r\n", "\n")
    ids = tokenizer(text[: max_tokens * 12], add_special_tokens=False, return_tensors="pt", verbose=False).input_ids
    if ids.shape[1] <= block:
        raise KVCompressError(f"{p} gives {ids.shape[1]} tokens; perplexity through the cache needs more than "
                              f"one block ({block} tokens)")
    return ids[:, :max_tokens]


def _scored_blocks(model, ids: torch.Tensor, new_cache: Callable[[], object], context: int, block: int):
    """Stream ``ids`` through a cache and yield, for every block: the predicted tokens' positions in their
    window ``[n]``, the logits predicting them ``[n, V]`` (float32), those tokens ``[n]``, the cache, and whether
    the block ends a window (``None`` instead of the cache otherwise)."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    n = ids.shape[1]
    for start in range(0, n - 1, context):
        window = ids[:, start:start + context]
        if window.shape[1] < 2:
            break
        cache = new_cache()
        prev_logits = None
        for b0 in range(0, window.shape[1], block):
            chunk = window[:, b0:b0 + block]
            pos = torch.arange(b0, b0 + chunk.shape[1], device=device).unsqueeze(0)
            logits = model(input_ids=chunk, position_ids=pos, use_cache=True, **{CACHE_ARG: cache}).logits.float()
            preds = logits[:, :-1] if prev_logits is None else torch.cat([prev_logits, logits[:, :-1]], dim=1)
            targets = chunk if prev_logits is not None else chunk[:, 1:]
            first = b0 if prev_logits is not None else 1
            prev_logits = logits[:, -1:]
            last = b0 + chunk.shape[1] >= window.shape[1]
            yield (torch.arange(first, b0 + chunk.shape[1]), preds[0], targets[0],
                   (cache, window.shape[1], start) if last else None)


@torch.no_grad()
def blocked_perplexity(
    model,
    ids: torch.Tensor,
    new_cache: Callable[[], object],
    context: int = 2048,
    block: int = 128,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of ``ids`` read in ``context``-token windows, ``block`` tokens at a time through a cache.

    Parameters
    ----------
    model : PreTrainedModel
        Any causal LM accepting a cache and ``position_ids``.
    ids : torch.Tensor
        ``[1, N]`` token ids; the tail that does not fill a window is scored as a shorter window.
    new_cache : callable
        Returns a fresh cache for each window; its bytes per token (:func:`cache_bytes`) are measured
        at the end of each full window (the largest is reported; a shorter tail window only counts
        when it is the only window).
    context, block : int
        Window and block sizes.
    progress : callable, optional
        ``(done_tokens, total_tokens)``.
    """
    if context < 2 or block < 1:
        raise KVCompressError("context must be >= 2 and block >= 1")
    total_nll, scored, kv_per_token = 0.0, 0, 0.0
    for _, preds, targets, end in _scored_blocks(model, ids, new_cache, context, block):
        total_nll += float(F.cross_entropy(preds, targets, reduction="sum"))
        scored += targets.numel()
        if end is not None:
            kv_per_token = _window_bytes(kv_per_token, *end, context, progress, ids.shape[1])
    nll = total_nll / scored
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=scored, kv_bytes_per_token=kv_per_token)


def _window_bytes(largest: float, cache, length: int, start: int, context: int, progress, total: int) -> float:
    """The largest bytes per token so far, with this window's (a short tail window only when it is the
    only one: it would overstate the per-token cost), and the progress callback."""
    if start == 0 or length == context:
        largest = max(largest, cache_bytes(cache) / length)
    if progress:
        progress(min(start + context, total), total)
    return largest


def position_edges(context: int) -> list[int]:
    """Bucket edges over positions in a window: the last half, quarter and eighth apart, then the start
    (``[0, 1k, 2k, 4k, 8k]`` at 8192, ``[0, 256, 512, 1024, 2048]`` at 2048)."""
    return sorted({0, *(max(1, context >> k) for k in (3, 2, 1)), context})


@dataclass
class AgreementResult:
    """Both models through their caches on the same windows: perplexities, and how far the compressed
    model's next-token distribution is from the uncompressed one's, overall and per position bucket."""

    compressed: PerplexityResult
    baseline: PerplexityResult
    kl: float  # mean KL(p_baseline || p_compressed) per scored token, nats
    top1: float  # fraction of scored tokens whose argmax agrees
    buckets: list[dict]  # per position bucket: "from", "to", "tokens", "kl", "top1", "ppl_ratio"


@torch.no_grad()
def agreement(model, base_model, ids: torch.Tensor, new_cache: Callable[[], object],
              base_cache: Callable[[], object], context: int = 2048, block: int = 128,
              progress: Callable[[int, int], None] | None = None) -> AgreementResult:
    """Perplexity of both models and the KL divergence and top-1 agreement between them, block by block.

    Both models read the same windows in the same blocks, each through its own cache, in lockstep (so both
    are resident); nothing but running sums is kept. Positions are bucketed by :func:`position_edges`.
    """
    if context < 2 or block < 1:
        raise KVCompressError("context must be >= 2 and block >= 1")
    return agree(_scored_blocks(model, ids, new_cache, context, block),
                 _scored_blocks(base_model, ids, base_cache, context, block), context, ids.shape[1], progress)


def agree(blocks: Iterable[tuple], base_blocks: Iterable[tuple], context: int, total: int,
          progress: Callable[[int, int], None] | None = None) -> AgreementResult:
    """:func:`agreement` of two streams of scored blocks, in lockstep.

    Parameters
    ----------
    blocks, base_blocks
        The compressed and uncompressed streams over the same windows, each yielding per block what
        ``_scored_blocks`` does: positions in the window ``[n]``, logits ``[n, V]``, target tokens ``[n]``,
        and at the end of a window ``(cache, window length, window start)`` (else None), where ``cache``
        is anything :func:`cache_bytes` measures.
    context
        The window, whose :func:`position_edges` bucket the positions.
    total
        Tokens in all windows (for ``progress``).
    """
    edges = position_edges(context)
    k = len(edges) - 1
    sums = {name: torch.zeros(k, dtype=torch.float64) for name in ("n", "kl", "top1", "nll", "base_nll")}
    comp_bytes, base_bytes = 0.0, 0.0
    for (pos, preds, targets, end), (_, base_preds, _, base_end) in zip(blocks, base_blocks, strict=True):
        logp, base_logp = preds.log_softmax(-1), base_preds.to(preds.device).log_softmax(-1)
        bucket = torch.bucketize(pos, torch.tensor(edges[1:-1]), right=True)
        per_token = {
            "n": torch.ones(len(pos), dtype=torch.float64),
            "kl": (base_logp.exp() * (base_logp - logp)).sum(-1).double().cpu(),
            "top1": (preds.argmax(-1) == base_preds.argmax(-1).to(preds.device)).double().cpu(),
            "nll": -logp.gather(-1, targets[:, None]).squeeze(-1).double().cpu(),
            "base_nll": -base_logp.gather(-1, targets[:, None].to(base_logp.device)).squeeze(-1).double().cpu(),
        }
        for name, values in per_token.items():
            sums[name].index_add_(0, bucket, values)
        if end is not None:
            comp_bytes = _window_bytes(comp_bytes, *end, context, progress, total)
            base_bytes = _window_bytes(base_bytes, *base_end, context, None, total)
    n = float(sums["n"].sum())

    def result(nll: torch.Tensor, kv: float) -> PerplexityResult:
        mean = float(nll.sum()) / n
        return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens=int(n), kv_bytes_per_token=kv)

    buckets = [{"from": edges[i], "to": edges[i + 1], "tokens": int(sums["n"][i]),
                "kl": float(sums["kl"][i] / sums["n"][i]) if sums["n"][i] else None,
                "top1": float(sums["top1"][i] / sums["n"][i]) if sums["n"][i] else None,
                "ppl_ratio": math.exp(float(sums["nll"][i] - sums["base_nll"][i]) / float(sums["n"][i]))
                if sums["n"][i] else None} for i in range(k)]
    return AgreementResult(result(sums["nll"], comp_bytes), result(sums["base_nll"], base_bytes),
                           float(sums["kl"].sum()) / n, float(sums["top1"].sum()) / n, buckets)


def cache_bytes(cache) -> int:
    """Bytes held by a kvcompress cache (its ``kv_bytes``) or by a transformers cache: every tensor its
    layers hold (``DynamicCache`` keys and values; ``QuantizedCache`` residual windows and quantized
    tensors, counted through their packed data, scales and shifts, also inside the ``(packed, meta)``
    tuples HQQ keeps)."""
    if hasattr(cache, "kv_bytes"):
        return int(cache.kv_bytes())
    return sum(_held_bytes(v) for layer in cache.layers for v in vars(layer).values())


def _held_bytes(value) -> int:
    """Bytes of every tensor in ``value``, also inside tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return tensor_bytes(value)
    if isinstance(value, (tuple, list)):
        return sum(_held_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_held_bytes(v) for v in value.values())
    return 0


def tensor_bytes(t: torch.Tensor) -> int:
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):  # quantized tensor subclasses
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def compare(checkpoint: str | Path, text: str | Path, context: int = 2048, block: int = 128,
            max_tokens: int = 16384, source: str | None = None,
            progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Perplexity of a compressed checkpoint and of its source model, same windows, same run, and the KL
    divergence and top-1 agreement of their next-token distributions (:func:`agreement`).

    Returns
    -------
    dict
        ``{"baseline": {"ppl", "kv_bytes_per_token"}, "compressed": {...}, "ratios": {"ppl", "kv_bytes"},
        "kl", "top1", "by_position", "context", "block", "tokens", "fp16_kv_bytes_per_token",
        "x_smaller_than_fp16"}``; the baseline holds the run's dtype, ``x_smaller_than_fp16`` compares with
        an fp16 cache of the same model; ``by_position`` has one entry per position bucket.
    """
    from transformers import DynamicCache

    from kvcompress.checkpoint.loading import load, load_source, make_cache
    from kvcompress.memory import baseline_bytes_per_token
    from kvcompress.sources import ModelSpec

    check_window(context, block, max_tokens)
    tick = progress or (lambda *_: None)
    model, tokenizer = load(checkpoint)
    positions = model.config.max_position_embeddings
    if context > positions:
        raise KVCompressError(f"--context {context} exceeds the model's {positions} positions")
    ids = text_ids(tokenizer, text, max_tokens, block)
    fp16 = baseline_bytes_per_token(ModelSpec.from_config(model.config.to_dict()))
    base_model = load_source(model.kvcompress_manifest, source, model.dtype)
    both = agreement(model, base_model, ids, partial(make_cache, model),
                     lambda: DynamicCache(config=base_model.config), context, block,
                     lambda d, n: tick("compressed and source", d, n))
    comp, base = both.compressed, both.baseline
    return {
        "context": context,
        "block": block,
        "tokens": comp.tokens,
        "baseline": {"ppl": base.ppl, "kv_bytes_per_token": base.kv_bytes_per_token},
        "compressed": {"ppl": comp.ppl, "kv_bytes_per_token": comp.kv_bytes_per_token},
        "ratios": {"ppl": comp.ppl / base.ppl, "kv_bytes": comp.kv_bytes_per_token / base.kv_bytes_per_token},
        "kl": both.kl,
        "top1": both.top1,
        "by_position": both.buckets,
        "fp16_kv_bytes_per_token": fp16,
        "x_smaller_than_fp16": fp16 / comp.kv_bytes_per_token,
    }
