"""Perplexity measured *through* a cache: text streams in blocks, so later blocks see only what is stored.

A single teacher-forced forward would attend to exact K/V of every earlier token and bypass whatever
the cache does (latents, quantized codes, evicted tokens). Here, within each window of ``context``
tokens, the model reads blocks of ``block`` tokens; each block attends to earlier blocks only through
the cache. The baseline takes the same path with an uncompressed cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
    device = next(model.parameters()).device
    ids = ids.to(device)
    total_nll, scored, kv_per_token = 0.0, 0, 0.0
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
            total_nll += float(F.cross_entropy(preds.reshape(-1, preds.shape[-1]), targets.reshape(-1),
                                               reduction="sum"))
            scored += targets.numel()
            prev_logits = logits[:, -1:]
        if start == 0 or window.shape[1] == context:  # a short tail window would overstate the per-token cost
            kv_per_token = max(kv_per_token, cache_bytes(cache) / window.shape[1])
        if progress:
            progress(min(start + context, n), n)
    nll = total_nll / scored
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=scored, kv_bytes_per_token=kv_per_token)


def cache_bytes(cache) -> int:
    """Bytes held by a kvcompress cache (its ``kv_bytes``) or by a transformers cache: every tensor its
    layers hold (``DynamicCache`` keys and values; ``QuantizedCache`` residual windows and quantized
    tensors, counted through their packed data, scales and shifts)."""
    if hasattr(cache, "kv_bytes"):
        return int(cache.kv_bytes())
    return sum(tensor_bytes(t) for layer in cache.layers for t in vars(layer).values()
               if isinstance(t, torch.Tensor))


def tensor_bytes(t: torch.Tensor) -> int:
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):  # quantized tensor subclasses
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def compare(checkpoint: str | Path, text: str | Path, context: int = 2048, block: int = 128,
            max_tokens: int = 16384, source: str | None = None,
            progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Perplexity of a compressed checkpoint and of its source model, same windows, same run.

    Returns
    -------
    dict
        ``{"baseline": {"ppl", "kv_bytes_per_token"}, "compressed": {...}, "ratios": {"ppl", "kv_bytes"},
        "context", "block", "tokens", "fp16_kv_bytes_per_token", "x_smaller_than_fp16"}``; the baseline holds
        the run's dtype, ``x_smaller_than_fp16`` compares with an fp16 cache of the same model.
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
    comp = blocked_perplexity(model, ids, partial(make_cache, model), context, block,
                              lambda d, n: tick("compressed", d, n))
    manifest = model.kvcompress_manifest
    dtype = model.dtype
    del model  # free the compressed model before building the source model
    base_model = load_source(manifest, source, dtype)
    base = blocked_perplexity(base_model, ids, lambda: DynamicCache(config=base_model.config), context, block,
                              lambda d, n: tick("baseline", d, n))
    return {
        "context": context,
        "block": block,
        "tokens": comp.tokens,
        "baseline": {"ppl": base.ppl, "kv_bytes_per_token": base.kv_bytes_per_token},
        "compressed": {"ppl": comp.ppl, "kv_bytes_per_token": comp.kv_bytes_per_token},
        "ratios": {"ppl": comp.ppl / base.ppl, "kv_bytes": comp.kv_bytes_per_token / base.kv_bytes_per_token},
        "fp16_kv_bytes_per_token": fp16,
        "x_smaller_than_fp16": fp16 / comp.kv_bytes_per_token,
    }
