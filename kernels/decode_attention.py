"""Decode attention (one query token per sequence) over a quantized cache plus a float residual window.

The Triton path is split over the sequence (flash-decoding): each program takes one KV head, all of its
``n_rep`` query heads (GQA) and a chunk of tokens, dequantizes the packed keys and values in registers and
runs an online softmax; a second kernel merges the partial ``(max, sum, acc)`` of all chunks. The
quantized tokens come first in the sequence, then the residual window; the result does not depend on the
order, since softmax attention is permutation invariant over keys. Keys and values may have any code width
1–8 and any head dim: :func:`~.pack.load_dequant` dequantizes a packed row in the slots of its widest
piece's bytes (bit planes for min–max codes, runs of consecutive channels for table codes), gathering the
narrower pieces into the same slots, and the queries are loaded in that channel order.

Either stream may be min–max codes (:class:`~.pack.Packed`, KIVI) or codes that index a table of levels
(:class:`~.pack.TablePacked`: ``mean + scale * table[code]``, the codebook of TurboQuant, arXiv 2504.19874,
or a vector codebook whose points span ``t`` consecutive channels, indexed by their ``t`` codes); one kernel
reads all three, the choice being a compile-time switch per stream. An attention sink (StreamingLLM,
arXiv 2309.17453) is 16-bit copies of the first quantized tokens that replace their codes: the kernel skips
those codes and attends over the copies as one more dense segment, beside the residual window.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .dispatch import Dispatch
from .pack import Packed, TablePacked, dequantize, load_dequant, pieces, plane_channels, plane_tile, reads_tuples

_TARGET_PROGRAMS = 512  # enough chunk programs to fill a large GPU several times over
_REGISTER_TILE = 4096  # elements of the [heads, tokens, dim] product held by one program
_PARTIAL_WARPS = 8  # with the tile above: no register spills on sm_90 for head dims up to 128


Codes = Packed | TablePacked


def _check(q: torch.Tensor, k: Codes | None, v: Codes | None, k_res: torch.Tensor, v_res: torch.Tensor,
           k_sink: torch.Tensor | None, v_sink: torch.Tensor | None) -> tuple[int, int, int]:
    """Validate shapes; return ``(n_rep, Tq, S)``: query heads per KV head, quantized and sink tokens."""
    b, hq, dk = q.shape
    _, hkv, tr, _ = k_res.shape
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of KV heads {hkv}")
    if k_res.shape != (b, hkv, tr, dk) or v_res.shape[:3] != (b, hkv, tr):
        raise ValueError(f"residual shapes {tuple(k_res.shape)}, {tuple(v_res.shape)} do not match q")
    if (k is None) != (v is None):
        raise ValueError("keys and values must both be quantized or both be absent")
    if (k_sink is None) != (v_sink is None) or (k_sink is not None and k is None):
        raise ValueError("a sink needs both its keys and values, and quantized tokens for them to replace")
    if k is None or v is None:
        return hq // hkv, 0, 0
    if k.along != "tokens" or v.along != "channels":
        raise ValueError("keys must be quantized along tokens and values along channels")
    if k.codes.shape[:3] != (b, hkv, k.num_tokens) or v.codes.shape[:3] != (b, hkv, k.num_tokens):
        raise ValueError("quantized keys and values must be [B, Hkv, Tq, ...] with the same Tq")
    if k.dim != dk or v.dim != v_res.shape[-1]:
        raise ValueError("quantized and residual head dims differ")
    if k_sink is None or v_sink is None:
        return hq // hkv, k.num_tokens, 0
    s = k_sink.shape[2]
    if k_sink.shape != (b, hkv, s, dk) or v_sink.shape != (b, hkv, s, v.dim) or s > k.num_tokens:
        raise ValueError(f"sink shapes {tuple(k_sink.shape)}, {tuple(v_sink.shape)} do not match the "
                         f"{k.num_tokens} quantized tokens")
    return hq // hkv, k.num_tokens, s


def _read(p: Codes | None, sink: torch.Tensor | None, res: torch.Tensor) -> torch.Tensor:
    """Every token of one stream in float32 ``[B, H, T, D]``: the codes with the sink's copies over their
    first tokens, then the residual window."""
    if p is None:
        return res.float()
    x = dequantize(p)
    if sink is not None:
        x[..., :sink.shape[2], :] = sink
    return torch.cat([x, res.float()], dim=2)


def decode_attention_ref(q: torch.Tensor, k: Codes | None, v: Codes | None, k_res: torch.Tensor,
                         v_res: torch.Tensor, sm_scale: float, k_sink: torch.Tensor | None = None,
                         v_sink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention with dequantize + dense torch (the CPU path).

    Parameters
    ----------
    q
        Queries ``[B, Hq, Dk]`` with ``Hq = Hkv * n_rep``.
    k, v
        Quantized keys ``[B, Hkv, Tq, Dk]`` (``along="tokens"``) and values ``[B, Hkv, Tq, Dv]``
        (``along="channels"``), each min–max codes (:class:`~.pack.Packed`) or table codes
        (:class:`~.pack.TablePacked`), or both ``None``.
    k_res, v_res
        Float residual window ``[B, Hkv, Tr, Dk]`` and ``[B, Hkv, Tr, Dv]``; ``Tr`` may be 0.
    sm_scale
        Multiplier of ``q · k`` before the softmax.
    k_sink, v_sink
        Optional float copies ``[B, Hkv, S, Dk]`` and ``[B, Hkv, S, Dv]`` of the first ``S <= Tq`` quantized
        tokens (the attention sink): they are attended instead of those tokens' codes.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        ``out`` float32 ``[B, Hq, Dv]`` and the natural-log ``lse`` float32 ``[B, Hq]`` of the scaled
        scores (``-inf`` with ``out == 0`` when there are no tokens).
    """
    n_rep, _, _ = _check(q, k, v, k_res, v_res, k_sink, v_sink)
    b, hq, dk = q.shape
    keys, values = _read(k, k_sink, k_res), _read(v, v_sink, v_res)
    scores = torch.matmul(q.float().reshape(b, hq // n_rep, n_rep, dk), keys.transpose(-1, -2)) * sm_scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]), values)
    return out.reshape(b, hq, -1), lse.reshape(b, hq)


@triton.jit
def _load_query(q_ptr, bh, qk_scale, N_REP, DK, cols, col_mask, BLOCK_R: tl.constexpr):
    """Scaled queries of one KV head's ``N_REP`` heads, ``[BLOCK_R, len(cols)]``, channels ``cols``."""
    r = tl.arange(0, BLOCK_R)
    mask = (r < N_REP)[:, None] & col_mask[None, :]
    q = tl.load(q_ptr + (bh * N_REP + r)[:, None] * DK + cols[None, :], mask=mask, other=0.0)
    return q.to(tl.float32) * qk_scale


@triton.jit
def _attend(q, k, v, valid, m_i, l_i, acc):
    """Online-softmax step (base 2) of scaled queries ``[R, Dk]`` over a tile ``k [N, Dk]``, ``v [N, Dv]``."""
    s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
    return m_new, l_i, acc


@triton.jit
def _store_partial(m_ptr, l_ptr, acc_ptr, bh, split, n_split, m_i, l_i, acc, N_REP, DV, cols, col_mask,
                   BLOCK_R: tl.constexpr):
    """Store one split's ``(max, sum, acc)``; column ``i`` of ``acc`` is value channel ``cols[i]``."""
    r = tl.arange(0, BLOCK_R)
    slot = (bh * N_REP + r) * n_split + split
    tl.store(m_ptr + slot, m_i, mask=r < N_REP)
    tl.store(l_ptr + slot, l_i, mask=r < N_REP)
    tl.store(acc_ptr + slot[:, None] * DV + cols[None, :], acc, mask=(r < N_REP)[:, None] & col_mask[None, :])


@triton.jit
def _plane_columns(D, PER: tl.constexpr, BLOCK_B: tl.constexpr, RUNS: tl.constexpr):
    """Channels (and validity) of a dequantized packed row flattened from ``[BLOCK_B, PER]`` slots."""
    cols, valid = plane_channels(D, PER, BLOCK_B, RUNS)
    return tl.reshape(cols, (BLOCK_B * PER,)), tl.reshape(valid, (BLOCK_B * PER,))


@triton.jit
def _quantized_partial_kernel(
    q_ptr, kc_ptr, ks_ptr, kb_ptr, kt_ptr, vc_ptr, vs_ptr, vb_ptr, vt_ptr, m_ptr, l_ptr, acc_ptr,
    T, skip, split_size, n_split, qk_scale, N_REP, DK, DV, K_GROUP, V_GROUP,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_PER: tl.constexpr, V_PER: tl.constexpr,
    K_TABLE: tl.constexpr, V_TABLE: tl.constexpr, K_BASE: tl.constexpr, V_BASE: tl.constexpr,
    K_TUPLE: tl.constexpr, V_TUPLE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, BLOCK_VB: tl.constexpr,
):
    """Splits of the quantized tokens ``skip .. T - 1`` of one KV head (the first ``skip`` are the sink's)."""
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    k_cols, k_valid = _plane_columns(DK, K_PER, BLOCK_KB, K_TABLE)  # min-max rows come out in bit-plane order
    v_cols, v_valid = _plane_columns(DV, V_PER, BLOCK_VB, V_TABLE)
    q = _load_query(q_ptr, bh, qk_scale, N_REP, DK, k_cols, k_valid, BLOCK_R)
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_VB * V_PER), tl.float32)
    lo = skip + split * split_size
    hi = tl.minimum(lo + split_size, T)
    for start in range(lo, hi, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        valid = t < hi
        rows = bh * T + t
        k = load_dequant(kc_ptr, ks_ptr, kb_ptr, kt_ptr, rows, valid, DK, K_GROUP, 1, K_BITS, K_PER, BLOCK_KB,
                         K_TABLE, K_BASE, K_TUPLE)
        v = load_dequant(vc_ptr, vs_ptr, vb_ptr, vt_ptr, rows, valid, DV, 1, V_GROUP, V_BITS, V_PER, BLOCK_VB,
                         V_TABLE, V_BASE, V_TUPLE)
        k = tl.reshape(k, (BLOCK_N, BLOCK_KB * K_PER))
        v = tl.reshape(v, (BLOCK_N, BLOCK_VB * V_PER))
        m_i, l_i, acc = _attend(q, k, v, valid, m_i, l_i, acc)
    _store_partial(m_ptr, l_ptr, acc_ptr, bh, split, n_split, m_i, l_i, acc, N_REP, DV, v_cols, v_valid, BLOCK_R)


@triton.jit
def _dense_partial_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, l_ptr, acc_ptr,
    stride_kb, stride_kh, stride_kt, stride_kd, stride_vb, stride_vh, stride_vt, stride_vd,
    H_KV, T, split_size, split_offset, n_split, qk_scale, N_REP, DK, DV,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    ck = tl.arange(0, BLOCK_DK)
    cv = tl.arange(0, BLOCK_DV)
    q = _load_query(q_ptr, bh, qk_scale, N_REP, DK, ck, ck < DK, BLOCK_R)
    k_base = k_ptr + (bh // H_KV) * stride_kb + (bh % H_KV) * stride_kh
    v_base = v_ptr + (bh // H_KV) * stride_vb + (bh % H_KV) * stride_vh
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_DV), tl.float32)
    lo = split * split_size
    hi = tl.minimum(lo + split_size, T)
    for start in range(lo, hi, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        valid = t < hi
        k = tl.load(k_base + t[:, None] * stride_kt + ck[None, :] * stride_kd,
                    mask=valid[:, None] & (ck < DK)[None, :], other=0.0).to(tl.float32)
        v = tl.load(v_base + t[:, None] * stride_vt + cv[None, :] * stride_vd,
                    mask=valid[:, None] & (cv < DV)[None, :], other=0.0).to(tl.float32)
        m_i, l_i, acc = _attend(q, k, v, valid, m_i, l_i, acc)
    _store_partial(m_ptr, l_ptr, acc_ptr, bh, split_offset + split, n_split, m_i, l_i, acc, N_REP, DV,
                   cv, cv < DV, BLOCK_R)


@triton.jit
def _merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, lse_ptr, n_split, DV,
                  BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    c = tl.arange(0, BLOCK_DV)
    s_mask = s < n_split
    m = tl.load(m_ptr + row * n_split + s, mask=s_mask, other=float("-inf"))
    l = tl.load(l_ptr + row * n_split + s, mask=s_mask, other=0.0)
    acc = tl.load(acc_ptr + (row * n_split + s)[:, None] * DV + c[None, :],
                  mask=s_mask[:, None] & (c < DV)[None, :], other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - m_max)
    total = tl.sum(w * l, axis=0)
    tl.store(out_ptr + row * DV + c, tl.sum(w[:, None] * acc, axis=0) / total, mask=c < DV)
    tl.store(lse_ptr + row, (m_max + tl.log2(total)) * 0.6931471805599453)


def _operands(p: Codes) -> tuple[torch.Tensor | int | None, ...]:
    """Codes, scale, base (minimum or mean, or None) and table (or None) of one stream as the kernel reads
    them (contiguous), and the channels per point of the table (1 for a scalar codebook or none)."""
    base, table = (p.mean, p.table.float()) if isinstance(p, TablePacked) else (p.minimum, None)
    t = 1 if table is None or table.dim() == 1 else table.shape[1]
    if isinstance(p, TablePacked) and p.joint:
        raise ValueError(f"the Triton decode kernel reads codes of integer widths, not {p.bits}-bit points (one code "
                         f"per point; read them with decode_attention_ref)")
    if t > 1 and not reads_tuples(p.bits, t):
        raise ValueError(f"the Triton decode kernel reads points of a power of two channels, not {t} "
                         f"(read them with decode_attention_ref)")
    return *(None if x is None else x.contiguous() for x in (p.codes, p.scale, base, table)), t


def decode_attention_triton(q: torch.Tensor, k: Codes | None, v: Codes | None, k_res: torch.Tensor,
                            v_res: torch.Tensor, sm_scale: float, k_sink: torch.Tensor | None = None,
                            v_sink: torch.Tensor | None = None, *,
                            split_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`decode_attention_ref` (same arguments, same outputs).

    ``split_size`` (tokens per program) overrides the heuristic, which aims at about
    ``_TARGET_PROGRAMS`` programs and whole tiles of tokens.
    """
    n_rep, tq, n_sink = _check(q, k, v, k_res, v_res, k_sink, v_sink)
    b, hq, dk = q.shape
    hkv, tr, dv = k_res.shape[1], k_res.shape[2], v_res.shape[-1]
    out = q.new_zeros((b, hq, dv), dtype=torch.float32)
    lse = q.new_full((b, hq), -math.inf, dtype=torch.float32)
    if tq + tr == 0 or out.numel() == 0:
        return out, lse
    block_r = triton.next_power_of_2(n_rep)
    block_dk, block_dv = triton.next_power_of_2(dk), triton.next_power_of_2(dv)
    block_n = max(8, min(32, _REGISTER_TILE // (block_r * max(block_dk, block_dv))))
    if split_size is None:
        per_head = triton.cdiv(tq + tr, max(1, _TARGET_PROGRAMS // (b * hkv)))
        split_size = block_n * triton.cdiv(per_head, block_n)
    dense = [(kd, vd) for kd, vd in ((k_sink, v_sink), (k_res, v_res)) if kd is not None and kd.shape[2]]
    n_quant = triton.cdiv(tq - n_sink, split_size)
    n_split = n_quant + sum(triton.cdiv(kd.shape[2], split_size) for kd, _ in dense)
    m = q.new_empty((b * hq, n_split), dtype=torch.float32)
    l = torch.empty_like(m)
    acc = q.new_empty((b * hq, n_split, dv), dtype=torch.float32)
    q = q.contiguous()
    qk_scale = sm_scale * math.log2(math.e)
    if n_quant:
        kc, ks, kb, kt, k_tuple = _operands(k)
        vc, vs, vb, vt, v_tuple = _operands(v)
        k_per, block_kb = plane_tile(dk, pieces(k.bits)[0])  # packed rows dequantize in the widest piece's planes
        v_per, block_vb = plane_tile(dv, pieces(v.bits)[0])
        _quantized_partial_kernel[(b * hkv, n_quant)](
            q, kc, ks, kb, kt, vc, vs, vb, vt, m, l, acc,
            tq, n_sink, split_size, n_split, qk_scale, n_rep, dk, dv, k.group_size, v.group_size,
            K_BITS=k.bits, V_BITS=v.bits, K_PER=k_per, V_PER=v_per,
            K_TABLE=kt is not None, V_TABLE=vt is not None, K_BASE=kb is not None, V_BASE=vb is not None,
            K_TUPLE=k_tuple, V_TUPLE=v_tuple,
            BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_KB=block_kb, BLOCK_VB=block_vb, num_warps=_PARTIAL_WARPS,
        )
    offset = n_quant
    for kd, vd in dense:  # the sink's copies, then the residual window: one segment of splits each
        n_dense = triton.cdiv(kd.shape[2], split_size)
        _dense_partial_kernel[(b * hkv, n_dense)](
            q, kd, vd, m, l, acc, *kd.stride(), *vd.stride(),
            hkv, kd.shape[2], split_size, offset, n_split, qk_scale, n_rep, dk, dv,
            BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_DK=block_dk, BLOCK_DV=block_dv, num_warps=_PARTIAL_WARPS,
        )
        offset += n_dense
    _merge_kernel[(b * hq,)](m, l, acc, out, lse, n_split, dv,
                             BLOCK_S=triton.next_power_of_2(n_split), BLOCK_DV=block_dv)
    return out, lse


decode_attention = Dispatch(decode_attention_triton, decode_attention_ref,
                            "Decode attention over quantized (min–max or table) codes, a sink and residual tokens.")
