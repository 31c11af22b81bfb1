"""Low-rank key reconstruction + RoPE: Triton kernel (interpreter on CPU) against its torch twin, and the
torch twin against a plain per-head Hugging Face style computation."""

import os

# The interpreter must be on before triton is imported: kernels are bound to a backend when defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

import types

import pytest
import torch

pytest.importorskip("triton")

from kvcompress.kernels import lowrank_rope as module
from kvcompress.kernels.lowrank_rope import lowrank_rope, lowrank_rope_ref, lowrank_rope_triton, pair_order

CASES = [
    # B, G, g, S, r, head_dim, table groups (1 or G), bias, latents layout
    (1, 1, 1, 1, 8, 8, 1, False, "contiguous"),
    (2, 2, 3, 7, 12, 16, 2, True, "transposed"),
    (1, 2, 1, 33, 24, 48, 1, True, "sliced"),
    (2, 1, 2, 33, 8, 48, 1, False, "contiguous"),
    (1, 2, 3, 7, 24, 8, 2, False, "sliced"),
    (2, 2, 1, 1, 12, 48, 2, True, "contiguous"),
    (1, 1, 3, 33, 12, 16, 1, True, "sliced"),
    (1, 3, 4, 7, 12, 80, 3, True, "contiguous"),  # G=3, g=4, half=40: partial channel-pair block
    (1, 2, 1, 70, 100, 48, 2, True, "transposed"),  # several token blocks and rank chunks
    (1, 1, 2, 5, 8, 160, 1, False, "contiguous"),  # several channel-pair blocks per head on both paths
]


def _inputs(b: int, groups: int, g: int, s: int, r: int, d: int, table_groups: int, with_bias: bool,
            layout: str, dtype: torch.dtype, seed: int = 0) -> tuple:
    """Latents in ``layout``, up-projections, bias, and strided half RoPE tables of real angles."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "transposed":  # [B, S, G, r] viewed as [B, G, S, r]
        latents = torch.randn(b, s, groups, r, generator=gen).to(dtype).transpose(1, 2)
    elif layout == "sliced":  # rank is a slice of a wider buffer
        latents = torch.randn(b, groups, s, r + 5, generator=gen).to(dtype)[..., 2 : r + 2]
    else:
        latents = torch.randn(b, groups, s, r, generator=gen).to(dtype)
    assert latents.is_contiguous() == (layout == "contiguous")
    up = (torch.randn(groups, g * d, r, generator=gen) / r**0.5).to(dtype)
    bias = torch.randn(groups * g * d, generator=gen).to(dtype) if with_bias else None
    positions = torch.randint(0, 4096, (b, table_groups, s), generator=gen).float()
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2).float() / d)
    angles = positions[..., None] * inv_freq  # [B, 1 or G, S, d/2]
    cos, sin = angles.cos().transpose(-1, -2), angles.sin().transpose(-1, -2)  # strided [B, 1 or G, d/2, S]
    return latents, up, bias, cos, sin, d


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _straightforward(latents: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor,
                     sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per (b, group, head) in float64: ``k = U c + bias`` as ``[S, d]``, then HF ``apply_rotary_pos_emb``,
    channels in pair order: ``i`` at ``2i``, ``i + d/2`` at ``2i + 1``."""
    b, groups, s, _ = latents.shape
    g = up.shape[1] // head_dim
    out = torch.empty(b, groups, g, head_dim, s, dtype=torch.float64)
    for bi in range(b):
        for gi in range(groups):
            tg = gi if cos.shape[1] > 1 else 0
            cos_full = torch.cat([cos[bi, tg], cos[bi, tg]]).T.double()  # [S, d]
            sin_full = torch.cat([sin[bi, tg], sin[bi, tg]]).T.double()
            for h in range(g):
                rows = slice(h * head_dim, (h + 1) * head_dim)
                k = latents[bi, gi].double() @ up[gi, rows].double().T  # [S, d]
                if bias is not None:
                    k = k + bias.view(groups, g * head_dim)[gi, rows].double()
                rotated = k * cos_full + _rotate_half(k) * sin_full
                half = head_dim // 2
                out[bi, gi, h, 0::2], out[bi, gi, h, 1::2] = rotated[:, :half].T, rotated[:, half:].T
    return out


def _tolerance(want: torch.Tensor, dtype: torch.dtype) -> dict:
    scale = want.abs().max().item()
    if dtype == torch.float32:
        return {"atol": 1e-5 * scale, "rtol": 1e-5}
    return {"atol": 5e-3 * scale, "rtol": 5e-3}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("use_dot", [False, True], ids=["broadcast", "dot"])
def test_triton_matches_ref(case: tuple, dtype: torch.dtype, use_dot: bool) -> None:
    args = _inputs(*case, dtype=dtype)
    got = lowrank_rope_triton(*args, use_dot=use_dot)
    want = lowrank_rope_ref(*args)
    b, groups, g, s, _, d, *_ = case
    assert got.shape == want.shape == (b, groups, g, d, s)
    assert got.dtype == want.dtype == dtype
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, **_tolerance(want, dtype))


@pytest.mark.parametrize("use_dot", [False, True], ids=["broadcast", "dot"])
def test_triton_matches_ref_mixed_dtypes(use_dot: bool) -> None:
    """float16 latents with float32 weights, float64 bias and float32 tables: all cast like the reference."""
    latents, up, bias, cos, sin, d = _inputs(*CASES[2], dtype=torch.float16)
    args = (latents, up.float() * 1.001, bias.double() + 0.001, cos, sin, d)
    got, want = lowrank_rope_triton(*args, use_dot=use_dot), lowrank_rope_ref(*args)
    assert got.dtype == want.dtype == torch.float16
    torch.testing.assert_close(got, want, **_tolerance(want, torch.float16))


def test_triton_matches_ref_bfloat16() -> None:
    """Broadcast path only: Triton 3.9's interpreter runs tl.dot on the raw bits of bfloat16 operands."""
    args = _inputs(*CASES[2], dtype=torch.bfloat16)
    got, want = lowrank_rope_triton(*args, use_dot=False), lowrank_rope_ref(*args)
    assert got.dtype == torch.bfloat16
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, atol=3e-2 * scale, rtol=3e-2)


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[7]])
def test_triton_default_path_matches_ref(case: tuple) -> None:
    args = _inputs(*case, dtype=torch.float32, seed=3)
    want = lowrank_rope_ref(*args)
    torch.testing.assert_close(lowrank_rope_triton(*args), want, **_tolerance(want, torch.float32))


@pytest.mark.parametrize("case", CASES)
def test_ref_matches_straightforward(case: tuple) -> None:
    args = _inputs(*case, dtype=torch.float32, seed=1)
    want = _straightforward(*args)
    got = lowrank_rope_ref(*args)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)


def test_ref_matches_straightforward_in_float64() -> None:
    """Tight check with no float32 rounding in the way: any mixed-up channel or head would show."""
    args = _inputs(*CASES[7], dtype=torch.float64, seed=2)
    torch.testing.assert_close(lowrank_rope_ref(*args), _straightforward(*args), atol=1e-12, rtol=1e-12)


def test_rope_is_applied() -> None:
    """Sanity of the inputs themselves: non-trivial angles change the keys, zero angles leave them alone."""
    latents, up, bias, cos, sin, d = _inputs(*CASES[1], dtype=torch.float32)
    rotated = lowrank_rope_ref(latents, up, bias, cos, sin, d)
    plain = lowrank_rope_ref(latents, up, bias, torch.ones_like(cos), torch.zeros_like(sin), d)
    assert not torch.allclose(rotated, plain, atol=1e-3)
    b, groups, s, _ = latents.shape
    keys = (latents @ up.transpose(-1, -2) + bias.view(groups, 1, -1)).transpose(-1, -2)  # [B, G, g·d, S]
    torch.testing.assert_close(pair_order(plain, d, dim=-2, inverse=True), keys.reshape(b, groups, -1, d, s))


def test_pair_order_round_trip_and_scores() -> None:
    """Pair order interleaves the halves of each head; permuting queries alike keeps every score."""
    x = torch.arange(2 * 8).view(1, 16)  # two heads of d = 8
    paired = pair_order(x, 8)
    assert paired[0, :8].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert torch.equal(pair_order(paired, 8, inverse=True), x)
    q, k = torch.randn(3, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(pair_order(q, 8) @ pair_order(k, 8).T, q @ k.T)


def test_dispatch_uses_ref_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    args = _inputs(*CASES[2], dtype=torch.float32)
    want = lowrank_rope_ref(*args)
    forced = lowrank_rope_triton(*args)

    def fail(*_args, **_kwargs):
        raise AssertionError("the Triton kernel must not run on CPU tensors")

    monkeypatch.setattr(module.lowrank_rope, "triton", fail)
    got = lowrank_rope(*args)
    assert torch.equal(got, want)
    torch.testing.assert_close(forced, got, **_tolerance(want, torch.float32))


def test_dispatch_uses_triton_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(module.lowrank_rope, "triton", lambda *a: calls.append("triton") or "t")
    monkeypatch.setattr(module.lowrank_rope, "torch", lambda *a: calls.append("ref") or "r")
    assert lowrank_rope(types.SimpleNamespace(is_cuda=True), None, None, None, None, 8) == "t"
    assert lowrank_rope(types.SimpleNamespace(is_cuda=False), None, None, None, None, 8) == "r"
    assert calls == ["triton", "ref"]


def test_empty_tokens() -> None:
    latents, up, bias, cos, sin, d = _inputs(1, 2, 3, 0, 8, 16, 2, True, "contiguous", torch.float32)
    for fn in (lowrank_rope_ref, lowrank_rope_triton):
        assert fn(latents, up, bias, cos, sin, d).shape == (1, 2, 3, 16, 0)


@pytest.mark.parametrize("fn", [lowrank_rope_ref, lowrank_rope_triton])
def test_rejects_bad_shapes(fn) -> None:
    latents, up, bias, cos, sin, d = _inputs(*CASES[1], dtype=torch.float32)
    with pytest.raises(ValueError, match="head_dim"):
        fn(latents, up, bias, cos, sin, 15)
    with pytest.raises(ValueError, match="up must be"):
        fn(latents, up[:, :, :-1], bias, cos, sin, d)
    with pytest.raises(ValueError, match="bias"):
        fn(latents, up, bias[:-1], cos, sin, d)
    with pytest.raises(ValueError, match="cos"):
        fn(latents, up, bias, cos[..., :-1], sin, d)
    with pytest.raises(ValueError, match="sin"):
        fn(latents, up, bias, cos, sin[:, :1].expand(-1, 3, -1, -1), d)
