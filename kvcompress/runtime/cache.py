"""The kvcompress cache: one layer object per decoder layer on transformers' ``Cache`` layer API.

A layer stores, per sequence and per latent head (a KV-head group), the key features (latent or full
width, pre-RoPE), the value features, and each stored token's RoPE position. Each stream lives in a
store (``kvcompress.methods``: dense, or a quantizer's codes plus an fp residual window); eviction
is a per-layer policy that picks which fp tokens to keep. Tokens are evicted first and quantized only
once the policy has settled them.

Attention (``kvcompress.runtime.attention``) talks to a layer through :meth:`KVCompressLayer.step`: it hands over
the new tokens and asks for everything held in one :data:`Layout` (dense tensors, de-quantized into the
shared workspace, or packed codes plus the sink's copies and the residual window, where
:meth:`KVCompressLayer.can_read` says the layer has them). The layer then runs its own eviction step;
what it holds afterwards is really gone for later tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvcompress.errors import KVCompressError
from kvcompress.kernels.pack import TablePacked, reads_tuples
from kvcompress.methods import CodebookStore, DenseStore, QuantizedStore, VectorCodebookStore, make_store
from kvcompress.methods.kivi import Packed
from kvcompress.methods.lagkv import compress_step, scored_chunks
from kvcompress.methods.value_prediction import HeldPrediction, ValuePredictor
from kvcompress.plan import LayerPlan, layer_plan
from kvcompress.recipe import LagKV, LayerRecipe, Quant
from kvcompress.runtime.workspace import Workspace

Layout = Literal["dense", "workspace", "packed"]
"""How :meth:`KVCompressLayer.step` hands out what a layer holds: ``"dense"`` and ``"workspace"`` give a
:class:`DenseKV` (fresh tensors, or the cache's reused workspace buffers), ``"packed"`` a :class:`PackedKV`."""

PACKED_STORES = (QuantizedStore, CodebookStore, VectorCodebookStore)  # the decode kernel reads these (exact types)


def _kernel_reads(store: object, width: int) -> bool:
    """Whether the decode kernel reads the codes of ``store``, a ``width``-channel stream: its type is one of
    :data:`PACKED_STORES`, and the kernel reads the points of its vector codebook
    (:func:`~kvcompress.kernels.pack.reads_tuples`), decided from the layout before anything is packed."""
    if type(store) not in PACKED_STORES:
        return False
    return not isinstance(store, VectorCodebookStore) or reads_tuples(store.bits, store.tuple_size(width))


@dataclass(frozen=True)
class DenseKV:
    """Everything a layer holds, de-quantized, new tokens last.

    Attributes
    ----------
    keys, values
        ``[B, H, S, Dk]`` and ``[B, H, S, Dv]`` in the dtype of the stored tokens.
    positions
        ``[B, 1 or H, S]`` int32 RoPE positions, or None when the layer keeps none (post-RoPE keys without
        eviction, :attr:`kvcompress.plan.Plan.stores_positions`).
    valid
        ``[B, 1 or H, S]`` bool padding flags, or None when no padding was ever stored.
    workspace
        For layout ``"workspace"``: the buffers ``keys`` and ``values`` lie in, from which the rest of this
        step may take more (under other names); None for ``"dense"``.
    prediction
        For layout ``"workspace"`` of a layer that predicts its values from its keys: which tokens of
        ``values`` hold only the residuals, and what attention adds for them
        (:class:`~kvcompress.methods.value_prediction.HeldPrediction`); None otherwise, ``values`` then
        being the values.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor | None
    valid: torch.Tensor | None
    workspace: Workspace | None = None
    prediction: HeldPrediction | None = None


@dataclass(frozen=True)
class PackedKV:
    """Everything a layer holds as the decode kernel reads it: packed codes first, then the 16-bit residual
    window; the sink's 16-bit copies stand in for the first packed tokens.

    Attributes
    ----------
    keys, values
        Packed keys (``along="tokens"``) and values (``along="channels"``), each KIVI min–max codes
        (:class:`Packed`) or codebook indices with their table (:class:`TablePacked`), or both None while
        nothing is packed.
    key_residual, value_residual
        ``[B, H, Tr, Dk]`` and ``[B, H, Tr, Dv]``: the tokens after the packed ones, in the compute dtype.
    key_sink, value_sink
        ``[B, H, S, Dk]`` and ``[B, H, S, Dv]``: 16-bit copies of the first ``S`` packed tokens, which
        replace their codes (the attention sink), or None without one.
    """

    keys: Packed | TablePacked | None
    values: Packed | TablePacked | None
    key_residual: torch.Tensor
    value_residual: torch.Tensor
    key_sink: torch.Tensor | None = None
    value_sink: torch.Tensor | None = None


class KVCompressLayer(CacheLayerMixin):
    """One decoder layer's compressed cache.

    ``get_seq_length`` counts tokens *seen* (what positions continue from); ``stored_length`` counts
    tokens *held*, which is smaller once a policy evicts.

    Parameters
    ----------
    plan : LayerPlan, optional
        Bits and quantization settings of both streams (default: dense, not quantized).
    eviction : LagKV, optional
        LagKV settings; eviction is the last part of each :meth:`step`, *after* the read it returns, so a
        block's own queries still see every token of the block, and everything that reports what the
        layer holds (:meth:`kv_bytes`, :attr:`stored_length`) counts after eviction. Selection is per
        sequence and per latent head; each kept token keeps its original RoPE position, and keys are
        rotated at those positions when read, so positions stay true after eviction.
    workspace : Workspace, optional
        Scratch buffers for decode, shared by all layers of a cache (default: this layer's own).
    keep_positions : bool
        Keep each stored token's RoPE position (4 bytes per token, and per latent head once evicting). Only
        pre-RoPE key latents and eviction need them (:attr:`kvcompress.plan.Plan.stores_positions`).
    """

    is_sliding = False
    is_compileable = False

    def __init__(self, plan: LayerPlan | None = None, eviction: LagKV | None = None,
                 workspace: Workspace | None = None, keep_positions: bool = True) -> None:
        super().__init__()
        if eviction is not None and not keep_positions:
            raise ValueError("an evicting layer must keep positions: kept tokens are no longer in order")
        self.plan = plan or layer_plan(LayerRecipe(0, 1, 1), Quant(enabled=False))
        self.eviction = eviction
        self.keep_positions = keep_positions
        self.workspace = workspace or Workspace()
        self.settled = 0
        keys, values = self.plan.keys, self.plan.values
        self.key_store = make_store(keys.bits, keys.group, "tokens", keys.block, keys.method, keys.segment,
                                    keys.sink)
        self.value_store = make_store(values.bits, values.group, "channels", values.block, values.method,
                                      values.segment, values.sink)
        self.positions: torch.Tensor | None = None  # [B, 1 or H, T] int32 RoPE positions of stored tokens
        self.valid: torch.Tensor | None = None  # [B, 1 or H, T] bool, only once padding was seen
        self.seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """transformers' layer API: :meth:`step` in layout ``"dense"``; ``cache_kwargs`` may carry
        ``positions`` and ``valid``.

        Returns
        -------
        tuple
            ``(keys, values, positions, valid)`` of everything held before this step's eviction, new tokens
            last.
        """
        cache_kwargs = (args[0] if args else kwargs.get("cache_kwargs")) or {}
        held = self.step(key_states, value_states, cache_kwargs.get("positions"), cache_kwargs.get("valid"))
        return held.keys, held.values, held.positions, held.valid

    def can_read(self, layout: Layout) -> bool:
        """Whether :meth:`step` can hand out this layer's tokens in ``layout``.

        ``"dense"`` and ``"workspace"`` always; ``"packed"`` when each stream is a plain KIVI store or a
        codebook store (:data:`PACKED_STORES`: not DecoQuant cores nor channel runs of several widths; a
        vector codebook of integer width), both with the same sink and flush block (so
        both hold the same packed tokens), no padding flags are stored and the values are not predicted from
        the keys, which is what the fused decode kernel reads.
        """
        if layout == "packed":
            keys, values = self.key_store, self.value_store
            return (self.valid is None and not self.plan.predicts_values and _kernel_reads(keys, self.plan.keys.rank)
                    and _kernel_reads(values, self.plan.values.rank)
                    and keys.sink == values.sink and keys.block == values.block)
        return layout in ("dense", "workspace")

    def step(self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor | None = None,
             valid: torch.Tensor | None = None, layout: Layout = "dense", predictor: ValuePredictor | None = None
             ) -> DenseKV | PackedKV:
        """Store new key/value features, read everything held in ``layout``, then evict.

        Parameters
        ----------
        key_states, value_states
            New features ``[B, H, T, Dk]`` and ``[B, H, T, Dv]``.
        positions
            ``[B, T]`` RoPE positions of the new tokens (default: counting on from the tokens seen).
        valid
            ``[B, T]`` bool padding flags of the new tokens, or None.
        layout
            What to hand out; ``"packed"`` only where :meth:`can_read` allows it.
        predictor
            The layer's value predictor (:mod:`kvcompress.methods.value_prediction`), required when its plan
            predicts values: the value store then holds the residual of the values from the de-quantized keys.

        Returns
        -------
        DenseKV | PackedKV
            Everything held with the new tokens last, read *before* this step's eviction (which replaces
            the stores' tensors rather than changing them, so the read stays as it was).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, _, t, _ = key_states.shape
        if positions is None:
            positions = torch.arange(self.seen, self.seen + t, device=key_states.device).expand(b, t)
        elif self.plan.predicts_values:
            _check_counting(positions, self.seen)
        if self.plan.predicts_values:
            _check_predicted(predictor, valid)
        self.key_store.append(key_states)
        self.value_store.append(value_states)
        if self.keep_positions:
            self.positions = _cat(self.positions, positions.reshape(b, 1, t).to(torch.int32))
        self.seen += t
        if valid is not None or self.valid is not None:
            new_valid = valid if valid is not None else torch.ones(b, t, dtype=torch.bool, device=positions.device)
            old = self.valid
            if old is None:  # padding appears now: everything before was valid
                old = torch.ones(b, 1, self.stored_length - t, dtype=torch.bool, device=new_valid.device)
            self.valid = _cat(old, new_valid.reshape(b, 1, t))
        held = self._read(layout, key_states, predictor)
        self._evict(predictor)
        return held

    def _read(self, layout: Layout, like: torch.Tensor, predictor: ValuePredictor | None = None
              ) -> DenseKV | PackedKV:
        keys, values = self.key_store, self.value_store
        if layout == "packed":
            if not self.can_read("packed"):
                raise ValueError("this layer's stores are not both KIVI or codebook stores with one sink and "
                                 "no padding (nor vector points of a fractional width)")
            return PackedKV(keys.packed, values.packed, keys.residual(), values.residual(),
                            keys.sink_copy, values.sink_copy)
        if layout == "workspace":
            held = DenseKV(_read_into(keys, self.workspace, "keys", like),
                           _read_into(values, self.workspace, "values", like), self.positions, self.valid,
                           self.workspace)
        else:
            held = DenseKV(keys.read(), values.read(), self.positions, self.valid)
        if predictor is not None and values.quantized_length:  # codes hold residuals: add the prediction back
            first = values.sink if values.sink_copy is not None else 0  # the sink's copies are the values
            tq = values.quantized_length
            if layout == "workspace":  # attention adds it to its weighted sum, not token by token
                held = replace(held, prediction=HeldPrediction(predictor, first, tq))
            else:
                held.values[..., first:tq, :] += predictor(held.keys[..., first:tq, :], first).to(held.values.dtype)
        return held

    def _evict(self, predictor: ValuePredictor | None = None) -> None:
        """Apply the eviction policy to the fp tokens, then quantize whatever is settled.

        Without a policy every stored token is settled. LagKV scores each chunk against the next and
        settles the chunks it has compressed; only those may be quantized ("evict before quantizing").
        """
        if self.eviction is not None:
            self._lagkv()
        else:
            self.settled = self.stored_length
        self.key_store.flush(self.settled)
        if predictor is None:
            self.value_store.flush(self.settled)
        else:  # the keys of the tokens about to be coded are coded already: predict from what reads will see
            self.value_store.flush(self.settled, lambda start, n: predictor(
                self.key_store.read()[..., start:start + n, :], start))

    def _lagkv(self) -> None:
        done = self.key_store.quantized_length  # packed tokens are settled, so scoring starts after them
        cfg = self.eviction if done == 0 else replace(self.eviction, sink_size=0)
        start, n_scored = scored_chunks(self.stored_length - done, self.settled - done, cfg)
        if n_scored < 1:  # no chunk has its reference yet: nothing to score (the common decode step)
            self.settled = done + start
            return
        keys, values = self.key_store.residual(), self.value_store.residual()
        valid = None if self.valid is None else self.valid[..., done:]
        keep, settled = compress_step(keys, values, self.settled - done, cfg, valid=valid)
        self.settled = done + settled
        if keep is None:
            return
        self.key_store.keep(keep)
        self.value_store.keep(keep)
        heads = keep.shape[1]

        def gather(meta: torch.Tensor) -> torch.Tensor:
            meta = meta.expand(-1, heads, -1)
            return torch.cat([meta[..., :done], meta[..., done:].gather(2, keep)], dim=-1)

        self.positions = gather(self.positions)
        if self.valid is not None:
            self.valid = gather(self.valid)

    @property
    def stored_length(self) -> int:
        """Tokens held (every token seen, unless it evicts)."""
        return self.seen if self.positions is None else self.positions.shape[-1]

    @property
    def window_length(self) -> int:
        """Held keys not yet quantized: the 16-bit residual window of a quantized layer (0 for a dense one)."""
        return self.stored_length - self.key_store.quantized_length if self.plan.keys.quantized else 0

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
        self.__init__(self.plan, self.eviction, self.workspace, self.keep_positions)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for store in (self.key_store, self.value_store):
            store.select_batch(beam_idx)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))
        if self.valid is not None:
            self.valid = self.valid.index_select(0, beam_idx.to(self.valid.device))


def _check_predicted(predictor: ValuePredictor | None, valid: torch.Tensor | None) -> None:
    """Refuse a step that a layer predicting its values cannot store: no predictor given, or padding (a
    padded token's position is not its index in the cache, at which the predictor reads keys)."""
    if predictor is None:
        raise ValueError("this layer predicts its values from its keys: step() needs the attention's predictor")
    if valid is not None:
        raise KVCompressError(_NOT_COUNTING)


def _check_counting(positions: torch.Tensor, seen: int) -> None:
    """Refuse positions ``[B, T]`` that do not continue ``seen, seen + 1, …`` in every sequence."""
    counting = torch.arange(seen, seen + positions.shape[-1], device=positions.device, dtype=positions.dtype)
    if not torch.equal(positions, counting.expand_as(positions)):
        raise KVCompressError(_NOT_COUNTING)


_NOT_COUNTING = ("a checkpoint that predicts values from keys (predict_values) reads each stored token at its "
                 "index: positions must count 0, 1, 2, ... with no padding")


def _read_into(store, workspace: Workspace, name: str, like: torch.Tensor) -> torch.Tensor:
    """Everything ``store`` holds, ``[B, H, S, D]`` in ``like``'s dtype: de-quantized into workspace
    ``name`` (a dense store of that dtype is returned as it is)."""
    if isinstance(store, DenseStore) and store.read().dtype == like.dtype:
        return store.read()
    return store.read(workspace.take(name, store.shape, like.dtype, like.device))


def _cat(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    if old is None:
        return new
    if old.shape[1] != new.shape[1]:  # per-head metadata after eviction, new tokens shared by heads
        new = new.expand(-1, old.shape[1], -1)
    return torch.cat([old, new], dim=-1)


class KVCompressCache(Cache):
    """A ``Cache`` of :class:`KVCompressLayer` objects, one per decoder layer, sharing one decode workspace."""

    def __init__(self, plans: list[LayerPlan], eviction: LagKV | None = None, keep_positions: bool = True) -> None:
        workspace = Workspace()
        super().__init__(layers=[KVCompressLayer(p, eviction, workspace, keep_positions) for p in plans])

    def kv_bytes(self) -> int:
        """Bytes held by every layer together (what is really stored)."""
        return sum(layer.kv_bytes() for layer in self.layers)
