"""Values predicted from the same layer's keys; the cache quantizes only what the keys do not explain.

AQUA-KV (Shutova et al., arXiv 2501.19392, §3) observes that a layer's keys and values are far from
independent, fits a linear regressor from what the cache already holds to what it stores next, and
quantizes only the residual. kvcompress uses the simplest of its predictors, the values of a layer from
its own keys: with ``k`` a token's pre-RoPE keys of all KV heads (``H·d``) and ``c_v`` its value latents
(``G·r_v``, as the cache stores them),

    ĉ_v = A [k; 1],      A = S_vk (S_kk + λ·m·I)⁻¹                                          (ridge regression)

where ``S_kk = Σ [k; 1][k; 1]ᵀ`` and ``S_vk = Σ c_v [k; 1]ᵀ`` are summed over the calibration text
(``c_v = D_v x`` is linear in the layer input ``x``, so export measures ``S_xk = Σ x [k; 1]ᵀ`` once and
forms ``S_vk = D_v S_xk`` for whatever ``D_v`` the factorization and rotation give), ``m`` is the mean
of ``S_kk``'s diagonal and ``λ`` = :data:`RIDGE`. The ridge keeps ``A`` from amplifying the keys'
quantization error, which is what the cache feeds it: with λ = 5·10⁻⁶, SmolLM2's first layer left a
residual of 13× its values' energy through a cache of 4.5-bit keys, with λ = 5·10⁻³ 0.25× (the first 2048
tokens of WikiText-2 test); λ itself was chosen on the two tuning texts (0.002–0.1 tried, README, Measured).

The cache predicts from the keys it holds, de-quantized (closed loop, as a DPCM coder does): when a block
of values is quantized, the keys of the same tokens have just been quantized, so the store encodes
``c_v − A [k̂; 1]`` and a read adds ``A [k̂; 1]`` back. The error of a read value is then the residual's
quantization error alone, and through the cache the residual holds about a quarter to two thirds of the
values' energy on SmolLM2 (0.23–0.68 by layer), so 2-bit residual codes do what 3-bit value codes do.

Keys are stored after RoPE (and turned by ``k_rot``), so a read undoes both per token (``k̂ R``, then
RoPE at minus the token's angle) before the product; a token's position is its index in the cache, which
the layer checks (no eviction, no left padding). The predictor adds no bytes per token; the checkpoint
holds ``A`` per layer as ``v_pred`` (``[G·r_v, H·d + 1]``, its last column the intercept).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvcompress.kernels.lowrank_rope import rotate
from kvcompress.methods.rotation import turn_keys

RIDGE = 0.01  # λ, relative to the mean diagonal of S_kk: chosen on the two tuning texts (README, Measured)


@dataclass
class PredictorMoments:
    """One layer's calibration sums for :func:`fit` (float64): ``keys`` = ``S_kk`` ``[H·d + 1, H·d + 1]``,
    ``inputs`` = ``S_xk`` ``[hidden, H·d + 1]``."""

    keys: torch.Tensor
    inputs: torch.Tensor

    @classmethod
    def measure(cls, x: torch.Tensor, k: torch.Tensor) -> PredictorMoments:
        """The sums over layer inputs ``x`` ``[..., hidden]`` and their pre-RoPE keys ``k`` ``[..., H·d]``."""
        x = x.reshape(-1, x.shape[-1]).double()
        k1 = torch.cat([k.reshape(x.shape[0], -1).double(), x.new_ones(x.shape[0], 1)], dim=1)
        return cls(k1.T @ k1, x.T @ k1)


def fit(moments: PredictorMoments, v_down: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """``A`` (float64 ``[G·r_v, H·d + 1]``) predicting the latents ``v_down @ x`` from ``[k; 1]``.

    Parameters
    ----------
    moments
        The layer's calibration sums.
    v_down
        ``[G·r_v, hidden]``: the value latents' map, as exported (factorized and rotated).
    ridge
        ``λ``, relative to the mean diagonal of ``S_kk``.
    """
    s_kk = moments.keys
    reg = ridge * s_kk.diagonal().mean() * torch.eye(s_kk.shape[0], dtype=s_kk.dtype)
    s_vk = v_down.double() @ moments.inputs
    return torch.linalg.solve(s_kk + reg, s_vk.T).T  # S_kk is symmetric


def unrope(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_rot: torch.Tensor | None) -> torch.Tensor:
    """Pre-RoPE keys ``[B, T, H·d]`` from stored keys ``[B, G, T, g·d]`` (the model's channel order, turned
    by ``k_rot`` ``[H, d, d]`` when given): ``k̂ R_h`` per head, then RoPE at minus each token's angle
    (rotate-half layout, ``cos``/``sin`` ``[B, T, d]``)."""
    b, groups, t, width = keys.shape
    d = cos.shape[-1]
    k = keys.float().reshape(b, groups, t, width // d, d)
    if k_rot is not None:
        k = turn_keys(k, k_rot.float().transpose(-1, -2))  # k̂ R: the inverse of attention's turn k Rᵀ
    k = k.permute(0, 2, 1, 3, 4).reshape(b, t, -1, d)
    return rotate(k, cos.float().unsqueeze(2), -sin.float().unsqueeze(2)).reshape(b, t, -1)


@dataclass
class ValuePredictor:
    """What a layer's cache calls to predict its value latents from its stored keys.

    ``weight``: ``A`` ``[G·r_v, H·d + 1]``; ``rope``: ``(positions [B, T]) -> (cos, sin)`` of the model's
    rotary embedding; ``k_rot``: the keys' turn after RoPE, or None.
    """

    weight: torch.Tensor
    rope: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    k_rot: torch.Tensor | None

    def __call__(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        """Predicted value latents ``[B, G, T, r_v]`` (float32) of stored keys ``[B, G, T, g·d]`` at
        positions ``start, start + 1, …``."""
        b, groups, t, _ = keys.shape
        positions = torch.arange(start, start + t, device=keys.device).expand(b, t)
        cos, sin = self.rope(positions)
        k = unrope(keys, cos, sin, self.k_rot)
        w = self.weight.float()
        out = torch.addmm(w[:, -1], k.reshape(b * t, -1), w[:, :-1].T)
        return out.view(b, t, groups, -1).transpose(1, 2)
