"""Scratch buffers that every layer of one cache reuses during decode."""

from __future__ import annotations

import math

import torch


class Workspace:
    """Named float buffers, grown by doubling and handed out as views.

    Decode de-quantizes and rebuilds each layer's keys and values into buffers the size of the cache.
    Layers run one after another, so one set serves them all, and nothing in a buffer outlives the
    attention step that filled it: this is working memory, not KV storage. Reusing it matters on the
    CPU, where a fresh buffer of a few hundred KiB costs a page fault per 4 KiB page on every step.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous ``shape`` view of buffer ``name`` (its contents are whatever was left in it)."""
        n = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            grown = 2 * buf.numel() if buf is not None and buf.dtype == dtype and buf.device == device else 0
            buf = torch.empty(max(n, grown), dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:n].view(shape)
