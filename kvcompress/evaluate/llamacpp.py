"""llama.cpp as a peer of ``bench``: the same GGUF run by llama-cpp-python, its K/V cache in f16, q8_0, q5_0, q4_0.

llama.cpp stores K and V per token in blocks of 32 values: ``q8_0`` keeps one fp16 scale and 32 int8 codes
(34 bytes, 8.5 bits per value), ``q5_0`` an fp16 scale and 32 5-bit codes (22 bytes, 5.5 bits), ``q4_0`` an
fp16 scale and 32 4-bit codes (18 bytes, 4.5 bits); ``f16`` is 16 bits. Since 0.5 (llama-cpp-python
0.3.36 vendors it) llama.cpp turns K and V of a quantized cache by a Walsh–Hadamard rotation when the head
dim is a multiple of 64 (``attn_rot_k`` / ``attn_rot_v`` in ``llama-kv-cache.cpp``; the environment variable
``LLAMA_ATTN_ROT_DISABLE=1`` turns it off), the same idea as our rotation. A quantized V needs flash
attention, so every run here has it on, f16 included, to keep the pairs alike.

Each row is measured against llama.cpp's own f16-K/V run, in the same process: perplexity, KL and top-1
agreement read both in lockstep over the token windows ``bench`` scores (logits of each block after the
cache holds the earlier ones), and decode speed alternates runs of the two. The bytes per token come
from the cache types' block sizes. llama.cpp multiplies with its own q4_1 weight kernels (activations
quantized to 8 bits), so its f16 perplexity is not exactly the transformers baseline's.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvcompress.evaluate.perplexity import agree
from kvcompress.evaluate.speed import Run, summarize, summarize_against

LLAMA_MISSING = "llama-cpp-python is not installed (pip install 'kvcompress[llamacpp]')"


@dataclass(frozen=True)
class CacheType:
    """One of llama.cpp's K/V cache types: ``block_bytes`` hold ``block`` values."""

    name: str
    ggml_type: int  # ggml's enum ggml_type
    block: int
    block_bytes: int

    def bytes_per_token(self, num_layers: int, kv_width: int) -> float:
        """K and V of every layer, ``kv_width`` values each (``kv_heads * head_dim``)."""
        return num_layers * 2 * kv_width / self.block * self.block_bytes


F16 = CacheType("f16", 1, 1, 2)
CACHE_TYPES = (CacheType("q8_0", 8, 32, 34), CacheType("q5_0", 6, 32, 22), CacheType("q4_0", 2, 32, 18))
"""The quantized types measured, each beside :data:`F16`, which is also a row of its own."""


def installed() -> bool:
    """Whether llama-cpp-python can be imported."""
    return importlib.util.find_spec("llama_cpp") is not None


def gguf_file(model_path: str | Path) -> Path | None:
    """The GGUF file ``bench`` was given (itself, or the one in its folder), or None."""
    path = Path(model_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    found = sorted(path.glob("*.gguf")) if path.is_dir() else []
    return found[0] if len(found) == 1 else None


class _KVHeld:
    """What llama.cpp's cache holds after ``tokens``, for :func:`kvcompress.evaluate.perplexity.cache_bytes`."""

    def __init__(self, tokens: int, per_token: float):
        self.tokens, self.per_token = tokens, per_token

    def kv_bytes(self) -> float:
        return self.tokens * self.per_token


class LlamaRunner:
    """One llama.cpp context of a GGUF with a given K/V cache type.

    Parameters
    ----------
    gguf : Path
        The model file.
    kv : CacheType
        K and V cache type.
    n_ctx : int
        Context size to allocate.
    block : int
        Tokens per ``llama_decode`` batch (the blocks perplexity reads).
    logits_all : bool
        Keep the logits of every token (perplexity); speed runs keep the last one only, as serving does.
    per_token : float
        KV bytes per token of ``kv`` for this model.
    """

    def __init__(self, gguf: Path, kv: CacheType, n_ctx: int, block: int, logits_all: bool, per_token: float):
        from llama_cpp import Llama

        threads = torch.get_num_threads()
        self.kv, self.per_token = kv, per_token
        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=block, n_ubatch=block, logits_all=logits_all,
                         flash_attn=True, type_k=kv.ggml_type, type_v=kv.ggml_type, n_threads=threads,
                         n_threads_batch=threads, verbose=False)

    def close(self) -> None:
        self.llm.close()

    def scored_blocks(self, ids: torch.Tensor, context: int, block: int) -> Iterator[tuple]:
        """What ``kvcompress.evaluate.perplexity._scored_blocks`` yields, through llama.cpp's cache: per block
        the positions predicted, their logits, their tokens, and at a window's end what the cache holds."""
        tokens = ids[0].tolist()
        for start in range(0, len(tokens) - 1, context):
            window = tokens[start:start + context]
            if len(window) < 2:
                break
            self.llm.reset()
            for b0 in range(0, len(window), block):
                self.llm.eval(window[b0:b0 + block])
                end = min(b0 + block, len(window))
                first = max(b0, 1)
                logits = torch.from_numpy(np.array(self.llm.scores[first - 1:end - 1], dtype=np.float32))
                last = end >= len(window)
                yield (torch.arange(first, end), logits, torch.tensor(window[first:end]),
                       (_KVHeld(len(window), self.per_token), len(window), start) if last else None)

    def timed(self, ids: torch.Tensor, new_tokens: int) -> Run:
        """Greedy decoding of ``new_tokens`` after prompt ``ids`` ``[1, T]``, timed as
        ``kvcompress.evaluate.speed.timed_generate`` times ``generate``: prefill until the first token is
        chosen, then the rate of the later ones."""
        from llama_cpp import llama_get_logits_ith

        vocab = self.llm.n_vocab()

        def choose() -> int:
            return int(np.ctypeslib.as_array(llama_get_logits_ith(self.llm.ctx, -1), shape=(vocab,)).argmax())

        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids[0].tolist())
        token = choose()
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            self.llm.eval([token])
            token = choose()
        done = time.perf_counter()
        return Run(prefill_seconds=first - start, decode_tokens_per_second=(new_tokens - 1) / (done - first),
                   kv_bytes_per_token=self.per_token)


@dataclass
class LlamaBench:
    """What the llama.cpp rows measure: the same windows, prompts and speed settings as ``bench``."""

    gguf: Path
    num_layers: int
    kv_width: int
    ids: torch.Tensor | None  # perplexity text, or None
    ppl_context: int
    block: int
    speed_ids: torch.Tensor | None  # the longest speed prompt, or None when speed is not measured
    contexts: list[int]
    new_tokens: int
    repeats: int
    tick: Callable[[str, int, int], None]

    def per_token(self, kv: CacheType) -> float:
        return kv.bytes_per_token(self.num_layers, self.kv_width)

    def _runner(self, kv: CacheType, quality: bool) -> LlamaRunner:
        """Batches of ``bench``'s block both ways: perplexity reads the cache after each block, and for speed
        128 beat llama.cpp's default of 512 with a quantized cache here (q4_0 prefill of 8160 tokens on 2 cores:
        236 s against more than 300 s; f16: 44 s against 48 s)."""
        n_ctx = self.ppl_context if quality else max(self.contexts) + self.new_tokens
        return LlamaRunner(self.gguf, kv, n_ctx, self.block, quality, self.per_token(kv))

    def rows(self) -> list[dict]:
        """The f16 row, then one per quantized type, each measured against the f16 run."""
        rows = [self._head(kv) for kv in (F16, *CACHE_TYPES)]
        if self.ids is not None:
            for row, kv in zip(rows[1:], CACHE_TYPES, strict=True):
                row |= self._quality(kv)
            rows[0] |= {"ppl": rows[1]["reference_ppl"], "ppl_tokens": rows[1]["ppl_tokens"],
                        "kv_bytes_per_token": self.per_token(F16)}
        if self.speed_ids is not None:
            f16_runs: dict[int, list[Run]] = {c: [] for c in self.contexts}
            for row, kv in zip(rows[1:], CACHE_TYPES, strict=True):
                row["speed"] = {str(c): self._paired_speed(kv, c, f16_runs[c]) for c in self.contexts}
            rows[0]["speed"] = {str(c): summarize(runs) for c, runs in f16_runs.items()}
        return rows

    def _head(self, kv: CacheType) -> dict:
        against = "" if kv is F16 else ", measured against its own f16 run (Δppl, KL, top-1 and speed ratios)"
        return {"name": f"llama.cpp {kv.name} K/V", "kind": "peer",
                "reference": None if kv is F16 else f"llama.cpp {F16.name} K/V",
                "cache": {"backend": "llama.cpp", "type_k": kv.name, "type_v": kv.name, "flash_attn": True,
                          "hadamard_rotation": kv is not F16},
                "description": f"llama.cpp (llama-cpp-python) on the same GGUF, K and V cache type {kv.name}{against}"}

    def _quality(self, kv: CacheType) -> dict:
        ours, f16 = self._runner(kv, True), self._runner(F16, True)
        try:
            both = agree(ours.scored_blocks(self.ids, self.ppl_context, self.block),
                         f16.scored_blocks(self.ids, self.ppl_context, self.block), self.ppl_context,
                         self.ids.shape[1], lambda d, n: self.tick(f"ppl llama.cpp {kv.name}", d, n))
        finally:
            ours.close()
            f16.close()
        return {"ppl": both.compressed.ppl, "ppl_tokens": both.compressed.tokens,
                "kv_bytes_per_token": both.compressed.kv_bytes_per_token, "kl": both.kl, "top1": both.top1,
                "by_position": both.buckets, "reference_ppl": both.baseline.ppl}

    def _paired_speed(self, kv: CacheType, context: int, f16_runs: list[Run]) -> dict:
        """``repeats`` alternating runs of ``kv`` and f16 (both resident), the f16 ones added to ``f16_runs``.
        Unlike torch, llama.cpp compiles nothing on a first run, so no pair is spent warming up (a q4_0 pair
        at 8k tokens takes minutes on 2 cores)."""
        ours, f16 = self._runner(kv, False), self._runner(F16, False)
        ids, mine, theirs = self.speed_ids[:, :context], [], []
        try:
            for i in range(self.repeats):
                self.tick(f"speed llama.cpp {kv.name} @{context}", i, self.repeats)
                mine.append(ours.timed(ids, self.new_tokens))
                theirs.append(f16.timed(ids, self.new_tokens))
        finally:
            ours.close()
            f16.close()
        f16_runs += theirs
        return summarize_against(mine, theirs)
