"""Bits per channel segment of a latent (``[quant] allocation = "channels"``): allocation, layout and store.

A K or V latent is stored in its principal axes (whitened SVD), where channel ``j`` carries energy
``σ_j²``. Quantization error of a group is proportional to its range, so at ``b`` bits a segment of
channels costs about ``E_seg · 4^-b``: spending bits where the energy is (reverse water-filling, the
classic transform-coding allocation) beats the same bits spread evenly. A stream's bits are then a list,
one entry per segment of ``size`` consecutive channels (the last one may be shorter); neighbouring
segments with equal bits form one *run*, stored as one quantized block of channels.

* Allocation (:func:`channel_bits`, run by ``analyze``): a segment's weight is its stream's measured 2-bit
  damage (MiniKV-style sensitivity, :mod:`kvcompress.methods.minikv`) times its share of the kept energy,
  ``w_seg = s_stream · Σ_seg σ_j² / Σ σ_j²``; :func:`kvcompress.methods.minikv.allocate_bits` spends one
  budget of bits over all segments of all layers.
* Checkpoint: the bits lists in the manifest, and a latent rotation that is block-diagonal over the runs
  (:func:`kvcompress.methods.rotation.rotate_latent`), so channels mix only within a run.
* Post-RoPE keys have no latent; with ``key_axes`` they get bits per segment of the queries' principal axes
  (:mod:`kvcompress.methods.key_axes`), within each layer's key budget, and are held the same way.
* Runtime: :class:`SegmentedStore`, one store of the stream's quantizer per run. Bytes: the sum of each
  run's bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvcompress.methods.kivi import QuantizedStore
from kvcompress.methods.minikv import allocate_bits

Bits = float | Sequence[int]  # one width (an int, or 1.5 for vector codebooks), or one int per segment


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
    if not isinstance(bits, list | tuple):
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
    if not isinstance(bits, list | tuple):
        return f"{bits:g}"
    return " ".join(f"{b}:{w}" for w, b in bit_runs(bits, width, size))


def channel_bits(energies: list[tuple[torch.Tensor, torch.Tensor]], sens: list[tuple[float, float]],
                 sizes: tuple[int, int], avg_bits: float, post_rope_keys: bool) -> tuple[list, list]:
    """Bits per segment of every latent's principal axes, from one budget over all layers and streams.

    Parameters
    ----------
    energies
        Per layer, the kept ``σ_j²`` of its key and value latents (averaged over head groups).
    sens
        Per layer, the keys' and values' 2-bit sensitivities.
    sizes
        Channels per segment for keys and for values.
    avg_bits
        The budget, in bits per channel.
    post_rope_keys
        Post-RoPE keys have no principal axes and stay one unit per layer.

    Returns
    -------
    tuple
        Per layer, the keys' and the values' bits: one width, or one per segment.
    """
    units = []  # (layer, stream, weight, width)
    for i, pair in enumerate(energies):
        for j, (stream, energy) in enumerate(zip("kv", pair, strict=True)):
            rank = energy.numel()
            if stream == "k" and post_rope_keys:
                units.append((i, stream, sens[i][j], rank))
                continue
            total = float(energy.sum().clamp_min(1e-300))
            start = 0
            for width in segment_widths(rank, sizes[j]):
                units.append((i, stream, sens[i][j] * float(energy[start:start + width].sum()) / total, width))
                start += width
    bits = allocate_bits([u[2] for u in units], avg_bits, widths=[u[3] for u in units])
    per_stream: dict[tuple[int, str], list[int]] = {}
    for (i, stream, _, _), b in zip(units, bits, strict=True):
        per_stream.setdefault((i, stream), []).append(b)

    def as_recipe(values: list[int]) -> int | list[int]:
        return values[0] if len(set(values)) == 1 else values  # one width for the whole stream

    layers = range(len(energies))
    return [as_recipe(per_stream[i, "k"]) for i in layers], [as_recipe(per_stream[i, "v"]) for i in layers]


class SegmentedStore:
    """Runs of channels with their own bit widths (latents under ``[quant] allocation = "channels"``, post-RoPE
    keys under ``key_axes``).

    ``bits`` holds one width per segment of ``segment`` channels in principal-axis order; neighbouring
    segments with equal bits form a run (``kvcompress.methods.channels``), each a store of ``quantizer``
    (a :class:`QuantizedStore` class) over its channels. All runs hold the same tokens, flush together and
    read back into one buffer.
    """

    def __init__(self, bits: tuple[int, ...], segment: int, group_size: int, along: str,
                 block: int, sink: int = 0, quantizer: type[QuantizedStore] = QuantizedStore) -> None:
        self.bits, self.segment, self.quantizer = bits, segment, quantizer
        self.layout = (group_size, along, block, sink)
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
            self.runs = [(w, self.quantizer(b, *self.layout)) for w, b in runs]
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
