"""Attention that caches low-rank K/V latents (LoRC) and reads them back from the kvcompress cache.

Per head group of ``g`` KV heads (``G`` groups per layer):

* values: the cache holds ``c_v = D_v x`` (``r_v`` wide). Attention weights sum to one, so
  ``Σ_t p_t (U_v c_v,t + b_v) = U_v (Σ_t p_t c_v,t) + b_v``: attention reads the latents, and ``U_v``
  is applied once to each head's output. Export folds ``U_v`` into ``o_proj`` (which then takes
  ``num_heads · r_v`` inputs) where that makes fewer weights, and otherwise keeps it as ``v_up``
  (``[G, g·d, r_v]``) beside the original ``o_proj``; the bias always goes into ``o_proj``'s.
* keys (``key_rope="pre"``, the default): the cache holds ``c_k = D_k x`` (pre-RoPE) and each
  token's position. At attention time ``k = RoPE(U_k c_k + b_k, pos)``. ``U_k`` cannot be folded into
  ``q``: the score is ``qᵀ R_mᵀ R_n U_k c_n``, and the rotation ``R_n`` sits *between* ``q`` and ``U_k``
  and changes with each key's position ``n``, so no single matrix can be precomputed for all keys.
  With ``key_rope="post"`` (full-width keys only, as KIVI does) the cache holds the rotated keys
  themselves, grouped per latent head. An orthogonal ``k_rot`` per KV head (QuaRot) may then turn both
  ``q`` and ``k`` after RoPE: ``(R q)ᵀ (R k) = qᵀ k``, and the cached ``R k`` has no outlier channels.

Each step hands the new latents to the cache layer (``kvcompress.runtime.cache.KVCompressLayer.step``) and
attends over what the layer gives back, in the layout the step's path asks for; the layer evicts on its
own afterwards. :data:`DECODE_PATHS` is the one table of paths, consulted once per step: on CUDA the
Triton decode-attention kernel attends over packed KIVI or codebook codes directly where it covers the
layout, on the CPU decode runs in the cache's reused workspace, one GEMM per stage
(``kvcompress.runtime.latent_decode``), and everything else (prefill too) reads the cache dense in torch
(de-quantize, reconstruct, attend): a prompt into an empty cache through SDPA's fused causal kernel, later
blocks in blocks of query rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvcompress.compat import pop_cache
from kvcompress.kernels.decode_attention import decode_attention
from kvcompress.kernels.lowrank_rope import (
    lowrank_rope,
    pair_order,
    pair_ordered_up,
    reconstruct,
    rope_pairs,
    rotate,
)
from kvcompress.methods.rotation import turn_keys
from kvcompress.methods.value_prediction import ValuePredictor
from kvcompress.runtime import latent_decode
from kvcompress.runtime.cache import DenseKV, KVCompressLayer, Layout, PackedKV

# Query rows scored at once in a prefill block after earlier ones (a first prompt goes through SDPA). The
# [heads, rows, keys] scores and their softmax are the largest transients of a long blocked prefill (2 x 19 MB
# for SmolLM2 at 2048 keys), and 128 rows prefill no slower than 512.
QUERY_BLOCK = 128
FUSED_DEVICES = ("cuda",)  # where decode reads packed codes through the Triton kernel


class LatentAttention(nn.Module):
    """Drop-in replacement for a Llama/Mistral/Qwen2/Qwen3 attention module with latent K/V.

    Parameters
    ----------
    config : PretrainedConfig
        The model config.
    layer_idx : int
        Decoder layer index (selects the cache layer).
    rank_k, rank_v : int
        Latent widths per head group.
    head_group : int
        KV heads sharing one latent.
    rotary : nn.Module
        The model's rotary embedding, called for stored key positions.
    bias : bool
        Whether q/k/v projections have biases (Qwen2); then ``o_proj`` carries the folded value bias.
    q_norm, k_norm : nn.Module, optional
        Qwen3's per-head RMS norms.
    key_rope : str
        ``"pre"``: cache key latents and rotate when reading; ``"post"``: cache rotated full-width keys.
    key_rotation : bool
        With ``key_rope="post"``: turn queries and keys by ``k_rot`` (one orthogonal matrix per KV head)
        after RoPE, before the keys are cached.
    value_folded : bool
        Whether ``U_v`` is folded into ``o_proj`` (else it is the parameter ``v_up``).
    predicts_values : bool
        Whether the cache predicts the value latents from the stored keys (the parameter ``v_pred``,
        :mod:`kvcompress.methods.value_prediction`) and codes only the residual.
    """

    def __init__(self, config, layer_idx: int, rank_k: int, rank_v: int, head_group: int, rotary: nn.Module,
                 bias: bool = False, q_norm: nn.Module | None = None, k_norm: nn.Module | None = None,
                 key_rope: str = "pre", key_rotation: bool = False, value_folded: bool = True,
                 predicts_values: bool = False):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.head_group = head_group
        self.groups = self.num_kv_heads // head_group
        self.rank_k, self.rank_v = rank_k, rank_v
        self.scaling = self.head_dim**-0.5
        hidden, d = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(hidden, self.num_heads * d, bias=bias)
        self.k_down = nn.Linear(hidden, self.groups * rank_k, bias=False)
        self.k_up = nn.Parameter(torch.empty(self.groups, head_group * d, rank_k))
        self.k_bias = nn.Parameter(torch.empty(self.num_kv_heads * d)) if bias else None
        self.v_down = nn.Linear(hidden, self.groups * rank_v, bias=False)
        self.v_up = None if value_folded else nn.Parameter(torch.empty(self.groups, head_group * d, rank_v))
        self.o_proj = nn.Linear(self.num_heads * (rank_v if value_folded else d), hidden, bias=bias)
        self.q_norm, self.k_norm = q_norm, k_norm
        self.key_rope = key_rope
        self.k_rot = nn.Parameter(torch.empty(self.num_kv_heads, d, d)) if key_rotation else None
        self.v_pred = (nn.Parameter(torch.empty(self.groups * rank_v, self.num_kv_heads * d + 1))
                       if predicts_values else None)
        self._rotary = (rotary,)  # shared with the model; a tuple keeps it out of this module's state dict
        self._up_cache: tuple = (None, None, None)  # (parameter identity, U_kᵀ, bias) in pair order

    def keys(self, latents: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotated keys, transposed per KV head, ``[B, G, g, head_dim, S]``, from latents ``[B, G, S, r_k]``.

        Each head's channels come in RoPE pair order (``kvcompress.kernels.lowrank_rope.pair_order``), so
        queries must be put in the same order before scoring. The transposed layout is what ``q @ k``
        reads with no copy. ``positions``: ``[B, 1 or G, S]``. Reconstruction and RoPE run in one kernel
        (``kvcompress.kernels.lowrank_rope``: Triton on CUDA, torch elsewhere), except with Qwen3's key
        norm, which sits between them.
        """
        cos, sin = rope_table(self._rotary[0], positions, latents.dtype)
        if self.k_norm is None:
            return lowrank_rope(latents, self.k_up, self.k_bias, cos, sin, self.head_dim)
        up_t, bias = pair_ordered_up(self.k_up, self.k_bias, self.head_dim)
        k = reconstruct(latents, up_t, bias, self.head_dim)  # [B, G, S, g, d], pair order
        var = k.float().pow(2).mean(-1, keepdim=True)
        k = (k.float() * torch.rsqrt(var + self.k_norm.variance_epsilon)).to(k.dtype)
        weight = pair_order(self.k_norm.weight, self.head_dim).to(k.dtype)
        return rope_pairs(k * weight, cos, sin).permute(0, 1, 3, 4, 2)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                **kwargs) -> tuple[torch.Tensor, None]:
        past_key_values = pop_cache(kwargs)
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, self.num_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        cos, sin = position_embeddings
        q = rotate(q.transpose(1, 2), cos.unsqueeze(1), sin.unsqueeze(1))
        ck = self.k_down(hidden_states).view(b, t, self.groups, self.rank_k).transpose(1, 2)
        cv = self.v_down(hidden_states).view(b, t, self.groups, self.rank_v).transpose(1, 2)
        if position_ids is None:
            raise ValueError("kvcompress attention needs position_ids")
        positions = position_ids.expand(b, t)
        valid = attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2 else None
        if self.key_rope == "post":  # store rotated keys, [B, G, T, g·d]: what KIVI quantizes
            ck = self.keys(ck, positions.unsqueeze(1)).permute(0, 1, 4, 2, 3)  # [B, G, T, g, d], pair order
            ck = pair_order(ck, self.head_dim, inverse=True)  # the model's channel order, as analysis saw it
            if self.k_rot is not None:
                rot = self.k_rot.to(q.dtype)
                ck = turn_keys(ck, rot)
                q = (q.reshape(b, self.num_kv_heads, -1, self.head_dim) @ rot.transpose(-1, -2)).view(q.shape)
            ck = ck.reshape(b, self.groups, t, -1)
        layer = past_key_values.layers[self.layer_idx] if past_key_values is not None else None
        path = self.decode_path(layer, q, valid)
        if layer is not None:
            held = layer.step(ck, cv, positions, valid, path.reads, self.value_predictor())
        else:
            held = DenseKV(ck, cv, positions.unsqueeze(1), valid.unsqueeze(1) if valid is not None else None)
        return self._output(path.attend(self, q, held)), None

    def value_predictor(self) -> ValuePredictor | None:
        """What the cache calls to predict this layer's value latents from its stored keys (None unless
        ``predicts_values``): ``v_pred``, ``k_rot`` and this model's RoPE."""
        if self.v_pred is None:
            return None
        rotary = self._rotary[0]
        return ValuePredictor(self.v_pred, lambda positions: rope_phases(rotary, positions), self.k_rot, self.head_dim)

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        """``o_proj`` of the attention-weighted value latents ``[B, Hq, T, r_v]``, through ``v_up`` if kept."""
        b, _, t, _ = out.shape
        if self.v_up is not None:  # query head h = ((G·g) + j)·rep + i reads KV head G·g + j
            kv = self.num_kv_heads
            up = self.v_up.to(out.dtype).view(kv, self.head_dim, self.rank_v).transpose(-1, -2)  # [kv, r_v, d]
            rows = out.view(b, kv, -1, self.rank_v).transpose(0, 1).reshape(kv, -1, self.rank_v)
            out = (rows @ up).view(kv, b, -1, self.head_dim).transpose(0, 1)  # one GEMM per KV head
        return self.o_proj(out.reshape(b, self.num_heads, t, -1).transpose(1, 2).reshape(b, t, -1))

    def decode_path(self, layer: KVCompressLayer | None, q: torch.Tensor, valid: torch.Tensor | None
                    ) -> DecodePath:
        """The first entry of :data:`DECODE_PATHS` that fits this step; :data:`GENERIC` unless the step
        decodes (a cache, one new token per sequence, no padding mask)."""
        if layer is None or q.shape[2] != 1 or valid is not None:
            return GENERIC
        return next(path for path in DECODE_PATHS if path.fits(self, layer, q))

    def _fused_fits(self, layer: KVCompressLayer, q: torch.Tensor) -> bool:
        return (q.device.type in FUSED_DEVICES and self.key_rope == "post" and self.head_group == 1
                and layer.can_read("packed"))

    def _workspace_fits(self, layer: KVCompressLayer, q: torch.Tensor) -> bool:
        return (q.device.type == "cpu" and q.dtype == torch.float32 and not torch.is_grad_enabled()
                and self.k_norm is None)

    def _fused_decode(self, q: torch.Tensor, held: PackedKV) -> torch.Tensor:
        """One query token against packed codes, the sink's copies and the 16-bit residual: ``[B, Hq, 1, r_v]``."""
        out, _ = decode_attention(q[:, :, 0], held.keys, held.values, held.key_residual, held.value_residual,
                                  self.scaling, held.key_sink, held.value_sink)
        return out.to(q.dtype).unsqueeze(2)

    def _workspace_decode(self, q: torch.Tensor, held: DenseKV) -> torch.Tensor:
        """One query token against the layer's tokens in the workspace, through :func:`latent_decode`:
        ``[B, Hq, 1, r_v]``."""
        q = q[:, :, 0]
        up_t = bias = phases = None
        if self.key_rope == "pre":
            q = pair_order(q, self.head_dim)
            up_t, bias = self._pair_ordered_up()
            phases = rope_phases(self._rotary[0], held.positions)
        return latent_decode.latent_decode(q, held, self.scaling, self.head_group, up_t, bias, phases).unsqueeze(2)

    def _pair_ordered_up(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:func:`pair_ordered_up` of ``U_k`` and the key bias, computed once and kept until the
        parameters change (decode only: the cached tensors are detached)."""
        key = (self.k_up.data_ptr(), self.k_up._version)
        if self._up_cache[0] != key:
            bias = None if self.k_bias is None else self.k_bias.detach()
            up_t, bias = pair_ordered_up(self.k_up.detach(), bias, self.head_dim)
            self._up_cache = (key, up_t.contiguous(), bias)
        return self._up_cache[1], self._up_cache[2]

    def _generic(self, q: torch.Tensor, held: DenseKV) -> torch.Tensor:
        """The new tokens' queries against everything held, read dense: ``[B, Hq, T, r_v]``."""
        b = q.shape[0]
        if self.key_rope == "post":
            kt = held.keys.view(b, self.groups, -1, self.head_group, self.head_dim).permute(0, 1, 3, 4, 2)
        else:
            kt, q = self.keys(held.keys, held.positions), pair_order(q, self.head_dim)
        return latent_attention(q, kt, held.values, held.valid, self.scaling)


@dataclass(frozen=True)
class DecodePath:
    """One way for :class:`LatentAttention` to attend in a step.

    Attributes
    ----------
    name
        Its name (tests check which path a step takes).
    reads
        The layout it asks the cache layer for (``kvcompress.runtime.cache.Layout``).
    when
        The condition under which it is taken, and why.
    fits
        ``fits(attention, layer, q)``: whether the condition holds for this step.
    attend
        ``attend(attention, q, held)``: attention-weighted value latents ``[B, Hq, T, r_v]``.
    """

    name: str
    reads: Layout
    when: str
    fits: Callable[[LatentAttention, KVCompressLayer, torch.Tensor], bool]
    attend: Callable[[LatentAttention, torch.Tensor, DenseKV | PackedKV], torch.Tensor]


GENERIC = DecodePath(
    "generic", "dense",
    "Everything else, and every step that is not a decode step (prefill, no cache, a padding mask): the "
    "layer de-quantizes all it holds into fresh tensors, keys are reconstructed and rotated, then attended.",
    lambda attention, layer, q: True, LatentAttention._generic)

DECODE_PATHS: tuple[DecodePath, ...] = (
    DecodePath(
        "fused", "packed",
        "On a device in FUSED_DEVICES (CUDA), with rotated full-width keys and one latent per KV head "
        "(key_rope = 'post', head_group = 1), and a layer that holds each stream as KIVI min-max or scalar "
        "codebook codes (any width 1-8), with or without a sink, and no padding: the Triton kernel attends over the "
        "packed codes, the sink's 16-bit copies and the residual window without de-quantizing them to memory. "
        "Pre-RoPE latent keys would need their reconstruction and RoPE fused in as well, which no kernel does "
        "yet.",
        LatentAttention._fused_fits, LatentAttention._fused_decode),
    DecodePath(
        "workspace", "workspace",
        "float32 on the CPU, no gradients (it works in place), and no Qwen3 key norm between U_k and RoPE: "
        "the layer de-quantizes into the cache's reused buffers and kvcompress.runtime.latent_decode runs one GEMM per "
        "stage, with no buffer the size of the cache allocated per step.",
        LatentAttention._workspace_fits, LatentAttention._workspace_decode),
    GENERIC,
)
"""The decode paths, tried in order; the last (generic) always fits."""


def rope_phases(rotary: nn.Module, positions: torch.Tensor) -> torch.Tensor:
    """``e^{i n θ}`` at each of ``positions`` ``[...]``: complex64 ``[..., d/2]``, one angle per channel pair.

    The table of all positions is computed once by the model's rotary module (so any RoPE scaling it
    applies is kept), kept on that module as complex rows and grown by doubling; reading it is one gather
    of rows. In the rotate-half layout both halves of a head share one frequency per pair, so half a
    table is all of it.
    """
    need = int(positions.max()) + 1
    table = getattr(rotary, "_kvcompress_phases", None)
    if table is None or table.shape[0] < need or table.device != positions.device:
        size = max(need, 2 * table.shape[0] if table is not None else 4096)
        probe = torch.zeros(1, device=positions.device)
        cos, sin = rotary(probe, torch.arange(size, device=positions.device).unsqueeze(0))
        half = cos.shape[-1] // 2
        table = torch.complex(cos[0, :, :half].float(), sin[0, :, :half].float())  # [positions, d/2]
        rotary._kvcompress_phases = table
    return table.index_select(0, positions.reshape(-1)).view(*positions.shape, -1)


def rope_table(rotary: nn.Module, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of the first half of each head's channels at ``positions``, ``[..., d/2, S]``
    (transposed views of :func:`rope_phases`)."""
    rows = torch.view_as_real(rope_phases(rotary, positions)).to(dtype)  # [..., S, d/2, 2]
    return rows[..., 0].transpose(-1, -2), rows[..., 1].transpose(-1, -2)


def fused_causal_attention(q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """:func:`latent_attention` when the queries are all the stored tokens, none is padding (a prompt into
    an empty cache) and the value latents are as wide as the keys, through ``scaled_dot_product_attention``
    with ``is_causal``: torch's flash kernel
    never holds a ``[rows, keys]`` block of scores (at 4096 tokens on the CPU it takes 2.4 s less than
    the score blocks). The group's value latent becomes each of its KV heads' values, as a stride-0 view
    when there is one group."""
    b, groups, g, d, s = kt.shape
    k = kt.transpose(-1, -2).reshape(b, groups * g, s, d)  # a view when there is one group
    r = v.shape[-1]
    heads = v.unsqueeze(2).expand(b, groups, g, s, r)
    values = heads[:, 0] if groups == 1 else heads.reshape(b, groups * g, s, r)
    return F.scaled_dot_product_attention(q, k, values, is_causal=True, scale=scaling, enable_gqa=True)


def latent_attention(q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                     scaling: float) -> torch.Tensor:
    """Causal attention of the last ``T`` stored tokens' queries over all ``S`` stored tokens.

    Parameters
    ----------
    q : ``[B, Hq, T, d]`` rotated queries of the new tokens (the last ``T`` stored ones).
    kt : ``[B, G, g, d, S]`` rotated keys, transposed: ``g`` KV heads in each of ``G`` latent groups.
    v : ``[B, G, S, r]`` value latents, one per group, read by all of its heads.
    valid : ``[B, 1 or G, S]`` bool padding flags, or None.

    Returns
    -------
    ``[B, Hq, T, r]`` attention-weighted value latents.

    All query heads of a group read one value latent, so a whole group's weights multiply ``v`` in one
    GEMM, and neither ``k`` nor ``v`` is copied per head (GQA).
    """
    b, hq, t, d = q.shape
    _, groups, g, _, s = kt.shape
    # a prompt into an empty cache: fused causal attention, no score blocks. Only for values as wide as the
    # keys: otherwise SDPA falls back to its math path, which holds every [T, S] score (on the CPU, 9 heads
    # of 8192 tokens with 192-wide joint value latents took 5.7 GB)
    if t == s and valid is None and v.shape[-1] == d:
        return fused_causal_attention(q, kt, v, scaling)
    if t > QUERY_BLOCK:  # long prefill: at most QUERY_BLOCK query rows of scores at a time
        parts = []
        for i in range(0, t, QUERY_BLOCK):
            j = min(i + QUERY_BLOCK, t)
            seen = s - t + j  # keys visible to the last query of this block
            parts.append(latent_attention(q[:, :, i:j], kt[..., :seen], v[:, :, :seen],
                                          None if valid is None else valid[..., :seen], scaling))
        return torch.cat(parts, dim=2)
    rep = hq // (groups * g)
    scores = ((q * scaling).reshape(b, groups, g, rep * t, d) @ kt).view(b, groups, g, rep, t, s)
    mask = None
    if t > 1:  # earlier tokens are all visible; the new block is causal within itself
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
    if valid is not None:
        own = torch.zeros(t, s, dtype=torch.bool, device=q.device)
        own[torch.arange(t), torch.arange(s - t, s)] = True  # a padded query still sees itself: no NaN rows
        flags = valid.view(b, valid.shape[1], 1, 1, 1, s)
        mask = (flags if mask is None else flags & mask) | own
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))  # in place: no second copy of the score block
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
    return (probs.view(b, groups, g * rep * t, s) @ v).view(b, hq, t, v.shape[-1])
