"""Token storage for one K or V stream of one layer: dense, or packed low-bit with an fp residual window.

Both stores hold ``[B, H, T, D]`` features and share one interface (``shape``, ``append``, ``read``,
``keep``, ``flush``, ``nbytes``, ``select_batch``), so a cache layer composes them with any eviction policy.
"""

from __future__ import annotations

import torch

from kvcompress.methods import decoquant
from kvcompress.methods.channels import bit_runs
from kvcompress.methods.kivi import Packed, cat, dequantize, quantize


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
        self.data = _gather(self.read(), index)

    def flush(self, settled: int) -> None:
        """Nothing to quantize."""

    def nbytes(self) -> int:
        """Bytes held."""
        return 0 if self.data is None else self.data.numel() * self.data.element_size()

    def select_batch(self, index: torch.Tensor) -> None:
        """Reorder or select sequences (beam search)."""
        if self.data is not None:
            self.data = self.data.index_select(0, index.to(self.data.device))


class QuantizedStore:
    """Packed ``bits``-bit codes for settled tokens plus a 16-bit residual window of recent ones (KIVI).

    Keys use ``along="tokens"`` (per-channel scales over ``group_size`` tokens), values
    ``along="channels"`` (per-token scales over ``group_size`` channels). Once the residual holds a full
    ``block`` of tokens that are *settled* (no eviction policy will touch them again), the block is
    quantized. ``block`` is the residual window, or one group without a window (resolved by the plan,
    :class:`kvcompress.plan.StreamPlan`).
    """

    def __init__(self, bits: int, group_size: int, along: str, block: int) -> None:
        self.bits, self.group_size, self.along, self.block = bits, group_size, along, block
        self.packed: Packed | None = None
        self.fp: torch.Tensor | None = None
        self.dtype = torch.float16

    @property
    def quantized_length(self) -> int:
        """Tokens held in packed form."""
        return 0 if self.packed is None else self.packed.num_tokens

    @property
    def shape(self) -> tuple[int, ...]:
        """``(B, H, T, D)`` of what :meth:`read` returns."""
        assert self.fp is not None
        b, h, t, d = self.fp.shape
        return b, h, self.quantized_length + t, d

    def append(self, x: torch.Tensor) -> None:
        """Add new tokens to the 16-bit residual window (float32 input is stored as float16)."""
        self.dtype = x.dtype
        x = x.to(torch.float16) if x.element_size() > 2 else x
        self.fp = x if self.fp is None else torch.cat([self.fp, x], dim=-2)

    def flush(self, settled: int) -> None:
        """Quantize whole blocks of the residual that lie within the first ``settled`` stored tokens."""
        if self.fp is None:
            return
        ready = min(settled - self.quantized_length, self.fp.shape[-2]) // self.block * self.block
        if ready <= 0:
            return
        block = self._encode(self.fp[..., :ready, :].detach().to(self.dtype))  # rounding has no gradient
        self.packed = block if self.packed is None else self._cat([self.packed, block])
        self.fp = self.fp[..., ready:, :].clone()  # a view would keep the whole flushed window allocated

    def _encode(self, x: torch.Tensor) -> Packed:
        return quantize(x, self.bits, self.group_size, self.along)

    def _decode(self, packed: Packed, out: torch.Tensor) -> None:
        dequantize(packed, self.dtype, out)

    def _cat(self, parts: list[Packed]) -> Packed:
        return cat(parts)

    def _select(self, packed: Packed, index: torch.Tensor) -> Packed:
        p = packed
        return Packed(p.codes.index_select(0, index), p.scale.index_select(0, index),
                      p.minimum.index_select(0, index), p.bits, p.group_size, p.along, p.dim)

    def read(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """All stored tokens, de-quantized, ``[B, H, T, D]`` in the compute dtype.

        The packed tokens are de-quantized straight into the front of one buffer (``out`` if given, which
        may be a slice of channels of a wider buffer) and the residual window is copied behind them: no
        intermediate copy of the whole cache.
        """
        fp, tq = self.fp, self.quantized_length
        assert fp is not None
        if out is None:
            if self.packed is None:
                return self.residual()
            out = fp.new_empty(self.shape, dtype=self.dtype)
        if self.packed is not None:
            self._decode(self.packed, out[..., :tq, :])
        out[..., tq:, :] = fp
        return out

    def residual(self) -> torch.Tensor:
        """The 16-bit tokens after the packed ones, in the compute dtype."""
        assert self.fp is not None
        return self.fp.to(self.dtype)

    def keep(self, index: torch.Tensor) -> None:
        """Keep residual tokens ``index`` (eviction happens before quantization)."""
        assert self.fp is not None
        self.fp = _gather(self.fp, index)

    def nbytes(self) -> int:
        """Packed codes, fp16 scales and minima, and the residual window."""
        fp = 0 if self.fp is None else self.fp.numel() * self.fp.element_size()
        return fp + (0 if self.packed is None else self.packed.nbytes())

    def select_batch(self, index: torch.Tensor) -> None:
        """Reorder or select sequences (beam search)."""
        if self.fp is not None:
            self.fp = self.fp.index_select(0, index.to(self.fp.device))
        if self.packed is not None:
            self.packed = self._select(self.packed, index)


class DecoQuantStore(QuantizedStore):
    """A :class:`QuantizedStore` whose settled blocks are stored in DecoQuant form (arXiv:2405.12591).

    Each flushed ``block`` of tokens is split by a two-core MPO into a large core,
    quantized exactly like KIVI would quantize the block (same ``bits``, ``group_size``, ``along``), and a
    small float16 ``k x k`` core per block and head (``kvcompress.methods.decoquant``). Same interface and
    residual window as the parent; ``nbytes`` adds the small cores.
    """

    def _encode(self, x: torch.Tensor) -> decoquant.DecoPacked:
        return decoquant.encode(x, self.bits, self.group_size, self.along, self.block)

    def _decode(self, packed: decoquant.DecoPacked, out: torch.Tensor) -> None:
        out.copy_(decoquant.decode(packed, self.dtype))

    def _cat(self, parts: list[decoquant.DecoPacked]) -> decoquant.DecoPacked:
        return decoquant.cat_blocks(parts)

    def _select(self, packed: decoquant.DecoPacked, index: torch.Tensor) -> decoquant.DecoPacked:
        large = super()._select(packed.large, index)
        return decoquant.DecoPacked(large, packed.small.index_select(0, index), packed.block)


class SegmentedStore:
    """Runs of latent channels with their own bit widths (``[quant] allocation = "channels"``).

    ``bits`` holds one width per segment of ``segment`` channels in principal-axis order; neighbouring
    segments with equal bits form a run (``kvcompress.methods.channels``), each a :class:`QuantizedStore`
    of its channels. All runs hold the same tokens, flush together and read back into one buffer.
    """

    def __init__(self, bits: tuple[int, ...], segment: int, group_size: int, along: str,
                 block: int) -> None:
        self.bits, self.segment = bits, segment
        self.layout = (group_size, along, block)
        self.runs: list[tuple[int, QuantizedStore]] = []  # (channels, store), built on the first append

    @property
    def quantized_length(self) -> int:
        """Tokens held in packed form."""
        return self.runs[0][1].quantized_length if self.runs else 0

    @property
    def shape(self) -> tuple[int, ...]:
        """``(B, H, T, D)`` of what :meth:`read` returns."""
        b, h, t, _ = self.runs[0][1].shape
        return b, h, t, sum(w for w, _ in self.runs)

    def append(self, x: torch.Tensor) -> None:
        """Add new tokens; each run takes its channels."""
        if not self.runs:
            runs = bit_runs(self.bits, x.shape[-1], self.segment)
            self.runs = [(w, QuantizedStore(b, *self.layout)) for w, b in runs]
        start = 0
        for width, store in self.runs:
            store.append(x[..., start:start + width])
            start += width

    def read(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """All stored tokens, de-quantized, ``[B, H, T, D]``: every run writes its channels of one buffer
        (``out`` if given)."""
        first = self.runs[0][1]
        assert first.fp is not None
        if out is None:
            out = first.fp.new_empty(self.shape, dtype=first.dtype)
        start = 0
        for width, store in self.runs:
            store.read(out[..., start:start + width])
            start += width
        return out

    def residual(self) -> torch.Tensor:
        """The 16-bit tokens after the packed ones, all channels."""
        return torch.cat([store.residual() for _, store in self.runs], dim=-1)

    def keep(self, index: torch.Tensor) -> None:
        """Keep residual tokens ``index`` in every run."""
        for _, store in self.runs:
            store.keep(index)

    def flush(self, settled: int) -> None:
        """Quantize settled whole blocks in every run."""
        for _, store in self.runs:
            store.flush(settled)

    def nbytes(self) -> int:
        """Bytes held by all runs."""
        return sum(store.nbytes() for _, store in self.runs)

    def select_batch(self, index: torch.Tensor) -> None:
        """Reorder or select sequences (beam search)."""
        for _, store in self.runs:
            store.select_batch(index)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != index.shape[1]:  # a store shared by heads is split per head by a per-head selection
        x = x.expand(-1, index.shape[1], -1, -1)
    return x.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


def make_store(bits: int | tuple[int, ...], group_size: int, along: str, block: int,
               method: str = "kivi", segment: int = 0) -> DenseStore | QuantizedStore | SegmentedStore:
    """A dense store for 16 bits, otherwise a quantized one: KIVI grouping, or DecoQuant (``method``).
    A tuple of bits (one per ``segment`` channels) makes a :class:`SegmentedStore`."""
    if not isinstance(bits, int):
        if len(set(bits)) == 1:
            return make_store(bits[0], group_size, along, block, method)
        return SegmentedStore(tuple(bits), segment, group_size, along, block)
    if bits >= 16:
        return DenseStore()
    if method not in STORES:
        raise ValueError(f"unknown quant method {method!r}; expected one of {tuple(STORES)}")
    return STORES[method](bits, group_size, along, block)


STORES = {"kivi": QuantizedStore, "decoquant": DecoQuantStore}
