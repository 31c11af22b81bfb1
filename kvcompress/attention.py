"""Attention that caches low-rank K/V latents (LoRC) and reads them back from the kvcompress cache.

Per head group of ``g`` KV heads (``G`` groups per layer):

* values: the cache holds ``c_v = D_v x`` (``r_v`` wide). Attention weights sum to one, so
  ``Σ_t p_t (U_v c_v,t + b_v) = U_v (Σ_t p_t c_v,t) + b_v``: the up-projection ``U_v`` and the bias are
  folded into ``o_proj`` at export, which then takes ``num_heads · r_v`` inputs. Exact, and fewer FLOPs.
* keys (``key_rope="pre"``, the default): the cache holds ``c_k = D_k x`` (pre-RoPE) and each
  token's position. At attention time ``k = RoPE(U_k c_k + b_k, pos)``. ``U_k`` cannot be folded into
  ``q``: the score is ``qᵀ R_mᵀ R_n U_k c_n``, and the rotation ``R_n`` sits *between* ``q`` and ``U_k``
  and changes with each key's position ``n``, so no single matrix can be precomputed for all keys.
  With ``key_rope="post"`` (full-width keys only, as KIVI does) the cache holds the rotated keys
  themselves, grouped per latent head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the rotate-half layout used by Hugging Face Llama-family models."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


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
    """

    def __init__(self, config, layer_idx: int, rank_k: int, rank_v: int, head_group: int, rotary: nn.Module,
                 bias: bool = False, q_norm: nn.Module | None = None, k_norm: nn.Module | None = None,
                 key_rope: str = "pre"):
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
        self.o_proj = nn.Linear(self.num_heads * rank_v, hidden, bias=bias)
        self.q_norm, self.k_norm = q_norm, k_norm
        self.key_rope = key_rope
        self._rotary = (rotary,)  # shared with the model; a tuple keeps it out of this module's state dict

    def keys(self, latents: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotated keys ``[B, num_kv_heads, S, head_dim]`` from latents ``[B, G, S, r_k]`` and positions."""
        b, _, s, _ = latents.shape
        k = latents @ self.k_up.to(latents.dtype).transpose(1, 2)  # [B, G, S, r] @ [G, r, g·d]
        k = k.reshape(b, self.groups, s, self.head_group, self.head_dim).transpose(2, 3)
        k = k.reshape(b, self.num_kv_heads, s, self.head_dim)
        if self.k_bias is not None:
            k = k + self.k_bias.view(1, self.num_kv_heads, 1, self.head_dim).to(k.dtype)
        if self.k_norm is not None:
            k = self.k_norm(k)
        # positions: [B, 1 or G, S]; after eviction each latent head's tokens have their own positions
        p = positions.shape[1]
        cos, sin = self._rotary[0](k, positions.reshape(b * p, s))
        cos, sin = (x.view(b, p, s, self.head_dim).to(k.dtype) for x in (cos, sin))
        if p > 1:
            cos, sin = (x.repeat_interleave(self.head_group, dim=1) for x in (cos, sin))
        return rotate(k, cos, sin)

    def _grouped(self, k: torch.Tensor) -> torch.Tensor:
        b, _, s, d = k.shape
        return k.view(b, self.groups, self.head_group, s, d).transpose(2, 3).reshape(b, self.groups, s, -1)

    def _ungrouped(self, k: torch.Tensor) -> torch.Tensor:
        b, _, s, _ = k.shape
        k = k.view(b, self.groups, s, self.head_group, self.head_dim).transpose(2, 3)
        return k.reshape(b, self.num_kv_heads, s, self.head_dim)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, past_key_values=None,
                position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
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
            ck = self._grouped(self.keys(ck, positions.unsqueeze(1)))
        layer = past_key_values.layers[self.layer_idx] if past_key_values is not None else None
        if layer is not None:
            ck, cv, stored_pos, stored_valid = layer.update(ck, cv, {"positions": positions, "valid": valid})
        else:
            stored_pos = positions.unsqueeze(1)
            stored_valid = valid.unsqueeze(1) if valid is not None else None
        k = self._ungrouped(ck) if self.key_rope == "post" else self.keys(ck, stored_pos)
        out = latent_attention(q, k, cv, stored_valid, self.scaling)
        if layer is not None:
            layer.evict()  # after attention: this block's queries have seen all of its tokens
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.rank_v)), None


def latent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                     scaling: float) -> torch.Tensor:
    """Causal attention of the last ``T`` stored tokens' queries over all stored tokens.

    Parameters
    ----------
    q : ``[B, Hq, T, d]`` rotated queries of the new tokens (the last ``T`` stored ones).
    k : ``[B, Hkv, S, d]`` rotated keys.
    v : ``[B, G, S, r]`` value latents; ``Hkv`` is a multiple of ``G`` and ``Hq`` of ``Hkv``.
    valid : ``[B, 1 or G, S]`` bool padding flags, or None.

    Returns
    -------
    ``[B, Hq, T, r]`` attention-weighted value latents.
    """
    _, hq, t, _ = q.shape
    s, hkv, g = k.shape[2], k.shape[1], v.shape[1]
    v = v.repeat_interleave(hkv // g, dim=1) if g != hkv else v
    if t == 1 and valid is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=hq != hkv)
    # earlier tokens are all visible; the new block is causal within itself
    mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
    mask = mask.view(1, 1, t, s)
    if valid is not None:
        valid = valid.repeat_interleave(hkv // valid.shape[1], dim=1) if valid.shape[1] > 1 else valid
        valid = valid.repeat_interleave(hq // valid.shape[1], dim=1) if valid.shape[1] > 1 else valid
        own = torch.zeros(t, s, dtype=torch.bool, device=q.device)
        own[torch.arange(t), torch.arange(s - t, s)] = True  # a padded query still sees itself: no NaN rows
        mask = (mask & valid.unsqueeze(2)) | own
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=hq != hkv)
