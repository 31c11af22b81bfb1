"""16-bit token storage: what a stream holds when it is not quantized, and every store's common interface.

A store holds one K or V stream of one layer, ``[B, H, T, D]`` features, behind one interface
(``shape``, ``append``, ``read``, ``residual``, ``keep``, ``flush``, ``nbytes``, ``select_batch``,
``quantized_length``), so a cache layer composes any store with any eviction policy. Bytes per token:
``2 · D`` (:func:`bytes_per_token`).
"""

from __future__ import annotations

import torch

FP16 = 2  # bytes of one 16-bit value


def bytes_per_token(width: int) -> int:
    """Bytes per token of ``width`` channels held in 16 bits."""
    return width * FP16


class DenseStore:
    """A growing ``[B, H, T, D]`` tensor in the model's dtype (no quantization)."""

    def __init__(self) -> None:
        self.data: torch.Tensor | None = None

    @property
    def quantized_length(self) -> int:
        """Tokens held in packed form (none here)."""
        return 0

    @property
    def shape(self) -> tuple[int, ...]:
        """``(B, H, T, D)`` of what :meth:`read` returns."""
        assert self.data is not None
        return tuple(self.data.shape)

    def append(self, x: torch.Tensor) -> None:
        """Add new tokens along dim -2."""
        self.data = x if self.data is None else torch.cat([self.data, x], dim=-2)

    def read(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """All stored tokens, ``[B, H, T, D]`` (copied into ``out`` if given)."""
        assert self.data is not None
        return self.data if out is None else out.copy_(self.data)

    def residual(self) -> torch.Tensor:
        """Tokens not in packed form (all of them)."""
        return self.read()

    def keep(self, index: torch.Tensor) -> None:
        """Keep only stored tokens ``index`` (``[B, H, T']``, ascending, relative to the residual)."""
        self.data = gather_tokens(self.read(), index)

    def flush(self, settled: int) -> None:
        """Nothing to quantize."""

    def nbytes(self) -> int:
        """Bytes held."""
        return 0 if self.data is None else self.data.numel() * self.data.element_size()

    def select_batch(self, index: torch.Tensor) -> None:
        """Reorder or select sequences (beam search)."""
        if self.data is not None:
            self.data = self.data.index_select(0, index.to(self.data.device))


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Tokens ``index`` (``[B, H, T']``) of ``x`` (``[B, H or 1, T, D]``): what eviction keeps."""
    if x.shape[1] != index.shape[1]:  # a store shared by heads is split per head by a per-head selection
        x = x.expand(-1, index.shape[1], -1, -1)
    return x.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))
