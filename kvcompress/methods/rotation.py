"""Random orthogonal rotations that spread outlier channels before quantization, folded into the weights.

QuaRot (Ashkboos et al., arXiv 2404.00456) and SpinQuant (arXiv 2405.16406) rotate activations by an
orthogonal ``Q`` before quantizing them: ``(Q x)`` has the same norm as ``x`` but no channel carries most
of the energy, so group-wise min–max codes lose less. TurboQuant (arXiv 2504.19874, §3) rests on the same
fact: after a random rotation each coordinate of a head vector is close to ``N(0, ‖x‖²/d)``.

Two places, both free at run time:

* **Latents** (pre-RoPE keys, values): ``W ≈ up @ down`` becomes ``(up Qᵀ)(Q down)``
  (:func:`rotate_latent`), so the cached latent ``Q down x`` is rotated and ``up`` undoes it; nothing is
  written beyond the factorized weights. With bit runs (``allocation = "channels"``) ``Q`` is
  block-diagonal over the runs, so channels mix only within a run. 2-bit K/V on SmolLM2: perplexity
  ×1.226 → ×1.117.
* **Post-RoPE keys** (``key_rope = "post"``): RoPE sits between ``k_up`` and the cache, so ``Q`` cannot be
  folded into ``k_up``. Export writes ``k_rot`` (one ``d × d`` orthogonal matrix per KV head,
  :func:`key_rotations`) and attention turns queries and keys after RoPE (:func:`turn_keys`):
  ``(R q)ᵀ (R k) = qᵀ k``.

Matrices are Haar-distributed (QR of a Gaussian, signs fixed by ``R``'s diagonal) and seeded by layer,
stream and group, so the same export gives the same checkpoint.
"""

from __future__ import annotations

import torch


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A seeded Haar-distributed ``n × n`` orthogonal matrix (float64)."""
    generator = torch.Generator().manual_seed(seed)
    q, tri = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(tri))


def rotate_latent(down: torch.Tensor, up: torch.Tensor, seed: int, blocks: list[int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q·down, up·Qᵀ)`` for a seeded random orthogonal ``Q``, so ``up @ down`` is unchanged.

    With ``blocks`` (channel counts summing to the rank), ``Q`` is block-diagonal: channels mix only within
    each block, e.g. each run of equal bits.
    """
    sizes = blocks or [down.shape[0]]
    q = torch.block_diag(*(random_orthogonal(n, seed + 7919 * i) for i, n in enumerate(sizes)))
    return q @ down, up @ q.T


def key_rotations(layer: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """``k_rot`` of one layer: ``[num_kv_heads, d, d]``, one seeded orthogonal matrix per KV head."""
    return torch.stack([random_orthogonal(head_dim, 2 * (layer * num_kv_heads + h)) for h in range(num_kv_heads)])


def turn_keys(k: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """``k R_hᵀ`` for rotated keys ``[B, G, T, g, d]`` and one orthogonal matrix per KV head, ``rot``
    ``[G·g, d, d]``: one batched GEMM over the heads (a broadcast ``matmul`` would copy ``R_h`` for every
    token, 100 MB per layer for SmolLM2 at 2048 tokens)."""
    groups, g = k.shape[1], k.shape[3]
    return torch.einsum("bgtjd,gjed->bgtje", k, rot.view(groups, g, *rot.shape[1:]))
