"""Codebook quantization with one norm per vector: rotated coordinates coded by a Lloyd–Max codebook.

TurboQuant (Zandieh et al., arXiv 2504.19874, §3.1, "TurboQuant_mse") and PolarQuant (arXiv 2502.02617):
after a random orthogonal rotation ``Π``, each coordinate of a ``g``-dimensional vector ``x`` is close to
``N(0, ‖x‖²/g)`` whatever ``x`` was (for ``g ≥ 64`` the exact Beta law of a coordinate on the sphere is
Gaussian to within a fraction of a percent). So one fixed scalar codebook fits every coordinate of every
vector, and the only per-vector metadata is its norm; there are no per-group minima or scales. Per
vector of ``g`` channels (a head vector, or ``group_size`` channels of one):

* ``s = ‖x‖ / √g`` (the RMS, in float16: it cannot overflow where the norm could), ``y = x / s``
  (coordinates ≈ ``N(0, 1)``);
* ``idx_j = argmin_i |y_j − c_i|`` over the ``2^b`` points ``c`` of the Lloyd–Max codebook of ``N(0, 1)``
  (Max 1960; Lloyd 1982): the fixed point of ``t_i = (c_i + c_{i+1}) / 2`` and
  ``c_i = E[Y | t_{i−1} < Y < t_i] = (φ(t_{i−1}) − φ(t_i)) / (Φ(t_i) − Φ(t_{i−1}))`` (:func:`lloyd_max`);
* ``x̂ = σ · c[idx]`` with the stored scale ``σ = ⟨x, c[idx]⟩ / ‖c[idx]‖²``, the least-squares one for
  the chosen indices (``s`` itself when ``c[idx]`` reproduces ``y``; at most a few times ``s``, kept
  within the float16 range). The mean squared error per coordinate
  is then a little below the codebook's distortion times ``s²`` (0.3634, 0.1175, 0.03454, 0.009497 for
  ``b`` = 1..4; TurboQuant Thm. 1 quotes ≈ 0.36, 0.117, 0.03, 0.009): on 64-dimensional Gaussian vectors
  1.3%, 3.4%, 5.2% and 6.7% below it, and perplexity through ``codebook-4x``'s values alone on the
  WikiText-2 tuning slice ×1.0057 → ×1.0033 (README, Measured).

**Vector codebooks** (quantizer ``"vector"``, :class:`VectorCodebookStore`): the same rotated, normalized
coordinates, coded ``t`` at a time by the ``2^(b·t)`` points of a generalized-Lloyd codebook of
``N(0, I_t)`` (Linde, Buzo & Gray 1980; Gersho & Gray, *Vector Quantization and Signal Compression*,
§11.3), still ``b`` bits per coordinate. A scalar code spends its bits on a product grid of points; a
vector codebook places them where the Gaussian's mass is (round cells, not square ones) and lowers the
distortion at the same width: per coordinate 0.0969 against 0.1175 at 2 bits (``t = 4``), 0.0298 against
0.0345 at 3 bits and 0.00783 against 0.00950 at 4 bits (``t = 2``; :data:`VECTOR_DISTORTION`). Coding
channels jointly is CQ's coupled quantization (Zhang et al., arXiv 2405.03917), which learns its centroids
from activations; after the rotation, one data-free codebook serves every head. The codebooks are fitted
once on seeded Gaussian samples (``scripts/gaussian_codebooks.py``) and shipped as
``kvcompress/data/gaussian_codebooks.safetensors``; ``t`` is :data:`TUPLES`'s for the width (at most 256
points, searched exhaustively), halved until it divides the group. The ``t`` codes of a tuple are the
digits of its point's index, first channel most significant, packed as any ``b``-bit codes: the bytes are
the scalar codebook's.

**Half a bit more** (:data:`FRACTIONAL`): a vector codebook also gives widths between the integers. At 1.5
bits per coordinate, 64 points of ``N(0, I_4)`` (0.1843 per coordinate, between 1 bit's 0.3417 and 2 bits'
0.0969 at ``t = 4``) code 4 channels with one 6-bit index; 8 points of ``N(0, I_2)`` where only pairs
divide the group. Such a point is one packed code (``D / t`` codes of ``b·t`` bits per token, the same
layout as any ``b·t``-bit codes), not ``t`` digits. It is what fills the gap of a whole bit between 1 and 2
bits, where a 6× cache of SmolLM2 spends most of its value layers (README, Measured).

The rotation is the latent rotation of :mod:`kvcompress.methods.rotation`, already folded into the
weights (or ``k_rot`` for post-RoPE keys), so this store sees rotated vectors and adds no run-time cost
for it. The codebook is data-free: computed once per width from the Gaussian density and cached; nothing
is written into the checkpoint beyond the plan's bits and groups.

Bytes per token of a ``D``-wide stream, ``T_q`` of ``T`` tokens quantized (:meth:`CodebookStore.bytes_per_token`)::

    (T_q · (packed_bytes(D, b) + 2·D/g) + (T − T_q) · 2·D) / T      (values; keys: 2·2·D/G for mean and deviation)

At ``g = 64``, the norm costs 0.25 bits per value: 3-bit codes hold 3.25 bits per value all-in, against
4 + 1 for KIVI's 4-bit codes with fp16 scale and minimum per 32 values.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import replace
from importlib import resources

import torch
from safetensors.torch import load

from kvcompress.errors import KVCompressError
from kvcompress.kernels.pack import (
    TablePacked,
    dequantize,
    pack_codes,
    packed_bytes,
    run_codes,
    run_index,
    run_slots,
    tuple_index,
)
from kvcompress.methods.dense import FP16
from kvcompress.methods.kivi import QuantizedStore, effective_group


@functools.cache
def lloyd_max(bits: int, iterations: int = 20_000, tol: float = 1e-12) -> tuple[tuple[float, ...], float]:
    """The ``2^bits``-point Lloyd–Max codebook of ``N(0, 1)`` and its mean squared error (float64, cached).

    Parameters
    ----------
    bits
        Code width, 1 to 8.
    iterations, tol
        Lloyd iterations at most, and the largest change of a point that stops them.

    Returns
    -------
    tuple
        ``(points, distortion)``: ascending points, symmetric about 0, and ``E[(Y − Q(Y))²]``.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 1 to 8, got {bits}")
    k = 2**bits
    f64 = torch.float64
    # start from the high-resolution optimum (Panter–Dite: point density ∝ pdf^(1/3), i.e. quantiles of N(0, 3))
    points = math.sqrt(3.0) * torch.special.ndtri((torch.arange(k, dtype=f64) + 0.5) / k)
    inf = torch.tensor([math.inf], dtype=f64)

    def cells(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        edges = torch.cat([-inf, (c[1:] + c[:-1]) / 2, inf])
        pdf = torch.exp(-0.5 * edges.square()) / math.sqrt(2 * math.pi)  # 0 at ±inf
        return edges, pdf, torch.special.ndtr(edges)

    for _ in range(iterations):
        _, pdf, cdf = cells(points)
        new = (pdf[:-1] - pdf[1:]) / (cdf[1:] - cdf[:-1]).clamp_min(1e-300)  # E[Y | cell]
        moved = float((new - points).abs().max())
        points = new
        if moved < tol:
            break
    edges, pdf, cdf = cells(points)
    tpdf = torch.where(edges.isfinite(), edges * pdf, 0.0)
    mass = cdf[1:] - cdf[:-1]
    second = mass + tpdf[:-1] - tpdf[1:]  # E[Y²; cell]
    distortion = float((second - 2 * points * (pdf[:-1] - pdf[1:]) + points.square() * mass).sum())
    return tuple(points.tolist()), distortion


# Coordinates per point of the vector codebook at each width: 256 points at most (4 coordinates up to 2 bits, 2 at
# 3 and 4 bits), scalar above. The search for the nearest point is exhaustive, so its cost grows with the points:
# quads at 3 bits (4,096 points, 0.0260 per coordinate) took 111 s instead of 27 s to stream 4096 tokens of
# SmolLM2 through the cache.
TUPLES = {1: 4, 1.5: 4, 2: 4, 3: 2, 4: 2}
FRACTIONAL = (1.5,)  # widths between the integers: vector codebooks whose point is one code of bits·t bits
# Mean squared error per coordinate of the shipped codebooks, keyed (t, bits), on 10^6 fresh N(0, 1) tuples: what
# ``scripts/gaussian_codebooks.py`` printed when it wrote them
VECTOR_DISTORTION = {(2, 1): 0.3632, (2, 1.5): 0.2013, (2, 2): 0.1090, (2, 3): 0.02982, (2, 4): 0.007832,
                     (4, 1): 0.3417, (4, 1.5): 0.1843, (4, 2): 0.09689}


def lloyd_gaussian(dim: int, bits: float, samples: int = 1_000_000, iterations: int = 100,
                   seed: int = 0) -> tuple[torch.Tensor, float]:
    """The generalized-Lloyd codebook of ``N(0, I_dim)`` with ``2^(bits·dim)`` points (an integer), fitted on
    seeded samples.

    Alternates nearest-point cells (found in float32) and their centroids (LBG) on ``samples`` draws, starting
    from the first ``2^(bits·dim)`` of them (the product of the scalar Lloyd–Max points would not move: its
    rectangular cells are a fixed point for independent coordinates); a point whose cell is empty stays where
    it is. Points come out sorted by their first, then later coordinates.

    Returns
    -------
    tuple
        ``(points, distortion)``: float64 ``[2^(bits·dim), dim]`` and the mean squared error per coordinate
        on the fitting samples.
    """
    x = torch.randn(samples, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x32, ones = x.float(), torch.ones(samples, dtype=torch.float64)
    points = x[:2 ** round(bits * dim)].clone()
    for _ in range(iterations):
        cell = nearest(x32, points.float())
        sums = torch.zeros_like(points).index_add_(0, cell, x)
        counts = torch.zeros(len(points), dtype=torch.float64).index_add_(0, cell, ones)
        points = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], points)
    distortion = float((x - points[nearest(x32, points.float())]).square().mean())
    for j in reversed(range(dim)):  # lexicographic order: a stable sort per coordinate, last first
        points = points[torch.sort(points[:, j], stable=True).indices]
    return points, distortion


def nearest(x: torch.Tensor, points: torch.Tensor, rows: int = 2048) -> torch.Tensor:
    """Index of the nearest of ``points`` ``[n, t]`` to each row of ``x`` ``[m, t]`` (int64 ``[m]``), ``rows``
    at a time: the arg-min of ``‖c‖²/2 − ⟨x, c⟩``."""
    half = points.square().sum(dim=1) / 2
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for i in range(0, x.shape[0], rows):
        torch.argmin(torch.addmm(half, x[i:i + rows], points.T, alpha=-1), dim=1, out=out[i:i + rows])
    return out


def tuple_dim(bits: float, group: int) -> int:
    """Coordinates per point of the vector codebook for ``bits`` and a group of ``group`` coordinates:
    :data:`TUPLES`'s, halved until it divides ``group``; ``ValueError`` where a fractional width is left with
    no whole number of bits per point."""
    t = TUPLES.get(bits, 1)
    while group % t:
        t //= 2
    if bits * t != round(bits * t):
        raise ValueError(f"{bits:g}-bit codes need groups of an even number of channels, got {group}")
    return t


def codebook_name(dim: int, bits: float) -> str:
    """The tensor of :func:`vector_points` in ``gaussian_codebooks.safetensors``: ``dim4_bits2``, ``dim4_bits1.5``."""
    return f"dim{dim}_bits{bits:g}"


@functools.cache
def vector_points(dim: int, bits: float, device: torch.device) -> torch.Tensor:
    """The shipped codebook of ``N(0, I_dim)`` for ``bits``-bit coordinates: float32 ``[2^(bits·dim), dim]``."""
    if (dim, bits) not in VECTOR_DISTORTION:
        raise ValueError(f"no vector codebook of {dim} coordinates at {bits} bits; shipped (coordinates, bits): "
                         f"{sorted(VECTOR_DISTORTION)}")
    data = resources.files("kvcompress").joinpath("data/gaussian_codebooks.safetensors").read_bytes()
    return load(data)[codebook_name(dim, bits)].to(device=device, dtype=torch.float32)


@functools.cache
def _tables(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    points = torch.tensor(lloyd_max(bits)[0], dtype=torch.float32, device=device)
    return points, (points[1:] + points[:-1]) / 2  # the points, and the cell edges between them


def _codebook(bits: int, dim: int, device: torch.device) -> torch.Tensor:
    """The stores' codebook: Lloyd–Max points ``[2^bits]`` (``dim = 1``), else :func:`vector_points`."""
    return _tables(bits, device)[0] if dim == 1 else vector_points(dim, bits, device)


def _grouped(x: torch.Tensor, group: int, along: str) -> torch.Tensor:
    """``x`` grouped: ``[..., T, D/g, g]`` (``along="channels"``) or ``[..., T/g, g, D]`` (``"tokens"``)."""
    *lead, t, d = x.shape
    return x.reshape(*lead, t, d // group, group) if along == "channels" else x.reshape(*lead, t // group, group, d)


def encode(x: torch.Tensor, bits: float, group: int, along: str = "channels",
           points: torch.Tensor | None = None, tuple_size: int = 1) -> TablePacked:
    """Quantize ``x`` (``[..., T, D]``) into codebook indices with one normalization per group.

    Returns the :class:`~kvcompress.kernels.pack.TablePacked` that the stores hold and the decode-attention
    kernel reads: uint8 indices packed as :func:`~kvcompress.kernels.pack.pack_codes`; the float16
    least-squares scale of the chosen points (about the RMS) per token and group of channels
    (``[..., T, D // group]``), or per channel and group of tokens (``[..., T // group, D]``, with the float16
    per-channel ``mean`` of each token group); and the points as the table.

    ``along="channels"`` (values): per ``group`` channels of each token, ``y = x / rms``.
    ``along="tokens"`` (keys): per channel over ``group`` tokens, a float16 mean and ``y = (x − mean) / std``.
    Each ``y_j`` is coded by the nearest point ``c`` of the Lloyd–Max codebook of ``bits`` (or of
    ``points``, ascending), and the float16 scale stored is the least-squares one for those points.
    With ``tuple_size`` ``t > 1`` (or 2-D ``points`` ``[2^(bits·t), t]``), each run of ``t`` consecutive
    channels of ``y`` (within a group of channels) is coded by the nearest point of the vector codebook
    (:func:`vector_points`), its index written as ``t`` digits of ``bits`` bits, first channel most significant;
    at a fractional width (:data:`FRACTIONAL`), as one code of ``bits·t`` bits.
    """
    d = x.shape[-1]
    if along == "channels":
        group = effective_group(d, group)
    points = _codebook(bits, tuple_size, x.device) if points is None else points.to(x.device)
    t = 1 if points.dim() == 1 else points.shape[1]
    if (group if along == "channels" else d) % t:
        raise ValueError(f"tuples of {t} channels do not divide {'groups of ' if along == 'channels' else ''}"
                         f"{group if along == 'channels' else d} channels")
    v = _grouped(x.float(), group, along)
    axis = -1 if along == "channels" else -2
    mean = None if along == "channels" else v.mean(dim=axis, keepdim=True).to(torch.float16)
    centred = v if mean is None else v - mean.float()
    s = centred.square().mean(dim=axis, keepdim=True).sqrt().to(torch.float16).float()
    y = torch.where(s > 0, centred / s.clamp_min(1e-30), 0.0)
    if t == 1:
        grouped_idx = torch.bucketize(y, (points[1:] + points[:-1]) / 2)  # the nearest point: between the midpoints
        c = points[grouped_idx]
    else:
        cell = nearest(y.reshape(-1, t), points)
        c = points[cell].view(y.shape)
        if bits == int(bits):
            shifts = bits * torch.arange(t - 1, -1, -1, device=x.device)
            grouped_idx = ((cell[:, None] >> shifts) & (2**bits - 1)).view(y.shape)
    # the scale that minimizes |centred - scale * c|^2 for these indices (the RMS when c reproduces y)
    cc = c.square().sum(dim=axis, keepdim=True)  # 0 only for a codebook with a 0 point and y all 0
    scale = torch.where(cc > 0, (centred * c).sum(dim=axis, keepdim=True) / cc.clamp_min(1e-30), 0.0)
    scale = scale.clamp_max(torch.finfo(torch.float16).max).to(torch.float16)
    codes = (pack_codes(grouped_idx.reshape(x.shape), bits, runs=True) if bits == int(bits)  # one code per point:
             else pack_codes(cell.to(torch.uint8).view(*x.shape[:-1], d // t), round(bits * t), runs=True))
    return TablePacked(codes, scale.squeeze(axis), None if mean is None else mean.squeeze(axis), points, bits,
                       group, along, d)


# A lookup element: ``k`` float32 values of consecutive channels, moved by one gather as one wider number (8: rows)
_ELEMENTS = {4: torch.complex128, 2: torch.float64, 1: torch.float32}


def _run_table(points: torch.Tensor, bits: float) -> torch.Tensor:
    """The values of every :func:`~kvcompress.kernels.pack.run_index` of codes of ``points``: float32 ``[E, k]``.

    ``points`` is a scalar codebook ``[n]`` or a vector codebook ``[m, t]``; the codes are ``w`` bits wide
    (:attr:`~kvcompress.kernels.pack.TablePacked.index_bits`), ``u`` of them per index
    (:func:`~kvcompress.kernels.pack.run_codes`), so ``E = 2^(u·w)`` indices (256 at 1, 2 and 4 bits, 1024 to
    16384 at 5, 3 and 6, and 7 bits, 65536 at 8 bits). Entry ``i`` holds the ``k`` consecutive channels of the
    ``u`` codes of index ``i``: ``k = u`` for a scalar codebook and for a vector codebook's digits (``t`` of them
    per point, ``t`` dividing ``u``: :func:`_runs_hold_points`), ``k = u·t`` for one code per point (a
    fractional width). Codes past the last point read NaN.
    """
    vector = points.view(-1, 1) if points.dim() == 1 else points
    t, joint = vector.shape[1], bits != int(bits)
    width = round(bits * t) if joint else int(bits)
    u = run_codes(width)
    slots = run_slots(torch.arange(2 ** (u * width), device=points.device), width)  # [E, u] codes
    digits = t > 1 and not joint
    if digits:
        slots = tuple_index(slots.view(len(slots), u // t, t), width)  # [E, u / t] points
    values = vector.new_full((2 ** (width * t if digits else width), t), math.nan, dtype=torch.float32)
    values[:len(vector)] = vector
    return values[slots].view(len(slots), -1)


@functools.cache
def _lookup_table(bits: float, t: int, device: torch.device) -> torch.Tensor:
    """:func:`_run_table` of the stores' codebook (:func:`_codebook`; data-free, so cached: 512 kB at 8 bits, 128 kB
    at most below)."""
    return _run_table(_codebook(bits, t, device), bits)


def _gather(table: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """``out = table[index]``, ``table`` ``[E, k]``, into a contiguous float32 ``out`` of ``index.numel() · k``
    values: each row as one ``_ELEMENTS[k]`` where ``out``'s offset allows it (3 × 2048 × 64 values take about
    600 µs one at a time, 130 two, 100 four and 160 eight, on one CPU thread), else row by row."""
    k = table.shape[1]
    if k in _ELEMENTS and out.storage_offset() % k == 0:
        element = _ELEMENTS[k]
        torch.index_select(table.view(element).view(-1), 0, index.view(-1), out=out.view(element).view(-1))
    else:
        torch.index_select(table, 0, index.view(-1), out=out.view(-1, k))


def _lookup(codes: torch.Tensor, bits: float, dim: int, out: torch.Tensor, points: torch.Tensor) -> None:
    """``out = c[idx]``: the points of packed indices ``codes``, into a contiguous float32 ``out`` ``[..., dim]``.

    The codes are packed in runs (:func:`~kvcompress.kernels.pack.pack_codes`), so each byte of the widest
    piece (two bytes at 8 bits), with the narrower pieces' bits for the same codes, is one index
    (:func:`~kvcompress.kernels.pack.run_index`) of a table of every such index's consecutive values
    (:func:`_run_table`): one gather writes them in channel order, nothing is unpacked. Through a fresh
    buffer where the indices hold more channels than ``dim``.
    """
    t = 1 if points.dim() == 1 else points.shape[1]
    joint = bits != int(bits)
    width, n = (round(bits * t), dim // t) if joint else (int(bits), dim)
    stores_codebook = ((t == 1 or (t, bits) in VECTOR_DISTORTION)  # the stores' codebook: its tables are cached
                       and points is _codebook(bits, t, codes.device))
    table = _lookup_table(bits, t, codes.device) if stores_codebook else _run_table(points, bits)
    index = run_index(codes, width, n)
    if index.shape[-1] * table.shape[1] == dim:
        _gather(table, index, out)
        return
    full = out.new_empty((*out.shape[:-1], index.shape[-1] * table.shape[1]))
    _gather(table, index, full)
    out.copy_(full[..., :dim])


def _runs_hold_points(p: TablePacked) -> bool:
    """Whether the codes of each :func:`~kvcompress.kernels.pack.run_index` hold whole points: always but for a
    vector codebook (given as ``points``; the shipped ones fit) whose ``t`` digits span more codes than that."""
    return p.joint or p.table.dim() == 1 or run_codes(int(p.bits)) % p.table.shape[1] == 0


def decode(p: TablePacked, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """``mean + scale · table[idx]`` back in ``[..., T, D]`` (into ``out`` if given).

    The table lookup (:func:`_lookup`) writes straight into ``out`` when it is a contiguous float32 buffer
    (the CPU workspace), and the normalization is applied there in place: no intermediate copy. In float32,
    whatever the lookup's element width; with a mean, ``torch.addcmul(mean, scale, level)``, one pass (a fused
    multiply-add where the CPU has one, as the GPU kernel's), which :func:`~kvcompress.kernels.pack.dequantize`
    also takes; it reads the points that span several bytes (:func:`_runs_hold_points`).
    """
    if not _runs_hold_points(p):
        return dequantize(p, dtype, out)
    axis = -1 if p.along == "channels" else -2
    direct = out is not None and out.dtype == torch.float32 and out.is_contiguous()
    x = out if direct else p.codes.new_empty((*p.codes.shape[:-1], p.dim), dtype=torch.float32)
    _lookup(p.codes, p.bits, p.dim, x, p.table)
    g = _grouped(x, p.group_size, p.along)
    if p.mean is None:
        g.mul_(p.scale.float().unsqueeze(axis))
    else:
        torch.addcmul(p.mean.float().unsqueeze(axis), p.scale.float().unsqueeze(axis), g, out=g)
    if direct:
        return x
    return x.to(dtype) if out is None else out.copy_(x)


def cat(parts: Sequence[TablePacked]) -> TablePacked:
    """Concatenate along tokens (same layout and table)."""
    first = parts[0]
    mean = None if first.mean is None else torch.cat([p.mean for p in parts], dim=-2)
    return replace(first, codes=torch.cat([p.codes for p in parts], dim=-2),
                   scale=torch.cat([p.scale for p in parts], dim=-2), mean=mean)


class CodebookStore(QuantizedStore):
    """Settled tokens as Lloyd–Max codebook indices, grouped as KIVI groups them.

    Keys (``along="tokens"``): per channel, a float16 mean and scale over ``group_size``
    tokens. Values (``along="channels"``): per token, a float16 norm over ``group_size`` channels. Same
    interface, flush blocks and residual window as :class:`~kvcompress.methods.kivi.QuantizedStore`.
    """

    @classmethod
    def coded_bytes(cls, width: int, bits: float, along: str, group: int, block: int) -> float:
        """Bytes of one quantized token: indices, and a mean and deviation per channel and token group (keys)
        or a norm per channel group (values)."""
        meta = 2 * FP16 * width / group if along == "tokens" else FP16 * width / effective_group(width, group)
        return cls.code_bytes(width, bits, along, group) + meta

    @staticmethod
    def code_bytes(width: int, bits: float, along: str, group: int) -> int:
        """Bytes of one token's packed indices: :func:`~kvcompress.kernels.pack.packed_bytes`."""
        return packed_bytes(width, int(bits))

    def _encode(self, x: torch.Tensor) -> TablePacked:
        return encode(x, self.bits, self.group_size, self.along)

    def _decode(self, packed: TablePacked, out: torch.Tensor) -> None:
        decode(packed, self.dtype, out)

    def _cat(self, parts: list[TablePacked]) -> TablePacked:
        return cat(parts)

    def _select(self, packed: TablePacked, index: torch.Tensor) -> TablePacked:
        mean = None if packed.mean is None else packed.mean.index_select(0, index)
        return replace(packed, codes=packed.codes.index_select(0, index),
                       scale=packed.scale.index_select(0, index), mean=mean)


class VectorCodebookStore(CodebookStore):
    """:class:`CodebookStore` with tuples of channels coded jointly by a vector codebook of ``N(0, I_t)``
    (module docstring; ``t`` = :func:`tuple_dim` of the width and the group): the same bytes and groups, a
    lower distortion. On CUDA the fused decode kernel reads its codes through the points' table (points of a power
    of two channels, :func:`~kvcompress.kernels.pack.reads_tuples`: every shipped integer width). It also stores the
    fractional widths of :data:`FRACTIONAL`, one ``bits·t``-bit code per point, which the kernel does not read:
    a layer holding them reads dense."""

    widths = tuple(sorted((*range(1, 9), *FRACTIONAL)))

    @staticmethod
    def _tuple(bits: float, along: str, group: int, width: int) -> int:
        """:func:`tuple_dim` of the channel group (values) or of the whole width (keys, grouped along tokens)."""
        return tuple_dim(bits, effective_group(width, group) if along == "channels" else width)

    @classmethod
    def check_bits(cls, name: str, method: str, bits: float, width: int, group: int) -> None:
        super().check_bits(name, method, bits, width, group)
        try:
            tuple_dim(bits, effective_group(width, group))
        except ValueError as e:
            raise KVCompressError(f"{name}: {e}") from None

    @classmethod
    def code_bytes(cls, width: int, bits: float, along: str, group: int) -> int:
        """Bytes of one token's packed indices: ``t`` digits per point of an integer width, one ``bits·t``-bit
        code per point of a fractional one."""
        if bits == int(bits):
            return packed_bytes(width, int(bits))
        t = cls._tuple(bits, along, group, width)
        return packed_bytes(width // t, round(bits * t))

    def tuple_size(self, width: int) -> int:
        """Channels per point for a ``width``-channel stream: :func:`tuple_dim` of the group (values) or of the
        whole width (keys, whose groups run along tokens)."""
        return self._tuple(self.bits, self.along, self.group_size, width)

    def _encode(self, x: torch.Tensor) -> TablePacked:
        return encode(x, self.bits, self.group_size, self.along, tuple_size=self.tuple_size(x.shape[-1]))
