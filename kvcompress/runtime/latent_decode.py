"""One-token decode attention over a latent cache on the CPU, in reused workspace.

Per layer and step, with ``S`` stored tokens and ``G`` latent groups of ``g`` KV heads (``rep`` query heads
each):

1. the cache layer de-quantizes its key and value stores into workspace buffers, ``[B, G, S, r_k]`` and
   ``[B, G, S, r_v]`` (layout ``"workspace"`` of ``kvcompress.runtime.cache.KVCompressLayer.step``);
2. pre-RoPE latent keys become keys by one GEMM, ``K = c_k U_kᵀ (+ b_k)``, with ``U_k``'s rows in RoPE
   pair order, and turn in place by one complex multiply with ``e^{i n θ}`` at each stored position ``n``
   (``kvcompress.kernels.lowrank_rope`` has the math). Post-RoPE keys are read as stored;
3. the scores of all ``g·rep`` query heads of a group come from one GEMM ``Q Kᵀ``, where ``Q`` is
   block-diagonal ``[g·rep, g·d]``: head ``j``'s ``rep`` queries meet only head ``j``'s channels. That
   multiplies ``g`` times more zeros than per-head products, but it is one GEMM over contiguous keys
   instead of ``g`` strided ones, and with the tokens as its long output dim it runs about 3x faster
   than ``K Qᵀ`` on MKL;
4. softmax over tokens, then one GEMM ``P c_v`` gives the attention-weighted value latents (LoRC: ``U_v``
   comes after, in ``o_proj``). Where the layer predicts its values from its keys, ``c_v`` holds residuals
   and the prediction's weighted sum is added once, ``A [P k̂; P 1]``
   (``kvcompress.methods.value_prediction.ValuePredictor.attend``).

Nothing here allocates a buffer the size of the cache: on the CPU a fresh one costs a page fault per 4 KiB
on every step, which is slower than the arithmetic it holds.
"""

from __future__ import annotations

import torch

from kvcompress.kernels.lowrank_rope import reconstruct
from kvcompress.runtime.cache import DenseKV


def block_queries(q: torch.Tensor, groups: int, heads: int, scaling: float) -> torch.Tensor:
    """Queries ``[B, Hq, d]`` as block-diagonal ``[B, G, g·rep, g·d]``, scaled: row ``j·rep + i`` holds
    query head ``(G·g + j)·rep + i`` in columns ``j·d … j·d + d - 1`` and zeros elsewhere."""
    b, hq, d = q.shape
    rep = hq // (groups * heads)
    blocks = q.new_zeros(b, groups, heads, rep, heads, d)
    diagonal = blocks.diagonal(dim1=2, dim2=4)  # [B, G, rep, d, g]
    diagonal.copy_(q.view(b, groups, heads, rep, d).permute(0, 1, 3, 4, 2)).mul_(scaling)
    return blocks.view(b, groups, heads * rep, heads * d)


def latent_decode(q: torch.Tensor, held: DenseKV, scaling: float, heads: int,
                  up_t: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  phases: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one new token per sequence over everything a layer holds (the new token included).

    Parameters
    ----------
    q
        Rotated queries ``[B, Hq, d]``, float32; in RoPE pair order when keys are latents (``up_t``).
    held
        The layer's tokens read in layout ``"workspace"``: latents ``[B, G, S, r_k]`` (or rotated keys
        ``[B, G, S, g·d]``), value latents ``[B, G, S, r_v]``, padding flags, and the workspace that takes
        the rotated keys.
    scaling
        Multiplier of ``q · k``.
    heads
        ``g``, KV heads per latent group.
    up_t
        ``U_kᵀ`` per group, ``[G, r_k, g·d]`` with columns in pair order
        (``kvcompress.kernels.lowrank_rope.pair_ordered_up``); None when keys are stored rotated.
    bias
        Key bias ``[G, 1, g·d]`` in pair order, or None.
    phases
        ``e^{i n θ}`` of each stored token, complex ``[B, 1 or G, S, d/2]`` (with ``up_t``).

    Returns
    -------
    torch.Tensor
        ``[B, Hq, r_v]`` attention-weighted value latents.
    """
    b, hq, d = q.shape
    k, valid = held.keys, held.valid
    if up_t is not None:
        out = held.workspace.take("rotated keys", (*k.shape[:-1], up_t.shape[-1]), q.dtype, q.device)
        pairs = reconstruct(k, up_t, bias, d, out=out).view(*out.shape[:-1], heads, d // 2, 2)
        torch.view_as_complex(pairs).mul_(phases.unsqueeze(-2))
        k = out
    groups = k.shape[1]
    scores = block_queries(q, groups, heads, scaling) @ k.transpose(-1, -2)  # [B, G, g·rep, S]
    if valid is not None:
        scores.masked_fill_(~valid.unsqueeze(-2), float("-inf"))
    probs = scores.softmax(dim=-1)
    out = probs @ held.values
    if held.prediction is not None:  # values predicted from the keys: their weighted sum, added once
        out += held.prediction.attend(probs, held.keys)
    return out.view(b, hq, held.values.shape[-1])
