"""Generation speed and peak memory of a model with a given cache, measured the way users run it.

Timing goes through ``model.generate``: a logits processor stamps the clock each time a token is chosen,
so the first stamp ends the prefill and the gaps between later stamps are decode steps, with
everything ``generate`` does per step included.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from kvcompress.compat import CACHE_ARG
from kvcompress.evaluate.perplexity import cache_bytes


class _Stamps(LogitsProcessor):
    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator statistics, or the kernel's RSS high-water mark.

    On Linux the CPU peak comes from ``VmHWM`` after resetting it through ``/proc/self/clear_refs``; no
    sampling thread runs beside the timed code (one would compete for the GIL with Python-heavy decode
    loops and slow them down unevenly). Elsewhere ``peak`` is None.
    """

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._start = _status("VmRSS") if _reset_high_water_mark() else None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self._start is not None:
            self.peak = max(0, _status("VmHWM") - self._start)


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


@dataclass
class Run:
    """One timed ``generate`` call."""

    prefill_seconds: float
    decode_tokens_per_second: float
    peak_memory_bytes: int | None
    kv_bytes_per_token: float


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
    device = next(model.parameters()).device
    ids = ids.to(device)
    stamps = _Stamps()
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{CACHE_ARG: cache},
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([stamps]), pad_token_id=pad_token_id)
    t = stamps.times
    return Run(prefill_seconds=t[0] - start, decode_tokens_per_second=(len(t) - 1) / (t[-1] - t[0]),
               peak_memory_bytes=mem.peak, kv_bytes_per_token=cache_bytes(cache) / cache.get_seq_length())


def summarize(runs: list[Run]) -> dict:
    """Medians of prefill time and decode rate, the largest peak, and the KV bytes per token."""
    return {"prefill_seconds": statistics.median(r.prefill_seconds for r in runs),
            "decode_tokens_per_second": statistics.median(r.decode_tokens_per_second for r in runs),
            "peak_memory_bytes": max((r.peak_memory_bytes for r in runs if r.peak_memory_bytes is not None),
                                     default=None),
            "kv_bytes_per_token": runs[-1].kv_bytes_per_token, "runs": len(runs)}
