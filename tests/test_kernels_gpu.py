"""Compiled Triton kernels against their torch twins on CUDA, at real model layouts, in float16 and bfloat16.

``scripts/gpu-check`` runs this file on a GPU with ``TRITON_INTERPRET=0`` and fails if any case here is
skipped. Layouts: SmolLM2-135M (3 KV heads of 64 channels, 9 query heads) and a Llama-3-8B-like one (8 KV
heads of 128 channels, 32 query heads), 4096 quantized tokens plus a ragged residual window; decode attention
over min–max codes, and over scalar and vector codebook values with a sink (the codebook recipes' layouts).
The twins run on CPU copies of the inputs, so a kernel is never compared with itself (on CUDA,
``dequantize`` inside ``decode_attention_ref`` would dispatch to Triton). Freed CUDA memory is filled with
NaN before each test, so an output element that a kernel leaves unwritten shows.

Anywhere else the file is skipped, unless ``KVCOMPRESS_KERNEL_SMOKE=1`` with the interpreter on (what
``scripts/gpu-check --dry-run`` sets): then the same comparisons run on CPU tensors through Triton's
interpreter at tiny token counts, bfloat16 ``tl.dot`` excepted (the interpreter's is broken).
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

from test_lowrank_rope import _inputs as lowrank_inputs

from kvcompress.kernels.decode_attention import decode_attention, decode_attention_ref, decode_attention_triton
from kvcompress.kernels.lowrank_rope import lowrank_rope, lowrank_rope_ref, lowrank_rope_triton
from kvcompress.kernels.pack import (
    TablePacked,
    quantize_pack,
    quantize_pack_ref,
    quantize_pack_triton,
    unpack_dequantize,
    unpack_dequantize_ref,
    unpack_dequantize_triton,
)
from kvcompress.methods import VectorCodebookStore, codebook
from kvcompress.methods.kivi import Packed, quantize

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SMOKE = os.environ.get("KVCOMPRESS_KERNEL_SMOKE") == "1" and INTERPRET
COMPILED = torch.cuda.is_available() and not INTERPRET
if not (COMPILED or SMOKE):
    pytest.skip("compiled kernels need CUDA and TRITON_INTERPRET=0 (scripts/gpu-check runs this file)",
                allow_module_level=True)

DEVICE = torch.device("cuda" if COMPILED else "cpu")
BATCH, TOKENS, RESIDUAL = (2, 4096, 77) if COMPILED else (1, 64, 5)  # TOKENS: a multiple of every key group


@dataclass(frozen=True)
class Layout:
    """Attention heads of one model."""

    name: str
    kv_heads: int
    query_heads: int
    head_dim: int

    def __str__(self) -> str:
        return self.name


LAYOUTS = [Layout("smollm2", 3, 9, 64), Layout("llama3-8b", 8, 32, 128)]
DTYPES = [torch.float16, torch.bfloat16]
# bits, group size, along: the recipes' key groups (32 tokens, 16 for low-rank recipes) and value groups
PACKINGS = [(4, 32, "tokens"), (2, 16, "tokens"), (8, 32, "tokens"), (4, 32, "channels"), (2, 32, "channels")]
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # one unit in the last place, relative
LOWRANK_TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2}  # as tests/test_lowrank_rope.py, of max |out|
LOWRANK_ERR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # ‖out − float64‖ / ‖float64‖
POISON_FLOATS = (2**26, *[2**18] * 64)  # one 256 MB block (large pool), 64 MB in 1 MB blocks (small pool)


@pytest.fixture(autouse=True)
def _poison_freed_memory() -> None:
    """Leave NaN in the CUDA caching allocator's free blocks, where the kernels' outputs will be placed."""
    if DEVICE.type == "cuda":
        blocks = [torch.full((n,), math.nan, device=DEVICE) for n in POISON_FLOATS]
        del blocks


def _seed(*params: object) -> int:
    """A seed of its own for every parametrization: no test can pass on another test's leftover output."""
    return zlib.crc32(repr(params).encode())


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    """Random CPU data (the same whatever the device)."""
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def _to_device(p: Packed | TablePacked) -> Packed | TablePacked:
    if isinstance(p, TablePacked):
        return dataclasses.replace(p, codes=p.codes.to(DEVICE), scale=p.scale.to(DEVICE), table=p.table.to(DEVICE),
                                   mean=None if p.mean is None else p.mean.to(DEVICE))
    return dataclasses.replace(p, codes=p.codes.to(DEVICE), scale=p.scale.to(DEVICE),
                               minimum=p.minimum.to(DEVICE))


def _codes(codes: torch.Tensor, scale: torch.Tensor, bits: int, group: int, along: str, dim: int) -> torch.Tensor:
    """The integer codes of packed bytes (dequantized with unit scales and zero minima)."""
    return unpack_dequantize_ref(codes, torch.ones_like(scale), torch.zeros_like(scale), bits, group, along, dim,
                                 torch.float32)


@pytest.mark.parametrize(("bits", "group", "along"), PACKINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_quantize_pack_matches_twin(layout: Layout, dtype: torch.dtype, bits: int, group: int, along: str) -> None:
    """Scales and minima within one float16 ulp (exact expected); codes off by one level at most, and rarely:
    fused multiply-adds may move ``(x - min) / scale + 0.5`` across a rounding boundary."""
    x = _randn(BATCH, layout.kv_heads, TOKENS, layout.head_dim, seed=_seed(layout, dtype, bits, group, along),
               dtype=dtype, scale=3.0)
    got = [t.cpu() for t in quantize_pack_triton(x.to(DEVICE), bits, group, along)]
    want = quantize_pack_ref(x, bits, group, along)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
    for g, w in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(g.float(), w.float(), rtol=2.0**-10, atol=2.0**-24)
    diff = (_codes(got[0], got[1], bits, group, along, layout.head_dim)
            - _codes(want[0], want[1], bits, group, along, layout.head_dim)).abs()
    assert diff.max().item() <= 1
    assert (diff > 0).float().mean().item() <= 1e-4


@pytest.mark.parametrize(("bits", "group", "along"), PACKINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_unpack_dequantize_matches_twin(layout: Layout, dtype: torch.dtype, bits: int, group: int, along: str
                                        ) -> None:
    """Both compute ``minimum + code * scale`` in float32; a fused multiply-add may move the result by one
    ulp of the output dtype."""
    shape = (BATCH, layout.kv_heads, TOKENS, layout.head_dim)
    packed = quantize_pack_ref(_randn(*shape, seed=_seed(layout, dtype, bits, group, along), scale=3.0),
                               bits, group, along)
    args = (bits, group, along, layout.head_dim, dtype)
    out = torch.full(shape, math.nan, dtype=dtype, device=DEVICE)
    got = unpack_dequantize_triton(*(t.to(DEVICE) for t in packed), *args, out=out)
    want = unpack_dequantize_ref(*packed, *args)
    assert got is out
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=ULP[dtype], atol=1e-5)


def _decode_inputs(layout: Layout, dtype: torch.dtype, k_bits: int, v_bits: int, seed: int) -> tuple:
    """CPU queries, keys and values quantized by the torch twin (KIVI groups of 32), residual window."""
    b, hkv, d = BATCH, layout.kv_heads, layout.head_dim
    q = _randn(b, layout.query_heads, d, seed=seed, dtype=dtype)
    k = quantize(_randn(b, hkv, TOKENS, d, seed=seed + 1, scale=2.0), k_bits, 32, "tokens")
    v = quantize(_randn(b, hkv, TOKENS, d, seed=seed + 2), v_bits, 32, "channels")
    k_res = _randn(b, hkv, RESIDUAL, d, seed=seed + 3, dtype=dtype, scale=2.0)
    v_res = _randn(b, hkv, RESIDUAL, d, seed=seed + 4, dtype=dtype)
    return q, k, v, k_res, v_res


@pytest.mark.parametrize("split", [None, TOKENS // 3 + 1], ids=["heuristic", "ragged"])
@pytest.mark.parametrize(("k_bits", "v_bits"), [(4, 4), (2, 2), (2, 4)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_decode_attention_matches_twin(layout: Layout, dtype: torch.dtype, k_bits: int, v_bits: int,
                                       split: int | None) -> None:
    """Both read the same 16-bit inputs and accumulate in float32: agreement to about 1e-4."""
    q, k, v, k_res, v_res = _decode_inputs(layout, dtype, k_bits, v_bits, _seed(layout, dtype, k_bits, v_bits))
    sm_scale = layout.head_dim**-0.5
    out, lse = decode_attention_triton(q.to(DEVICE), _to_device(k), _to_device(v), k_res.to(DEVICE),
                                       v_res.to(DEVICE), sm_scale, split_size=split)
    want_out, want_lse = decode_attention_ref(q, k, v, k_res, v_res, sm_scale)
    assert out.shape == want_out.shape and lse.shape == want_lse.shape
    torch.testing.assert_close(out.cpu(), want_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse.cpu(), want_lse, atol=1e-4, rtol=1e-5)


SINK = 4  # the codebook recipes' sink


def _codebook_inputs(layout: Layout, dtype: torch.dtype, k_bits: int, v_bits: int, key_method: str,
                     seed: int, value_method: str = "codebook") -> tuple:
    """CPU queries; keys as KIVI codes (groups of 32 tokens) or codebook indices (mean and deviation per 32
    tokens; ``key_method="vector"``: vector codebook points); codebook values with a norm per 64 channels
    (scalar, or ``value_method="vector"``); a residual window; the sink's 16-bit copies."""
    b, hkv, d = BATCH, layout.kv_heads, layout.head_dim
    q = _randn(b, layout.query_heads, d, seed=seed, dtype=dtype)
    keys = _randn(b, hkv, TOKENS, d, seed=seed + 1, scale=2.0)
    k_tuple = VectorCodebookStore(k_bits, 32, "tokens", 32).tuple_size(d) if key_method == "vector" else 1
    k = (quantize(keys, k_bits, 32, "tokens") if key_method == "kivi"
         else codebook.encode(keys, k_bits, 32, "tokens", tuple_size=k_tuple))
    v_tuple = VectorCodebookStore(v_bits, 64, "channels", 32).tuple_size(d) if value_method == "vector" else 1
    v = codebook.encode(_randn(b, hkv, TOKENS, d, seed=seed + 2), v_bits, 64, "channels", tuple_size=v_tuple)
    k_res = _randn(b, hkv, RESIDUAL, d, seed=seed + 3, dtype=dtype, scale=2.0)
    v_res = _randn(b, hkv, RESIDUAL, d, seed=seed + 4, dtype=dtype)
    k_sink = _randn(b, hkv, SINK, d, seed=seed + 5, dtype=dtype, scale=6.0)
    v_sink = _randn(b, hkv, SINK, d, seed=seed + 6, dtype=dtype)
    return q, k, v, k_res, v_res, k_sink, v_sink


@pytest.mark.parametrize(("k_bits", "v_bits", "key_method", "value_method"),
                         [(4, 3, "kivi", "codebook"), (2, 2, "kivi", "codebook"), (3, 4, "codebook", "codebook"),
                          (4, 2, "kivi", "vector"), (4, 3, "kivi", "vector"), (1, 1, "vector", "vector")],
                         ids=["codebook-4x", "codebook-2bit", "codebook-keys", "codebook-5x", "vector-pairs",
                              "vector-keys"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_decode_attention_over_codebook_codes_and_a_sink_matches_twin(layout: Layout, dtype: torch.dtype,
                                                                      k_bits: int, v_bits: int, key_method: str,
                                                                      value_method: str) -> None:
    """As the min–max case: the same 16-bit inputs, float32 accumulation, agreement to about 1e-4; scalar
    and vector codebooks (4 channels a point at 1-2 bits, 2 at 3 bits)."""
    seed = _seed(layout, dtype, k_bits, v_bits, key_method, value_method)
    inputs = _codebook_inputs(layout, dtype, k_bits, v_bits, key_method, seed, value_method)
    q, k, v, k_res, v_res, k_sink, v_sink = inputs
    sm_scale = layout.head_dim**-0.5
    out, lse = decode_attention_triton(q.to(DEVICE), _to_device(k), _to_device(v), k_res.to(DEVICE),
                                       v_res.to(DEVICE), sm_scale, k_sink.to(DEVICE), v_sink.to(DEVICE))
    want_out, want_lse = decode_attention_ref(q, k, v, k_res, v_res, sm_scale, k_sink, v_sink)
    assert out.shape == want_out.shape and lse.shape == want_lse.shape
    torch.testing.assert_close(out.cpu(), want_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse.cpu(), want_lse, atol=1e-4, rtol=1e-5)


# B, latent groups G, KV heads per group g, rank r, head_dim: all heads in one group, and 2 groups of 4
LOWRANK = {"smollm2": (1, 3, 144, 64), "llama3-8b": (2, 4, 384, 128)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_lowrank_rope_matches_twin(layout: Layout, dtype: torch.dtype) -> None:
    """Against the twin in the same dtype (tolerances as tests/test_lowrank_rope.py), and no further than
    ``LOWRANK_ERR`` from the twin run in float64."""
    if SMOKE and dtype == torch.bfloat16:
        pytest.skip("the interpreter's bfloat16 tl.dot is broken")
    groups, g, rank, d = LOWRANK[layout.name]
    args = lowrank_inputs(BATCH, groups, g, TOKENS, rank, d, 1, True, "contiguous", dtype,
                          seed=_seed(layout, dtype))
    got = lowrank_rope_triton(*(a.to(DEVICE) if torch.is_tensor(a) else a for a in args)).cpu()
    want = lowrank_rope_ref(*args)
    exact = lowrank_rope_ref(*(a.double() if torch.is_tensor(a) else a for a in args))
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.isfinite(got).all()
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, atol=LOWRANK_TOL[dtype] * scale, rtol=LOWRANK_TOL[dtype])
    assert (torch.linalg.norm(got.double() - exact) / torch.linalg.norm(exact)).item() <= LOWRANK_ERR[dtype]


@pytest.mark.skipif(not COMPILED, reason="dispatch picks the torch twins on CPU tensors")
def test_dispatch_picks_triton_on_cuda() -> None:
    """The public entry points run the same Triton kernels as the ``*_triton`` functions on CUDA tensors."""
    layout, dtype = LAYOUTS[1], torch.float16
    x = _randn(BATCH, layout.kv_heads, TOKENS, layout.head_dim, seed=1, dtype=dtype).to(DEVICE)
    packed = quantize_pack(x, 4, 32, "tokens")
    assert all(torch.equal(a, b) for a, b in zip(packed, quantize_pack_triton(x, 4, 32, "tokens"), strict=True))
    args = (*packed, 4, 32, "tokens", layout.head_dim, dtype)
    assert torch.equal(unpack_dequantize(*args), unpack_dequantize_triton(*args))
    q, k, v, k_res, v_res = _decode_inputs(layout, dtype, 4, 2, seed=2)
    inputs = (q.to(DEVICE), _to_device(k), _to_device(v), k_res.to(DEVICE), v_res.to(DEVICE), 0.125)
    assert all(torch.equal(a, b) for a, b in zip(decode_attention(*inputs), decode_attention_triton(*inputs),
                                                 strict=True))
    q, k, v, k_res, v_res, k_sink, v_sink = _codebook_inputs(layout, dtype, 4, 3, "kivi", seed=4)
    inputs = (q.to(DEVICE), _to_device(k), _to_device(v), k_res.to(DEVICE), v_res.to(DEVICE), 0.125,
              k_sink.to(DEVICE), v_sink.to(DEVICE))
    assert all(torch.equal(a, b) for a, b in zip(decode_attention(*inputs), decode_attention_triton(*inputs),
                                                 strict=True))
    rope = [a.to(DEVICE) if torch.is_tensor(a) else a
            for a in lowrank_inputs(1, 1, 3, TOKENS, 144, 64, 1, True, "contiguous", dtype, seed=3)]
    assert torch.equal(lowrank_rope(*rope), lowrank_rope_triton(*rope))
