"""Vector codebooks of N(0, I_t) (quantizer "vector"): the shipped points, encode / decode, the store, a model."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvcompress
from kvcompress.checkpoint.export import export
from kvcompress.compat import CACHE_ARG
from kvcompress.kernels.decode_attention import decode_attention_ref, decode_attention_triton
from kvcompress.kernels.pack import dequantize, packed_bytes, tuple_index, unpack_codes
from kvcompress.memory import compressed_bytes_per_token
from kvcompress.methods import QUANTIZERS, CodebookStore, VectorCodebookStore
from kvcompress.methods.codebook import (
    FRACTIONAL,
    TUPLES,
    VECTOR_DISTORTION,
    decode,
    encode,
    lloyd_gaussian,
    lloyd_max,
    nearest,
    tuple_dim,
    vector_points,
)
from kvcompress.methods.kivi import effective_group
from kvcompress.plan import layer_plan
from kvcompress.recipe import LayerRecipe, Quant, Recipe
from kvcompress.runtime.cache import KVCompressLayer
from kvcompress.sources import open_source

CPU = torch.device("cpu")
F16_REL = 2.0**-10  # one float16 ulp relative to the value


def _gauss(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the shipped codebooks


@pytest.mark.parametrize(("t", "bits"), sorted(VECTOR_DISTORTION))
def test_shipped_codebooks_have_the_quoted_distortion_on_fresh_gaussian_tuples(t, bits):
    points = vector_points(t, bits, CPU)
    assert points.shape == (2 ** round(bits * t), t) and points.dtype == torch.float32
    assert torch.unique(points, dim=0).shape[0] == points.shape[0]  # no point repeated
    x = torch.randn(400_000, t, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    mse = float((x - points.double()[nearest(x.float(), points)]).square().mean())
    assert mse == pytest.approx(VECTOR_DISTORTION[(t, bits)], rel=0.01)
    if bits in FRACTIONAL:  # between the scalar codes of the integer widths around it
        assert lloyd_max(math.ceil(bits))[1] < mse < lloyd_max(math.floor(bits))[1] * 0.6
        return
    # joint coding never loses to the scalar Lloyd–Max code of the same width, and wins from 2 bits
    assert mse < lloyd_max(bits)[1] * (1.005 if bits == 1 else 0.97)


@pytest.mark.parametrize(("t", "bits"), [(2, 3), (4, 2)])
def test_shipped_codebooks_are_near_a_fixed_point_of_the_lloyd_step(t, bits):
    # one more centroid step on fresh samples moves the points by sampling noise only
    points = vector_points(t, bits, CPU).double()
    x = torch.randn(1_000_000, t, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    cell = nearest(x.float(), points.float())
    counts = torch.bincount(cell, minlength=len(points)).double()
    centroids = torch.zeros_like(points).index_add_(0, cell, x) / counts[:, None]
    assert counts.min() > 0
    # a cell of n samples has its centroid within a few standard errors (cell spread / sqrt(n)) of its point
    assert float((centroids - points).norm(dim=1).max()) < 0.05


def test_lloyd_gaussian_fits_a_small_codebook_to_the_shipped_distortion():
    points, fit = lloyd_gaussian(2, 3, samples=200_000, iterations=60)
    assert points.shape == (64, 2)
    assert fit == pytest.approx(VECTOR_DISTORTION[(2, 3)], rel=0.03)
    assert torch.equal(points, lloyd_gaussian(2, 3, samples=200_000, iterations=60)[0])  # seeded: reproducible


def test_tuple_dim_follows_the_table_and_divides_the_group():
    assert [tuple_dim(b, 64) for b in range(1, 9)] == [4, 4, 2, 2, 1, 1, 1, 1]
    assert tuple_dim(2, 6) == 2 and tuple_dim(3, 7) == 1 and tuple_dim(4, 66) == 2 and tuple_dim(4, 9) == 1
    assert tuple_dim(1.5, 64) == 4 and tuple_dim(1.5, 6) == 2  # 6 bits a point, or 3 for pairs
    with pytest.raises(ValueError, match="even number of channels"):
        tuple_dim(1.5, 7)  # a point of one channel would hold half a bit
    assert set(TUPLES) == {b for _, b in VECTOR_DISTORTION}
    with pytest.raises(ValueError, match="no vector codebook"):
        vector_points(4, 3, CPU)


# --------------------------------------------------------------------------- encode / decode


def _point_index(p) -> torch.Tensor:
    """Each point's index, written out: ``t`` digits of ``bits`` bits, first most significant; or one code per point
    (a fractional width)."""
    t = p.table.view(len(p.table), -1).shape[1]
    if p.bits != int(p.bits):
        return unpack_codes(p.codes, round(p.bits * t), p.dim // t, runs=True).long()
    codes = unpack_codes(p.codes, p.bits, p.dim, runs=True).long()
    return (codes.unflatten(-1, (-1, t)) * (2 ** (p.bits * torch.arange(t - 1, -1, -1)))).sum(-1)


def _reference(p) -> torch.Tensor:
    """The decode written out: the point of each run of ``t`` codes, times the scale, plus the mean (one
    ``addcmul``)."""
    table = p.table.view(len(p.table), -1)
    x = table[_point_index(p)].flatten(-2)
    if p.along == "channels":
        return (x.unflatten(-1, (-1, p.group_size)) * p.scale.float().unsqueeze(-1)).flatten(-2)
    x = torch.addcmul(p.mean.float().unsqueeze(-2), p.scale.float().unsqueeze(-2), x.unflatten(-2, (-1, p.group_size)))
    return x.flatten(-3, -2)


@pytest.mark.parametrize("dim", [8, 64, 66, 128])
@pytest.mark.parametrize("along", ["channels", "tokens"])
@pytest.mark.parametrize("bits", [1, 1.5, 2, 3, 4])
def test_decode_and_the_kernel_twin_read_are_bit_for_bit_the_formula(bits, along, dim):
    x = _gauss(2, 3, 16, dim, seed=int(bits * 1000) + dim) * 5.0 + 1.5
    group = 64 if along == "channels" else 8
    channels = effective_group(dim, group) if along == "channels" else dim
    if bits in FRACTIONAL and channels % 2:  # 66 channels in groups of 33: no whole number of bits per point
        with pytest.raises(ValueError, match="even number of channels"):
            encode(x, bits, group, along, tuple_size=tuple_dim(bits, channels))
        return
    t = tuple_dim(bits, channels)  # as the store picks it
    p = encode(x, bits, group, along, tuple_size=t)
    assert p.table.shape == ((2 ** round(bits * t), t) if t > 1 else (2**bits,))
    assert p.codes.shape[-1] == VectorCodebookStore.code_bytes(dim, bits, along, group)
    want = _reference(p).view(torch.int32)
    assert torch.equal(decode(p).view(torch.int32), want)
    assert torch.equal(dequantize(p).view(torch.int32), want)  # the reading the kernels' torch twin takes
    for offset in (0, 1, 2, 3):  # into buffers whose start splits the tuples, or not
        out = torch.full((want.numel() + offset,), math.nan)[offset:].view(want.shape)
        assert decode(p, out=out) is out and torch.equal(out.view(torch.int32), want)


@pytest.mark.parametrize(("bits", "t"), [(4, 4), (8, 2)])  # a byte holds 2 or 1 codes: each point spans 2 bytes
def test_points_that_span_several_bytes_read_through_the_kernels_twin(bits, t):
    points = _gauss(2 ** (bits * t), t, seed=bits)
    x = _gauss(1, 2, 3, 8, seed=t)
    p = encode(x, bits, 8, "channels", points=points)
    want = _reference(p).view(torch.int32)
    assert torch.equal(decode(p).view(torch.int32), want) and torch.equal(dequantize(p).view(torch.int32), want)


@pytest.mark.parametrize("bits", [1, 1.5, 2, 3, 4])
@pytest.mark.parametrize("along", ["channels", "tokens"])
def test_a_read_of_no_tokens_is_empty(bits, along):
    p = encode(_gauss(2, 0, 8), bits, 4, along, tuple_size=tuple_dim(bits, 4))
    assert p.codes.shape == (2, 0, VectorCodebookStore.code_bytes(8, bits, along, 4))
    assert decode(p).shape == (2, 0, 8) and dequantize(p).shape == (2, 0, 8)


def test_tuple_index_reads_the_first_code_as_the_most_significant_digit():
    digits = torch.tensor([[1, 2, 3, 0], [7, 7, 7, 7]])
    assert tuple_index(digits, 3).tolist() == [1 * 512 + 2 * 64 + 3 * 8, 4095]


@pytest.mark.parametrize(("bits", "group"), [(1, 512), (1.5, 512), (1.5, 510), (2, 512), (3, 512), (4, 512)])
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), log_scale=st.floats(-3.0, 3.0))
def test_gaussian_mse_per_coordinate_is_the_vector_codebook_distortion(bits, group, seed, log_scale):
    sigma, t = 10.0**log_scale, tuple_dim(bits, group)  # 1.5 bits in groups of 510: pairs of 8 points
    x = _gauss(256, 2 * group, seed=seed) * sigma  # 256 tokens of two groups of i.i.d. N(0, sigma^2) coordinates
    p = encode(x, bits, group, "channels", tuple_size=t)
    mse = (decode(p) - x).square().mean().item()
    # the least-squares norm takes a little off the codebook's distortion, never more than 5%
    assert mse == pytest.approx(VECTOR_DISTORTION[(t, bits)] * sigma**2, rel=0.05)
    assert mse < lloyd_max(math.floor(bits))[1] * sigma**2 * (1.0 if bits == 1 else 0.97)


@st.composite
def _points_case(draw):
    """``[T, D]`` whose every group of ``g`` channels is a permutation of one multiset of at most
    ``2**(bits·t)`` distinct ``t``-tuples, normalized to RMS 1; the codebook is those tuples; and a scale."""
    bits = draw(st.sampled_from([1, 1.5, 2, 3, 4]))
    t = draw(st.sampled_from([2, 4] if bits <= 2 else [2]))  # the widths' largest tuples (TUPLES)
    distinct = draw(st.integers(1, min(6, 2 ** round(bits * t))))
    tuples = torch.randint(-20, 21, (distinct, t), generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    tuples[0, 0] = 25  # distinct rows, not all zero
    tuples = torch.unique(tuples, dim=0).double()
    per_group = draw(st.integers(tuples.shape[0], 8))
    multiset = list(range(tuples.shape[0])) + draw(st.lists(st.integers(0, tuples.shape[0] - 1),
                                                            min_size=per_group - tuples.shape[0],
                                                            max_size=per_group - tuples.shape[0]))
    tokens, groups = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    rows = [tuples[draw(st.permutations(multiset))].flatten() for _ in range(tokens * groups)]
    w = torch.stack(rows).reshape(tokens, groups * per_group * t)
    rms = math.sqrt(float(tuples[multiset].square().sum()) / (per_group * t))
    return bits, per_group * t, (w / rms).float(), (tuples / rms).float(), 10.0 ** draw(st.floats(-2.0, 2.0))


@settings(max_examples=60, deadline=None)
@given(case=_points_case())
def test_norms_and_indices_reproduce_the_vector_when_the_codebook_has_its_points(case):
    bits, g, v, points, scale = case
    t = points.shape[1]
    x = v * scale
    p = encode(x, bits, g, "channels", points=points)
    d = x.shape[-1]  # the points' own t: one code of bits·t bits per point, or t digits of bits bits
    assert p.codes.shape[-1] == (packed_bytes(d // t, round(bits * t)) if bits in FRACTIONAL else packed_bytes(d, bits))
    assert torch.equal(points[_point_index(p)].flatten(-2), v)  # exactly its points
    assert torch.allclose(decode(p), x, rtol=F16_REL, atol=0)  # and x up to the float16 norm
    n = x.reshape(x.shape[0], -1, g).square().mean(-1).sqrt()
    assert torch.allclose(p.scale.float(), n, rtol=F16_REL, atol=0)


# --------------------------------------------------------------------------- the store and the cache


@pytest.mark.parametrize("bits", [1, 1.5, 2, 3, 4, 5, 6, 7, 8])
def test_vector_store_counts_the_codebook_bytes_and_reads_what_it_encoded(bits):
    assert QUANTIZERS["vector"] is VectorCodebookStore
    for along, group in (("channels", 64), ("tokens", 8)):
        store = VectorCodebookStore(bits, group, along, 8)
        x = _gauss(1, 3, 21, 64, seed=int(2 * bits))
        store.append(x)
        store.flush(21)
        assert store.packed.table.dim() == (2 if bits in TUPLES else 1)
        coded = VectorCodebookStore.coded_bytes(64, bits, along, group, 8)
        if bits in FRACTIONAL:  # one 6-bit code per 4 channels: 1.5 bits per channel, plus the norms
            assert coded == 64 * 1.5 / 8 + (2 * 64 / 64 if along == "channels" else 2 * 2 * 64 / 8)
        else:
            assert coded == CodebookStore.coded_bytes(64, bits, along, group, 8)  # digits: the scalar code's bytes
        assert store.nbytes() == pytest.approx(16 * coded * 3 + 5 * 64 * 2 * 3)
        if bits in FRACTIONAL and along == "channels":  # groups of 6 channels: three pairs, a 3-bit code each
            pairs = VectorCodebookStore(bits, 6, along, 8)
            pairs.append(x[..., :6])
            pairs.flush(21)
            assert pairs.packed.table.shape == (8, 2) and pairs.packed.index_bits == 3
            assert pairs.nbytes() == pytest.approx(16 * 3 * (packed_bytes(3, 3) + 2) + 5 * 6 * 2 * 3)
            assert VectorCodebookStore.coded_bytes(6, bits, along, 6, 8) == packed_bytes(3, 3) + 2
        read = store.read()
        assert torch.equal(read[..., :16, :], decode(store.packed))
        err = (read[..., :16, :] - x[..., :16, :]).square().mean() / x.square().mean()
        t = store.packed.table.view(len(store.packed.table), -1).shape[1]
        assert err < 1.2 * VECTOR_DISTORTION.get((t, bits), lloyd_max(math.floor(bits))[1])  # the codebook's distortion


@pytest.mark.parametrize(("bits", "points"), [(3, (64, 2)), (1, (16, 4))])  # 1 bit: 2 bytes of 8 channels, 2 points
def test_a_layer_of_vector_values_hands_its_codes_to_the_triton_kernel(bits, points):
    layer = KVCompressLayer(layer_plan(LayerRecipe(0, 16, 16, 2, bits),
                                       Quant(enabled=True, method="vector", key_method="kivi", group_size=16,
                                             residual_length=8)))
    assert type(layer.value_store) is VectorCodebookStore and layer.can_read("packed")
    g = torch.Generator().manual_seed(4)
    k, v, q = torch.randn(1, 1, 21, 16, generator=g), torch.randn(1, 1, 21, 16, generator=g), torch.randn(1, 2, 16)
    layer.step(k[:, :, :20], v[:, :, :20])  # packs 16 tokens
    held = layer.step(k[:, :, 20:], v[:, :, 20:], layout="packed")  # codes and the residual, as the kernel reads them
    assert held.values is layer.value_store.packed and held.values.table.shape == points
    keys, values = layer.key_store.read(), layer.value_store.read()  # the stores' own dense reading, 21 tokens
    scores = torch.einsum("bhd,bhtd->bht", q, keys.repeat_interleave(2, dim=1)) * 0.25
    want = torch.einsum("bht,bhtd->bhd", scores.softmax(-1), values.repeat_interleave(2, dim=1))
    args = (q, held.keys, held.values, held.key_residual, held.value_residual, 0.25, held.key_sink, held.value_sink)
    torch.testing.assert_close(decode_attention_ref(*args)[0], want, atol=1e-5, rtol=1e-5)  # the torch twin
    torch.testing.assert_close(decode_attention_triton(*args)[0], want, atol=1e-5, rtol=1e-5)  # the interpreter


def test_vector_values_export_load_and_generate(llama_gqa, tmp_path, one_thread):
    rec = Recipe()
    rec.lowrank.target_ratio = 1.0
    rec.calibration.max_tokens, rec.calibration.seq_len = 256, 128
    for key, value in dict(enabled=True, method="vector", key_method="kivi", sink=2, avg_bits=4.0, group_size=8,
                           key_group_size=4, residual_length=8).items():
        setattr(rec.quant, key, value)
    export(open_source(llama_gqa.path), tmp_path / "ckpt", rec, dtype="float32")
    model = kvcompress.load(tmp_path / "ckpt")[0]
    assert all(lay["method"] == "vector" for lay in model.kvcompress_manifest["layers"])
    ids = torch.randint(4, 300, (1, 40), generator=torch.Generator().manual_seed(3))
    cache = kvcompress.make_cache(model)
    with torch.no_grad():
        for start in range(0, 40, 10):
            logits = model(input_ids=ids[:, start:start + 10], **{CACHE_ARG: cache},
                           position_ids=torch.arange(start, start + 10)[None]).logits
        exact = llama_gqa.model(ids).logits[:, -10:]
    assert all(type(layer.value_store) is VectorCodebookStore for layer in cache.layers)
    assert (logits - exact).abs().max() < 0.2 * exact.abs().max()  # the 4-bit codebook values' bound
    spec, plan = open_source(llama_gqa.path).spec, model.kvcompress_plan
    assert cache.kv_bytes() == pytest.approx(40 * compressed_bytes_per_token(spec, plan, 40))
    out = model.generate(ids[:, :13], max_new_tokens=12, do_sample=False)
    assert out.shape == (1, 25) and torch.equal(out, model.generate(ids[:, :13], max_new_tokens=12, do_sample=False))


def test_a_layer_of_half_bit_values_reads_dense_and_the_kernel_refuses_their_codes():
    layer = KVCompressLayer(layer_plan(LayerRecipe(0, 16, 16, 2, 1.5),
                                       Quant(enabled=True, method="vector", key_method="kivi", group_size=16,
                                             residual_length=8)))
    assert type(layer.value_store) is VectorCodebookStore and not layer.can_read("packed")
    g = torch.Generator().manual_seed(6)
    k, v, q = torch.randn(1, 1, 21, 16, generator=g), torch.randn(1, 1, 21, 16, generator=g), torch.randn(1, 2, 16)
    layer.step(k[:, :, :20], v[:, :, :20])
    values = layer.value_store.packed
    assert values.joint and values.index_bits == 6 and values.codes.shape[-1] == 3  # four 6-bit codes per token
    dense = layer.step(k[:, :, 20:], v[:, :, 20:])
    torch.testing.assert_close(dense.values[..., :16, :], decode(values))
    torch.testing.assert_close(dense.values[..., 16:, :], v[:, :, 16:].half().float())  # the 16-bit residual window
    with pytest.raises(ValueError, match=r"integer widths, not 1\.5-bit points"):
        decode_attention_triton(q, layer.key_store.packed, values, k[:, :, 16:], v[:, :, 16:], 0.25)
    # the torch twin reads them as the store does
    keys, vals = layer.key_store.read(), layer.value_store.read()
    scores = torch.einsum("bhd,bhtd->bht", q, keys.repeat_interleave(2, dim=1)) * 0.25
    want = torch.einsum("bht,bhtd->bhd", scores.softmax(-1), vals.repeat_interleave(2, dim=1))
    got = decode_attention_ref(q, layer.key_store.packed, values, layer.key_store.fp, layer.value_store.fp, 0.25)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_half_bit_values_export_load_and_generate_with_the_bytes_of_their_formula(llama_gqa, tmp_path, one_thread):
    rec = Recipe()
    rec.lowrank.target_ratio = 1.0
    rec.calibration.max_tokens, rec.calibration.seq_len = 256, 128
    for key, value in dict(enabled=True, method="vector", key_method="kivi", key_bits=4, value_bits=1.5,
                           group_size=8, key_group_size=4, residual_length=8).items():
        setattr(rec.quant, key, value)
    export(open_source(llama_gqa.path), tmp_path / "ckpt", rec, dtype="float32")
    model = kvcompress.load(tmp_path / "ckpt")[0]
    assert all(lay["bits_v"] == 1.5 for lay in model.kvcompress_manifest["layers"])
    ids = torch.randint(4, 300, (1, 40), generator=torch.Generator().manual_seed(3))
    cache = kvcompress.make_cache(model)
    with torch.no_grad():
        model(input_ids=ids, **{CACHE_ARG: cache})
    assert all(layer.value_store.packed.joint for layer in cache.layers)
    spec, plan = open_source(llama_gqa.path).spec, model.kvcompress_plan
    assert cache.kv_bytes() == pytest.approx(40 * compressed_bytes_per_token(spec, plan, 40))
    out = model.generate(ids[:, :13], max_new_tokens=12, do_sample=False)
    assert out.shape == (1, 25) and torch.equal(out, model.generate(ids[:, :13], max_new_tokens=12, do_sample=False))
