"""Packed low-bit storage: pack layout, quantization error bound, edge cases, block helpers."""

import os

# Triton decides interpreter mode when kernels are defined; set it before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kvcompress.kernels.pack import (
    WIDTHS,
    pack_codes,
    packed_bytes,
    pieces,
    plane_codes,
    plane_weights,
    quantize_pack_ref,
    run_codes,
    run_index,
    run_slots,
    unpack_codes,
    unpack_indices,
)
from kvcompress.methods.kivi import Packed, cat, dequantize, effective_group, quantize

FAST = settings(max_examples=60, deadline=None)


def _expand(stat: torch.Tensor, p: Packed) -> torch.Tensor:
    """Broadcast per-group scale or minimum back to the element shape ``[..., T, D]``."""
    dim = -2 if p.along == "tokens" else -1
    return stat.float().repeat_interleave(p.group_size, dim=dim)


@st.composite
def layouts(draw: st.DrawFn) -> tuple[tuple[int, ...], int, int, str]:
    """A valid ``(shape, bits, group_size, along)``; channel groups need not divide ``D``."""
    bits = draw(st.sampled_from(WIDTHS))
    along = draw(st.sampled_from(["tokens", "channels"]))
    d = (8 // min(pieces(bits))) * draw(st.integers(1, 5))  # every piece packs evenly
    if along == "tokens":
        group = draw(st.integers(1, 4))
        t = group * draw(st.integers(0, 3))
    else:
        group = draw(st.integers(1, 2 * d))
        t = draw(st.integers(0, 4))
    lead = tuple(draw(st.lists(st.integers(1, 2), max_size=2)))
    return (*lead, t, d), bits, group, along


@st.composite
def cases(draw: st.DrawFn) -> tuple[torch.Tensor, int, int, str]:
    shape, bits, group, along = draw(layouts())
    magnitude = draw(st.sampled_from([1e-4, 1.0, 1e3]))
    # at 1e3, a group spans at most 64,000: its 1-bit scale (the span itself) stays within float16's 65,504
    x = draw(arrays(np.float32, shape, elements=st.floats(-32, 32, width=32)))
    return torch.from_numpy(x) * magnitude, bits, group, along


def unpack_planes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of one piece from packed bytes through :func:`plane_codes` into floats, times the plane weights."""
    planes = plane_codes(packed, bits, out=packed.new_empty((*packed.shape[:-1], 8 // bits, packed.shape[-1]),
                                                             dtype=torch.float32))
    weights = plane_weights(bits, planes.shape[-2] * planes.shape[-1], packed.device)
    return (planes.flatten(-2) * weights).to(torch.uint8)


@FAST
@given(
    st.sampled_from(WIDTHS),
    st.lists(st.integers(0, 3), max_size=2),
    st.integers(1, 40),
    st.data(),
)
def test_pack_unpack_round_trip(bits: int, lead: list, dim: int, data: st.DataObject) -> None:
    shape = (*lead, dim)
    codes = torch.from_numpy(data.draw(arrays(np.uint8, shape, elements=st.integers(0, 2**bits - 1))))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*lead, packed_bytes(dim, bits))
    restored = unpack_codes(packed, bits, dim)
    assert restored.dtype == torch.float32 and torch.equal(restored, codes.float())
    wide = torch.zeros((*lead, packed.shape[-1] + 3), dtype=torch.uint8)  # packed bytes inside wider rows
    wide[..., 1:-2] = packed
    out = torch.full(shape, math.nan)
    assert unpack_codes(wide[..., 1:-2], bits, dim, out=out) is out
    assert torch.equal(out, codes.float())
    runs = pack_codes(codes, bits, runs=True)  # the table codes' layout: same bytes per row, other order
    assert runs.shape == packed.shape and torch.equal(unpack_indices(runs, bits, dim, runs=True), codes)
    assert torch.equal(unpack_codes(wide[..., 1:-2], bits, dim, runs=False), codes.float())


@FAST
@given(st.sampled_from(WIDTHS), st.integers(1, 40), st.data())
def test_run_index_holds_each_widest_bytes_codes_and_run_slots_splits_them(bits: int, dim: int,
                                                                          data: st.DataObject) -> None:
    codes = torch.from_numpy(data.draw(arrays(np.uint8, (3, dim), elements=st.integers(0, 2**bits - 1))))
    packed = pack_codes(codes, bits, runs=True)
    index = run_index(packed, bits, dim)
    wide = torch.zeros((3, packed.shape[1] + 1), dtype=torch.uint8)  # rows at an odd byte offset
    wide[:, 1:] = packed
    assert torch.equal(run_index(wide[:, 1:], bits, dim), index)
    u = run_codes(bits)  # codes per byte of the widest piece, two bytes' at 8 bits
    assert u == (2 if bits == 8 else 8 // pieces(bits)[0])
    assert index.dtype == torch.int32 and index.shape == (3, math.ceil(dim / u))
    assert int(index.min()) >= 0 and int(index.max()) < 2 ** (u * bits)
    slots = run_slots(index, bits)
    assert slots.shape == (3, index.shape[1], u)
    assert torch.equal(slots.flatten(1)[:, :dim], codes.long())
    assert not slots.flatten(1)[:, dim:].any()  # the padding slots of the last byte


@given(st.sampled_from(WIDTHS), st.integers(0, 300))
def test_packed_bytes_is_the_pieces_rounded_up(bits: int, dim: int) -> None:
    digits = [1 << k for k in range(3, -1, -1) if bits >> k & 1]
    assert list(pieces(bits)) == digits and sum(digits) == bits
    assert packed_bytes(dim, bits) == sum(math.ceil(dim / (8 // p)) for p in digits)
    assert packed_bytes(dim, bits) * 8 >= dim * bits
    if dim % 8 == 0:
        assert packed_bytes(dim, bits) * 8 == dim * bits


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n_bytes", [1, 2, 3, 4, 6, 8, 24])
def test_unpack_reads_every_row_width(bits: int, n_bytes: int) -> None:
    d = n_bytes * 8 // bits
    codes = torch.randint(0, 2**bits, (3, 5, d), generator=torch.Generator().manual_seed(n_bytes), dtype=torch.uint8)
    codes[0, 0] = 2**bits - 1  # all bits set
    packed = pack_codes(codes, bits)
    assert torch.equal(unpack_planes(packed, bits), codes)
    assert torch.equal(unpack_planes(packed[:, 1:4], bits), codes[:, 1:4])  # a non-contiguous view


@pytest.mark.parametrize("dim", [1, 7, 16, 32, 50, 64, 66, 96, 136])
@pytest.mark.parametrize("bits", WIDTHS)
def test_unpack_indices_gives_the_codes_from_any_lane_width_and_offset(bits: int, dim: int) -> None:
    # dims whose pieces are whole 8-, 4-, 2- or 1-byte lanes (1-bit codes at 64, 32, 16 and 50 channels), rows
    # at byte offsets that allow each lane width, and leading dims in any order
    codes = torch.randint(0, 2**bits, (2, 3, 5, dim), generator=torch.Generator().manual_seed(dim), dtype=torch.uint8)
    codes[0, 0, 0] = 2**bits - 1  # all bits set
    packed = pack_codes(codes, bits)
    nb = packed.shape[-1]
    for offset in (0, 1, 2, 4, 8):
        wide = torch.zeros((2, 3, 5, nb + 16), dtype=torch.uint8)
        wide[..., offset:offset + nb] = packed
        got = unpack_indices(wide[..., offset:offset + nb], bits, dim)
        assert got.dtype == torch.uint8 and got.shape == codes.shape and torch.equal(got, codes)
    assert torch.equal(unpack_indices(packed.transpose(0, 1), bits, dim), codes.transpose(0, 1))
    assert torch.equal(unpack_indices(packed[:, 1:, 2:], bits, dim), codes[:, 1:, 2:])
    assert unpack_indices(packed[..., :0, :], bits, dim).shape == (2, 3, 0, dim)


def test_table_codes_pack_in_runs() -> None:
    # channel d of a p-bit piece goes to byte d // (8 // p) at bit offset p * (d % (8 // p))
    codes = torch.tensor([1, 2, 3, 0, 3, 3, 0, 1], dtype=torch.uint8)
    assert pack_codes(codes, 2, runs=True).tolist() == [1 | 2 << 2 | 3 << 4 | 0 << 6, 3 | 3 << 2 | 0 << 4 | 1 << 6]
    assert pack_codes(torch.tensor([0xA, 0x5, 0x1], dtype=torch.uint8), 4, runs=True).tolist() == [0x5A, 0x01]
    # 3 bits = a 2-bit piece (2 bytes, channels 5-7 padding) then a 1-bit piece (1 byte, channels 5-7 padding)
    codes = torch.tensor([0b101, 0b011, 0b111, 0b000, 0b110], dtype=torch.uint8)
    runs = pack_codes(codes, 3, runs=True)
    assert runs.tolist() == [0b01 | 0b11 << 2 | 0b11 << 4, 0b10, 1 | 0 << 1 | 1 << 2 | 0 << 3 | 1 << 4]
    # one index per 2-bit byte: the byte, then the 4 bits of the 1-bit piece for its 4 channels
    assert run_index(runs, 3, 5).tolist() == [runs[0] | 0b0101 << 8, runs[1] | 0b0001 << 8]


def test_pack_layout_is_bit_planes() -> None:
    # channel d of nb bytes goes to byte d % nb at bit offset bits * (d // nb)
    codes = torch.tensor([1, 2, 3, 0, 3, 3, 0, 1], dtype=torch.uint8)
    assert pack_codes(codes, 2).tolist() == [1 | 3 << 2 | 3 << 4 | 0 << 6, 2 | 0 << 2 | 3 << 4 | 1 << 6]
    assert pack_codes(torch.tensor([0xA, 0x5], dtype=torch.uint8), 4).tolist() == [0x5A]
    assert pack_codes(torch.tensor([7, 200], dtype=torch.uint8), 8).tolist() == [7, 200]
    # 3 bits = a 2-bit piece (2 bytes, channel 5 is padding) then a 1-bit piece (1 byte, channels 5-7 padding)
    codes = torch.tensor([0b101, 0b011, 0b111, 0b000, 0b110], dtype=torch.uint8)
    assert pack_codes(codes, 3).tolist() == [0b01 | 0b11 << 2 | 0b10 << 4, 0b11, 1 | 1 << 2 | 1 << 4]


@FAST
@given(cases())
def test_error_bound_and_storage(case: tuple) -> None:
    x, bits, group, along = case
    p = quantize(x, bits, group, along)
    *lead, t, d = x.shape
    gt, gc = (p.group_size, 1) if along == "tokens" else (1, p.group_size)
    assert p.codes.shape == (*lead, t, d * bits // 8) and p.codes.dtype == torch.uint8
    assert p.scale.shape == p.minimum.shape == (*lead, t // gt, d // gc)
    assert p.scale.dtype == p.minimum.dtype == torch.float16
    assert p.nbytes() == math.prod(lead) * (t * d * bits // 8 + 2 * 2 * (t // gt) * (d // gc))

    y = dequantize(p)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(p.scale).all() and torch.isfinite(p.minimum).all()
    scale, minimum = _expand(p.scale, p), _expand(p.minimum, p)
    # every width's read (bit planes into float32, or integer codes cast once) is the formula, bit for bit
    assert torch.equal(y, unpack_codes(p.codes, bits, d) * scale + minimum)
    levels = 2**bits - 1
    eps = 1e-6 * (x.abs() + minimum.abs() + levels * scale) + 1e-30
    assert (minimum <= x).all() and (x <= minimum + levels * scale + eps).all()
    assert ((y - x).abs() <= scale / 2 + eps).all()


@FAST
@given(
    st.sampled_from([2, 4, 8]),
    st.sampled_from(["tokens", "channels"]),
    st.floats(-1e4, 1e4, width=16),
)
def test_constant_groups_are_exact(bits: int, along: str, value: float) -> None:
    x = torch.full((2, 4, 8), value)
    x[1] = 0.0
    p = quantize(x, bits, 4, along)
    assert (p.scale == 0).all()
    assert (p.codes == 0).all()
    assert torch.equal(dequantize(p), x)


@pytest.mark.parametrize("along", ["tokens", "channels"])
def test_constant_group_not_in_float16_stays_finite(along: str) -> None:
    x = torch.full((4, 8), 0.1)
    x[:, 4:] = -1e-9
    p = quantize(x, 2, 4, along)
    y = dequantize(p)
    assert torch.isfinite(y).all()
    assert ((y - x).abs() <= _expand(p.scale, p) / 2 + 1e-7).all()
    assert (p.scale.float() < 1e-4).all()


def test_dequantize_dtype_and_empty() -> None:
    x = torch.randn(3, 8, 16)
    p = quantize(x, 4, 8, "tokens")
    y16 = dequantize(p, torch.float16)
    assert y16.dtype == torch.float16
    assert torch.allclose(y16.float(), dequantize(p), atol=1e-2)
    empty = quantize(torch.zeros(3, 0, 16), 4, 8, "tokens")
    assert empty.nbytes() == 0 and empty.num_tokens == 0
    assert dequantize(empty).shape == (3, 0, 16)


@pytest.mark.parametrize(
    ("dim", "group", "expected"), [(128, 32, 32), (48, 32, 24), (40, 32, 20), (7, 4, 1), (12, 64, 12)]
)
def test_effective_group_examples(dim: int, group: int, expected: int) -> None:
    assert effective_group(dim, group) == expected


@given(st.integers(1, 300), st.integers(1, 300))
def test_effective_group_is_largest_divisor(dim: int, group: int) -> None:
    g = effective_group(dim, group)
    assert dim % g == 0 and g <= group
    assert all(dim % h for h in range(g + 1, min(dim, group) + 1))


def test_channel_groups_use_effective_group() -> None:
    p = quantize(torch.randn(5, 12), 2, 8, "channels")
    assert p.group_size == 6 and p.scale.shape == (5, 2)


@pytest.mark.parametrize(
    ("shape", "bits", "group", "along"),
    [
        ((4, 8), 9, 4, "tokens"),  # wider than 8 bits
        ((4, 8), 0, 4, "tokens"),  # no bits
        ((4, 8), 4, 4, "rows"),  # unknown direction
        ((6, 8), 4, 4, "tokens"),  # T not a multiple of the group
        ((8,), 4, 4, "channels"),  # no token dim
    ],
)
def test_invalid_layouts_raise(shape: tuple, bits: int, group: int, along: str) -> None:
    with pytest.raises(ValueError):
        quantize(torch.randn(shape), bits, group, along)


@pytest.mark.parametrize("along", ["tokens", "channels"])
def test_cat_matches_quantizing_the_whole(along: str) -> None:
    x = torch.randn(2, 3, 12, 8)
    whole = quantize(x, 4, 4, along)
    joined = cat([quantize(x[:, :, :4], 4, 4, along), quantize(x[:, :, 4:], 4, 4, along)])
    assert joined.num_tokens == 12
    for a, b in ((joined.codes, whole.codes), (joined.scale, whole.scale), (joined.minimum, whole.minimum)):
        assert torch.equal(a, b)


def test_cat_rejects_mixed_layouts() -> None:
    x = torch.randn(4, 8)
    with pytest.raises(ValueError):
        cat([quantize(x, 4, 4, "tokens"), quantize(x, 2, 4, "tokens")])
    with pytest.raises(ValueError):
        cat([])


def test_quantizing_leaves_no_tensor_behind():
    import gc

    def live() -> int:
        gc.collect()
        return sum(type(o) is torch.Tensor for o in gc.get_objects())

    quantize_pack_ref(torch.randn(1, 2, 16, 8), 4, 8, "tokens")  # warm caches keyed by shape, not by tensor
    before = live()
    for seed in range(5):
        quantize_pack_ref(torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(seed)), 4, 8, "tokens")
    assert live() == before  # nothing of these calls is kept (a cache keyed by tensors would keep them)
