"""Triton kernels against their torch twins (interpreter on CPU), and the decode reference against dense."""

import os

# The interpreter must be on before triton is imported: kernels are bound to a backend when defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

import inspect
import math
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from kvcompress.kernels.decode_attention import (
    decode_attention,
    decode_attention_ref,
    decode_attention_triton,
)
from kvcompress.kernels.dispatch import Dispatch
from kvcompress.kernels.lowrank_rope import lowrank_rope, lowrank_rope_ref, lowrank_rope_triton
from kvcompress.kernels.pack import (
    WIDTHS,
    TablePacked,
    packed_bytes,
    quantize_pack,
    quantize_pack_ref,
    quantize_pack_triton,
    reads_tuples,
    unpack_dequantize,
    unpack_dequantize_ref,
    unpack_dequantize_triton,
)
from kvcompress.methods import VectorCodebookStore, codebook
from kvcompress.methods.kivi import Packed, dequantize, quantize

LAYOUTS = [
    # shape, bits, group_size, along
    ((2, 3, 8, 16), 2, 4, "tokens"),
    ((1, 12, 8), 4, 3, "tokens"),  # group not a power of two
    ((32, 8), 8, 32, "tokens"),
    ((2, 5, 12), 2, 6, "channels"),  # group not a multiple of codes per byte
    ((2, 2, 7, 16), 4, 16, "channels"),
    ((4, 24), 8, 3, "channels"),
]


def _input(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random data with an all-zero row and a constant row, so constant groups are covered."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 4
    x[..., 0, :] = 0.0
    x[..., -1, :] = 0.75
    return x


ENTRY_POINTS = [
    (quantize_pack, quantize_pack_triton, quantize_pack_ref),
    (unpack_dequantize, unpack_dequantize_triton, unpack_dequantize_ref),
    (decode_attention, decode_attention_triton, decode_attention_ref),
    (lowrank_rope, lowrank_rope_triton, lowrank_rope_ref),
]


@pytest.mark.parametrize(("entry", "triton_impl", "torch_impl"), ENTRY_POINTS, ids=lambda f: f.__name__)
def test_every_entry_point_is_one_dispatch_with_its_twins_signature(entry, triton_impl, torch_impl) -> None:
    assert isinstance(entry, Dispatch)
    assert entry.triton is triton_impl and entry.torch is torch_impl
    assert entry.__name__ == torch_impl.__name__.removesuffix("_ref") == triton_impl.__name__.removesuffix("_triton")
    assert inspect.signature(entry) == inspect.signature(torch_impl)
    assert "Triton on CUDA tensors" in entry.__doc__


def test_dispatch_picks_by_the_first_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = Dispatch(lambda *a, **k: ("triton", a, k), lambda *a, **k: ("torch", a, k), "A kernel.")
    cuda, cpu = types.SimpleNamespace(is_cuda=True), types.SimpleNamespace(is_cuda=False)
    assert entry(cuda, cpu, out=1) == ("triton", (cuda, cpu), {"out": 1})
    assert entry(cpu, cuda) == ("torch", (cpu, cuda), {})
    monkeypatch.setattr(entry, "torch", lambda *a: "replaced")  # looked up at each call
    assert entry(cpu) == "replaced"


@pytest.mark.parametrize(("shape", "bits", "group", "along"), LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_pack_triton_matches_ref(shape: tuple, bits: int, group: int, along: str, dtype: torch.dtype
                                         ) -> None:
    x = _input(shape).to(dtype)
    got_all, want_all = quantize_pack_triton(x, bits, group, along), quantize_pack_ref(x, bits, group, along)
    for got, want in zip(got_all, want_all, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)


@pytest.mark.parametrize(("shape", "bits", "group", "along"), LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_unpack_dequantize_triton_matches_ref(shape: tuple, bits: int, group: int, along: str,
                                              dtype: torch.dtype) -> None:
    packed = quantize_pack_ref(_input(shape, seed=1), bits, group, along)
    args = (*packed, bits, group, along, shape[-1], dtype)
    got, want = unpack_dequantize_triton(*args), unpack_dequantize_ref(*args)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("dim", [7, 13, 64])  # odd (zero-padded pieces) and even
@pytest.mark.parametrize("along", ["tokens", "channels"])
def test_every_width_and_dim_matches_ref(bits: int, dim: int, along: str) -> None:
    shape, group = (2, 3, 16, dim), 8 if along == "tokens" else (dim if dim % 16 else 16)
    x = _input(shape, seed=bits)
    got_all, want_all = quantize_pack_triton(x, bits, group, along), quantize_pack_ref(x, bits, group, along)
    assert want_all[0].shape == (*shape[:-1], packed_bytes(dim, bits))
    for got, want in zip(got_all, want_all, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)
    args = (*want_all, bits, group, along, dim)
    want = unpack_dequantize_ref(*args, torch.float32)
    assert torch.equal(unpack_dequantize_triton(*args, torch.float32), want)
    buffer = torch.full((2, 3, 20, dim + 3), math.nan, dtype=torch.float16)  # wider in tokens and channels
    view = buffer[:, :, 2:18, 1:dim + 1]
    assert unpack_dequantize_triton(*args, torch.float16, out=view) is view
    assert torch.equal(view, unpack_dequantize_ref(*args, torch.float16))
    view.fill_(math.nan)
    assert buffer.isnan().all()  # nothing was written outside the slice


@settings(max_examples=12, deadline=None)
@given(
    st.sampled_from(WIDTHS),
    st.sampled_from(["tokens", "channels"]),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 11),
    st.integers(0, 2**31 - 1),
)
def test_kernels_match_ref_on_random_layouts(bits: int, along: str, group: int, n_groups: int, dim: int,
                                             seed: int) -> None:
    shape = (2, group * n_groups, dim) if along == "tokens" else (2, 3, group * n_groups)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 10
    got, want = quantize_pack_triton(x, bits, group, along), quantize_pack_ref(x, bits, group, along)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    args = (*want, bits, group, along, shape[-1], torch.float32)
    assert torch.equal(unpack_dequantize_triton(*args), unpack_dequantize_ref(*args))


def test_quantize_pack_empty_and_dispatch() -> None:
    empty = torch.zeros(2, 0, 8)
    codes, scale, minimum = quantize_pack_triton(empty, 4, 4, "tokens")
    assert codes.shape == (2, 0, 4) and scale.shape == minimum.shape == (2, 0, 8)
    restored = unpack_dequantize_triton(codes, scale, minimum, 4, 4, "tokens", 8, torch.float32)
    assert restored.shape == (2, 0, 8)
    x = _input((3, 8, 16))
    assert all(torch.equal(a, b) for a, b in zip(quantize_pack(x, 2, 4, "tokens"),
                                                 quantize_pack_ref(x, 2, 4, "tokens"), strict=True))


def _cache(b: int, hkv: int, n_rep: int, tq: int, tr: int, dk: int, dv: int, k_bits: int, v_bits: int,
           seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * n_rep, dk, generator=g)
    k = quantize(torch.randn(b, hkv, tq, dk, generator=g) * 2, k_bits, 8, "tokens") if tq else None
    v = quantize(torch.randn(b, hkv, tq, dv, generator=g), v_bits, 8, "channels") if tq else None
    k_res = torch.randn(b, hkv, tr, dk, generator=g) * 2
    v_res = torch.randn(b, hkv, tr, dv, generator=g)
    return q, k, v, k_res, v_res


def _dense(q: torch.Tensor, k: Packed | None, v: Packed | None, k_res: torch.Tensor, v_res: torch.Tensor,
           sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax(q Kᵀ) V with K/V repeated per query head."""
    keys = torch.cat([dequantize(k), k_res], dim=2) if k is not None else k_res
    values = torch.cat([dequantize(v), v_res], dim=2) if v is not None else v_res
    return _attend(q, keys, values, sm_scale)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, sm_scale: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q Kᵀ) V and the log-sum-exp over float keys and values ``[B, Hkv, T, D]``, per query head."""
    n_rep = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(n_rep, dim=1), values.repeat_interleave(n_rep, dim=1)
    scores = torch.einsum("bhd,bhtd->bht", q, keys) * sm_scale
    out = torch.einsum("bht,bhtd->bhd", torch.softmax(scores, dim=-1), values)
    return out, torch.logsumexp(scores, dim=-1)


CASES = [
    # b, hkv, n_rep, tq, tr, dk, dv, k_bits, v_bits, split_size
    (2, 2, 1, 16, 5, 16, 16, 2, 2, None),
    (1, 2, 2, 24, 3, 16, 8, 4, 2, None),  # Dk != Dv
    (1, 1, 4, 40, 7, 8, 12, 8, 4, None),
    (1, 2, 4, 40, 9, 16, 8, 2, 8, 36),  # several tiles per split, ragged last tile
    (2, 1, 2, 16, 1, 16, 16, 4, 4, 5),  # many splits, split smaller than a tile
    (1, 2, 2, 0, 7, 16, 8, 4, 4, None),  # no quantized tokens
    (1, 2, 2, 24, 0, 16, 8, 2, 4, None),  # empty residual window
    (1, 2, 2, 0, 0, 16, 8, 4, 4, None),  # no tokens at all
    (1, 1, 3, 24, 4, 24, 40, 2, 2, None),  # bytes per row not a power of two: padded bit-plane slots
    # every key width with value width 9 - bits: several pieces, and odd head dims (zero-padded pieces)
    *[(1, 2, 2, 16, 3, dk, dv, bits, 9 - bits, 8) for bits in WIDTHS for dk, dv in ((13, 7), (16, 24))],
]


@pytest.mark.parametrize(("b", "hkv", "n_rep", "tq", "tr", "dk", "dv", "k_bits", "v_bits", "split"), CASES)
def test_decode_triton_matches_ref(b: int, hkv: int, n_rep: int, tq: int, tr: int, dk: int, dv: int,
                                   k_bits: int, v_bits: int, split: int | None) -> None:
    q, k, v, k_res, v_res = _cache(b, hkv, n_rep, tq, tr, dk, dv, k_bits, v_bits)
    out, lse = decode_attention_triton(q, k, v, k_res, v_res, 0.25, split_size=split)
    ref_out, ref_lse = decode_attention_ref(q, k, v, k_res, v_res, 0.25)
    assert out.shape == (b, hkv * n_rep, dv) and out.dtype == torch.float32
    assert lse.shape == (b, hkv * n_rep) and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)
    if tq + tr == 0:
        assert (out == 0).all() and (lse == -math.inf).all()


@pytest.mark.parametrize(("b", "hkv", "n_rep", "tq", "tr", "dk", "dv", "k_bits", "v_bits", "split"), CASES)
def test_decode_ref_matches_dense(b: int, hkv: int, n_rep: int, tq: int, tr: int, dk: int, dv: int,
                                  k_bits: int, v_bits: int, split: int | None) -> None:
    q, k, v, k_res, v_res = _cache(b, hkv, n_rep, tq, tr, dk, dv, k_bits, v_bits, seed=3)
    out, lse = decode_attention_ref(q, k, v, k_res, v_res, 0.3)
    dense_out, dense_lse = _dense(q, k, v, k_res, v_res, 0.3)
    torch.testing.assert_close(out, dense_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, dense_lse, atol=1e-5, rtol=1e-5)


def test_decode_triton_strided_half_residual() -> None:
    q, k, v, _, _ = _cache(1, 2, 2, 16, 0, 16, 8, 4, 2)
    buffers = torch.randn(2, 1, 2, 12, 24).half()  # preallocated window, only 5 of 12 slots used
    k_res, v_res = buffers[0, :, :, :5, :16], buffers[1, :, :, :5, 4:12]
    out, lse = decode_attention_triton(q, k, v, k_res, v_res, 0.5)
    ref_out, ref_lse = decode_attention_ref(q, k, v, k_res, v_res, 0.5)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)
    assert torch.equal(decode_attention(q, k, v, k_res, v_res, 0.5)[0], ref_out)  # CPU dispatches to ref


def test_decode_rejects_bad_shapes() -> None:
    q, k, v, k_res, v_res = _cache(1, 2, 2, 16, 3, 16, 8, 4, 4)
    with pytest.raises(ValueError):
        decode_attention_ref(q[:, :3], k, v, k_res, v_res, 1.0)  # 3 query heads over 2 KV heads
    with pytest.raises(ValueError):
        decode_attention_triton(q, k, None, k_res, v_res, 1.0)
    with pytest.raises(ValueError):
        decode_attention_ref(q, v, k, k_res, v_res, 1.0)  # swapped layouts


# --------------------------------------------------------------------------- codebook codes and the sink


def _table_cache(b: int, hkv: int, n_rep: int, tq: int, tr: int, dk: int, dv: int, k_kind: str, k_bits: int,
                 v_bits: int, sink: int, v_group: int = 64, seed: int = 0, v_kind: str = "codebook") -> tuple:
    """Queries; keys as KIVI min–max codes (``k_kind="kivi"``, groups of 8 tokens) or codebook indices with a
    mean and deviation per 8 tokens (``"codebook"``, or ``"vector"``: points of the vector codebook of the
    width, as :class:`~kvcompress.methods.VectorCodebookStore` codes them); values as codebook indices with a
    norm per ``v_group`` channels (``v_kind`` ``"codebook"`` or ``"vector"``; :mod:`kvcompress.methods.codebook`);
    the 16-bit residual; ``sink`` float16 copies of the first tokens (None for 0). Keys and values are the
    stores' own: ``TablePacked`` and ``Packed``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * n_rep, dk, generator=g)
    keys = torch.randn(b, hkv, tq, dk, generator=g) * 2 + torch.randn(dk, generator=g)  # channel offsets
    if k_kind == "kivi":
        k = quantize(keys, k_bits, 8, "tokens")
    else:
        k_tuple = VectorCodebookStore(k_bits, 8, "tokens", 8).tuple_size(dk) if k_kind == "vector" else 1
        k = codebook.encode(keys, k_bits, 8, "tokens", tuple_size=k_tuple)
    v_tuple = VectorCodebookStore(v_bits, v_group, "channels", 8).tuple_size(dv) if v_kind == "vector" else 1
    v = codebook.encode(torch.randn(b, hkv, tq, dv, generator=g), v_bits, v_group, "channels", tuple_size=v_tuple)
    k_res = torch.randn(b, hkv, tr, dk, generator=g) * 2
    v_res = torch.randn(b, hkv, tr, dv, generator=g)
    k_sink = (torch.randn(b, hkv, sink, dk, generator=g) * 4).half() if sink else None  # outliers: the sink's
    v_sink = torch.randn(b, hkv, sink, dv, generator=g).half() if sink else None
    return q, k, v, k_res, v_res, k_sink, v_sink


def _decoded(p: Packed | TablePacked, sink: torch.Tensor | None) -> torch.Tensor:
    """The store's own reading: :func:`codebook.decode` or the min–max dequantize, the sink over the first tokens."""
    x = codebook.decode(p) if isinstance(p, TablePacked) else dequantize(p)
    if sink is not None:
        x[..., :sink.shape[2], :] = sink.float()
    return x


TABLE_CASES = [
    # b, hkv, n_rep, tq, tr, dk, dv, key kind, k_bits, v_bits, sink, split_size
    # codebook-4x's layout at every value width: 4-bit min–max keys, a norm per 64-channel head vector, a sink
    *[(1, 2, 2, 16, 5, 64, 64, "kivi", 4, bits, 4, None) for bits in WIDTHS],
    # codebook keys too, every width, odd head dims (zero-padded pieces), no sink
    *[(1, 2, 3, 16, 3, 13, 7, "codebook", bits, 9 - bits, 0, 8) for bits in WIDTHS],
    (2, 1, 4, 24, 0, 64, 64, "kivi", 4, 3, 4, None),  # no residual window
    (1, 2, 2, 24, 7, 64, 64, "kivi", 2, 3, 0, None),  # no sink
    (1, 1, 1, 8, 2, 16, 16, "codebook", 3, 2, 8, None),  # the sink replaces every quantized token
    (1, 2, 2, 40, 9, 24, 40, "codebook", 4, 3, 3, 5),  # many splits, the sink in the first of them
    (1, 1, 4, 16, 1, 128, 128, "kivi", 4, 3, 4, None),  # Llama-like head dim, two norms per head vector
]


@pytest.mark.parametrize(("b", "hkv", "n_rep", "tq", "tr", "dk", "dv", "kind", "k_bits", "v_bits", "sink", "split"),
                         TABLE_CASES)
def test_decode_triton_matches_ref_over_table_codes_and_a_sink(b: int, hkv: int, n_rep: int, tq: int, tr: int,
                                                               dk: int, dv: int, kind: str, k_bits: int,
                                                               v_bits: int, sink: int, split: int | None) -> None:
    q, k, v, k_res, v_res, k_sink, v_sink = _table_cache(b, hkv, n_rep, tq, tr, dk, dv, kind, k_bits, v_bits, sink)
    args = (q, k, v, k_res, v_res, 0.25, k_sink, v_sink)
    out, lse = decode_attention_triton(*args, split_size=split)
    ref_out, ref_lse = decode_attention_ref(*args)
    assert out.shape == (b, hkv * n_rep, dv) and lse.shape == (b, hkv * n_rep)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)
    assert torch.equal(decode_attention(*args)[0], ref_out)  # CPU tensors dispatch to the twin


@pytest.mark.parametrize(("b", "hkv", "n_rep", "tq", "tr", "dk", "dv", "kind", "k_bits", "v_bits", "sink", "split"),
                         TABLE_CASES)
def test_decode_ref_over_table_codes_matches_dense_over_the_stores_decode(
        b: int, hkv: int, n_rep: int, tq: int, tr: int, dk: int, dv: int, kind: str, k_bits: int, v_bits: int,
        sink: int, split: int | None) -> None:
    q, k, v, k_res, v_res, k_sink, v_sink = _table_cache(b, hkv, n_rep, tq, tr, dk, dv, kind, k_bits, v_bits, sink,
                                                         seed=5)
    out, lse = decode_attention_ref(q, k, v, k_res, v_res, 0.3, k_sink, v_sink)
    keys = torch.cat([_decoded(k, k_sink), k_res], dim=2)
    values = torch.cat([_decoded(v, v_sink), v_res], dim=2)
    dense_out, dense_lse = _attend(q, keys, values, 0.3)
    torch.testing.assert_close(out, dense_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, dense_lse, atol=1e-5, rtol=1e-5)
    if sink:  # the sink's copies are attended, not the codes they replace
        without = decode_attention_ref(q, k, v, k_res, v_res, 0.3)[1]
        assert not torch.allclose(lse, without, atol=1e-3)


@settings(max_examples=10, deadline=None)
@given(
    st.sampled_from(WIDTHS),
    st.sampled_from(WIDTHS),
    st.sampled_from(["kivi", "codebook"]),
    st.integers(1, 3),  # query heads per KV head
    st.integers(1, 3),  # key groups of 8 tokens
    st.integers(0, 4),  # residual tokens
    st.integers(0, 7),  # sink tokens
    st.sampled_from([(8, 8), (5, 12), (16, 9)]),  # head dims of keys and values
    st.integers(0, 2**31 - 1),
)
def test_decode_triton_matches_ref_on_random_table_layouts(k_bits: int, v_bits: int, kind: str, n_rep: int,
                                                           groups: int, tr: int, sink: int, dims: tuple,
                                                           seed: int) -> None:
    dk, dv = dims
    q, k, v, k_res, v_res, k_sink, v_sink = _table_cache(1, 2, n_rep, 8 * groups, tr, dk, dv, kind, k_bits, v_bits,
                                                         sink, v_group=dv, seed=seed)
    args = (q, k, v, k_res, v_res, 0.4, k_sink, v_sink)
    for got, want in zip(decode_attention_triton(*args, split_size=4), decode_attention_ref(*args), strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


VECTOR_CASES = [
    # b, hkv, n_rep, tq, tr, dk, dv, key kind, k_bits, v_bits, sink, split_size
    # codebook-5x's layout: min–max keys, vector values at every width the shipped codebooks have (4 channels
    # a point at 1-2 bits, 2 at 3-4 bits), a sink
    *[(1, 2, 2, 16, 5, 64, 64, "kivi", 4, bits, 4, None) for bits in (1, 2, 3, 4)],
    # vector keys too, every width, and above 4 bits (scalar tables) beside them
    *[(1, 2, 3, 16, 3, 32, 32, "vector", bits, 9 - bits, 0, 8) for bits in WIDTHS],
    (1, 1, 4, 24, 0, 128, 128, "vector", 2, 3, 4, 5),  # Llama-like head dim, many splits, no residual
    (1, 2, 2, 16, 2, 64, 192, "kivi", 3, 1, 3, None),  # values as wide as three heads' latents, a norm each 64
]


@pytest.mark.parametrize(("b", "hkv", "n_rep", "tq", "tr", "dk", "dv", "kind", "k_bits", "v_bits", "sink", "split"),
                         VECTOR_CASES)
def test_decode_triton_matches_ref_over_vector_codebook_codes(b: int, hkv: int, n_rep: int, tq: int, tr: int,
                                                              dk: int, dv: int, kind: str, k_bits: int, v_bits: int,
                                                              sink: int, split: int | None) -> None:
    q, k, v, k_res, v_res, k_sink, v_sink = _table_cache(b, hkv, n_rep, tq, tr, dk, dv, kind, k_bits, v_bits, sink,
                                                         seed=7, v_kind="vector")
    assert v.table.dim() == 2 or v_bits > 4  # the values index points of several channels
    args = (q, k, v, k_res, v_res, 0.25, k_sink, v_sink)
    out, lse = decode_attention_triton(*args, split_size=split)
    ref_out, ref_lse = decode_attention_ref(*args)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)
    keys = torch.cat([_decoded(k, k_sink), k_res], dim=2)  # and both are attention over the stores' own reading
    values = torch.cat([_decoded(v, v_sink), v_res], dim=2)
    dense_out, dense_lse = _attend(q, keys, values, 0.25)
    torch.testing.assert_close(out, dense_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, dense_lse, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(("dim", "bits", "t"), [
    (64, 1, 4), (16, 2, 4), (8, 3, 2), (32, 4, 2),
    (16, 1, 4),  # 1-bit codes of 16 channels: 2 bytes of 8 channels, two points each
    (6, 4, 2),  # 4-bit codes of 6 channels: 3 bytes, one point each
    (6, 2, 2),  # 2-bit codes of 6 channels: 2 bytes, the second half padding
])
def test_the_kernel_reads_vector_points_of_any_layout_in_runs(dim: int, bits: int, t: int) -> None:
    assert reads_tuples(bits, t)
    assert not reads_tuples(bits, 3)  # 3-channel points: not a block Triton can reshape into
    assert not reads_tuples(1.5, 4)  # one code per point
    q, k, v, k_res, v_res, _, _ = _table_cache(1, 1, 1, 8, 1, 8, dim, "kivi", 4, bits, 0, v_group=dim, seed=2,
                                               v_kind="vector")
    assert v.table.shape[1] == t
    got = decode_attention_triton(q, k, v, k_res, v_res, 0.5)
    for a, b in zip(got, decode_attention_ref(q, k, v, k_res, v_res, 0.5), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_decode_rejects_a_bad_sink() -> None:
    q, k, v, k_res, v_res, k_sink, v_sink = _table_cache(1, 2, 2, 16, 3, 16, 8, "kivi", 4, 3, 2)
    k, v = k, v
    for impl in (decode_attention_ref, decode_attention_triton):
        with pytest.raises(ValueError, match="sink needs"):
            impl(q, k, v, k_res, v_res, 1.0, k_sink, None)  # keys without values
        with pytest.raises(ValueError, match="sink needs"):
            impl(q, None, None, k_res, v_res, 1.0, k_sink, v_sink)  # nothing quantized to replace
        with pytest.raises(ValueError, match="sink shapes"):
            impl(q, k, v, k_res, v_res, 1.0, k_sink, v_sink[..., :4])  # value dim 4, not 8
        long_k, long_v = (x[..., :1, :].expand(1, 2, 17, -1) for x in (k_sink, v_sink))
        with pytest.raises(ValueError, match="sink shapes"):  # longer than the 16 quantized tokens
            impl(q, k, v, k_res, v_res, 1.0, long_k, long_v)


def test_codebook_bytes_are_codes_scales_and_means() -> None:
    _, k, v, *_ = _table_cache(2, 3, 1, 16, 0, 12, 20, "codebook", 3, 5, 0, v_group=10)
    for p in (k, v):  # keys with a mean per group, values without
        assert p.nbytes() == sum(
            t.numel() * t.element_size() for t in (p.codes, p.scale, p.mean) if t is not None)
    assert k.mean is not None and v.mean is None
