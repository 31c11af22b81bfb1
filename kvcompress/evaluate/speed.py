"""Generation speed and peak memory of a model with a given cache, measured the way users run it.

Timing goes through ``model.generate``: a logits processor stamps the clock each time a token is chosen,
so the first stamp ends the prefill and the gaps between later stamps are decode steps, with
everything ``generate`` does per step included. Peak memory comes from runs of its own: recording
allocations slows the code it watches.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LogitsProcessor, LogitsProcessorList

from kvcompress.compat import CACHE_ARG
from kvcompress.evaluate.perplexity import cache_bytes


class _Stamps(LogitsProcessor):
    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


_KINETO_SILENT = "1000"
"""A ``KINETO_LOG_LEVEL`` above all of kineto's severities (their count has grown across releases), so it logs none."""


@contextmanager
def _kineto_quiet() -> Iterator[None]:
    """Keep kineto, the torch profiler's engine, from writing its own lines to stderr (``profiler_start``,
    ``gpuGetDeviceCount failed`` on a machine without CUDA) while a profiler starts.

    Kineto reads ``KINETO_LOG_LEVEL`` once, when the process starts its first profiler, so the variable is
    set only around that start and the environment is left as it was; a level the user set is kept.
    """
    if "KINETO_LOG_LEVEL" in os.environ:
        yield
        return
    os.environ["KINETO_LOG_LEVEL"] = _KINETO_SILENT
    try:
        yield
    finally:
        del os.environ["KINETO_LOG_LEVEL"]


class PeakMemory:
    """Peak tensor memory allocated above the level at entry, in bytes (``peak``, set on exit).

    On CUDA it comes from the allocator's statistics. Elsewhere the torch profiler records every
    allocation and free of tensor memory, and their running sum, in time order, peaks at the answer: exact
    and repeatable, unlike the process's RSS, which memory the allocator kept from earlier work hides.
    Recording slows the code it watches, so speed is timed in other runs (:func:`peak_generate`). The
    profiler's own log lines stay off stderr (:func:`_kineto_quiet`).
    """

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            with _kineto_quiet():
                self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._profile.__exit__(*exc)
        events = [e for e in self._profile.profiler.kineto_results.events() if e.name() == "[memory]"]
        level = self.peak = 0
        for event in sorted(events, key=lambda e: e.start_ns()):
            level += event.nbytes()  # negative for a free
            self.peak = max(self.peak, level)


@dataclass
class Run:
    """One timed ``generate`` call."""

    prefill_seconds: float
    decode_tokens_per_second: float
    kv_bytes_per_token: float


def _generate(model, ids: torch.Tensor, cache, new_tokens: int, pad_token_id: int | None,
              processors: list | None = None) -> None:
    """Greedy-generate exactly ``new_tokens`` tokens after prompt ``ids`` ``[1, T]`` into ``cache``."""
    ids = ids.to(next(model.parameters()).device)
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{CACHE_ARG: cache},
                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   logits_processor=LogitsProcessorList(processors or []), pad_token_id=pad_token_id)


@torch.no_grad()
def timed_generate(model, ids: torch.Tensor, cache, new_tokens: int = 32, pad_token_id: int | None = None) -> Run:
    """Greedy-generate exactly ``new_tokens`` tokens after prompt ``ids`` ``[1, T]`` into ``cache``, timed.

    Parameters
    ----------
    model : PreTrainedModel
        Any causal LM with ``generate``.
    ids : torch.Tensor
        The prompt; its length is the context.
    cache : Cache
        An empty cache, filled by this call.
    new_tokens : int
        At least 3 (the decode rate needs two gaps).
    pad_token_id : int, optional
        Passed to ``generate`` (silences its warning).
    """
    if new_tokens < 3:
        raise ValueError("need new_tokens >= 3")
    stamps = _Stamps()
    start = time.perf_counter()
    _generate(model, ids, cache, new_tokens, pad_token_id, [stamps])
    t = stamps.times
    return Run(prefill_seconds=t[0] - start, decode_tokens_per_second=(len(t) - 1) / (t[-1] - t[0]),
               kv_bytes_per_token=cache_bytes(cache) / cache.get_seq_length())


@torch.no_grad()
def peak_generate(model, ids: torch.Tensor, new_cache, new_tokens: int = 32, pad_token_id: int | None = None) -> int:
    """Peak tensor memory (:class:`PeakMemory`) of one untimed run of what :func:`timed_generate` times.

    ``new_cache`` makes the empty cache inside the measured span, so all of the cache counts: what it
    holds at the end and anything it allocates on the way.
    """
    with PeakMemory(next(model.parameters()).device) as mem:
        _generate(model, ids, new_cache(), new_tokens, pad_token_id)
    return mem.peak


def summarize(runs: list[Run]) -> dict:
    """Medians of prefill time and decode rate, and the KV bytes per token."""
    return {"prefill_seconds": statistics.median(r.prefill_seconds for r in runs),
            "decode_tokens_per_second": statistics.median(r.decode_tokens_per_second for r in runs),
            "kv_bytes_per_token": runs[-1].kv_bytes_per_token, "runs": len(runs)}


def summarize_against(runs: list[Run], beside: list[Run]) -> dict:
    """:func:`summarize` of ``runs`` with its decode and prefill ratios to the ``beside`` runs, taken in turn
    with them."""
    result, other = summarize(runs), summarize(beside)
    result["decode_ratio"] = result["decode_tokens_per_second"] / other["decode_tokens_per_second"]
    result["prefill_ratio"] = result["prefill_seconds"] / other["prefill_seconds"]
    return result
