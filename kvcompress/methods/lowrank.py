"""Low-rank factorization of K/V projections per KV-head group, plain (LoRC) or whitened.

A group of ``g`` KV heads shares one latent: its projection ``W`` (``g·head_dim × hidden``) is
factorized as ``W ≈ up @ down`` with ``down`` (``r × hidden``) producing the cached latent and
``up`` (``g·head_dim × r``) recovering K or V.

* ``weight`` mode (LoRC, arXiv 2410.03111 §3): truncated SVD of ``W`` itself; minimizes ‖W − Ŵ‖_F.
* ``whitened`` mode (activation-aware, as in SVD-LLM / Palu): with the input Gram matrix
  ``G = E[x xᵀ] = S Sᵀ`` (Cholesky), ``E‖(W − Ŵ)x‖² = ‖(W − Ŵ)S‖_F²``, so the optimal rank-r
  ``Ŵ = (WS)_r S⁻¹``: truncate the SVD of ``WS`` and map back through ``S⁻¹``. This minimizes the
  error of the projection's *outputs* on real activations, which plain SVD cannot see when a few
  input channels are huge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WHITEN_DAMPING = 1e-6  # relative ridge added to the Gram diagonal so its Cholesky factor exists


@dataclass
class GroupSVD:
    """SVD of one head group's (possibly whitened) projection, in float64.

    ``matrix = u @ diag(sigma) @ vh``, where ``matrix`` is ``W`` or ``W S``; ``s_factor`` is ``S``
    (None in weight mode).
    """

    u: torch.Tensor
    sigma: torch.Tensor
    vh: torch.Tensor
    s_factor: torch.Tensor | None

    @property
    def width(self) -> int:
        """Largest useful rank: min(out, in)."""
        return int(self.sigma.numel())

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down, up)`` of the best rank-``rank`` approximation, float64.

        ``down`` is ``rank × hidden`` and ``up`` is ``out × rank``; ``up @ down`` equals ``W`` at full
        rank in both modes (exactly, up to float64 rounding). ``up = U_r`` has orthonormal columns, so
        the cached latent ``down @ x = U_rᵀ (W x)`` is the output rotated into its principal axes: an
        error in a quantized latent comes back with the same norm, never amplified by ``σ_max``.
        """
        up = self.u[:, :rank]
        down = self.sigma[:rank, None] * self.vh[:rank]
        if self.s_factor is not None:  # down = V_rᵀ S⁻¹, solved as X S = V_rᵀ
            down = torch.linalg.solve_triangular(self.s_factor, down, upper=False, left=False)
        return down, up


def energy_kept(sigma: torch.Tensor, rank: int) -> float:
    """Fraction of the squared spectrum ``sigma`` kept at ``rank``."""
    s2 = sigma.double().square()
    return float(s2[:rank].sum() / s2.sum().clamp_min(1e-300))


def whitening_factor(gram: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor ``S`` of the damped Gram matrix (float64)."""
    g = gram.double()
    damp = WHITEN_DAMPING * g.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    for scale in (1.0, 1e2, 1e4):  # escalate only if the Gram matrix is numerically singular
        s, info = torch.linalg.cholesky_ex(g + scale * damp * eye)
        if int(info) == 0:
            return s
    raise ValueError("calibration Gram matrix is not positive definite")


def group_svd(weight: torch.Tensor, s_factor: torch.Tensor | None = None) -> GroupSVD:
    """SVD of a group's projection ``weight`` (``out × hidden``), whitened by ``s_factor`` if given."""
    w = weight.double()
    matrix = w @ s_factor if s_factor is not None else w
    u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
    return GroupSVD(u=u, sigma=sigma, vh=vh, s_factor=s_factor)


def condition_number(weight: torch.Tensor) -> float:
    """κ = σ_max / σ_min of a weight matrix (LoRC's per-layer sensitivity measure)."""
    sigma = torch.linalg.svdvals(weight.double())
    return float(sigma[0] / sigma[-1].clamp_min(1e-300))


def split_groups(weight: torch.Tensor, num_kv_heads: int, head_dim: int, head_group: int) -> list[torch.Tensor]:
    """Split a K/V projection (``num_kv_heads·head_dim × hidden``) into row blocks of ``head_group`` heads."""
    rows = head_group * head_dim
    return list(weight.reshape(num_kv_heads // head_group, rows, -1).unbind(0))
