"""KIVI min–max groups: packed low-bit codes for settled tokens, a 16-bit residual window for recent ones.

Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (arXiv:2402.02750), §3.2–3.3;
MiniKV (arXiv:2411.18077) uses the same grouping. Keys are quantized *per channel*, each group running
along ``G`` consecutive tokens (``along="tokens"``), because key outliers live in fixed channels; values
*per token*, each group running along ``G`` consecutive channels (``along="channels"``), because attention
mixes values token by token. The newest tokens stay in 16 bits (the residual window, KIVI's ``R``) until a
whole block of them can be quantized.

Per group (KIVI eq. 2): ``z = min X``, ``s = (max X − z) / (2^b − 1)``, ``Q(X) = round((X − z) / s)``,
``X̂ = z + Q(X)·s``, with ``b``-bit codes of any width 1–8 (packed as :mod:`kvcompress.kernels.pack` says).
``z`` is rounded down and ``s`` up to float16 and codes are computed from those stored values, so
``|X̂ − X| <= s / 2`` up to float32 rounding. Constant groups whose value is a float16 number get ``s == 0``
and are reproduced exactly.

Bytes per token of a ``D``-wide stream (:meth:`QuantizedStore.bytes_per_token`), averaged over ``T`` tokens
of which ``T_q = ⌊T / block⌋·block`` are quantized::

    (T_q · (packed_bytes(D, b) + 2·2·D/G) + (T − T_q) · 2·D) / T

(codes, ``D·b/8`` bytes when the pieces pack evenly; an fp16 scale and minimum per group; the fp16
residual). Writes nothing into the checkpoint: the recipe's bits and groups reach the runtime through the
plan (:class:`kvcompress.plan.StreamPlan`). The
packed layout (:class:`Packed`), :func:`dequantize` and the kernels live in :mod:`kvcompress.kernels.pack`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kvcompress.errors import KVCompressError
from kvcompress.kernels.pack import Along, Packed, dequantize, packed_bytes, quantize_pack
from kvcompress.methods.dense import FP16, gather_tokens

__all__ = ["Packed", "QuantizedStore", "cat", "dequantize", "effective_group", "quantize"]


def effective_group(dim: int, group_size: int) -> int:
    """Largest divisor of ``dim`` that is at most ``group_size``.

    Used for ``along="channels"`` so that any head dim can be quantized: a requested group of 32 on a
    48-wide dim becomes 24, on a 40-wide dim 20.

    Parameters
    ----------
    dim
        Size of the grouped dimension (positive).
    group_size
        Requested group size (positive).

    Returns
    -------
    int
        The group size actually used.
    """
    if dim < 1 or group_size < 1:
        raise ValueError(f"dim and group_size must be positive, got {dim} and {group_size}")
    return next(g for g in range(min(dim, group_size), 0, -1) if dim % g == 0)


def quantize(x: torch.Tensor, bits: int, group_size: int, along: Along) -> Packed:
    """Quantize ``x`` group-wise into packed ``bits``-wide codes.

    Parameters
    ----------
    x
        Float tensor ``[..., T, D]``; each group's span divided by ``2**bits - 1`` (its float16 scale) must lie
        within the float16 range, e.g. at most 65,504 at 1 bit.
    bits
        2, 4 or 8. ``D`` must be divisible by ``8 // bits``.
    group_size
        Tokens per group for ``along="tokens"`` (``T`` must be a multiple of it); channels per group for
        ``along="channels"``, reduced to :func:`effective_group` when it does not divide ``D``.
    along
        ``"tokens"`` for keys, ``"channels"`` for values.

    Returns
    -------
    Packed
        Codes, float16 scales and minima, and the layout.

    Raises
    ------
    ValueError
        On bad ``bits``, ``along``, or shapes that do not fit the groups.
    """
    if along == "channels":
        group_size = effective_group(x.shape[-1], group_size)
    codes, scale, minimum = quantize_pack(x, bits, group_size, along)
    return Packed(codes, scale, minimum, bits, group_size, along, x.shape[-1])


def cat(blocks: Sequence[Packed]) -> Packed:
    """Concatenate quantized blocks along tokens.

    Parameters
    ----------
    blocks
        Non-empty sequence with identical ``bits``, ``group_size``, ``along``, ``dim`` and leading dims.

    Returns
    -------
    Packed
        The blocks' tokens in order.
    """
    if not blocks:
        raise ValueError("cat needs at least one block")
    first = blocks[0]
    layout = (first.bits, first.group_size, first.along, first.dim)
    if any((b.bits, b.group_size, b.along, b.dim) != layout for b in blocks):
        raise ValueError("cannot concatenate blocks with different bits, group_size, along or dim")
    return Packed(
        torch.cat([b.codes for b in blocks], dim=-2),
        torch.cat([b.scale for b in blocks], dim=-2),
        torch.cat([b.minimum for b in blocks], dim=-2),
        *layout,
    )


class QuantizedStore:
    """Packed ``bits``-bit codes for settled tokens plus a 16-bit residual window of recent ones (KIVI).

    Keys use ``along="tokens"`` (per-channel scales over ``group_size`` tokens), values
    ``along="channels"`` (per-token scales over ``group_size`` channels). Once the residual holds a full
    ``block`` of tokens that are *settled* (no eviction policy will touch them again), the block is
    quantized. ``block`` is the residual window, or one group without a window (resolved by the plan,
    :class:`kvcompress.plan.StreamPlan`).

    The first ``sink`` tokens (the attention sink, StreamingLLM arXiv 2309.17453) also keep a 16-bit copy
    once quantized: the copy is what :meth:`read` returns for them, and they are left out of their block's
    statistics (replaced by the next token before encoding), so their outliers widen no group. The layout
    of the codes does not change; subclasses get the sink by overriding only the encoder and decoder.
    """

    widths: tuple[float, ...] = tuple(range(1, 9))  # the code widths this quantizer stores (bits per channel)

    @staticmethod
    def check(name: str, width: int, block: int) -> None:
        """Refuse a stream this quantizer cannot hold (every width fits min–max groups)."""

    @classmethod
    def check_bits(cls, name: str, method: str, bits: float, width: int, group: int) -> None:
        """Refuse a code width this quantizer (registered as ``method``) does not store for a ``width``-channel
        stream whose channels are grouped by ``group`` (values; keys: ``width``), naming the stream."""
        if bits not in cls.widths:
            extra = ' (1.5 bits is a vector codebook\'s width: [quant] method = "vector")' if bits == 1.5 else ""
            raise KVCompressError(f"{name}: {method} codes are {', '.join(f'{b:g}' for b in cls.widths)} bits "
                                  f"wide, got {bits:g}{extra}")

    @staticmethod
    def coded_bytes(width: int, bits: int, along: str, group: int, block: int) -> float:
        """Bytes of one quantized token: codes plus an fp16 scale and minimum per group."""
        group = group if along == "tokens" else effective_group(width, group)
        return packed_bytes(width, bits) + 2 * FP16 * width / group  # keys: per channel; values: per token

    @classmethod
    def bytes_per_token(cls, width: int, bits: int, along: str, group: int, block: int, context: int,
                        sink: int = 0) -> float:
        """Bytes per token of a ``width``-channel stream averaged over ``context`` tokens (module docstring),
        plus the sink's 16-bit copy once its block is quantized."""
        quantized = context // block * block
        copy = sink * width * FP16 if quantized else 0
        return (quantized * cls.coded_bytes(width, bits, along, group, block)
                + (context - quantized) * width * FP16 + copy) / context

    def __init__(self, bits: int, group_size: int, along: str, block: int, sink: int = 0) -> None:
        self.bits, self.group_size, self.along, self.block, self.sink = bits, group_size, along, block, sink
        self.packed: Packed | None = None
        self.fp: torch.Tensor | None = None
        self.sink_copy: torch.Tensor | None = None  # [B, H, sink, D] once the first block is quantized
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

    def flush(self, settled: int, prediction: Callable[[int, int], torch.Tensor] | None = None) -> None:
        """Quantize whole blocks of the residual that lie within the first ``settled`` stored tokens.

        With ``prediction`` (``(first token, count) -> [B, H, count, D]``), the codes hold each token's
        difference from it, which the reader adds back (:mod:`kvcompress.methods.value_prediction`).
        """
        if self.fp is None:
            return
        ready = min(settled - self.quantized_length, self.fp.shape[-2]) // self.block * self.block
        if ready <= 0:
            return
        x = self.fp[..., :ready, :].detach().to(self.dtype)  # rounding has no gradient
        if prediction is not None:
            x = x - prediction(self.quantized_length, ready).to(x.dtype)
        if self.sink and self.packed is None:
            self.sink_copy = self.fp[..., :self.sink, :].clone()
            x = torch.cat([x[..., self.sink:self.sink + 1, :].expand(*x.shape[:-2], self.sink, -1),
                           x[..., self.sink:, :]], dim=-2)
        block = self._encode(x)
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
        if self.sink_copy is not None:
            out[..., :self.sink, :] = self.sink_copy
        out[..., tq:, :] = fp
        return out

    def residual(self) -> torch.Tensor:
        """The 16-bit tokens after the packed ones, in the compute dtype."""
        assert self.fp is not None
        return self.fp.to(self.dtype)

    def keep(self, index: torch.Tensor) -> None:
        """Keep residual tokens ``index`` (eviction happens before quantization)."""
        assert self.fp is not None
        self.fp = gather_tokens(self.fp, index)

    def nbytes(self) -> int:
        """Packed codes, fp16 scales and minima, the residual window and the sink's copy."""
        held = [t for t in (self.fp, self.sink_copy) if t is not None]
        return sum(t.numel() * t.element_size() for t in held) + (0 if self.packed is None else self.packed.nbytes())

    def select_batch(self, index: torch.Tensor) -> None:
        """Reorder or select sequences (beam search)."""
        if self.fp is not None:
            self.fp = self.fp.index_select(0, index.to(self.fp.device))
        if self.sink_copy is not None:
            self.sink_copy = self.sink_copy.index_select(0, index.to(self.sink_copy.device))
        if self.packed is not None:
            self.packed = self._select(self.packed, index)
