"""Low-rank K/V (LoRC, Zhang et al., arXiv 2410.03111): cache latents of factorized K/V projections.

A group of ``g`` KV heads shares one latent. Its projection ``W`` (``g·d × hidden``) is factorized as
``W ≈ up @ down`` (LoRC eq. 2–3): ``down`` (``r × hidden``) produces the cached latent ``c = down · x`` and
``up`` (``g·d × r``) recovers K or V. A layer then caches ``r_k + r_v`` channels per group and token
instead of ``2·g·d``; that is the whole byte saving of this method, and the quantizers' formulas see
``r`` as the stream's width. The ranks come from a schedule (:mod:`kvcompress.analysis.schedule`; LoRC's
progressive schedule shrinks deeper layers more, §4.2).

* ``weight`` SVD (LoRC §3): truncated SVD of ``W`` itself, minimizing ‖W − Ŵ‖_F.
* ``whitened`` SVD (activation-aware, as in SVD-LLM / Palu): with the input Gram matrix
  ``G = E[x xᵀ] = S Sᵀ`` (Cholesky), ``E‖(W − Ŵ)x‖² = ‖(W − Ŵ)S‖_F²``, so the optimal rank-r
  ``Ŵ = (WS)_r S⁻¹``: truncate the SVD of ``WS`` and map back through ``S⁻¹``. This minimizes the
  error of the projection's *outputs* on real activations, which plain SVD cannot see when a few
  input channels are huge.

Values: attention weights sum to one, so ``Σ_t p_t (U_v c_t + b_v) = U_v (Σ_t p_t c_t) + b_v``; ``U_v`` is
applied once per head output and folded into ``o_proj`` (LoRC §3, "absorbed into the output projection")
where that makes fewer weights (:func:`value_folded`), else kept as ``v_up``. Keys: RoPE sits between
``U_k`` and the query, so ``U_k`` stays (``k_up``) and keys are rebuilt when read.

Checkpoint tensors per layer (:func:`tensor_shapes`, written by :func:`factorized_attention`, read by
:class:`kvcompress.runtime.attention.LatentAttention`): ``k_down.weight`` ``[G·r_k, hidden]``, ``k_up``
``[G, g·d, r_k]``, ``v_down.weight`` ``[G·r_v, hidden]``, ``o_proj.weight`` ``[hidden, heads·r_v]`` folded
(or ``[hidden, heads·d]`` with ``v_up`` ``[G, g·d, r_v]``), and when present ``k_bias``, ``o_proj.bias`` (with
the value bias folded in) and ``k_rot`` (:mod:`kvcompress.methods.rotation`, or the queries' principal
axes of :mod:`kvcompress.methods.key_axes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvcompress.methods import rotation
from kvcompress.methods.channels import bit_runs
from kvcompress.sources import ModelSpec, Source, attn_prefix

if TYPE_CHECKING:
    from kvcompress.plan import LayerPlan, Plan

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


def layer_group_svds(
    source: Source, layer: int, head_group: int, s_factor: torch.Tensor | None
) -> tuple[list[GroupSVD], list[GroupSVD]]:
    """SVDs of one layer's K and V projections, one per head group (whitened when ``s_factor`` is given)."""
    spec = source.spec
    out = []
    for proj in ("k", "v"):
        w = source.tensor(f"{attn_prefix(layer)}{proj}_proj.weight")
        out.append([group_svd(g, s_factor) for g in split_groups(w, spec.num_kv_heads, spec.head_dim, head_group)])
    return out[0], out[1]


def value_folded(spec: ModelSpec, rank_v: int) -> bool:
    """Whether folding ``U_v`` into ``o_proj`` makes fewer weights than keeping it apart (LoRC §3's folding).

    Folded: ``hidden × heads·r_v``. Apart: ``U_v`` (``kv_heads·d × r_v``) plus the original ``hidden ×
    heads·d``. Every weight is read at each decode step, so fewer weights is also faster decoding.
    """
    folded = spec.hidden_size * spec.num_heads * rank_v
    return folded <= spec.num_kv_heads * spec.head_dim * rank_v + spec.hidden_size * spec.num_heads * spec.head_dim


def tensor_shapes(spec: ModelSpec, plan: Plan, lay: LayerPlan) -> dict[str, tuple[int, ...]]:
    """The factorized tensors one layer of a checkpoint must hold, with their shapes."""
    p, groups, width = attn_prefix(lay.layer), plan.groups(spec), plan.head_group * spec.head_dim
    rank_k, rank_v = lay.keys.rank, lay.values.rank
    shapes = {
        f"{p}k_down.weight": (groups * rank_k, spec.hidden_size),
        f"{p}k_up": (groups, width, rank_k),
        f"{p}v_down.weight": (groups * rank_v, spec.hidden_size),
        f"{p}o_proj.weight": (spec.hidden_size, spec.num_heads * (rank_v if lay.value_folded else spec.head_dim)),
    }
    if not lay.value_folded:
        shapes[f"{p}v_up"] = (groups, width, rank_v)
    if lay.predicts_values:  # kvcompress.methods.value_prediction's A, its last column the intercept
        shapes[f"{p}v_pred"] = (groups * rank_v, spec.num_kv_heads * spec.head_dim + 1)
    return shapes


def _run_widths(bits: int | tuple[int, ...], rank: int, segment: int) -> list[int]:
    """Channels of each run of equal bits (one block for a single width): the rotation's blocks."""
    return [w for w, _ in bit_runs(bits, rank, segment)]


def factorized_attention(source: Source, layer: int, plan: Plan, svds: tuple[list[GroupSVD], list[GroupSVD]],
                         rotate: bool, key_rot: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One layer's replacement tensors from its K and V SVDs (one per head group): ``k_down``, ``k_up``,
    ``k_bias``, ``v_down``, ``o_proj`` (with ``U_v`` folded in, or ``v_up`` beside it; see
    :func:`value_folded`), and ``k_rot`` (one orthogonal ``d × d`` per KV head) when post-RoPE keys are
    rotated. With ``rotate``, the latents are turned by seeded orthogonal matrices
    (:mod:`kvcompress.methods.rotation`), and the keys by ``key_rot`` when given (the queries' principal axes,
    :mod:`kvcompress.methods.key_axes`), else by seeded ones too.

    ``o_proj`` folding: query head h reads KV head j = h // n_rep, member jj of group G; its value is
    ``U_v[G][jj] c_v + b_v[j]``, so ``W_o'[:, h] = W_o[:, h] @ U_v[G][jj]`` and the value bias becomes
    ``b_o' = b_o + Σ_h W_o[:, h] b_v[j]`` (attention weights sum to one).
    """
    spec = source.spec
    lay = plan.layers[layer]
    g, d = plan.head_group, spec.head_dim
    p = attn_prefix(layer)
    k_factors = [x.factors(lay.keys.rank) for x in svds[0]]
    v_factors = [x.factors(lay.values.rank) for x in svds[1]]
    out = {}
    if rotate:
        if plan.key_rotation:  # RoPE sits between k_up and the cache: rotate q and k after RoPE at run time
            out[f"{p}k_rot"] = rotation.key_rotations(layer, spec.num_kv_heads, d) if key_rot is None else key_rot
        else:
            blocks = _run_widths(lay.keys.bits, lay.keys.rank, lay.keys.segment)
            k_factors = [rotation.rotate_latent(down, up, 2 * (layer * len(k_factors) + group), blocks)
                         for group, (down, up) in enumerate(k_factors)]
        blocks = _run_widths(lay.values.bits, lay.values.rank, lay.values.segment)
        v_factors = [rotation.rotate_latent(down, up, 2 * (layer * len(v_factors) + group) + 1, blocks)
                     for group, (down, up) in enumerate(v_factors)]
    out[f"{p}k_down.weight"] = torch.cat([down for down, _ in k_factors])
    out[f"{p}k_up"] = torch.stack([up for _, up in k_factors])
    out[f"{p}v_down.weight"] = torch.cat([down for down, _ in v_factors])
    w_o = source.tensor(f"{p}o_proj.weight").double()
    n_rep = spec.num_heads // spec.num_kv_heads
    if lay.value_folded:
        blocks = []
        for h in range(spec.num_heads):
            j = h // n_rep
            up = v_factors[j // g][1][(j % g) * d:(j % g + 1) * d]  # this KV head's rows of U_v, d × r_v
            blocks.append(w_o[:, h * d:(h + 1) * d] @ up)
        out[f"{p}o_proj.weight"] = torch.cat(blocks, dim=1)
    else:
        out[f"{p}v_up"] = torch.stack([up for _, up in v_factors])
        out[f"{p}o_proj.weight"] = w_o
    bias = source.tensor(f"{p}o_proj.bias").double() if source.has(f"{p}o_proj.bias") else None
    if source.has(f"{p}v_proj.bias"):
        b_v = source.tensor(f"{p}v_proj.bias").double().view(spec.num_kv_heads, d)
        folded = sum(w_o[:, h * d:(h + 1) * d] @ b_v[h // n_rep] for h in range(spec.num_heads))
        bias = folded if bias is None else bias + folded
    if bias is not None:
        out[f"{p}o_proj.bias"] = bias
    if source.has(f"{p}k_proj.bias"):
        out[f"{p}k_bias"] = source.tensor(f"{p}k_proj.bias")
    return out
