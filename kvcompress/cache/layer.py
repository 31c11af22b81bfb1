"""The kvcompress cache: one layer object per decoder layer on transformers' ``Cache`` layer API.

A layer stores, per sequence and per latent head (a KV-head group), the key features (latent or full
width, pre-RoPE), the value features, and each stored token's RoPE position. Storage of each stream
is a :class:`Store`; eviction is a per-layer policy that returns which stored tokens to keep.
Attention (``kvcompress.attention``) reads what the layer holds, so whatever the stores and the
policy drop is really gone for later tokens.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvcompress.cache.lagkv import LagKVConfig, compress_step


class DenseStore:
    """A growing ``[B, H, T, D]`` tensor in the model's dtype (no quantization)."""

    def __init__(self) -> None:
        self.data: torch.Tensor | None = None

    def append(self, x: torch.Tensor) -> None:
        """Add new tokens along dim -2."""
        self.data = x if self.data is None else torch.cat([self.data, x], dim=-2)

    def read(self) -> torch.Tensor:
        """All stored tokens, ``[B, H, T, D]``."""
        assert self.data is not None
        return self.data

    def keep(self, index: torch.Tensor) -> None:
        """Keep only stored tokens ``index`` (``[B, H, T']``, ascending)."""
        assert self.data is not None
        self.data = self.data.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, self.data.shape[-1]))

    def nbytes(self) -> int:
        """Bytes held."""
        return 0 if self.data is None else self.data.numel() * self.data.element_size()

    def select_batch(self, index: torch.Tensor) -> None:
        """Reorder or select sequences (beam search)."""
        if self.data is not None:
            self.data = self.data.index_select(0, index.to(self.data.device))


class KVCompressLayer(CacheLayerMixin):
    """One decoder layer's compressed cache.

    ``get_seq_length`` counts tokens *seen* (what positions continue from); ``stored_length`` counts
    tokens *held*, which is smaller once a policy evicts.

    Parameters
    ----------
    eviction : LagKVConfig, optional
        LagKV settings; eviction runs in :meth:`evict`, which attention calls *after* reading the cache,
        so a block's own queries still see every token of the block. Selection is per sequence and per
        latent head; each kept token keeps its original RoPE position, and keys are rotated at those
        positions when read, so positions stay true after eviction.
    """

    is_sliding = False
    is_compileable = False

    def __init__(self, eviction: LagKVConfig | None = None) -> None:
        super().__init__()
        self.eviction = eviction
        self.settled = 0
        self.key_store = DenseStore()
        self.value_store = DenseStore()
        self.positions: torch.Tensor | None = None  # [B, 1 or H, T] int32 RoPE positions of stored tokens
        self.valid: torch.Tensor | None = None  # [B, 1 or H, T] bool, only once padding was seen
        self.seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store new key/value features; ``cache_kwargs`` carries ``positions`` and ``valid``.

        Returns
        -------
        tuple
            ``(keys, values, positions, valid)`` of everything held, new tokens last.
        """
        cache_kwargs = (args[0] if args else kwargs.get("cache_kwargs")) or {}
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, _, t, _ = key_states.shape
        positions = cache_kwargs.get("positions")
        if positions is None:
            positions = torch.arange(self.seen, self.seen + t, device=key_states.device).expand(b, t)
        valid = cache_kwargs.get("valid")
        self.key_store.append(key_states)
        self.value_store.append(value_states)
        self.positions = _cat(self.positions, positions.reshape(b, 1, t).to(torch.int32))
        if valid is not None or self.valid is not None:
            new_valid = valid if valid is not None else torch.ones(b, t, dtype=torch.bool, device=positions.device)
            old = self.valid
            if old is None:  # padding appears now: everything before was valid
                old = torch.ones(b, 1, self.stored_length - t, dtype=torch.bool, device=new_valid.device)
            self.valid = _cat(old, new_valid.reshape(b, 1, t))
        self.seen += t
        return self.key_store.read(), self.value_store.read(), self.positions, self.valid

    def evict(self) -> None:
        """Apply the eviction policy to what is stored (LagKV: score each chunk against the next)."""
        if self.eviction is None or self.positions is None:
            return
        keys, values = self.key_store.read(), self.value_store.read()
        keep, self.settled = compress_step(keys, values, self.settled, self.eviction, valid=self.valid)
        if keep is None:
            return
        self.key_store.keep(keep)
        self.value_store.keep(keep)
        heads = keep.shape[1]
        self.positions = self.positions.expand(-1, heads, -1).gather(2, keep)
        if self.valid is not None:
            self.valid = self.valid.expand(-1, heads, -1).gather(2, keep)

    @property
    def stored_length(self) -> int:
        """Tokens held."""
        return 0 if self.positions is None else self.positions.shape[-1]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # kvcompress attention builds its own mask from stored positions; it only needs the padding
        # flags of the new tokens, which this size selects from the 2D attention mask.
        return query_length, 0

    def get_max_length(self) -> int:
        return -1

    def kv_bytes(self) -> int:
        """Bytes this layer holds: both stores, positions, and padding flags if any."""
        meta = sum(t.numel() * t.element_size() for t in (self.positions, self.valid) if t is not None)
        return self.key_store.nbytes() + self.value_store.nbytes() + meta

    def reset(self) -> None:
        self.__init__(self.eviction)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for store in (self.key_store, self.value_store):
            store.select_batch(beam_idx)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))
        if self.valid is not None:
            self.valid = self.valid.index_select(0, beam_idx.to(self.valid.device))


def _cat(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    if old is None:
        return new
    if old.shape[1] != new.shape[1]:  # per-head metadata after eviction, new tokens shared by heads
        new = new.expand(-1, old.shape[1], -1)
    return torch.cat([old, new], dim=-1)


class KVCompressCache(Cache):
    """A ``Cache`` of :class:`KVCompressLayer` objects, one per decoder layer."""

    def __init__(self, num_layers: int, eviction: LagKVConfig | None = None) -> None:
        super().__init__(layers=[KVCompressLayer(eviction) for _ in range(num_layers)])

    def kv_bytes(self) -> int:
        """Bytes held by every layer together (what is really stored)."""
        return sum(layer.kv_bytes() for layer in self.layers)
