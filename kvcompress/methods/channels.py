"""Bits per channel segment of a latent: the layout behind ``[quant] allocation = "channels"``.

A K or V latent is stored in its principal axes (whitened SVD), where channel ``j`` carries energy
``σ_j²``. Quantization error of a group is proportional to its range, so at ``b`` bits a segment of
channels costs about ``E_seg · 4^-b``: spending bits where the energy is (reverse water-filling, the
classic transform-coding allocation) beats the same bits spread evenly. A stream's bits are then a list,
one entry per segment of ``size`` consecutive channels (the last one may be shorter); neighbouring
segments with equal bits form one *run*, stored as one quantized block of channels.
"""

from __future__ import annotations

from collections.abc import Sequence

Bits = int | Sequence[int]


def segment_widths(width: int, size: int) -> list[int]:
    """Widths of the segments of ``size`` channels covering ``width`` channels (the last may be shorter)."""
    return [min(size, width - start) for start in range(0, width, size)]


def bit_runs(bits: Bits, width: int, size: int) -> list[tuple[int, int]]:
    """``(channels, bits)`` of each run of a stream ``width`` channels wide.

    Parameters
    ----------
    bits
        One width for the whole stream, or one per segment of ``size`` channels.
    width
        The stream's width (its rank).
    size
        Channels per segment.

    Raises
    ------
    ValueError
        When a list does not have one entry per segment.
    """
    if isinstance(bits, int):
        return [(width, bits)]
    widths = segment_widths(width, size)
    if len(bits) != len(widths):
        raise ValueError(f"{len(bits)} segment bits for {len(widths)} segments of {size} in {width} channels")
    runs: list[tuple[int, int]] = []
    for w, b in zip(widths, bits, strict=True):
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0] + w, b)
        else:
            runs.append((w, b))
    return runs


def mean_bits(bits: Bits, width: int, size: int) -> float:
    """Average code width over the stream's channels."""
    return sum(w * b for w, b in bit_runs(bits, width, size)) / width


def describe(bits: Bits, width: int, size: int) -> str:
    """Short text: ``"4"`` for one width, else runs as ``bits:channels`` (``"8:16 4:32 2:80"``)."""
    if isinstance(bits, int):
        return str(bits)
    return " ".join(f"{b}:{w}" for w, b in bit_runs(bits, width, size))
