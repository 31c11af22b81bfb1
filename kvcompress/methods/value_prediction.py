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
RoPE at minus the token's angle, :meth:`ValuePredictor.pre_rope`) before the product; a token's position
is its index in the cache, which the layer checks (no eviction, no left padding). A decode step needs the
values only through attention's weighted sum ``Σ_t p_t c_v(t)``, and the prediction is linear, so it adds
``A [Σ_t p_t k̂_t; Σ_t p_t]`` once (:meth:`ValuePredictor.attend`) instead of a prediction per token: the
``T × H·d × G·r_v`` product of every step becomes ``T × H·d`` per query row. The predictor adds no bytes
per token; the checkpoint holds ``A`` per layer as ``v_pred`` (``[G·r_v, H·d + 1]``, its last column the
intercept).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvcompress.kernels.lowrank_rope import pair_order
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


@dataclass
class ValuePredictor:
    """What a layer's cache calls to predict its value latents from its stored keys.

    ``weight``: ``A`` ``[G·r_v, H·d + 1]`` (keys in the model's channel order); ``phases``: ``(positions [T])
    -> e^{i n θ}`` ``[T, d/2]`` (complex64) of the model's rotary embedding, one angle per channel pair;
    ``k_rot``: the keys' turn after RoPE ``[H, d, d]``, or None; ``head_dim``: ``d``.
    """

    weight: torch.Tensor
    phases: Callable[[torch.Tensor], torch.Tensor]
    k_rot: torch.Tensor | None
    head_dim: int

    def pre_rope(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        """Pre-RoPE keys ``[B, H, T, d]`` (float32, each head's channels in RoPE pair order) of stored keys
        ``[B, G, T, g·d]`` at positions ``start, start + 1, …``.

        ``k̂ R_h`` by one batched GEMM whose columns come out in pair order (``R_h``'s columns permuted, a
        ``d × d`` copy per head), then each channel pair times ``e^{−i n θ}`` in place: RoPE undone as one
        complex multiply (``kvcompress.kernels.lowrank_rope``: in pair order RoPE is ``(k[2i] + i·k[2i+1]) ·
        e^{iθ}``).
        """
        b, groups, t, width = keys.shape
        d = self.head_dim
        k = keys.float().reshape(b, groups, t, width // d, d)
        if self.k_rot is None:
            k = pair_order(k, d)
        else:  # k̂ R with R's columns in pair order; turn_keys multiplies by the transpose of what it is given
            k = turn_keys(k, pair_order(self.k_rot.float(), d).transpose(-1, -2))
        k = k.transpose(2, 3).reshape(b, groups * (width // d), t, d).contiguous()
        phases = self.phases(torch.arange(start, start + t, device=keys.device))
        torch.view_as_complex(k.view(*k.shape[:-1], d // 2, 2)).mul_(phases.conj())
        return k

    def _weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A``'s key columns in pair order ``[G·r_v, H·d]`` and its intercept ``[G·r_v]``, float32."""
        w = self.weight.float()
        return pair_order(w[:, :-1], self.head_dim), w[:, -1]

    def __call__(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        """Predicted value latents ``[B, G, T, r_v]`` (float32) of stored keys ``[B, G, T, g·d]`` at
        positions ``start, start + 1, …``."""
        b, groups, t, _ = keys.shape
        k = self.pre_rope(keys, start)
        a, a0 = self._weight()
        out = torch.addmm(a0, k.transpose(1, 2).reshape(b * t, -1), a.T)
        return out.view(b, t, groups, -1).transpose(1, 2)

    def attend(self, probs: torch.Tensor, keys: torch.Tensor, start: int) -> torch.Tensor:
        """``Σ_t p_t ĉ_v(t)`` ``[B, G, q, r_v]`` for attention weights ``probs`` ``[B, G, q, T]`` over stored keys
        ``[B, G, T, g·d]`` at positions ``start, start + 1, …``, without a prediction per token.

        The prediction is linear in the keys, so the weighted sum of predictions is the prediction of the
        weighted sum: ``A [Σ_t p_t k_t; Σ_t p_t]``, one ``[q, T] × [T, d]`` product per KV head and one
        ``[q, H·d] × [H·d, r_v]`` per group, where a prediction per token costs ``T × H·d × G·r_v``.
        """
        b, groups, q, t = probs.shape
        k = self.pre_rope(keys, start)  # [B, H, T, d]
        rows = probs.reshape(b, 1, groups * q, t)
        summed = (rows @ k).transpose(1, 2).reshape(b, groups * q, -1)  # [B, G·q, H·d]
        a, a0 = self._weight()
        a, a0 = a.view(groups, -1, a.shape[-1]), a0.view(groups, 1, -1)  # A's rows are group-major
        weights = probs.sum(dim=-1, keepdim=True)  # [B, G, q, 1]
        return summed.view(b, groups, q, -1) @ a.transpose(-1, -2) + weights * a0  # [B, G, q, r_v]


@dataclass
class HeldPrediction:
    """The predicted values of one read, left unformed: the values read hold residuals at tokens ``start …
    stop − 1``, and attention adds :meth:`attend` of its weights to what it reads from them."""

    predictor: ValuePredictor
    start: int
    stop: int

    def attend(self, probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """:meth:`ValuePredictor.attend` of ``probs`` ``[B, G, q, S]`` over all the keys read ``[B, G, S, g·d]``,
        restricted to the predicted tokens."""
        span = slice(self.start, self.stop)
        return self.predictor.attend(probs[..., span], keys[..., span, :], self.start)
