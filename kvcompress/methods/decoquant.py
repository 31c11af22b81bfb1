"""DecoQuant: low-bit KV blocks through a two-core matrix product operator (Liu et al., 2024, arXiv:2405.12591).

DecoQuant factors an activation matrix with a matrix-product-operator (MPO) decomposition before quantizing
it. Outliers migrate to a small local tensor, which stays 16-bit, while the large tensor gets a narrower
value range and is quantized at low bits. For the KV cache the paper uses two cores (``n = 2``).

The MPO here, for one settled block ``M`` of ``T`` tokens by ``D`` channels (one sequence, one latent head):

* Index split (paper Sec. 3, MPO input shape ``[T, 1]``, output shape ``[D / k, k]``): view ``M`` as the
  4-index tensor ``M[t, 1, c1, c2]`` with channel ``c = c1 * k + c2`` and group the indices
  ``(t, c1) | (1, c2)``, giving the matrix ``M_g`` of shape ``[T * D / k, k]``: every row is one run of ``k``
  consecutive channels of one token.
* SVD (the MPO's single bond, rank ``<= k``, kept whole): ``M_g = U S V^T``.
* Cores in the canonical (balanced) gauge the reference MPO code reaches for two cores:
  ``A = U S^(1/2)`` (``[T * D / k, k]``, the *large* core: as many entries as ``M``) and
  ``B = S^(1/2) V^T`` (``[k, k]``, the *small* core). ``M_g = A B`` exactly.
* ``A`` is stored with :func:`kvcompress.methods.kivi.quantize` in ``M``'s own ``[T, D]`` layout (element
  ``(t, c1 * k + r)`` is the coefficient of token ``t``'s channel run ``c1`` on singular direction ``r``), so
  its codes, scales and minima cost exactly what plain KIVI grouping of ``M`` costs; ``B`` is float16.
  Reconstruction: ``M_hat = reshape(dequantize(A) @ B)``; the error is ``dA @ B``, so
  ``||M - M_hat||_F <= ||dA||_F * ||B||_2 + (fp16 rounding of B)``.

Shapes chosen and why:

* ``k = 16`` (the small core's width, :data:`CORE`; the paper's KV shapes also end in 16), reduced to the
  largest divisor of ``D`` that is at most 16 and at most ``sqrt(T * D)`` (so the bond keeps full rank
  ``k``; :func:`core_width`). Any width with such a divisor works; widths without a divisor >=
  :data:`MIN_CORE` (e.g. primes) are refused when the plan is built (:func:`check_core`), since a 1- to 3-wide core is
  little more than a rescaling. The small core costs ``2 * k^2`` bytes per block per head: 512 B per 128-token block,
  4 B per token per stream, against ``D * bits / 8`` code bytes (48 B for ``D = 192`` at 2 bits), so at the same bits
  and groups DecoQuant stores ~5% more than KIVI (176 vs 168 B per token and layer
  for ``minikv-2bit``'s groups). A larger ``k`` grows that quadratically; ``k = 8`` (1 B per token)
  moved fewer outliers in our measurements.
* Blocks are the store's ``residual_length`` tokens (each block is decomposed on its own when it is
  flushed), so the decomposition follows the text and needs no calibration data.
* Grouping of ``A``: the same as KIVI (keys ``along="tokens"``, values ``along="channels"``, same group
  sizes), so the bytes differ from KIVI's only by the small cores, and the store streams exactly like
  KIVI's. With per-channel groups (keys) the gauge and the decomposition barely matter (scaling a column
  of ``A`` scales its error by the factor ``B`` undoes; what is left is a per-block rotation of each
  ``k``-channel run); with per-token groups (values) a group spans several singular directions, and the
  balanced gauge (``S^(1/2)`` on each side) gave lower value error than ``A = U`` or ``A = M_g V``.

Measured on SmolLM2-135M K/V (1024 wikitext tokens, 2 bits, keys 16 tokens/group, values 32
channels/group): without a latent rotation DecoQuant lowers value error (0.424 -> 0.401 relative) and the
worst layer's attention-output error (0.74 -> 0.58); after kvcompress's random orthogonal rotation it
gains almost nothing (0.394 -> 0.391), and KIVI with 24-channel value groups at DecoQuant's bytes does
better (0.368). Perplexity (wikitext-2, 4096 tokens, context 2048): ``decoquant-2bit`` x1.089 at 5,400
B/token, against ``minikv-2bit`` (same groups, KIVI) x1.075 at 5,160 B/token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvcompress.errors import KVCompressError
from kvcompress.methods.dense import FP16
from kvcompress.methods.kivi import Packed, QuantizedStore, cat, dequantize, effective_group, quantize

CORE = 16  # requested width k of the small fp16 core
MIN_CORE = 4  # narrower cores are refused (check_core, when the plan is built): they cannot hold outliers


def core_width(dim: int, tokens: int, core: int = CORE) -> int:
    """Width ``k`` of the small core for ``tokens x dim`` blocks: the largest divisor of ``dim`` that is at most
    ``core`` and leaves ``M_g`` at least as tall as wide (``k * k <= tokens * dim``, so the bond is ``k``)."""
    limit = min(core, math.isqrt(tokens * dim))
    return effective_group(dim, max(limit, 1))


def check_core(name: str, dim: int, tokens: int) -> None:
    """Refuse a stream whose blocks have no usable small core (:func:`core_width` below ``MIN_CORE``).

    Raises
    ------
    KVCompressError
        Naming the stream (e.g. ``"layer 3: rank_v"``) and its width.
    """
    if core_width(dim, tokens) < MIN_CORE:
        raise KVCompressError(f"{name}: decoquant needs a width with a divisor in [{MIN_CORE}, {CORE}] (the small "
                              f'core\'s width), got {dim}; use a rank_multiple of 8 or method = "kivi"')


def decompose(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-core MPO of each ``[T, D]`` matrix in ``x`` (``[..., T, D]``).

    Returns
    -------
    tuple
        ``(A, B)``: the large core in ``x``'s layout ``[..., T, D]`` and the small core ``[..., k, k]``,
        both float32, with ``compose(A, B) == x`` up to float32 rounding.
    """
    *lead, t, d = x.shape
    if d % k:
        raise ValueError(f"core width {k} does not divide the width {d}")
    m = x.float().reshape(*lead, t * d // k, k)  # M_g: rows (t, c1), columns c2
    u, s, vh = torch.linalg.svd(m, full_matrices=False)  # M_g = U diag(S) V^T
    root = s.sqrt().unsqueeze(-1)  # balanced gauge: S^(1/2) on each core
    return (u * root.transpose(-1, -2)).reshape(*lead, t, d), root * vh


def compose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``M = A B`` back in ``[..., T, D]`` (float32)."""
    *lead, t, d = a.shape
    k = b.shape[-1]
    return (a.float().reshape(*lead, t * d // k, k) @ b.float()).reshape(*lead, t, d)


@dataclass
class DecoPacked:
    """Settled tokens in DecoQuant form: quantized large cores and float16 small cores, block after block.

    Attributes
    ----------
    large
        The ``A`` cores of all blocks, quantized, ``[..., T, D]`` (``T`` a multiple of ``block``).
    small
        float16 ``B`` cores, ``[..., T // block, k, k]``.
    block
        Tokens per decomposed block.
    """

    large: Packed
    small: torch.Tensor
    block: int

    @property
    def num_tokens(self) -> int:
        """Tokens stored."""
        return self.large.num_tokens

    def nbytes(self) -> int:
        """Exact bytes: the large cores' codes, scales and minima, and the float16 small cores."""
        return self.large.nbytes() + self.small.numel() * self.small.element_size()


def encode(x: torch.Tensor, bits: int, group_size: int, along: str, block: int, core: int = CORE) -> DecoPacked:
    """Decompose every ``block``-token block of ``x`` (``[..., T, D]``, ``T`` a multiple of ``block``) and
    quantize the large cores with :func:`quantize` (``bits``, ``group_size``, ``along`` as for KIVI)."""
    *lead, t, d = x.shape
    if t % block:
        raise ValueError(f"{t} tokens are not whole blocks of {block}")
    a, b = decompose(x.reshape(*lead, t // block, block, d), core_width(d, block, core))
    return DecoPacked(quantize(a.reshape(*lead, t, d), bits, group_size, along), b.to(torch.float16), block)


def decode(p: DecoPacked, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reconstruct ``[..., T, D]`` in ``dtype``: dequantized large cores times the small cores, per block."""
    a = dequantize(p.large, torch.float32)
    *lead, t, d = a.shape
    return compose(a.reshape(*lead, t // p.block, p.block, d), p.small).reshape(*lead, t, d).to(dtype)


def cat_blocks(parts: Sequence[DecoPacked]) -> DecoPacked:
    """Concatenate along tokens (same block size and layout)."""
    if any(p.block != parts[0].block for p in parts):
        raise ValueError("cannot concatenate DecoQuant blocks of different sizes")
    return DecoPacked(cat([p.large for p in parts]), torch.cat([p.small for p in parts], dim=-3), parts[0].block)


class DecoQuantStore(QuantizedStore):
    """A :class:`QuantizedStore` whose settled blocks are stored in DecoQuant form (arXiv:2405.12591).

    Each flushed ``block`` of tokens is split by a two-core MPO into a large core,
    quantized exactly like KIVI would quantize the block (same ``bits``, ``group_size``, ``along``), and a
    small float16 ``k x k`` core per block and head (``kvcompress.methods.decoquant``). Same interface and
    residual window as the parent; ``nbytes`` and :meth:`bytes_per_token` add the small cores.
    """

    check = staticmethod(check_core)  # refuse widths without a usable small core

    @staticmethod
    def coded_bytes(width: int, bits: int, along: str, group: int, block: int) -> float:
        """KIVI's bytes at the same groups plus one fp16 ``k × k`` small core per flushed block."""
        cores = FP16 * core_width(width, block) ** 2 / block
        return QuantizedStore.coded_bytes(width, bits, along, group, block) + cores

    def _encode(self, x: torch.Tensor) -> DecoPacked:
        return encode(x, self.bits, self.group_size, self.along, self.block)

    def _decode(self, packed: DecoPacked, out: torch.Tensor) -> None:
        out.copy_(decode(packed, self.dtype))

    def _cat(self, parts: list[DecoPacked]) -> DecoPacked:
        return cat_blocks(parts)

    def _select(self, packed: DecoPacked, index: torch.Tensor) -> DecoPacked:
        large = super()._select(packed.large, index)
        return DecoPacked(large, packed.small.index_select(0, index), packed.block)
