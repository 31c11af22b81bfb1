"""Post-RoPE keys in the principal axes of the queries, with bits per segment of those axes.

A key's quantization error ``e`` reaches attention only through the logit ``qᵀe``. With per-channel codes
(KIVI's key groups) in an orthonormal basis ``B``, channel ``j``'s error has variance about
``c_j = (Bᵀ C_k B)_jj`` times ``4^-b_j`` (``C_k``: the keys' covariance inside a quantization group), so the
logit error is::

    E[(qᵀe)²] ≈ Σ_j  w_j · 4^-b_j,      w_j = (Bᵀ C_q B)_jj · (Bᵀ C_k B)_jj

(``C_q``: the queries' second moment). A random rotation (QuaRot) makes every ``w_j`` about
``tr C_q · tr C_k / d²``; bits spent evenly are then as good as any spending. In the principal axes of
the queries (the eigenvectors of ``C_q``) the ``w_j`` spread over orders of magnitude, and reverse
water-filling (Huang & Schultheiss 1963, the transform-coding bit allocation; Gersho & Gray,
*Vector Quantization and Signal Compression*, §8.4) spends the same bits for less error: ``b_j = b̄ +
½·log₂(w_j / GM(w))``, saving ``½·log₂(AM(w)/GM(w))`` bits per value. On SmolLM2's post-RoPE keys this
saving is 0.5–1.4 bits per layer by the formula (the queries' axes beat the keys' own, measured on
calibration text); through the cache, 3.5 bits on average in these axes hold what uniform 4-bit codes
in a random rotation hold (README, Measured).

Every orthonormal ``B`` keeps ``qᵀk = (Bᵀq)ᵀ(Bᵀk)``, and attention already turns queries and keys after
RoPE by one matrix per KV head (``k_rot``, :mod:`kvcompress.methods.rotation`): the axes replace the
random matrix there, so attention reads nothing new. The axes come from
calibration text (:func:`kvcompress.analysis.calibration.layer_statistics`), sorted by ``w_j``, so that
the first segments carry the most weight. They must be measured at the positions the cache will hold:
RoPE turns each channel pair by ``θ_i·p``, so the post-RoPE moments of 256-token sequences miss what the
slow pairs do at position 2000. ``codebook-4.5x`` calibrates on 2048-token sequences of the built-in
text (six of them, 12,288 tokens); on four unseen WikiText-2 slices that took the perplexity increase
from ×1.016 to ×1.010 on average (README, Measured).

``analyze`` spreads each layer's key bits (``key_bits``, or what the stream allocation gave the layer)
over segments of the axes (:func:`segment_bits`), and the cache holds each run of equal bits as one
store of the key quantizer (:class:`kvcompress.methods.channels.SegmentedStore`).
Bytes: those of the runs, the same as one stream at the mean width (per-channel groups cost per channel).
A layer whose keys hold runs of several widths is read run by run, on CUDA through the dense read rather
than the fused decode kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.methods.channels import segment_widths
from kvcompress.methods.minikv import allocate_bits


@dataclass
class KeyMoments:
    """Second moments of one layer's post-RoPE queries and keys, per KV head (float64 sums).

    ``queries``: ``Σ q qᵀ`` over tokens and the query heads that read the KV head; ``keys``: ``Σ (k − k̄) (k −
    k̄)ᵀ`` with ``k̄`` the mean of each group of ``group`` tokens (what a per-channel min–max code does not
    pay for); ``counts``: how many vectors each sum holds.
    """

    queries: torch.Tensor  # [kv_heads, d, d]
    keys: torch.Tensor  # [kv_heads, d, d]
    counts: tuple[int, int]

    @classmethod
    def measure(cls, q: torch.Tensor, k: torch.Tensor, group: int) -> KeyMoments:
        """The moments of post-RoPE queries ``[B, Hq, T, d]`` and keys ``[B, H, T, d]`` (``Hq`` a multiple of
        ``H``); keys of a ragged last group are left out."""
        b, hq, t, d = q.shape
        heads = k.shape[1]
        qf = q.double().reshape(b, heads, hq // heads, t, d).transpose(0, 1).reshape(heads, -1, d)
        whole = t // group * group
        kf = k[..., :whole, :].double().reshape(b, heads, -1, group, d)
        kf = (kf - kf.mean(dim=-2, keepdim=True)).transpose(0, 1).reshape(heads, -1, d)
        return cls(qf.transpose(1, 2) @ qf, kf.transpose(1, 2) @ kf, (qf.shape[1], kf.shape[1]))


def query_axes(moments: KeyMoments) -> tuple[torch.Tensor, torch.Tensor]:
    """The principal axes of the queries, per KV head, sorted by their logit weight.

    Returns
    -------
    tuple
        ``(k_rot, weights)``: ``k_rot`` ``[kv_heads, d, d]`` (float64, orthonormal rows: the axes, so
        ``k_rot @ k`` is the key in them; attention's ``k_rot`` layout), and ``weights`` ``[kv_heads, d]``,
        each head's ``w_j`` in the same order (descending), for the bit allocation.
    """
    if min(moments.counts) == 0:
        raise ValueError("key axes need at least one query and one whole key group of calibration tokens")
    cq = moments.queries / moments.counts[0]
    ck = moments.keys / moments.counts[1]
    axes = torch.linalg.eigh(cq).eigenvectors  # columns
    w = torch.diagonal(axes.mT @ cq @ axes, dim1=-2, dim2=-1) * torch.diagonal(axes.mT @ ck @ axes, dim1=-2, dim2=-1)
    order = w.argsort(dim=-1, descending=True)
    axes = axes.gather(-1, order.unsqueeze(-2).expand_as(axes))
    return axes.mT.contiguous(), w.gather(-1, order)


def segment_bits(weights: torch.Tensor, bits: float, segment: int) -> int | list[int]:
    """One stream's code widths per segment of ``segment`` axes, ``bits`` per channel on average.

    Reverse water-filling in integer steps (:func:`kvcompress.methods.minikv.allocate_bits`, whose model is
    the ``w · 4^-b`` above): a segment's weight is the sum of its axes' ``weights``, taken in the order of
    the axes. Returns one width when every segment gets the same.
    """
    sizes = segment_widths(weights.numel(), segment)
    spent = allocate_bits([float(w.sum()) for w in weights.split(sizes)], bits, widths=sizes)
    return spent[0] if len(set(spent)) == 1 else spent
