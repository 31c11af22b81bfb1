"""Low-bit KV storage: asymmetric min–max quantization into bit-packed codes.

Grouping follows KIVI (Liu et al., 2024, arXiv:2402.02750), also used by MiniKV: keys are quantized
*per channel*, each group running along ``group_size`` consecutive tokens (``along="tokens"``), because key
outliers live in fixed channels; values are quantized *per token*, each group running along
``group_size`` consecutive channels (``along="channels"``), because attention mixes values token by token.

Every group stores a float16 ``minimum`` and ``scale``; an element is ``minimum + code * scale`` with a
``bits``-wide code (2, 4 or 8). The minimum is rounded down and the scale up to float16, and codes are
computed from those stored values, so ``|dequantize(quantize(x)) - x| <= scale / 2`` up to float32
rounding. Constant groups whose value is a float16 number get ``scale == 0`` and are reproduced exactly.
The storage layout (:class:`Packed`), :func:`dequantize` and the kernels live in :mod:`kvcompress.kernels.pack`
and are imported from there; this module adds the grouping policy (:func:`effective_group`), :func:`quantize`
and :func:`cat`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvcompress.kernels.pack import Along, Packed, dequantize, quantize_pack

__all__ = ["Packed", "cat", "dequantize", "effective_group", "quantize"]


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
        Float tensor ``[..., T, D]``; values must lie within the float16 range.
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
