"""Group-wise asymmetric quantization into bit-packed codes of any width 1–8: Triton kernels and torch twins.

A tensor ``x`` of shape ``[..., T, D]`` is cut into groups of ``GT`` tokens by ``GC`` channels and each
group is stored as ``minimum + code * scale`` with ``code`` in ``[0, 2**bits - 1]``:

- ``along="tokens"`` (keys): ``GT = group_size``, ``GC = 1``, one scale per channel per block of tokens;
- ``along="channels"`` (values): ``GT = 1``, ``GC = group_size``, one scale per token per block of channels.

``scale`` and ``minimum`` are float16 of shape ``[..., T // GT, D // GC]``.

Packed layout (:func:`pack_codes`). A ``bits``-wide code is split into *pieces* of 8, 4, 2 and 1 bits, the
binary digits of ``bits`` (:func:`pieces`: 3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2, 7 = 4 + 2 + 1), lowest bits in
the widest piece. Each piece of ``p`` bits is packed in bit planes into ``nb = ceil(D / (8 // p))`` bytes per
token: channel ``d`` goes to byte ``d % nb`` at bit offset ``p * (d // nb)`` (channels past ``D`` are zero
padding). A row of codes is the pieces' bytes one after the other, ``packed_bytes(D, bits)`` in all, so any
width costs ``D * bits / 8`` bytes when ``8 // p`` divides ``D`` for every piece. One mask then gives ``nb``
consecutive channels of a piece; on the CPU one ``and`` unpacks every plane at once, each code left at its
bit offset (:func:`plane_codes`). The Triton kernels and the decode-attention kernel read this layout
directly: the encode kernel writes one piece per launch, the decoders read a row in the slots of its widest
piece's bytes and gather the narrower pieces into the same slots (:func:`load_dequant`; they read the runs
below the same way). :class:`Packed` holds one such tensor with its layout, :func:`dequantize` reads it back.

:class:`TablePacked` holds codes that index a table of levels instead (codebook quantization, e.g. TurboQuant,
arXiv 2504.19874): ``mean + scale * table[code]`` per group, which :func:`load_dequant` reads too. Its codes are
packed in *runs* (``pack_codes(..., runs=True)``): the same pieces, but byte ``d // (8 // p)`` of a piece holds
``8 // p`` consecutive channels, channel ``d`` at bit offset ``p * (d % (8 // p))``. A byte of the widest piece
and the bits of the narrower pieces for the same channels then form one index (:func:`run_index`) that a
single gather turns into that many consecutive float32 outputs, where bit planes would scatter them ``nb``
apart: on the CPU the table read is one gather and one scaling pass, no unpacking (:mod:`kvcompress.methods.codebook`).

Rounding: the minimum is rounded *down* and the scale *up* to float16, so every value of a group lies in
``[minimum, minimum + (2**bits - 1) * scale]`` and the reconstruction error is at most ``scale / 2`` (plus
float32 rounding). Inputs must therefore lie within the float16 range.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from typing import Literal

import torch
import triton
import triton.language as tl

from .dispatch import Dispatch

Along = Literal["tokens", "channels"]

WIDTHS = tuple(range(1, 9))  # code widths every packer and kernel takes
_REL = 2.0**-10  # one float16 ulp relative to the value (normal range)
_TINY = 2.0**-24  # the smallest float16 subnormal
_TILE = 4096  # elements per program in the quantize/dequantize kernels


@dataclass
class Packed:
    """A quantized ``[..., T, D]`` tensor in this module's layout.

    Attributes
    ----------
    codes
        uint8 ``[..., T, packed_bytes(D, bits)]``: codes bit-packed along the last dim, piece by piece, in
        bit planes (module docstring).
    scale, minimum
        float16 ``[..., T // group_size, D]`` for ``along="tokens"``, ``[..., T, D // group_size]`` for
        ``along="channels"``.
    bits
        Code width, 1 to 8.
    group_size
        Group extent along ``along``, exactly as used (it divides ``T`` or ``D``, see :func:`group_shape`).
    along
        ``"tokens"`` (keys, per-channel groups) or ``"channels"`` (values, per-token groups).
    dim
        ``D``, the unpacked last-dim size.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    bits: int
    group_size: int
    along: Along
    dim: int

    @property
    def num_tokens(self) -> int:
        """``T``, the number of tokens stored."""
        return self.codes.shape[-2]

    def nbytes(self) -> int:
        """Exact storage in bytes of codes, scale and minimum."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.minimum))


@dataclass
class TablePacked:
    """A ``[..., T, D]`` tensor as packed codes that index a table of levels: ``mean + scale * table[code]``.

    The codes are grouped as :class:`Packed`'s and packed in runs (module docstring); where a min–max group
    reconstructs ``minimum + code * scale``, this one looks each code up in ``table`` (a codebook, e.g. the
    Lloyd–Max points of TurboQuant, arXiv 2504.19874) before scaling, and adds a ``mean`` only if it has one.

    Attributes
    ----------
    codes
        uint8 ``[..., T, packed_bytes(D, bits)]``: :func:`pack_codes` with ``runs=True``.
    scale
        float16 ``[..., T // group_size, D]`` for ``along="tokens"``, ``[..., T, D // group_size]`` for
        ``along="channels"``.
    mean
        float16 of ``scale``'s shape, or None for no offset.
    table
        float32 ``[2**bits]``, the level of each code, on the codes' device; or a vector codebook
        ``[2**(bits·t), t]``, whose point :func:`tuple_index` of each run of ``t`` codes gives ``t`` channels.
    bits
        Bits per channel: an integer 1 to 8 (codes of :class:`Packed`'s layout, a vector codebook's point
        written as ``t`` digits), or a fractional width such as 1.5 with a vector codebook whose ``bits·t`` is
        an integer (64 points of 4 channels): then each point is one :attr:`index_bits`-wide code, ``D / t``
        codes per token packed as any codes (``[..., T, packed_bytes(D / t, bits·t)]``).
    group_size, along, dim
        As :class:`Packed`'s.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    mean: torch.Tensor | None
    table: torch.Tensor
    bits: float
    group_size: int
    along: Along
    dim: int

    @property
    def num_tokens(self) -> int:
        """``T``, the number of tokens stored."""
        return self.codes.shape[-2]

    @property
    def joint(self) -> bool:
        """Whether each point of the vector codebook is one packed code (a fractional :attr:`bits`)."""
        return self.bits != int(self.bits)

    @property
    def index_bits(self) -> int:
        """The width of each packed code: :attr:`bits`, or ``bits·t`` for one code per point."""
        return round(self.bits * self.table.shape[1]) if self.joint else int(self.bits)

    @property
    def index_dim(self) -> int:
        """Packed codes per token: ``D``, or ``D / t`` for one code per point."""
        return self.dim // self.table.shape[1] if self.joint else self.dim

    def nbytes(self) -> int:
        """Exact storage in bytes of codes, scale and mean (the table, shared by every token, left out)."""
        held = (self.codes, self.scale) if self.mean is None else (self.codes, self.scale, self.mean)
        return sum(t.numel() * t.element_size() for t in held)


def group_shape(
    shape: torch.Size | tuple[int, ...], bits: int, group_size: int, along: Along
) -> tuple[int, int]:
    """Validate a quantization layout and return its group extent ``(tokens, channels)``.

    Parameters
    ----------
    shape
        Shape ``[..., T, D]`` of the unpacked tensor.
    bits
        Code width, 1 to 8.
    group_size
        Group extent along ``along``; must divide ``T`` (tokens) or ``D`` (channels).
    along
        ``"tokens"`` for per-channel groups running along tokens, ``"channels"`` for per-token groups.

    Returns
    -------
    tuple[int, int]
        ``(GT, GC)``: tokens and channels per group.

    Raises
    ------
    ValueError
        On any unsupported combination.
    """
    if bits not in WIDTHS:
        raise ValueError(f"bits must be an integer from 1 to 8, got {bits}")
    if len(shape) < 2:
        raise ValueError(f"expected a tensor [..., T, D], got shape {tuple(shape)}")
    t, d = shape[-2], shape[-1]
    if group_size < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")
    if along == "tokens":
        if t % group_size:
            raise ValueError(f"token count {t} must be a multiple of group_size {group_size}")
        return group_size, 1
    if along == "channels":
        if d % group_size:
            raise ValueError(f"last dim {d} must be a multiple of group_size {group_size}")
        return 1, group_size
    raise ValueError(f"along must be 'tokens' or 'channels', got {along!r}")


def pieces(bits: int) -> tuple[int, ...]:
    """The piece widths of a ``bits``-wide code, widest (lowest bits) first: its binary digits."""
    return tuple(p for p in (8, 4, 2, 1) if bits & p)


def piece_bytes(dim: int, piece: int) -> int:
    """Bytes per token of one ``piece``-bit piece of ``dim`` channels (zero-padded to whole bytes)."""
    return -(-dim // (8 // piece))


def packed_bytes(dim: int, bits: int) -> int:
    """Bytes per token of ``dim`` channels of ``bits``-wide codes: ``dim * bits / 8`` when that packs evenly."""
    return sum(piece_bytes(dim, p) for p in pieces(bits))


def _pack_piece(codes: torch.Tensor, piece: int, runs: bool) -> torch.Tensor:
    per, d = 8 // piece, codes.shape[-1]
    nb = piece_bytes(d, piece)
    if nb * per != d:
        codes = torch.nn.functional.pad(codes, (0, nb * per - d))
    lead = codes.shape[:-1]
    planes = codes.reshape(*lead, nb, per).transpose(-1, -2) if runs else codes.reshape(*lead, per, nb)
    shifts = torch.arange(0, 8, piece, dtype=torch.uint8, device=codes.device).view(per, 1)
    return (planes << shifts).sum(-2, dtype=torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int, runs: bool = False) -> torch.Tensor:
    """Pack integer codes ``[..., D]`` (values below ``2**bits``) into uint8 ``[..., packed_bytes(D, bits)]``.

    Parameters
    ----------
    codes
        Integer tensor, any last dim.
    bits
        Code width, 1 to 8.
    runs
        Each byte of a piece holds consecutive channels (:class:`TablePacked`'s layout) instead of bit planes.

    Returns
    -------
    torch.Tensor
        The packed bytes, piece after piece (module docstring).
    """
    codes = codes.to(torch.uint8)
    parts, shift = [], 0
    for piece in pieces(bits):
        parts.append(_pack_piece((codes >> shift) & (2**piece - 1), piece, runs))
        shift += piece
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


_LANES = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))  # (bytes, integer dtype)


def _lane(packed: torch.Tensor, sizes: list[int]) -> tuple[int, torch.dtype]:
    """The widest integer lane ``(bytes, dtype)`` that ``packed`` views as with pieces of ``sizes`` bytes whole."""
    return next((width, dtype) for width, dtype in _LANES if width == 1 or (packed.stride(-1) == 1 and all(
        n % width == 0 for n in (*sizes, packed.storage_offset(), *packed.stride()[:-1]))))


def tuple_index(digits: torch.Tensor, bits: int) -> torch.Tensor:
    """The point index of each run of ``t`` codes ``[..., t]`` of a vector codebook (:class:`TablePacked` with a
    2-D table): ``Σ_i digits_i · 2^(bits·(t−1−i))``, first code most significant; int64 ``[...]``."""
    t = digits.shape[-1]
    weights = 2 ** (bits * torch.arange(t - 1, -1, -1, device=digits.device))
    return (digits.long() * weights).sum(dim=-1)


def unpack_indices(packed: torch.Tensor, bits: int, dim: int, runs: bool = False) -> torch.Tensor:
    """The codes of :func:`pack_codes` back as uint8 ``[..., dim]``.

    Bit planes work on whole integer lanes of up to 8 bytes (the widest that every piece's bytes and ``packed``'s
    strides allow): per bit plane, one shift by a scalar and one ``and`` with the lane's mask, ``or``-ed in
    for the pieces after the first; no float conversion. On one CPU thread, 3 × 2048 × 64 codes take 20 µs
    (8-bit) to 280 µs (7-bit): 52 µs 4-bit, 68 µs 2-bit, 200 µs 3-bit, 1.2 to 3.3 times faster than
    unpacking byte by byte.

    Parameters
    ----------
    packed
        uint8 ``[..., packed_bytes(dim, bits)]`` (any strides).
    bits
        Code width, 1 to 8.
    dim
        ``D``, the unpacked channels.
    runs
        The codes were packed in runs (``pack_codes(..., runs=True)``).

    Returns
    -------
    torch.Tensor
        uint8 ``[..., dim]``, contiguous.
    """
    if runs:
        return _run_codes_int64(packed, bits, dim).to(torch.uint8).contiguous()
    sizes = [piece_bytes(dim, p) for p in pieces(bits)]
    width, lane = _lane(packed, sizes)
    span = max(nb * (8 // p) for p, nb in zip(pieces(bits), sizes, strict=True))  # channels, padding included
    out = packed.new_empty((*packed.shape[:-1], span))
    words, codes = packed.view(lane), out.view(lane)
    ones = int.from_bytes(b"\x01" * width, "little")  # a 1 in every byte of a lane
    start, shift = 0, 0
    for piece, nb in zip(pieces(bits), sizes, strict=True):
        n = nb // width  # lanes of the piece
        part = words[..., start:start + n]
        mask = ((2**piece - 1) << shift) * ones  # the piece's bits at their place in a code, in every byte
        if width > 1 and mask >= 2 ** (8 * width - 1):
            mask -= 2 ** (8 * width)  # as the signed lane holds it
        for plane in range(min(8 // piece, -(-dim // nb))):  # the planes that hold channels below dim
            down = piece * plane - shift  # bits from the plane's offset in a byte to the piece's offset in a code
            # the mask drops what a shift brings in from the next byte (or the sign of a signed lane)
            src = part >> down if down > 0 else part << -down if down < 0 else part
            dst = codes[..., plane * n:(plane + 1) * n]
            if shift == 0:
                torch.bitwise_and(src, mask, out=dst)
            else:
                dst |= src & mask
        start, shift = start + n, shift + piece
    return out if span == dim else out[..., :dim].contiguous()


def _run_codes_int64(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The codes of a row packed in runs as int64 ``[..., dim]``: each :func:`run_index`'s codes, in channel order."""
    return run_slots(run_index(packed, bits, dim), bits).flatten(-2)[..., :dim]


def run_codes(bits: int) -> int:
    """Codes per :func:`run_index`: the ``8 // p`` of a byte of the widest, ``p``-bit piece; two bytes' for
    8-bit codes, so that every index moves at least two channels."""
    return max(2, 8 // pieces(bits)[0])


def run_index(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """One int32 index per ``u`` consecutive codes packed in runs (:func:`run_codes`): the codes of a byte of
    the widest piece, or of two bytes at 8 bits.

    ``packed`` holds ``n`` ``bits``-wide codes per row (``[..., packed_bytes(n, bits)]``, runs); the widest
    piece, of ``p`` bits, packs ``u = 8 // p`` consecutive codes per byte. The index of byte ``i`` is that
    byte, then the ``u · q`` bits that each narrower ``q``-bit piece holds for the same ``u`` codes, widest
    piece first: ``u · bits`` bits in all (12 at 3 bits, 16 at most), which :func:`run_slots` splits back
    into codes. Returns int32 ``[..., ceil(n / u)]``; the slots past ``n`` hold zeros.
    """
    if bits == 8:  # bytes 2i and 2i + 1: as one 16-bit number where the row's bytes pair up (8x faster)
        if sys.byteorder == "little" and _lane(packed, [n])[0] > 1:
            return packed.view(torch.uint16).int()
        index = packed[..., 0::2].int()
        index[..., :n // 2] |= packed[..., 1::2].int() << 8
        return index
    sizes = [piece_bytes(n, p) for p in pieces(bits)]
    u, nb = run_codes(bits), sizes[0]
    index = packed[..., :nb].int()
    start, offset = nb, 8
    for piece, size in zip(pieces(bits)[1:], sizes[1:], strict=True):
        lanes = _run_lanes(u * piece, offset, packed.device)  # each byte's chunks of u codes, in place
        element = _LANE_ELEMENTS[lanes.shape[1]]
        narrow = packed[..., start:start + size].int()
        parts = torch.index_select(lanes.view(element).view(-1), 0, narrow.view(-1)).view(torch.int32)
        index |= parts.view(*narrow.shape[:-1], size * lanes.shape[1])[..., :nb]
        start, offset = start + size, offset + u * piece
    return index


_LANE_ELEMENTS = {2: torch.int64, 4: torch.complex128}  # 2 or 4 int32 moved as one element (bits only)


@functools.cache
def _run_lanes(chunk: int, offset: int, device: torch.device) -> torch.Tensor:
    """int32 ``[256, 8 // chunk]``: byte ``b``'s ``chunk``-bit chunks, low first, each shifted up by ``offset``."""
    k = torch.arange(8 // chunk, device=device)
    return ((torch.arange(256, device=device)[:, None] >> (chunk * k)) & (2**chunk - 1)).int() << offset


def run_slots(index: torch.Tensor, bits: int) -> torch.Tensor:
    """The ``u`` codes ``[..., u]`` (int64) of each :func:`run_index` ``index``, in channel order."""
    index, codes = index.long(), 0
    u, offset, shift = run_codes(bits), 0, 0
    j = torch.arange(u, device=index.device)
    for piece in pieces(bits):
        codes = codes | ((index[..., None] >> (offset + piece * j)) & (2**piece - 1)) << shift
        offset, shift = offset + u * piece, shift + piece
    return codes


def unpack_codes(packed: torch.Tensor, bits: int, dim: int, out: torch.Tensor | None = None,
                 runs: bool = False) -> torch.Tensor:
    """The codes of :func:`pack_codes` back as float32 ``[..., dim]`` (exact integers).

    The integer codes of :func:`unpack_indices`, cast once: for codes of several pieces (3, 5, 6 and 7 bits)
    2.3–4× faster on one CPU thread than unpacking each piece's planes into float32 and adding them.

    Parameters
    ----------
    packed
        uint8 ``[..., packed_bytes(dim, bits)]`` (any strides).
    bits
        Code width, 1 to 8.
    dim
        ``D``, the unpacked channels.
    out
        Optional float32 ``[..., dim]`` tensor to write into.
    runs
        The codes were packed in runs (``pack_codes(..., runs=True)``).
    """
    codes = unpack_indices(packed, bits, dim, runs)
    return codes.float() if out is None else out.copy_(codes)


def plane_codes(packed: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Codes of packed bytes ``[..., nb]`` by bit plane, ``[..., 8 // bits, nb]``, each left at its bit offset.

    Plane ``j`` comes out as ``code * 2**(bits * j)``: the byte masked to its bits, not shifted down. One
    ``and`` with a scalar mask per plane does it (into a float ``out``, torch casts the result); the plane
    weights ``2**(-bits * j)`` are powers of two that fold exactly into the scales (:func:`plane_weights`).
    On the CPU a scalar mask per plane runs 1.3x (1-bit) to 4x (4-bit) faster than one ``and`` with a
    broadcast ``[planes, nb]`` mask, and several times faster than shifting each plane down.

    Parameters
    ----------
    packed
        Packed bytes (any strides).
    bits
        Width of one piece: 1, 2, 4 or 8.
    out
        Optional ``[..., 8 // bits, nb]`` tensor of a floating dtype (or uint8) to write into.

    Returns
    -------
    torch.Tensor
        The weighted codes (``out`` if given, else uint8).
    """
    per = 8 // bits
    if out is None:
        out = packed.new_empty((*packed.shape[:-1], per, packed.shape[-1]))
    for j in range(per):
        torch.bitwise_and(packed, (2**bits - 1) << (bits * j), out=out[..., j, :])
    return out


@functools.cache
def plane_weights(bits: int, dim: int, device: torch.device) -> torch.Tensor:
    """The weight ``2**(-bits * j)`` of each channel, ``j`` being its bit plane.

    Parameters
    ----------
    bits
        Width of one piece: 1, 2, 4 or 8.
    dim
        Channels of the piece, padding included (a multiple of ``8 // bits``).
    device
        Where the weights live.

    Returns
    -------
    torch.Tensor
        float32 ``[D]``; :func:`plane_codes` times these gives the codes. Cached: do not modify.
    """
    per = 8 // bits
    weights = torch.tensor([2.0 ** (-bits * j) for j in range(per)], dtype=torch.float32, device=device)
    return weights.repeat_interleave(dim // per)


def _fp16_floor(v: torch.Tensor) -> torch.Tensor:
    h = v.half()
    return torch.where(h.float() <= v, h, (v - v.abs() * _REL - _TINY).half())


def _fp16_ceil(v: torch.Tensor) -> torch.Tensor:
    h = v.half()
    return torch.where(h.float() >= v, h, (v + v.abs() * _REL + _TINY).half())


def _empty_outputs(x: torch.Tensor, bits: int, gt: int, gc: int) -> tuple[torch.Tensor, ...]:
    *lead, t, d = x.shape
    codes = x.new_empty((*lead, t, packed_bytes(d, bits)), dtype=torch.uint8)
    stats = x.new_empty((*lead, t // gt, d // gc), dtype=torch.float16)
    return codes, stats, stats.clone()


def quantize_pack_ref(
    x: torch.Tensor, bits: int, group_size: int, along: Along
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize and bit-pack ``x`` with vectorized torch (the CPU path).

    Parameters
    ----------
    x
        Float tensor ``[..., T, D]``.
    bits
        Code width, 1 to 8.
    group_size
        Exact group extent along ``along`` (see :func:`group_shape`).
    along
        ``"tokens"`` (keys) or ``"channels"`` (values).

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor, torch.Tensor]
        ``codes`` uint8 ``[..., T, packed_bytes(D, bits)]``, ``scale`` and ``minimum`` float16
        ``[..., T // GT, D // GC]``.
    """
    gt, gc = group_shape(x.shape, bits, group_size, along)
    if x.numel() == 0:
        return _empty_outputs(x, bits, gt, gc)
    *lead, t, d = x.shape
    levels = float(2**bits - 1)
    groups = x.float().reshape(math.prod(lead), t // gt, gt, d // gc, gc)
    minimum = _fp16_floor(groups.amin(dim=(2, 4)))
    scale = _fp16_ceil((groups.amax(dim=(2, 4)) - minimum.float()) / levels)
    s = scale.float()[:, :, None, :, None]
    inv = torch.where(s > 0, 1.0 / s, 0.0)
    codes = torch.floor((groups - minimum.float()[:, :, None, :, None]) * inv + 0.5).clamp_(0, levels)
    packed = pack_codes(codes.reshape(*lead, t, d), bits)
    return packed, scale.reshape(*lead, t // gt, d // gc), minimum.reshape(*lead, t // gt, d // gc)


def unpack_dequantize_ref(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bits: int, group_size: int,
                          along: Along, dim: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Unpack codes and dequantize with vectorized torch (the CPU path).

    Parameters
    ----------
    codes, scale, minimum
        As returned by :func:`quantize_pack_ref`.
    bits, group_size, along
        The layout the codes were made with.
    dim
        Unpacked last-dim size ``D``.
    dtype
        Output dtype.
    out
        Optional ``[..., T, D]`` tensor of ``dtype`` to write into (it may be a slice of a larger buffer).

    Returns
    -------
    torch.Tensor
        ``[..., T, D]`` reconstruction ``minimum + code * scale`` (``out`` if given).
    """
    *lead, t, nb = codes.shape
    gt, gc = group_shape((*lead, t, dim), bits, group_size, along)
    n = math.prod(lead)
    direct = out is not None and dtype == torch.float32
    x = out if direct else torch.empty((*lead, t, dim), dtype=torch.float32, device=codes.device)
    # 4- and 8-bit codes: each plane straight into float32, its weight folded into the scale (fastest there);
    # other widths or padding: integer codes first (1.5–3x faster on one CPU thread), then the scale
    if bits not in (4, 8) or dim % (8 // bits):
        unpack_codes(codes, bits, dim, out=x)
        groups = x.view(n, t // gt, gt, dim // gc, gc)
        groups.mul_(scale.reshape(n, t // gt, 1, dim // gc, 1)).add_(minimum.reshape(n, t // gt, 1, dim // gc, 1))
        return x if direct else (x.to(dtype) if out is None else out.copy_(x))
    plane_codes(codes.reshape(n, t, nb), bits, out=x.view(n, t, 8 // bits, nb))  # code * 2**(bits * plane)
    unit = math.gcd(gc, nb)  # runs of channels that share one scale and one plane weight
    groups, runs = dim // gc, gc // unit  # a group spans `runs` runs (more than one if it crosses planes)
    weights = plane_weights(bits, dim, codes.device)[::unit].view(groups, runs)
    s = scale.reshape(n, t // gt, groups, 1) * weights  # exact: powers of two
    x.view(n, t // gt, gt, groups, runs, unit).mul_(s.view(n, t // gt, 1, groups, runs, 1)).add_(
        minimum.reshape(n, t // gt, 1, groups, 1, 1))
    if direct:
        return x
    return x.to(dtype) if out is None else out.copy_(x)


@triton.jit
def _fp16_floor_tl(v):
    h = v.to(tl.float16)
    below = v - tl.abs(v) * 0.0009765625 - 5.960464477539063e-08  # _REL and _TINY
    return tl.where(h.to(tl.float32) <= v, h, below.to(tl.float16))


@triton.jit
def _fp16_ceil_tl(v):
    h = v.to(tl.float16)
    above = v + tl.abs(v) * 0.0009765625 + 5.960464477539063e-08  # _REL and _TINY
    return tl.where(h.to(tl.float32) >= v, h, above.to(tl.float16))


@triton.jit
def _group_index(rows, c, D, GT, GC):
    """Flat index into scale/minimum of rows ``[R]`` (flattened ``n * T + t``) by channels ``[B, PER]``."""
    return (rows // GT)[:, None, None] * (D // GC) + (c // GC)[None, :, :]


@triton.jit
def plane_channels(D, PER: tl.constexpr, BLOCK_B: tl.constexpr, RUNS: tl.constexpr = False):
    """Channels ``[BLOCK_B, PER]`` of the (byte, plane) slots of one ``8 // PER``-bit piece of a packed row.

    Slot ``(b, j)`` holds channel ``j * nb + b``, ``nb = cdiv(D, PER)`` being the piece's bytes per row; in
    runs (``RUNS``, :class:`TablePacked`'s layout), channel ``b * PER + j``.

    Parameters
    ----------
    D
        Channels per row.
    PER
        Codes per byte of the piece (8, 4, 2 or 1).
    BLOCK_B
        Byte slots, a power of two at least ``nb`` (:func:`plane_tile`).
    RUNS
        Whether the codes are packed in runs.

    Returns
    -------
    tuple
        The int32 channels and their validity ``[BLOCK_B, PER]``: false for slots past the row's bytes and
        for zero-padding channels (``>= D``).
    """
    b = tl.arange(0, BLOCK_B)
    j = tl.arange(0, PER)
    n_bytes = tl.cdiv(D, PER)
    c = b[:, None] * PER + j[None, :] if RUNS else j[None, :] * n_bytes + b[:, None]
    return c, (b < n_bytes)[:, None] & (c < D)


@triton.jit
def _row_bytes(D, BITS: tl.constexpr):
    """``packed_bytes(D, BITS)``: the bytes of every piece of a row."""
    n = 0
    for i in tl.static_range(4):
        if BITS & (8 >> i):
            n += tl.cdiv(D, 1 << i)  # piece 8 >> i packs 1 << i codes per byte
    return n


@triton.jit
def _gather_piece(row, c, mask, D, P: tl.constexpr, RUNS: tl.constexpr):
    """Bits of the ``P``-bit piece whose bytes start at pointers ``row`` ``[R]``, for channels ``c`` ``[B, PER]``:
    int32 ``[R, B, PER]`` (0 where masked), and the piece's bytes per row."""
    n_bytes = tl.cdiv(D, 8 // P)
    if RUNS:
        byte_of, slot = c // (8 // P), c % (8 // P)
    else:
        byte_of, slot = c % n_bytes, c // n_bytes
    byte = tl.load(row[:, None, None] + byte_of[None, :, :], mask=mask, other=0)
    return (byte.to(tl.int32) >> (P * slot)[None, :, :]) & ((1 << P) - 1), n_bytes


@triton.jit
def _load_codes(codes_ptr, rows, row_mask, D, BITS: tl.constexpr, PER: tl.constexpr, BLOCK_B: tl.constexpr,
                RUNS: tl.constexpr):
    """Integer codes int32 ``[R, BLOCK_B, PER]`` of whole rows ``[R]`` of ``BITS``-wide codes, with their mask.

    Slot ``(b, j)`` holds channel ``plane_channels(D, PER, BLOCK_B, RUNS)[b, j]``, code ``j`` of byte ``b`` of
    the widest piece (``8 // PER`` bits, lowest in the code), whose bytes load contiguously; every narrower
    piece is gathered into the same slots and or-ed in at its bit offset. Masked slots hold 0.
    """
    WIDE: tl.constexpr = 8 // PER
    b = tl.arange(0, BLOCK_B)
    j = tl.arange(0, PER)
    c, valid = plane_channels(D, PER, BLOCK_B, RUNS)
    mask = row_mask[:, None, None] & valid[None, :, :]
    row = codes_ptr + rows * _row_bytes(D, BITS)
    start = tl.cdiv(D, PER)  # the widest piece's bytes; the next piece starts there
    byte = tl.load(row[:, None] + b[None, :], mask=row_mask[:, None] & (b < start)[None, :], other=0)
    q = (byte.to(tl.int32)[:, :, None] >> (j * WIDE)[None, None, :]) & ((1 << WIDE) - 1)
    for i in tl.static_range(1, 4):
        if BITS & (WIDE >> i):  # the narrower pieces, widest first
            piece, n_bytes = _gather_piece(row + start, c, mask, D, WIDE >> i, RUNS)
            q |= piece << (BITS & -2 * (WIDE >> i))  # its bit offset: the wider pieces' bits
            start += n_bytes
    return q, mask


@triton.jit
def _tuple_levels(table_ptr, q, mask, BITS: tl.constexpr, TUPLE: tl.constexpr):
    """The points of a vector codebook (:func:`tuple_index`) read for codes ``q`` ``[R, BLOCK_B, PER]``.

    The codes are in runs: slot ``(b, j)`` holds channel ``b * PER + j``, so the slots flattened are the
    channels in order, and the ``TUPLE`` channels of a point are ``TUPLE`` consecutive ones. One reshape to
    ``[R, BLOCK_B · PER / TUPLE, TUPLE]`` and a weighted sum give each point's index, and each slot reads its
    own coordinate of that point from the ``[2^(BITS·TUPLE), TUPLE]`` table.
    """
    R: tl.constexpr = q.shape[0]
    BLOCK_B: tl.constexpr = q.shape[1]
    PER: tl.constexpr = q.shape[2]
    N: tl.constexpr = BLOCK_B * PER // TUPLE  # points per row, padding included
    i = tl.arange(0, TUPLE)
    digits = tl.reshape(q, (R, N, TUPLE)) << (BITS * (TUPLE - 1 - i))[None, None, :]
    point = tl.sum(digits, axis=2)  # [R, N], first channel most significant
    entry = point[:, :, None] * TUPLE + i[None, None, :]
    levels = tl.load(table_ptr + entry, mask=tl.reshape(mask, (R, N, TUPLE)), other=0.0)
    return tl.reshape(levels, (R, BLOCK_B, PER))


def reads_tuples(bits: float, t: int) -> bool:
    """Whether :func:`load_dequant` reads ``t``-channel points of ``bits``-wide codes: ``t`` must be a power of
    two (a Triton block). A fractional width (one code per point) is not read."""
    return bits == int(bits) and t & (t - 1) == 0


@triton.jit
def load_dequant(codes_ptr, scale_ptr, base_ptr, table_ptr, rows, row_mask, D, GT, GC,
                 BITS: tl.constexpr, PER: tl.constexpr, BLOCK_B: tl.constexpr,
                 TABLE: tl.constexpr, BASE: tl.constexpr, TUPLE: tl.constexpr = 1):
    """Dequantize whole packed rows of ``BITS``-wide codes to float32 ``[R, BLOCK_B, PER]``.

    Parameters
    ----------
    codes_ptr, scale_ptr, base_ptr
        Contiguous codes ``[n_rows, packed_bytes(D, BITS)]`` and float16 scale and base (the minimum of a
        :class:`Packed`, the mean of a :class:`TablePacked`) of ``n_rows // GT`` by ``D // GC`` groups.
    table_ptr
        float32 levels ``[2**BITS]`` when ``TABLE`` (else unused, may be None); with ``TUPLE > 1``, the
        points of a vector codebook, ``[2**(BITS * TUPLE), TUPLE]`` (:func:`reads_tuples` must hold).
    rows, row_mask
        Flat row indices ``[R]`` (``n * T + t``) and which of them to load.
    D, GT, GC
        Channels per row and the group extent (tokens, channels).
    BITS
        Code width, 1 to 8.
    PER, BLOCK_B
        The tile of the widest piece, ``plane_tile(D, pieces(BITS)[0])``.
    TABLE
        Whether the codes index ``table`` (a :class:`TablePacked`) or are the levels themselves.
    BASE
        Whether there is a base to add (``base_ptr`` is unused, and may be None, otherwise).
    TUPLE
        Channels per point of the table: 1 (a scalar codebook), or ``t`` of a vector codebook, whose point
        is indexed by the codes of ``t`` consecutive channels (:func:`tuple_index`).

    Returns
    -------
    tensor
        ``base + level * scale`` with ``level = table[code]`` (a point's coordinate) or ``code``; slot
        ``(b, j)`` holds channel ``plane_channels(D, PER, BLOCK_B, TABLE)[0][b, j]`` (table codes are packed in
        runs), zeros where masked or invalid.
    """
    q, mask = _load_codes(codes_ptr, rows, row_mask, D, BITS, PER, BLOCK_B, TABLE)
    c, _ = plane_channels(D, PER, BLOCK_B, TABLE)
    g = _group_index(rows, c, D, GT, GC)
    s = tl.load(scale_ptr + g, mask=mask, other=0.0).to(tl.float32)
    if not TABLE:
        level = q.to(tl.float32)
    elif TUPLE == 1:
        level = tl.load(table_ptr + q, mask=mask, other=0.0)
    else:
        level = _tuple_levels(table_ptr, q, mask, BITS, TUPLE)
    x = level * s
    if BASE:
        x = tl.load(base_ptr + g, mask=mask, other=0.0).to(tl.float32) + x
    return x


@triton.jit
def _group_stats_kernel(x_ptr, scale_ptr, min_ptr, n_groups, D, GT, GC, levels,
                        BLOCK_K: tl.constexpr, BLOCK_GT: tl.constexpr, BLOCK_GC: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = k < n_groups
    row0 = (k // (D // GC)) * GT
    col0 = (k % (D // GC)) * GC
    i = tl.arange(0, BLOCK_GT)
    j = tl.arange(0, BLOCK_GC)
    offs = (row0[:, None, None] + i[None, :, None]) * D + col0[:, None, None] + j[None, None, :]
    mask = k_mask[:, None, None] & (i < GT)[None, :, None] & (j < GC)[None, None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lo = tl.min(tl.min(tl.where(mask, x, float("inf")), axis=2), axis=1)
    hi = tl.max(tl.max(tl.where(mask, x, float("-inf")), axis=2), axis=1)
    minimum = _fp16_floor_tl(tl.where(k_mask, lo, 0.0))
    span = tl.where(k_mask, hi, 0.0) - minimum.to(tl.float32)
    scale = _fp16_ceil_tl(tl.div_rn(span, tl.zeros_like(span) + levels))  # div_rn takes no scalars
    tl.store(scale_ptr + k, scale, mask=k_mask)
    tl.store(min_ptr + k, minimum, mask=k_mask)


@triton.jit
def _encode_kernel(x_ptr, scale_ptr, min_ptr, codes_ptr, n_rows, D, GT, GC, levels, row_bytes, offset,
                   PIECE: tl.constexpr, SHIFT: tl.constexpr, PER: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    """Quantize rows and write bits ``SHIFT .. SHIFT + PIECE - 1`` of their codes, the piece whose bytes start
    ``offset`` bytes into each ``row_bytes``-byte packed row."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = tl.arange(0, BLOCK_B)
    j = tl.arange(0, PER)
    c, valid = plane_channels(D, PER, BLOCK_B)
    mask = (rows < n_rows)[:, None, None] & valid[None, :, :]
    x = tl.load(x_ptr + rows[:, None, None] * D + c[None, :, :], mask=mask, other=0.0).to(tl.float32)
    g = _group_index(rows, c, D, GT, GC)
    s = tl.load(scale_ptr + g, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(min_ptr + g, mask=mask, other=0.0).to(tl.float32)
    inv = tl.where(s > 0, tl.div_rn(tl.zeros_like(s) + 1.0, tl.where(s > 0, s, 1.0)), 0.0)
    q = tl.minimum(tl.maximum(tl.floor((x - m) * inv + 0.5), 0.0), levels).to(tl.int32)  # 0 where masked
    q = (q >> SHIFT) & ((1 << PIECE) - 1)
    packed = tl.sum(q << (j * PIECE)[None, None, :], axis=2)
    tl.store(codes_ptr + rows[:, None] * row_bytes + offset + b[None, :], packed.to(tl.uint8),
             mask=(rows < n_rows)[:, None] & (b < tl.cdiv(D, PER))[None, :])


@triton.jit
def _decode_kernel(codes_ptr, scale_ptr, min_ptr, out_ptr, n_rows, D, GT, GC,
                   BITS: tl.constexpr, PER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    x = load_dequant(codes_ptr, scale_ptr, min_ptr, None, rows, row_mask, D, GT, GC, BITS, PER, BLOCK_B, False, True)
    c, valid = plane_channels(D, PER, BLOCK_B)
    tl.store(out_ptr + rows[:, None, None] * D + c[None, :, :], x.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None, None] & valid[None, :, :])


def plane_tile(dim: int, piece: int) -> tuple[int, int]:
    """The ``[BLOCK_B, PER]`` (byte, plane) tile that holds one row of a ``piece``-bit piece in registers.

    Parameters
    ----------
    dim
        ``D``, channels per row.
    piece
        Width of the piece: 1, 2, 4 or 8; for a whole row of codes, the widest, ``pieces(bits)[0]``.

    Returns
    -------
    tuple[int, int]
        ``(PER, BLOCK_B)``: codes per byte, and the piece's bytes per row rounded up to a power of two.
    """
    return 8 // piece, triton.next_power_of_2(piece_bytes(dim, piece))


def _row_tiles(d: int, piece: int) -> tuple[int, int, int]:
    """``(BLOCK_R, PER, BLOCK_B)`` for kernels that process whole rows of ``d`` channels of a ``piece``-bit piece."""
    per, block_b = plane_tile(d, piece)
    return max(1, _TILE // (block_b * per)), per, block_b


def quantize_pack_triton(
    x: torch.Tensor, bits: int, group_size: int, along: Along
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`quantize_pack_ref` (same arguments, same outputs)."""
    gt, gc = group_shape(x.shape, bits, group_size, along)
    codes, scale, minimum = _empty_outputs(x, bits, gt, gc)
    if x.numel() == 0:
        return codes, scale, minimum
    x = x.contiguous()
    d = x.shape[-1]
    n_rows = x.numel() // d
    levels = float(2**bits - 1)
    block_gt, block_gc = triton.next_power_of_2(gt), triton.next_power_of_2(gc)
    block_k = max(1, _TILE // (block_gt * block_gc))
    _group_stats_kernel[(triton.cdiv(scale.numel(), block_k),)](
        x, scale, minimum, scale.numel(), d, gt, gc, levels,
        BLOCK_K=block_k, BLOCK_GT=block_gt, BLOCK_GC=block_gc,
    )
    offset, shift = 0, 0
    for piece in pieces(bits):  # one pass per piece, each writing its bytes of every row
        block_r, per, block_b = _row_tiles(d, piece)
        _encode_kernel[(triton.cdiv(n_rows, block_r),)](
            x, scale, minimum, codes, n_rows, d, gt, gc, levels, codes.shape[-1], offset,
            PIECE=piece, SHIFT=shift, PER=per, BLOCK_R=block_r, BLOCK_B=block_b,
        )
        offset, shift = offset + piece_bytes(d, piece), shift + piece
    return codes, scale, minimum


def unpack_dequantize_triton(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bits: int,
                             group_size: int, along: Along, dim: int, dtype: torch.dtype,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of :func:`unpack_dequantize_ref` (same arguments, same output)."""
    *lead, t, _ = codes.shape
    gt, gc = group_shape((*lead, t, dim), bits, group_size, along)
    result = out if out is not None and out.is_contiguous() else codes.new_empty((*lead, t, dim), dtype=dtype)
    if result.numel() == 0:
        return result
    n_rows = result.numel() // dim
    block_r, per, block_b = _row_tiles(dim, pieces(bits)[0])
    _decode_kernel[(triton.cdiv(n_rows, block_r),)](
        codes.contiguous(), scale.contiguous(), minimum.contiguous(), result, n_rows, dim, gt, gc,
        BITS=bits, PER=per, BLOCK_R=block_r, BLOCK_B=block_b,
    )
    return result if out is None or result is out else out.copy_(result)


quantize_pack = Dispatch(quantize_pack_triton, quantize_pack_ref, "Quantize and pack ``x``.")
unpack_dequantize = Dispatch(unpack_dequantize_triton, unpack_dequantize_ref, "Unpack and dequantize.")


def dequantize(p: Packed | TablePacked, dtype: torch.dtype = torch.float32,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Reconstruct ``[..., T, D]`` in ``dtype``: ``minimum + code * scale`` of a :class:`Packed`
    (:func:`unpack_dequantize`), ``mean + scale * table[code]`` of a :class:`TablePacked` (torch).

    Parameters
    ----------
    p
        A quantized tensor.
    dtype
        Output dtype.
    out
        Optional ``[..., T, D]`` tensor to write into, e.g. the front of a buffer that also takes the
        residual window.

    Returns
    -------
    torch.Tensor
        The dequantized tensor.
    """
    if isinstance(p, Packed):
        return unpack_dequantize(p.codes, p.scale, p.minimum, p.bits, p.group_size, p.along, p.dim, dtype, out)
    *lead, t, _ = p.codes.shape
    gt, gc = group_shape((*lead, t, p.dim), p.index_bits, p.group_size, p.along)
    idx = _run_codes_int64(p.codes, p.index_bits, p.index_dim)
    if p.table.dim() == 2 and not p.joint:  # a vector codebook: each run of t codes indexes one point of t channels
        idx = tuple_index(idx.view(*idx.shape[:-1], p.dim // p.table.shape[1], p.table.shape[1]), p.bits)
    x = p.table.float()[idx].view(*lead, t, p.dim)
    shape = (math.prod(lead), t // gt, 1, p.dim // gc, 1)
    groups = x.view(shape[0], t // gt, gt, p.dim // gc, gc)
    if p.mean is None:
        groups.mul_(p.scale.float().reshape(shape))
    else:  # one torch.addcmul, as the stores' reading takes it
        torch.addcmul(p.mean.float().reshape(shape), p.scale.float().reshape(shape), groups, out=groups)
    return x.to(dtype) if out is None else out.copy_(x)
