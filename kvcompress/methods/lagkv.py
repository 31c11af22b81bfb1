"""LagKV token eviction (Liang et al., arXiv 2504.04704) as pure tensor functions.

LagKV is attention-free: each chunk of ``lag_size`` cached tokens is scored against the chunk that
follows it (its "lag" reference) using only the keys and values, and only the top-scoring tokens of the
chunk are kept. The stored layout of one layer is::

    [sink][settled region: compressed chunks][pending tokens]

The sink (the first ``sink_size`` tokens) is never evicted. Whenever the pending region holds at least
two full chunks, every chunk except the last full one is scored against its successor and shrunk to its
top ``keep_per_chunk`` tokens, which then join the settled region. The last full chunk and the remainder
stay pending until a later chunk arrives to serve as their reference. Because a chunk's reference is the
raw (uncompressed) next chunk and chunk boundaries are fixed at ``sink_size + i * lag_size`` in the
original token stream, the kept set does not depend on how the tokens were fed (one at a time, in
blocks, or all at once).

Scores (paper §3): each partition ``X`` of ``lag_size`` tokens is min–max normalized per channel by the
range of the next partition ``X_ref``, ``X̄ = (X − min X_ref) / (max X_ref − min X_ref)``; a token's score
is ``softmax_L(std_D(K̄)) + w · softmax_L(std_D(V̄))`` (:func:`chunk_scores`), and the chunk's top
``keep_per_chunk = round(keep_ratio · lag_size)`` tokens stay (:class:`kvcompress.recipe.LagKV`).

Settings: :class:`kvcompress.recipe.LagKV` (the one settings class; validated there). Checkpoint: the
manifest's ``eviction`` entry, nothing in the weights. Runtime: :func:`compress_step`, run by the cache layer
(:meth:`kvcompress.runtime.cache.KVCompressLayer.step`) as its own last step after each update. Bytes: an
evicting cache keeps one int32 position per token and latent head (:data:`kvcompress.memory.POSITION`); how
many tokens it drops depends on the text, at most :func:`max_stored_tokens` stay.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.recipe import LagKV

RANGE_EPS = 1e-6
"""Smallest per-channel reference range (max - min) used as a divisor.

A channel that is constant over the reference chunk has range 0; dividing by ``RANGE_EPS`` instead keeps
every normalized value finite (scores are computed in float32, where ``|x - min| / 1e-6`` stays far from
overflow for any realistic activation). Tokens that equal the constant map to 0 exactly, so fully
constant keys/values give uniform scores rather than NaN.
"""


def _normalized_std(x: Tensor, ref: Tensor, ref_valid: Tensor | None) -> Tensor:
    """Std over channels of ``x`` normalized by the reference's per-channel min/max, ``[..., L]``."""
    x, ref = x.float(), ref.float()
    if ref_valid is None:
        # Paper §3: per-channel min and max over the tokens of the lag (next) partition.
        lo = ref.amin(dim=-2, keepdim=True)
        hi = ref.amax(dim=-2, keepdim=True)
    else:
        token_ok = ref_valid.unsqueeze(-1)
        lo = ref.masked_fill(~token_ok, float("inf")).amin(dim=-2, keepdim=True)
        hi = ref.masked_fill(~token_ok, float("-inf")).amax(dim=-2, keepdim=True)
        # A reference chunk with no valid token gives no range: fall back to the identity normalization.
        empty = ~ref_valid.any(dim=-1)[..., None, None]
        lo = lo.masked_fill(empty, 0.0)
        hi = hi.masked_fill(empty, 1.0)
    # Paper §3: min-max normalization of the partition by its reference, then std over channels.
    normalized = (x - lo) / (hi - lo).clamp_min(RANGE_EPS)
    return normalized.std(dim=-1)


def chunk_scores(
    keys: Tensor,
    values: Tensor,
    ref_keys: Tensor,
    ref_values: Tensor,
    value_weight: float,
    valid: Tensor | None = None,
    ref_valid: Tensor | None = None,
) -> Tensor:
    """Score each token of each chunk against its reference (next) chunk.

    ``score = softmax_L(std_D(norm(K))) + value_weight * softmax_L(std_D(norm(V)))`` where ``norm``
    min-max normalizes every channel by the reference chunk's per-channel min and max, ``std_D`` is the
    (unbiased, as ``torch.std``) standard deviation over channels and ``softmax_L`` runs over the chunk's
    valid tokens.

    Parameters
    ----------
    keys, values : Tensor
        ``[B, H, C, L, Dk]`` and ``[B, H, C, L, Dv]``: ``C`` chunks of ``L`` tokens to score; ``Dk`` and
        ``Dv`` may differ and must be at least 2 (the std over channels is unbiased).
    ref_keys, ref_values : Tensor
        Same shapes as ``keys`` and ``values``: the reference chunk of each scored chunk.
    value_weight : float
        Weight of the value score.
    valid : Tensor, optional
        Bool mask broadcastable to ``[B, H, C, L]``; False tokens (padding) get score ``-inf`` and are left
        out of the softmax.
    ref_valid : Tensor, optional
        Bool mask broadcastable to ``[B, H, C, L]`` for the reference tokens; False tokens are left out of
        the min/max. A reference chunk without any valid token falls back to min 0, max 1 (no rescaling).

    Returns
    -------
    Tensor
        float32 ``[B, H, C, L]`` scores; higher means more important.
    """
    if ref_keys.shape != keys.shape or ref_values.shape != values.shape:
        raise ValueError("reference chunks must have the same shapes as the scored chunks")
    if keys.shape[:-1] != values.shape[:-1]:
        raise ValueError(
            f"keys {tuple(keys.shape)} and values {tuple(values.shape)} differ before the last dim"
        )
    if min(keys.shape[-1], values.shape[-1]) < 2:
        raise ValueError("LagKV needs at least 2 channels per head for the std over channels")
    key_std = _normalized_std(keys, ref_keys, ref_valid)
    value_std = _normalized_std(values, ref_values, ref_valid)
    if valid is not None:
        key_std = key_std.masked_fill(~valid, float("-inf"))
        value_std = value_std.masked_fill(~valid, float("-inf"))
    # Paper §3: softmax of the std over the partition's tokens; key score + weighted value score.
    scores = key_std.softmax(dim=-1) + value_weight * value_std.softmax(dim=-1)
    if valid is not None:
        # Also replaces the NaN softmax of a chunk that is entirely padding.
        scores = scores.masked_fill(~valid, float("-inf"))
    return scores


def scored_chunks(total: int, settled: int, cfg: LagKV) -> tuple[int, int]:
    """Where scoring starts and how many chunks can be scored among ``total`` stored tokens.

    Paper §3 (recursive compression): every full chunk after the settled region but the last gets the
    next chunk as its reference; the last one and any remainder wait for more tokens.
    """
    start = max(settled, min(cfg.sink_size, total))
    return start, (total - start) // cfg.lag_size - 1


def compress_step(
    keys: Tensor,
    values: Tensor,
    settled: int,
    cfg: LagKV,
    valid: Tensor | None = None,
) -> tuple[Tensor | None, int]:
    """Compress every pending chunk that has a full reference chunk after it, in one vectorized pass.

    Parameters
    ----------
    keys, values : Tensor
        Stored ``[B, H, T, Dk]`` keys and ``[B, H, T, Dv]`` values of one layer.
    settled : int
        Leading stored tokens that are final (sink plus settled region), as returned by the previous call;
        start with 0. The first ``cfg.sink_size`` tokens are always treated as settled.
    cfg : LagKV
        Eviction hyper-parameters.
    valid : Tensor, optional
        Bool ``[B, T]`` (per sequence) or ``[B, H, T]`` mask, False for padding. Padding in a scored chunk
        is evicted first and is excluded from the reference min/max. Once the caller has gathered with a
        per-head ``keep_index`` the mask differs per head, so it should keep and pass it as ``[B, H, T]``.

    Returns
    -------
    keep_index : Tensor or None
        int64 ``[B, H, T']`` strictly ascending indices of the stored tokens to keep (gather keys, values
        and any per-token metadata with it along the token axis), or None when nothing is evicted.
    new_settled : int
        Leading tokens of the gathered cache that are final; pass it to the next call.

    Notes
    -----
    Within a chunk, ties in score keep the earlier token (stable sort), so results are deterministic on
    every device; e.g. constant keys/values keep the first ``keep_per_chunk`` tokens of each chunk.
    """
    batch, heads, total, _ = keys.shape
    if values.shape[:3] != keys.shape[:3]:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} disagree on [B, H, T]")
    if not 0 <= settled <= total:
        raise ValueError(f"settled must be in [0, {total}], got {settled}")
    lag, keep = cfg.lag_size, cfg.keep_per_chunk
    start, n_scored = scored_chunks(total, settled, cfg)
    if n_scored < 1:
        return None, start
    new_settled = start + n_scored * keep
    if keep == lag:
        return None, new_settled

    def chunked(x: Tensor) -> tuple[Tensor, Tensor]:
        region = x[..., start : start + (n_scored + 1) * lag, :]
        region = region.reshape(*x.shape[:2], n_scored + 1, lag, x.shape[-1])
        return region[:, :, :-1], region[:, :, 1:]

    mask = mask_ref = None
    if valid is not None:
        if valid.dim() == 2:
            valid = valid[:, None, :]
        region_mask = valid[..., start : start + (n_scored + 1) * lag].reshape(
            *valid.shape[:2], n_scored + 1, lag
        )
        mask, mask_ref = region_mask[:, :, :-1], region_mask[:, :, 1:]
    key_chunks, key_refs = chunked(keys)
    value_chunks, value_refs = chunked(values)
    scores = chunk_scores(key_chunks, value_chunks, key_refs, value_refs, cfg.value_weight, mask, mask_ref)

    # Top-k per chunk and head; stable sort breaks ties toward the earlier token. Kept tokens stay in order.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :keep]
    offsets = start + lag * torch.arange(n_scored, device=keys.device).view(1, 1, n_scored, 1)
    selected = (order.sort(dim=-1).values + offsets).reshape(batch, heads, n_scored * keep)

    def span(lo: int, hi: int) -> Tensor:
        return torch.arange(lo, hi, device=keys.device).expand(batch, heads, hi - lo)

    keep_index = torch.cat([span(0, start), selected, span(start + n_scored * lag, total)], dim=-1)
    return keep_index, new_settled


def max_stored_tokens(n: int, cfg: LagKV) -> int:
    """Stored tokens after ``n`` tokens have been fed through :func:`compress_step`.

    ``sink + c * keep_per_chunk + pending`` with ``c = max(0, (n - sink) // lag - 1)`` compressed chunks
    and ``pending = n - sink - c * lag < 2 * lag``; just ``n`` while ``n <= sink``. Independent of how
    the ``n`` tokens were split into calls.

    Parameters
    ----------
    n : int
        Tokens fed so far.
    cfg : LagKV
        Eviction hyper-parameters.

    Returns
    -------
    int
        The number of stored tokens (an exact count, and the memory bound).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n <= cfg.sink_size:
        return n
    rest = n - cfg.sink_size
    compressed = max(0, rest // cfg.lag_size - 1)
    return cfg.sink_size + compressed * cfg.keep_per_chunk + rest - compressed * cfg.lag_size
