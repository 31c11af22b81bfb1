"""Rotated keys from a low-rank pre-RoPE latent key cache (Palu/LoRC style): Triton kernel and torch twin.

Each latent group ``G`` stores one vector ``c[b, G, s]`` of rank ``r`` per token and serves ``g`` KV heads of
``head_dim`` ``d`` through an up-projection ``U_k[G]`` of shape ``[g·d, r]``. For every stored token ``s``:

    k = U_k[G] @ c[b, G, s] (+ bias[G])                              [g·d], split into g heads of d channels

then Hugging Face Llama's rotate-half RoPE, per head, with ``half = d / 2`` and ``i < half``:

    out[i]        = k[i] · cos[i] - k[i + half] · sin[i]
    out[i + half] = k[i + half] · cos[i] + k[i] · sin[i]

``cos`` and ``sin`` are half tables (both halves of a pair share one frequency) taken at the token's stored
position. The output is transposed per head, ``[B, G, g, d, S]``: what ``q @ k`` reads with no copy. Each
head's channels come out in *pair order*: ``out[i]`` at channel ``2i`` and ``out[i + half]`` at ``2i + 1``
(:func:`pair_order`). Scores only need the queries in the same order (``(Pq)ᵀ(Pk) = qᵀk``), and in pair
order RoPE is one complex multiply, ``(k[2i] + i·k[2i+1]) · e^{iθ}``, which the torch twin uses.

The Triton program owns one ``(b, G)``, a block of tokens, one head and a block of channel pairs ``i``: it
computes rows ``i`` and ``i + half`` together over a loop of rank chunks (so any ``r`` fits), reading each
chunk of the latent tile once for both rows, then adds the bias and rotates in registers and stores both
halves. It accumulates in float32 and writes ``latents.dtype``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import Dispatch

_REGISTER_TILE = 4096  # elements of the [rows, rank, tokens] product held by one broadcast-sum program
_DOT_MIN = 16  # smallest tl.dot block dim


def _check(latents: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor,
           sin: torch.Tensor, head_dim: int) -> int:
    """Validate shapes; return ``g``, the KV heads per latent group."""
    if latents.dim() != 4:
        raise ValueError(f"latents must be [B, G, S, r], got shape {tuple(latents.shape)}")
    b, groups, s, r = latents.shape
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be even and positive, got {head_dim}")
    if up.dim() != 3 or up.shape[0] != groups or up.shape[2] != r or up.shape[1] % head_dim:
        raise ValueError(f"up must be [G={groups}, g*{head_dim}, r={r}], got shape {tuple(up.shape)}")
    rows = up.shape[0] * up.shape[1]
    if bias is not None and bias.numel() != rows:
        raise ValueError(f"bias must have G*g*head_dim = {rows} elements, got {bias.numel()}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 4 or t.shape[0] != b or t.shape[1] not in (1, groups) or t.shape[2:] != (head_dim // 2, s):
            raise ValueError(f"{name} must be [B={b}, 1 or G={groups}, {head_dim // 2}, S={s}], "
                             f"got shape {tuple(t.shape)}")
    return up.shape[1] // head_dim


def lowrank_rope_ref(latents: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None,
                     cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Up-project latent keys and apply RoPE with vectorized torch (the CPU path).

    Parameters
    ----------
    latents
        Pre-RoPE key latents ``[B, G, S, r]``.
    up
        Up-projections ``[G, g·head_dim, r]`` (cast to ``latents.dtype``), rows in the model's rotate-half
        order.
    bias
        Key bias ``[G·g·head_dim]``, or ``None``.
    cos, sin
        Half RoPE tables ``[B, 1 or G, head_dim // 2, S]`` in any float dtype (cast to ``latents.dtype``);
        dim 1 of size 1 broadcasts over groups.
    head_dim
        Channels per KV head ``d``; must be even.

    Returns
    -------
    torch.Tensor
        Rotated keys in pair order, transposed per head: ``[B, G, g, head_dim, S]`` in ``latents.dtype``.
        This is a view of token-major memory ``[B, G, S, g, d]``: on the CPU ``c U_kᵀ`` (rows of tokens)
        runs about 1.5x faster than ``U_k cᵀ``, and BLAS reads the transposed view in ``q @ k`` with no copy.
    """
    _check(latents, up, bias, cos, sin, head_dim)
    keys = reconstruct(latents, *pair_ordered_up(up, bias, head_dim), head_dim)
    return rope_pairs(keys, cos, sin).permute(0, 1, 3, 4, 2)


def pair_order(x: torch.Tensor, head_dim: int, dim: int = -1, inverse: bool = False) -> torch.Tensor:
    """Permute each head's channels along ``dim`` from rotate-half order to RoPE pair order (or back).

    Rotate-half order pairs channel ``i`` with ``i + d/2``; pair order puts them at ``2i`` and ``2i + 1``.
    """
    x = x.movedim(dim, -1)
    split = (2, head_dim // 2) if not inverse else (head_dim // 2, 2)
    out = x.reshape(*x.shape[:-1], x.shape[-1] // head_dim, *split).transpose(-1, -2).reshape(x.shape)
    return out.movedim(-1, dim)


def pair_ordered_up(up: torch.Tensor, bias: torch.Tensor | None,
                    head_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``U_kᵀ`` ``[G, r, g·d]`` and the key bias ``[G, 1, g·d]`` from the model's rotate-half order
    (``up`` ``[G, g·d, r]``, ``bias`` ``[G·g·d]``) to pair order: what :func:`reconstruct` takes."""
    up_t = pair_order(up, head_dim, dim=1).transpose(-1, -2)
    if bias is not None:
        bias = pair_order(bias, head_dim).view(up.shape[0], 1, -1)
    return up_t, bias


def reconstruct(latents: torch.Tensor, up_t: torch.Tensor, bias: torch.Tensor | None, head_dim: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Keys before RoPE, token-major ``[B, G, S, g, d]`` in pair order: one GEMM ``c U_kᵀ`` (plus bias).

    ``up_t`` and ``bias`` come from :func:`pair_ordered_up`; ``out`` (``[B, G, S, g·d]``) takes the GEMM.
    """
    b, groups, s, _ = latents.shape
    k = torch.matmul(latents, up_t.to(latents.dtype), out=out)  # [B, G, S, r] @ [G, r, g·d]
    if bias is not None:
        k += bias.to(k.dtype)
    return k.view(b, groups, s, up_t.shape[-1] // head_dim, head_dim)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the rotate-half layout used by Hugging Face Llama-family models (the model's channel order);
    ``sin`` negated turns back."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rope_pairs(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of token-major keys in pair order, ``[B, G, S, g, d]``, by half tables ``[B, 1 or G, d/2, S]``.

    Pair ``(k[2i], k[2i+1])`` turns by the angle of channel ``i``: one complex multiply in float32/64,
    the same rotation written out in real arithmetic for 16-bit dtypes (which have no complex type).
    """
    cos = cos.to(k.dtype).transpose(-1, -2).unsqueeze(-2)  # [B, 1 or G, S, 1, d/2]
    sin = sin.to(k.dtype).transpose(-1, -2).unsqueeze(-2)
    pairs = k.view(*k.shape[:-1], k.shape[-1] // 2, 2)
    if k.dtype in (torch.float32, torch.float64):
        return torch.view_as_real(torch.view_as_complex(pairs) * torch.complex(cos, sin)).view(k.shape)
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).view(k.shape)


@triton.jit
def _lowrank_rope_kernel(
    c_ptr, u_ptr, bias_ptr, cos_ptr, sin_ptr, out_ptr,
    stride_cb, stride_cg, stride_cs, stride_cr,
    stride_ug, stride_uo, stride_ur,
    stride_tb, stride_tg, stride_ti, stride_ts,  # cos
    stride_nb, stride_ng, stride_ni, stride_ns,  # sin
    G, S, R, HEADS, HALF, N_IBLOCKS,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr,
):
    s_block = tl.program_id(0)
    bg = tl.program_id(1).to(tl.int64)  # b * G + group
    head = tl.program_id(2) // N_IBLOCKS
    b = bg // G
    grp = bg % G
    s = s_block * BLOCK_S + tl.arange(0, BLOCK_S)
    i = (tl.program_id(2) % N_IBLOCKS) * BLOCK_I + tl.arange(0, BLOCK_I)  # channel pairs (i, i + half)
    s_mask = s < S
    i_mask = i < HALF
    row1 = head * 2 * HALF + i  # rows of U_k[grp]: first and second half of this head
    row2 = row1 + HALF
    c_base = c_ptr + b * stride_cb + grp * stride_cg
    u_base = u_ptr + grp * stride_ug
    c_dtype = c_ptr.dtype.element_ty

    acc1 = tl.zeros((BLOCK_I, BLOCK_S), tl.float32)
    acc2 = tl.zeros((BLOCK_I, BLOCK_S), tl.float32)
    for r0 in range(0, R, BLOCK_R):
        k = r0 + tl.arange(0, BLOCK_R)
        k_mask = k < R
        ct = tl.load(c_base + k[:, None] * stride_cr + s[None, :] * stride_cs,  # latent tile, transposed
                     mask=k_mask[:, None] & s_mask[None, :], other=0.0)
        u_mask = i_mask[:, None] & k_mask[None, :]
        u1 = tl.load(u_base + row1[:, None] * stride_uo + k[None, :] * stride_ur, mask=u_mask, other=0.0)
        u2 = tl.load(u_base + row2[:, None] * stride_uo + k[None, :] * stride_ur, mask=u_mask, other=0.0)
        u1, u2 = u1.to(c_dtype), u2.to(c_dtype)  # the reference multiplies in latents.dtype
        if USE_DOT:
            acc1 = tl.dot(u1, ct, acc1, input_precision=DOT_PRECISION)
            acc2 = tl.dot(u2, ct, acc2, input_precision=DOT_PRECISION)
        else:
            ctf = ct.to(tl.float32)[None, :, :]
            acc1 += tl.sum(u1.to(tl.float32)[:, :, None] * ctf, axis=1)
            acc2 += tl.sum(u2.to(tl.float32)[:, :, None] * ctf, axis=1)

    if HAS_BIAS:
        bias_base = bias_ptr + grp * HEADS * 2 * HALF
        acc1 += tl.load(bias_base + row1, mask=i_mask, other=0.0).to(c_dtype).to(tl.float32)[:, None]
        acc2 += tl.load(bias_base + row2, mask=i_mask, other=0.0).to(c_dtype).to(tl.float32)[:, None]

    mask = i_mask[:, None] & s_mask[None, :]
    cos = tl.load(cos_ptr + b * stride_tb + grp * stride_tg + i[:, None] * stride_ti + s[None, :] * stride_ts,
                  mask=mask, other=0.0).to(c_dtype).to(tl.float32)  # tables rounded like the reference's
    sin = tl.load(sin_ptr + b * stride_nb + grp * stride_ng + i[:, None] * stride_ni + s[None, :] * stride_ns,
                  mask=mask, other=0.0).to(c_dtype).to(tl.float32)
    out1 = acc1 * cos - acc2 * sin
    out2 = acc2 * cos + acc1 * sin

    out_base = out_ptr + (bg * HEADS + head) * 2 * HALF * S  # out is contiguous [B, G, g, d, S]
    out_dtype = out_ptr.dtype.element_ty  # pair order: channel i at row 2i, channel i + half at 2i + 1
    tl.store(out_base + (2 * i)[:, None] * S + s[None, :], out1.to(out_dtype), mask=mask)
    tl.store(out_base + (2 * i + 1)[:, None] * S + s[None, :], out2.to(out_dtype), mask=mask)


def _table_strides(t: torch.Tensor) -> tuple[int, ...]:
    """Strides of a ``[B, 1 or G, d/2, S]`` table, 0 along the broadcast group dim."""
    sb, sg, si, ss = t.stride()
    return sb, (0 if t.shape[1] == 1 else sg), si, ss


def lowrank_rope_triton(latents: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None,
                        cos: torch.Tensor, sin: torch.Tensor, head_dim: int, *,
                        use_dot: bool | None = None) -> torch.Tensor:
    """Triton twin of :func:`lowrank_rope_ref` (same arguments, same output).

    Strided ``latents``, ``up``, ``cos`` and ``sin`` are read in place. ``use_dot`` forces the ``tl.dot``
    (tensor core) or the broadcast-multiply-sum path; by default ``tl.dot`` is used when a head has at
    least ``16`` channel pairs and the broadcast sum otherwise.
    """
    g = _check(latents, up, bias, cos, sin, head_dim)
    b, groups, s, r = latents.shape
    half = head_dim // 2
    out = latents.new_empty((b, groups, g, head_dim, s))
    if out.numel() == 0:
        return out
    if use_dot is None:
        use_dot = half >= _DOT_MIN
    if use_dot:
        block_i = min(64, max(_DOT_MIN, triton.next_power_of_2(half)))
        block_s = 64
        block_r = min(64, max(_DOT_MIN, triton.next_power_of_2(r)))
    else:
        block_i = min(16, triton.next_power_of_2(half))
        block_s = min(32, triton.next_power_of_2(s))
        block_r = max(1, min(triton.next_power_of_2(r), _REGISTER_TILE // (block_i * block_s)))
    n_iblocks = triton.cdiv(half, block_i)
    bias_arg = bias.contiguous() if bias is not None else out  # dummy pointer, never read without bias
    grid = (triton.cdiv(s, block_s), b * groups, g * n_iblocks)
    _lowrank_rope_kernel[grid](
        latents, up, bias_arg, cos, sin, out,
        *latents.stride(), *up.stride(), *_table_strides(cos), *_table_strides(sin),
        groups, s, r, g, half, n_iblocks,
        HAS_BIAS=bias is not None, USE_DOT=use_dot,
        DOT_PRECISION="ieee" if latents.dtype in (torch.float32, torch.float64) else None,  # no tf32
        BLOCK_S=block_s, BLOCK_I=block_i, BLOCK_R=block_r,
    )
    return out


lowrank_rope = Dispatch(lowrank_rope_triton, lowrank_rope_ref, "Rotated keys from latent keys.")
