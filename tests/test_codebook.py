"""Codebook quantizer (Lloyd–Max codebook, one normalization per group), the sink copy, and a tiny model end to end."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvcompress
from kvcompress.checkpoint.export import export
from kvcompress.compat import CACHE_ARG
from kvcompress.errors import KVCompressError
from kvcompress.kernels.decode_attention import decode_attention_ref, decode_attention_triton
from kvcompress.kernels.pack import Packed, TablePacked, unpack_codes
from kvcompress.memory import compressed_bytes_per_token
from kvcompress.methods import QUANTIZERS, CodebookStore, QuantizedStore, make_store
from kvcompress.methods.codebook import _lookup_table, cat, decode, encode, lloyd_max
from kvcompress.plan import Plan, build_plan, layer_plan
from kvcompress.recipe import LayerRecipe, Quant, Recipe
from kvcompress.runtime.cache import KVCompressLayer
from kvcompress.sources import ModelSpec, open_source

MAX_1960 = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}  # Max (1960), Table I: mean squared error of N(0, 1)
F16_REL = 2.0**-10  # one float16 ulp relative to the value: the rounding of a stored norm or deviation is half of it


def _gauss(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _cells(points: torch.Tensor) -> torch.Tensor:
    """Cell edges of the nearest-point rule: -inf, the midpoints, +inf."""
    inf = torch.tensor([math.inf], dtype=points.dtype)
    return torch.cat([-inf, (points[1:] + points[:-1]) / 2, inf])


def _pieces_bytes(dim: int, bits: int) -> int:
    """Packed bytes per token by the layout's rule: one ``ceil(dim / (8 // p))``-byte plane set per binary
    digit ``p`` of ``bits`` (written out here rather than read from the packer)."""
    return sum(-(-dim // (8 // p)) for p in (8, 4, 2, 1) if bits & p)


# --------------------------------------------------------------------------- the codebook


@pytest.mark.parametrize(("bits", "expected"), sorted(MAX_1960.items()))
def test_lloyd_max_distortion_matches_max_1960(bits, expected):
    points, distortion = lloyd_max(bits)
    assert len(points) == 2**bits
    assert distortion == pytest.approx(expected, rel=1e-3)


# Lloyd's iteration contracts slowly with many cells: its 20,000 steps leave the 128 and 256 points short of
# the fixed point (measured: 2.8e-9 and 5.1e-6 from their centroids), which changes the distortion by ~1e-11
CENTROID_ATOL = {7: 1e-8, 8: 1e-5}


@pytest.mark.parametrize("bits", range(1, 9))
def test_lloyd_max_points_are_ascending_symmetric_centroids_of_their_cells(bits):
    points, distortion = lloyd_max(bits)
    c = torch.tensor(points, dtype=torch.float64)
    atol = CENTROID_ATOL.get(bits, 1e-10)
    assert (c[1:] > c[:-1]).all()
    assert torch.allclose(c, -c.flip(0), rtol=0, atol=1e-10)
    edges = _cells(c)
    # closed form: E[Y | a < Y < b] = (phi(a) - phi(b)) / (Phi(b) - Phi(a))
    pdf = torch.exp(-0.5 * edges.square()) / math.sqrt(2 * math.pi)
    cdf = torch.special.ndtr(edges)
    assert torch.allclose((pdf[:-1] - pdf[1:]) / (cdf[1:] - cdf[:-1]), c, rtol=0, atol=atol)
    # and independently, by 80-point Gauss–Legendre quadrature of the density over each cell (cut at +-16)
    nodes, weights = np.polynomial.legendre.leggauss(80)
    lo, hi = edges[:-1].clamp(min=-16.0).numpy(), edges[1:].clamp(max=16.0).numpy()
    half, mid = (hi - lo)[:, None] / 2, (hi + lo)[:, None] / 2
    y = mid + half * nodes  # [cells, nodes]
    w = half * weights * np.exp(-0.5 * y**2) / math.sqrt(2 * math.pi)
    mass, first = w.sum(1), (w * y).sum(1)
    np.testing.assert_allclose(first / mass, c.numpy(), rtol=0, atol=atol)
    assert mass.sum() == pytest.approx(1.0, abs=1e-12)
    assert (w * (y - c.numpy()[:, None]) ** 2).sum() == pytest.approx(distortion, rel=1e-9)


def test_lloyd_max_8_bits_reaches_the_fixed_point():
    # 4.1185083e-05: lloyd_max.__wrapped__(8, iterations=200_000) and (8, iterations=1_000_000) agree to 1e-15
    assert lloyd_max(8)[1] == pytest.approx(4.1185083e-05, rel=1e-4)


def test_lloyd_max_distortion_falls_toward_the_high_resolution_limit():
    d = [lloyd_max(b)[1] for b in range(1, 9)]
    assert all(a > 3 * b for a, b in itertools.pairwise(d))  # about 4x per bit (3.09 from 1 to 2 bits)
    assert d[-1] * 4**8 == pytest.approx(math.pi * math.sqrt(3) / 2, rel=0.01)  # Panter–Dite: sqrt(3) pi / 2 / 4^b


def test_lloyd_max_refuses_widths_outside_1_to_8():
    for bits in (0, 9):
        with pytest.raises(ValueError, match="1 to 8"):
            lloyd_max(bits)


# --------------------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), log_scale=st.floats(-3.0, 3.0))
def test_gaussian_mse_per_coordinate_is_the_codebook_distortion(bits, seed, log_scale):
    sigma = 10.0**log_scale
    x = _gauss(512, 512, seed=seed) * sigma  # 512 vectors of 512 i.i.d. N(0, sigma^2) coordinates
    p = encode(x, bits, 512, "channels")
    assert p.scale.shape == (512, 1) and p.mean is None
    mse = (decode(p) - x).square().mean().item()
    assert mse == pytest.approx(lloyd_max(bits)[1] * sigma**2, rel=0.05)


def _levels(draw, bits: int) -> list[int]:
    """Up to ``2**bits`` distinct integers, not all zero."""
    values = draw(st.lists(st.integers(-40, 40), min_size=1, max_size=2**bits, unique=True))
    return [0, 1] if values == [0] else values


@st.composite
def _channel_case(draw):
    """A ``[T, D]`` tensor whose every group of ``g`` channels is a permutation of one multiset of at most
    ``2**bits`` levels, normalized to RMS 1; the codebook is the sorted distinct levels; and a scale."""
    bits = draw(st.integers(1, 8))
    levels = _levels(draw, bits)
    g = draw(st.integers(len(levels), 48))
    multiset = levels + draw(st.lists(st.sampled_from(levels), min_size=g - len(levels), max_size=g - len(levels)))
    tokens, groups = draw(st.integers(1, 6)), draw(st.integers(1, 3))
    rows = [draw(st.permutations(multiset)) for _ in range(tokens * groups)]
    w = torch.tensor(rows, dtype=torch.float64).reshape(tokens, groups * g)
    v = (w / math.sqrt(sum(m * m for m in multiset) / g)).float()  # each group: RMS 1, so sqrt(g) x / |x| = v
    scale = 10.0 ** draw(st.floats(-2.0, 2.0))
    return bits, g, v, scale


@settings(max_examples=60, deadline=None)
@given(case=_channel_case())
def test_norms_and_indices_reproduce_the_vector_when_the_codebook_has_its_points(case):
    bits, g, v, scale = case
    points = torch.unique(v)  # ascending
    assert points.numel() <= 2**bits
    x = v * scale
    p = encode(x, bits, g, "channels", points=points)
    assert p.group_size == g and p.scale.dtype == torch.float16
    # the stored indices are exactly those of the points, and the decode is x up to the float16 norm
    assert torch.equal(points[unpack_codes(p.codes, bits, v.shape[-1], runs=True).long()], v)
    y = decode(p)
    assert torch.allclose(y, x, rtol=F16_REL, atol=0)
    n = x.reshape(x.shape[0], -1, g).square().mean(-1).sqrt()  # the RMS per group: the norm over sqrt(g)
    assert torch.allclose(p.scale.float(), n, rtol=F16_REL, atol=0)


@st.composite
def _token_case(draw):
    """A ``[T, D]`` tensor whose every channel, over each group of ``G`` tokens, is ``m + s * v`` with ``v`` a
    permutation of a symmetric multiset (mean 0, RMS 1) of at most ``2**bits`` levels and ``m`` a float16
    number; the codebook is the sorted distinct levels."""
    bits = draw(st.integers(1, 8))
    half = draw(st.lists(st.integers(1, 40), min_size=1, max_size=2 ** (bits - 1), unique=True))
    reps = draw(st.lists(st.sampled_from(half), min_size=0, max_size=8))
    multiset = [*half, *reps, *(-m for m in half), *(-m for m in reps)]
    group, channels, blocks = len(multiset), draw(st.integers(1, 7)), draw(st.integers(1, 3))
    cols = [draw(st.permutations(multiset)) for _ in range(channels * blocks)]
    w = torch.tensor(cols, dtype=torch.float64).reshape(channels, blocks, group).permute(1, 2, 0)
    v = (w / math.sqrt(sum(m * m for m in multiset) / group)).float().reshape(blocks * group, channels).contiguous()
    means = torch.tensor([draw(st.sampled_from([-1.0, 1.0])) * draw(st.floats(1.0, 50.0, width=16))
                          for _ in range(channels)])  # float16 numbers, far from 0 next to float32 sums
    devs = 10.0 ** torch.tensor(draw(st.lists(st.floats(-1.0, 1.0), min_size=channels, max_size=channels)))
    return bits, group, v, means.float(), devs.float()


@settings(max_examples=60, deadline=None)
@given(case=_token_case())
def test_keys_layout_reproduces_float16_means_and_the_centred_part_up_to_the_float16_deviation(case):
    # along "tokens" the normalization is a float16 mean and deviation per channel: exact when the channel's
    # mean is a float16 number, and then the centred part is reproduced up to the deviation's float16 rounding
    bits, group, v, means, devs = case
    points = torch.unique(v)
    assert points.numel() <= 2**bits
    x = means + devs * v
    p = encode(x, bits, group, "tokens", points=points)
    assert p.mean is not None and p.mean.shape == p.scale.shape == (x.shape[0] // group, x.shape[1])
    assert torch.equal(p.mean.float(), means.expand_as(p.mean))
    assert torch.equal(points[unpack_codes(p.codes, bits, v.shape[-1], runs=True).long()], v)  # the points' indices
    y = decode(p)
    centred = x - means
    tol = F16_REL * centred.abs() + 2.0**-20 * (means.abs() + devs)  # the deviation's rounding; float32 sums
    assert ((y - x).abs() <= tol).all()
    assert torch.allclose(p.scale.float(), devs.expand_as(p.scale), rtol=F16_REL + 1e-5, atol=0)


def test_a_constant_group_decodes_to_its_float16_mean_or_zero():
    x = torch.full((16, 8), 3.0)
    assert torch.equal(decode(encode(x, 3, 16, "tokens")), x)
    zero = torch.zeros(4, 64)
    assert torch.equal(decode(encode(zero, 2, 64, "channels")), zero)


def _decode_reference(p: TablePacked, points: torch.Tensor | None = None) -> torch.Tensor:
    """The decode written out: the float32 points at the unpacked indices, times the scale, plus the mean (one
    ``addcmul``)."""
    c = torch.tensor(lloyd_max(p.bits)[0], dtype=torch.float32) if points is None else points
    x = c[unpack_codes(p.codes, p.bits, p.dim, runs=True).long()]
    if p.along == "channels":
        return (x.unflatten(-1, (-1, p.group_size)) * p.scale.float().unsqueeze(-1)).flatten(-2)
    x = torch.addcmul(p.mean.float().unsqueeze(-2), p.scale.float().unsqueeze(-2), x.unflatten(-2, (-1, p.group_size)))
    return x.flatten(-3, -2)


def _bits_of(x: torch.Tensor) -> torch.Tensor:
    """float32 values as their bit patterns: equal means bit for bit (signed zeros and NaNs included)."""
    return x.view(torch.int32)


@pytest.mark.parametrize("dim", [1, 2, 6, 7, 50, 64, 66, 128])  # lookups of 4, 2 and 1 channels
@pytest.mark.parametrize("along", ["channels", "tokens"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_decode_is_bit_for_bit_the_points_times_the_scale_plus_the_mean(bits, along, dim):
    x = _gauss(2, 3, 16, dim, seed=bits * 1000 + dim) * 5.0 + 1.5
    x[0, 0, :, 0] = 0.0  # a zero channel: a zero scale for keys
    x[0, 1, 3, :] = 0.0  # a zero token: zero norms for values
    p = encode(x, bits, 64 if along == "channels" else 8, along)
    want = _bits_of(_decode_reference(p))
    assert torch.equal(_bits_of(decode(p)), want)
    for offset in (0, 1, 2, 4):  # into float32 buffers whose start splits no lookup element, or every one
        buf = torch.full((want.numel() + offset,), math.nan)
        out = buf[offset:].view(want.shape)
        assert decode(p, out=out) is out and torch.equal(_bits_of(out), want)
    workspace = torch.full((2, 3, 20, dim), math.nan)  # the front of a workspace that also takes a residual
    decode(p, out=workspace[..., :16, :])
    assert torch.equal(_bits_of(workspace[..., :16, :]), want) and workspace[..., 16:, :].isnan().all()
    half = torch.empty(want.shape, dtype=torch.float16)
    assert decode(p, torch.float16, out=half) is half
    assert torch.equal(half, want.view(torch.float32).half())
    assert torch.equal(decode(p, torch.float16), half)


@pytest.mark.parametrize("dim", [50, 64, 66])
@pytest.mark.parametrize("along", ["channels", "tokens"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_store_reads_are_bit_for_bit_the_decode_formula(bits, along, dim):
    store = CodebookStore(bits, KEY_GROUP if along == "tokens" else 64, along, BLOCK)
    x = _gauss(2, 3, 21, dim, seed=bits + dim)
    store.append(x)
    store.flush(21)
    want = _bits_of(_decode_reference(store.packed))
    assert torch.equal(_bits_of(store.read()[..., :16, :]), want)
    workspace = torch.full((2, 3, 24, dim), math.nan)
    store.read(workspace[..., :21, :])
    assert torch.equal(_bits_of(workspace[..., :16, :]), want)
    assert torch.equal(workspace[..., 16:21, :], x[..., 16:, :].half().float())


@pytest.mark.parametrize("bits", range(1, 9))
def test_decode_with_a_smaller_codebook_is_bit_for_bit_the_formula(bits):
    points = torch.sort(_gauss(max(1, 2**bits - 3), seed=bits)).values
    for along, group, dim in (("channels", 8, 64), ("tokens", 4, 66), ("channels", 7, 7)):
        p = encode(_gauss(3, 8, dim, seed=dim), bits, group, along, points=points)
        assert torch.equal(_bits_of(decode(p)), _bits_of(_decode_reference(p, points)))


@pytest.mark.parametrize("bits", range(1, 9))
def test_a_read_of_no_tokens_is_empty(bits):
    for along in ("channels", "tokens"):
        assert decode(encode(_gauss(2, 0, 7), bits, 4, along)).shape == (2, 0, 7)


def test_lookup_tables_are_kept_per_width_only():
    # the cached tables hold the codebook's points, never data: reads of any data, shape or layout add none
    _lookup_table.cache_clear()
    for bits in (2, 3):
        for seed, (dim, tokens) in enumerate([(64, 8), (64, 24), (66, 8), (7, 16), (64, 8)]):
            for along in ("channels", "tokens"):
                decode(encode(_gauss(2, tokens, dim, seed=seed), bits, 8, along))
    assert _lookup_table.cache_info().currsize == 2


def test_cat_concatenates_token_blocks():
    x = _gauss(2, 3, 24, 16)
    for along, group in (("tokens", 8), ("channels", 8)):
        whole = encode(x, 3, group, along)
        parts = cat([encode(x[..., i:i + 8, :], 3, group, along) for i in (0, 8, 16)])
        assert isinstance(parts, TablePacked) and parts.num_tokens == 24
        assert torch.equal(decode(parts), decode(whole))
        assert parts.nbytes() == whole.nbytes()


# --------------------------------------------------------------------------- the store


BLOCK, KEY_GROUP = 8, 4


@pytest.mark.parametrize(("dim", "value_group"), [(7, 64), (13, 64), (21, 8)])
@pytest.mark.parametrize("along", ["tokens", "channels"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_codebook_store_round_trips_every_width_and_counts_bytes_by_the_formula(bits, along, dim, value_group):
    group = KEY_GROUP if along == "tokens" else value_group
    eff = group if along == "tokens" else max(d for d in range(1, min(dim, group) + 1) if dim % d == 0)
    assert make_store(bits, group, along, BLOCK, "codebook").__class__ is CodebookStore
    store = CodebookStore(bits, group, along, BLOCK)
    b, h = 2, 3
    x = _gauss(b, h, 40, dim, seed=bits * dim)
    coded = _pieces_bytes(dim, bits) + (2 * 2 * dim / group if along == "tokens" else 2 * dim / eff)
    seen = 0
    for chunk in (5, 3, 5, 11, 16):  # contexts 5 (nothing packed), 8, 13, 24 and 40
        store.append(x[..., seen:seen + chunk, :])
        seen += chunk
        store.flush(seen)
        tq = seen // BLOCK * BLOCK
        assert store.quantized_length == tq
        expect = (tq * coded + (seen - tq) * 2 * dim) * b * h
        assert store.nbytes() == pytest.approx(expect, abs=1e-6)
        assert store.nbytes() == pytest.approx(
            CodebookStore.bytes_per_token(dim, bits, along, group, BLOCK, seen) * seen * b * h, abs=1e-6)
        got = store.read()
        assert got.shape == (b, h, seen, dim) and got.dtype == torch.float32
        assert torch.equal(got[..., tq:, :], x[..., tq:seen, :].half().float())  # the 16-bit residual window
        if tq:  # the packed tokens: each block encoded on its own, from its float16 values
            blocks = [encode(x[..., i:i + BLOCK, :].half().float(), bits, group, along) for i in range(0, tq, BLOCK)]
            assert torch.equal(got[..., :tq, :], decode(cat(blocks)))
            assert store.packed.codes.shape == (b, h, tq, _pieces_bytes(dim, bits))
            assert store.packed.group_size == eff
    err = (store.read() - x).square().mean().item()
    assert err < 1.5 * lloyd_max(bits)[1] + 1e-5 if along == "channels" and eff >= 7 else err < 1.5


def test_codebook_bytes_beat_kivi_at_the_same_width_and_group():
    # one float16 norm per 64 values against a float16 scale and minimum per 32
    for bits in (2, 3, 4):
        cb = CodebookStore.coded_bytes(128, bits, "channels", 64, 128)
        kivi = QuantizedStore.coded_bytes(128, bits, "channels", 32, 128)
        assert cb == 128 * bits / 8 + 2 * 2 and kivi == 128 * bits / 8 + 4 * 2 * 2
        assert cb * 8 / 128 == bits + 0.25


# --------------------------------------------------------------------------- the sink


SINK = 4


def _sink_data(b: int = 3, h: int = 2, t: int = 29, d: int = 16) -> torch.Tensor:
    x = _gauss(b, h, t, d, seed=7)
    x[..., :SINK, :] *= 50.0  # the attention sink's outliers
    return x


@pytest.mark.parametrize("along", ["tokens", "channels"])
@pytest.mark.parametrize("store_cls", [QuantizedStore, CodebookStore], ids=["kivi", "codebook"])
def test_sink_tokens_read_exact_and_stay_out_of_their_blocks_statistics(store_cls, along):
    group = BLOCK  # keys: the sink shares its token group with the next 4 tokens; values: 8 channels
    x = _sink_data()
    b, h, _, d = x.shape
    replaced = x.clone()
    replaced[..., :SINK, :] = x[..., SINK:SINK + 1, :]  # the sink tokens replaced by the next token
    store, ref, plain = (store_cls(3, group, along, BLOCK, sink=s) for s in (SINK, 0, 0))
    seen = 0
    for chunk in (3, 4, 6, 9, 7):  # contexts 3, 7 (nothing packed yet), 13, 22, 29
        for s, data in ((store, x), (ref, replaced), (plain, x)):
            s.append(data[..., seen:seen + chunk, :])
            s.flush(seen + chunk)
        seen += chunk
        copy = SINK * d * 2 * b * h if seen >= BLOCK else 0
        assert store.nbytes() == ref.nbytes() + copy
        assert store.nbytes() == pytest.approx(
            store_cls.bytes_per_token(d, 3, along, group, BLOCK, seen, sink=SINK) * seen * b * h, abs=1e-6)
        got = store.read()
        assert torch.equal(got[..., :SINK, :], x[..., :min(seen, SINK), :].half().float())  # bit-equal float16
        assert torch.equal(got[..., SINK:, :], ref.read()[..., SINK:, :])
        assert (store.sink_copy is not None) == (seen >= BLOCK)
    if along == "channels":
        return  # per-token groups: the sink never shared a group with other tokens
    # the outliers widen no group: the sink's block neighbours are far closer than without the sink
    near = slice(SINK, BLOCK)
    err = (got[..., near, :] - x[..., near, :]).abs().max()
    assert err < 0.5 * (plain.read()[..., near, :] - x[..., near, :]).abs().max()


@pytest.mark.parametrize("store_cls", [QuantizedStore, CodebookStore], ids=["kivi", "codebook"])
def test_select_batch_keeps_the_sink_copy_with_its_sequence(store_cls):
    x = _sink_data(t=40)
    store = store_cls(2, KEY_GROUP, "tokens", BLOCK, sink=SINK)
    store.append(x[..., :20, :])
    store.flush(20)
    before = store.read()
    index = torch.tensor([2, 0, 2, 1])
    store.select_batch(index)
    assert store.sink_copy.shape == (4, 2, SINK, 16)
    assert torch.equal(store.read(), before[index])
    store.append(x[index][..., 20:, :])  # the selected sequences go on
    store.flush(40)
    got = store.read()
    assert torch.equal(got[..., :SINK, :], x[index][..., :SINK, :].half().float())
    assert torch.equal(got[..., :16, :], before[index][..., :16, :])  # packed blocks untouched
    assert store.nbytes() == pytest.approx(
        store_cls.bytes_per_token(16, 2, "tokens", KEY_GROUP, BLOCK, 40, sink=SINK) * 40 * 4 * 2, abs=1e-6)


def test_a_sink_as_long_as_the_flush_block_is_refused():
    # the first flush of one block would hold nothing but the sink: build_plan refuses it in one line
    quant = Quant(enabled=True, method="codebook", group_size=4, residual_length=0, sink=4)
    spec = ModelSpec("llama", 1, 64, 1, 1, 16, 1e4, False, False)
    with pytest.raises(KVCompressError, match=r"sink \(4\) must be shorter than the flush block"):
        build_plan(Recipe(quant=quant, layers=[LayerRecipe(0, 16, 16, 2, 2)]), spec)
    quant.sink = 3
    build_plan(Recipe(quant=quant, layers=[LayerRecipe(0, 16, 16, 2, 2)]), spec)


# --------------------------------------------------------------------------- the runtime


def _layer(**quant) -> KVCompressLayer:
    q = Quant(enabled=True, group_size=8, residual_length=8, **quant)
    return KVCompressLayer(layer_plan(LayerRecipe(0, 16, 8, 2, 4), q))


def test_packed_decode_reads_kivi_and_codebook_stores_with_a_sink():
    codebook_4x = {"method": "codebook", "key_method": "kivi", "sink": 2}  # its layout, in small
    for quant in ({}, {"method": "codebook"}, {"key_method": "codebook"}, {"method": "codebook", "key_method": "kivi"},
                  {"sink": 2}, {"method": "codebook", "sink": 2}, codebook_4x):
        layer = _layer(**quant)
        assert layer.can_read("packed") and layer.can_read("dense") and layer.can_read("workspace"), quant
        held = layer.step(torch.randn(1, 1, 9, 16), torch.randn(1, 1, 9, 8), layout="packed")
        assert held.keys is None and held.key_sink is None  # nothing packed before this step's flush
        held = layer.step(torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 8), layout="packed")
        kinds = {"kivi": Packed, "codebook": TablePacked}
        assert type(held.keys) is kinds[quant.get("key_method") or quant.get("method", "kivi")], quant
        assert type(held.values) is kinds[quant.get("method", "kivi")], quant
        assert held.keys.num_tokens == 8 and held.key_residual.shape[-2] == 2
        sink = quant.get("sink", 0)
        assert (held.key_sink is None) == (held.value_sink is None) == (sink == 0)
        if sink:
            assert torch.equal(held.key_sink, layer.key_store.sink_copy) and held.value_sink.shape[-2] == sink
    plan = layer_plan(LayerRecipe(0, 16, 8, 2, 4), Quant(enabled=True, group_size=8, residual_length=8, sink=2))
    lopsided = KVCompressLayer(dataclasses.replace(plan, values=dataclasses.replace(plan.values, sink=0)))
    assert not lopsided.can_read("packed")  # the kernel replaces the same first tokens of both streams
    with pytest.raises(ValueError, match="one sink"):
        lopsided.step(torch.randn(1, 1, 9, 16), torch.randn(1, 1, 9, 8), layout="packed")
    # without a residual window each stream flushes its own group: keys every 16 tokens, values every 8
    unaligned = layer_plan(LayerRecipe(0, 16, 8, 2, 4), Quant(enabled=True, group_size=8, key_group_size=16,
                                                              residual_length=0))
    assert unaligned.keys.block == 16 and unaligned.values.block == 8
    assert not KVCompressLayer(unaligned).can_read("packed")  # the kernel needs the same packed tokens in both


@pytest.mark.parametrize("key_method", ["kivi", "codebook"])
def test_the_packed_read_attends_like_the_dense_read(key_method):
    # codebook-4x's layout in small (codebook values, KIVI keys, a sink, a residual window): the decode kernel
    # and its twin over what a layer hands out packed agree with attention over the same layer's dense read
    layers = [_layer(method="codebook", key_method=key_method, sink=3) for _ in range(2)]
    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(2, 2, 30, 16, generator=g) * 2, torch.randn(2, 2, 30, 8, generator=g)
    q = torch.randn(2, 6, 16, generator=g)
    for layer in layers:
        layer.step(k[:, :, :29], v[:, :, :29])  # packs 24 tokens, sink included; 5 stay in the window
    packed = layers[0].step(k[:, :, 29:], v[:, :, 29:], layout="packed")
    dense = layers[1].step(k[:, :, 29:], v[:, :, 29:])
    assert packed.keys.num_tokens == 24 and packed.key_residual.shape[-2] == 6 and packed.key_sink.shape[-2] == 3
    keys, values = dense.keys.repeat_interleave(3, dim=1), dense.values.repeat_interleave(3, dim=1)
    scores = torch.einsum("bhd,bhtd->bht", q, keys) * 0.25
    want = torch.einsum("bht,bhtd->bhd", scores.softmax(-1), values)
    args = (q, packed.keys, packed.values, packed.key_residual, packed.value_residual, 0.25, packed.key_sink,
            packed.value_sink)
    torch.testing.assert_close(decode_attention_ref(*args)[0], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decode_attention_triton(*args, split_size=8)[0], want, atol=1e-5, rtol=1e-5)


def test_layer_stores_follow_the_per_stream_quantizers():
    layer = _layer(method="codebook", key_method="kivi", sink=2)
    assert type(layer.key_store) is QuantizedStore and type(layer.value_store) is CodebookStore
    assert layer.key_store.sink == layer.value_store.sink == 2
    assert QUANTIZERS["codebook"] is CodebookStore


def _export(tiny, tmp_path, **quant):
    rec = Recipe()
    rec.lowrank.target_ratio = 1.0
    rec.calibration.max_tokens, rec.calibration.seq_len = 256, 128
    for key, value in quant.items():
        setattr(rec.quant, key, value)
    out = tmp_path / "ckpt"
    export(open_source(tiny.path), out, rec, dtype="float32")
    return kvcompress.load(out)[0]


# the logits' largest error against the exact model, relative to its largest logit (measured 0.087 and 0.0056)
TRACKS = {4: 0.2, 8: 0.03}


@pytest.mark.parametrize("bits", sorted(TRACKS))
def test_codebook_values_kivi_keys_and_a_sink_export_load_and_generate(llama_gqa, tmp_path, one_thread, bits):
    model = _export(llama_gqa, tmp_path, enabled=True, method="codebook", key_method="kivi", sink=2,
                    avg_bits=float(bits), group_size=8, key_group_size=4, residual_length=8)
    layers = model.kvcompress_manifest["layers"]
    assert all((lay["method"], lay["key_method"], lay["sink"]) == ("codebook", "kivi", 2) for lay in layers)
    assert all(lay["bits_k"] == lay["bits_v"] == bits for lay in layers)
    plan = model.kvcompress_plan
    assert plan == Plan.from_manifest(model.kvcompress_manifest)
    assert all((lay.keys.method, lay.values.method, lay.keys.sink, lay.values.sink) == ("kivi", "codebook", 2, 2)
               for lay in plan.layers)
    spec = open_source(llama_gqa.path).spec

    ids = torch.randint(4, 300, (1, 40), generator=torch.Generator().manual_seed(3))
    cache = kvcompress.make_cache(model)
    with torch.no_grad():
        for start in range(0, 40, 10):  # chunked prefill: flushes one and two blocks at a time
            logits = model(input_ids=ids[:, start:start + 10], **{CACHE_ARG: cache},
                           position_ids=torch.arange(start, start + 10)[None]).logits
        exact = llama_gqa.model(ids).logits[:, -10:]
    for layer in cache.layers:
        assert type(layer.key_store) is QuantizedStore and type(layer.value_store) is CodebookStore
        assert layer.key_store.quantized_length == 40 and layer.key_store.sink_copy.shape[-2] == 2
        assert layer.can_read("packed")  # on CUDA, decode reads the codes through the Triton kernel
    assert (logits - exact).abs().max() < TRACKS[bits] * exact.abs().max()
    assert cache.kv_bytes() == pytest.approx(40 * compressed_bytes_per_token(spec, plan, 40))

    prompt = ids[:, :13]
    cache = kvcompress.make_cache(model)
    with torch.no_grad():
        out = model.generate(prompt, **{CACHE_ARG: cache}, max_new_tokens=12, do_sample=False)
    assert out.shape == (1, 25)
    stored = cache.layers[0].stored_length  # every token but the last generated one went through the cache
    assert stored == 24
    assert cache.kv_bytes() == pytest.approx(stored * compressed_bytes_per_token(spec, plan, stored))
    again = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, again)


def test_the_stored_norm_is_the_least_squares_scale_for_the_chosen_indices():
    x = _gauss(256, 64, seed=3)
    p = encode(x, 3, 64, "channels")
    c = decode(dataclasses.replace(p, scale=torch.ones_like(p.scale)))  # the points c[idx]
    best = (c * x).sum(-1, keepdim=True) / c.square().sum(-1, keepdim=True)
    assert torch.allclose(p.scale.float(), best, rtol=F16_REL, atol=0)
    err = (decode(p) - x).square().sum(-1)
    for factor in (0.98, 1.02):  # any other scale for the same indices does worse
        assert ((c * (p.scale.float() * factor) - x).square().sum(-1) > err).all()
    assert err.mean() / 64 < lloyd_max(3)[1]  # below the codebook's distortion on Gaussian vectors


def test_a_zero_vector_with_a_zero_point_in_the_codebook_stores_a_zero_norm():
    points = torch.tensor([-1.0, 0.0, 1.0])  # c[idx] is all 0 for a zero vector: the scale must not be 0 / 0
    p = encode(torch.zeros(3, 8), 2, 8, "channels", points=points)
    assert torch.equal(p.scale, torch.zeros_like(p.scale))
    assert torch.equal(decode(p), torch.zeros(3, 8))
