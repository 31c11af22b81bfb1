"""The plan of a compressed checkpoint: every setting resolved once, in typed objects.

:func:`build_plan` turns a recipe (what the user asks) and the model's spec (what the model is) into a
:class:`Plan`. Export writes it into the manifest (:meth:`Plan.to_manifest`); loading, ``inspect``,
memory accounting and the cache read it back (:meth:`Plan.from_manifest`) and never look at a raw
dict. Every default is resolved here and nowhere else:

- the key group: ``key_group_size``, or ``group_size`` when it is 0;
- a quantized store's flush block: ``residual_length``, or the stream's group without a window;
- 16 bits (not quantized) for every stream when ``[quant]`` is off;
- the head group: ``head_group``, or all KV heads of a layer when it is 0;
- whether a layer's ``U_v`` is folded into ``o_proj`` (:func:`value_folded`);
- the key layout: pre-RoPE latents, or post-RoPE keys turned after RoPE when the rotation is on (into the
  queries' principal axes with ``key_axes``).

Manifests of schema 1 (kvcompress 0.1.0) hold the same per-layer fields, some missing, and read with
the defaults of their time (``method`` KIVI, ``value_folded`` true, ``key_segment`` 16).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from kvcompress.errors import KVCompressError
from kvcompress.methods import quantizer
from kvcompress.methods.lowrank import value_folded
from kvcompress.recipe import QUANT_METHODS, LagKV, LayerRecipe, Quant, Recipe
from kvcompress.sources import ModelSpec

DTYPES = ("float16", "bfloat16", "float32")
DENSE = 16  # bits of a stream that is not quantized


def check_dtype(dtype: str) -> str:
    """``dtype`` if it is a checkpoint dtype kvcompress writes and reads; else :class:`KVCompressError`."""
    if dtype not in DTYPES:
        raise KVCompressError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


@dataclass(frozen=True)
class StreamPlan:
    """One layer's keys or values as the cache stores them (per latent group).

    Attributes
    ----------
    rank
        Latent channels.
    bits
        Code width (an int, or a fractional width such as 1.5 for the quantizers that store one); 16 = not
        quantized; a tuple gives one integer width per ``segment`` channels.
    group
        Quantization group: tokens for keys (per-channel scales), channels for values (per-token scales).
    segment
        Channels per bit segment when ``bits`` is a tuple.
    block
        Tokens quantized at once: the residual window, or ``group`` without one.
    method
        The quantizer (a name in :data:`kvcompress.methods.QUANTIZERS`).
    sink
        First tokens that keep a 16-bit copy once quantized (the attention sink).
    """

    rank: int
    bits: float | tuple[int, ...]
    group: int
    segment: int
    block: int
    method: str = "kivi"
    sink: int = 0

    @property
    def quantized(self) -> bool:
        """Whether the stream holds low-bit codes."""
        return self.bits != DENSE


@dataclass(frozen=True)
class LayerPlan:
    """One decoder layer: its key and value streams (each with its quantizer) and the value layout."""

    layer: int
    keys: StreamPlan
    values: StreamPlan
    residual_length: int
    value_folded: bool  # U_v folded into o_proj, or kept apart as v_up
    predicts_values: bool = False  # value codes hold the residual from the keys' prediction (v_pred)


@dataclass(frozen=True)
class Plan:
    """A whole checkpoint's settings; see the module docstring for what is resolved where."""

    model_type: str
    dtype: str
    head_group: int
    key_rope: str  # "pre": key latents before RoPE; "post": full-width keys after RoPE
    key_rotation: bool  # post-RoPE keys and queries turned by one orthogonal matrix per KV head (k_rot)
    layers: tuple[LayerPlan, ...]
    eviction: LagKV | None
    recipe: str = ""
    key_axes: bool = False  # k_rot holds the queries' principal axes (calibrated), not a random rotation

    def groups(self, spec: ModelSpec) -> int:
        """Latent groups per layer."""
        return spec.num_kv_heads // self.head_group

    @property
    def stores_positions(self) -> bool:
        """Whether the cache keeps each stored token's RoPE position: pre-RoPE key latents are rotated at
        it when read, and eviction leaves gaps. Post-RoPE keys without eviction are stored already rotated,
        token after token, so nothing reads a position and none is kept."""
        return self.key_rope == "pre" or self.eviction is not None

    def to_manifest(self) -> dict:
        """The manifest fields of this plan (JSON types; see :meth:`from_manifest`)."""
        return {
            "model_type": self.model_type,
            "dtype": self.dtype,
            "head_group": self.head_group,
            "key_rope": self.key_rope,
            "key_rotation": self.key_rotation,
            "key_axes": self.key_axes,
            "recipe": self.recipe,
            "eviction": None if self.eviction is None else {"method": "lagkv", **{
                k: v for k, v in asdict(self.eviction).items() if k != "enabled"}},
            "layers": [
                {"layer": lay.layer, "rank_k": lay.keys.rank, "rank_v": lay.values.rank,
                 "bits_k": _json_bits(lay.keys.bits), "bits_v": _json_bits(lay.values.bits),
                 "group_size": lay.values.group, "key_group_size": lay.keys.group,
                 "key_segment": lay.keys.segment, "residual_length": lay.residual_length,
                 "method": lay.values.method, "key_method": lay.keys.method, "sink": lay.keys.sink,
                 "value_folded": lay.value_folded, "predicts_values": lay.predicts_values}
                for lay in self.layers
            ],
        }

    @classmethod
    def from_manifest(cls, manifest: dict) -> Plan:
        """Read a manifest of schema 1 or 2.

        Raises
        ------
        KVCompressError
            A missing or mistyped field, named.
        """
        try:
            eviction = manifest.get("eviction")
            plan = cls(
                model_type=str(manifest["model_type"]),
                dtype=check_dtype(manifest["dtype"]),
                head_group=int(manifest["head_group"]),
                key_rope=str(manifest.get("key_rope", "pre")),
                key_rotation=bool(manifest.get("key_rotation", False)),
                key_axes=bool(manifest.get("key_axes", False)),
                layers=tuple(_layer_from_manifest(lay) for lay in manifest["layers"]),
                eviction=None if eviction is None else LagKV(
                    enabled=True, **{k: v for k, v in eviction.items() if k != "method"}),
                recipe=str(manifest.get("recipe") if isinstance(manifest.get("recipe"), str)
                           else (manifest.get("recipe") or {}).get("name", "")),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise KVCompressError(f"corrupt manifest: bad or missing field {e}") from None
        bad = [lay.layer for lay in plan.layers if {lay.keys.method, lay.values.method} - set(QUANT_METHODS)]
        if plan.key_rope not in ("pre", "post") or bad:
            raise KVCompressError(f"corrupt manifest: key_rope {plan.key_rope!r}, quant method of layers {bad}")
        try:
            for lay in plan.layers:
                check_widths(lay)
        except KVCompressError as e:
            raise KVCompressError(f"corrupt manifest: {e}") from None
        return plan


def _channel_group(name: str, stream: StreamPlan) -> int:
    """The channels a stream's codes are grouped by: its whole width for keys (groups run along tokens)."""
    return stream.rank if name == "k" else stream.group


def check_widths(lay: LayerPlan) -> None:
    """Refuse, in one line naming the stream, a code width that a quantized stream's quantizer does not store."""
    for name, stream in (("k", lay.keys), ("v", lay.values)):
        if stream.quantized:
            for b in sorted(set(stream.bits)) if isinstance(stream.bits, tuple) else [stream.bits]:
                quantizer(stream.method).check_bits(f"layer {lay.layer}: bits_{name}", stream.method, b,
                                                    stream.rank, _channel_group(name, stream))


def stream_widths(name: str, stream: StreamPlan, half_bits: bool) -> tuple[float, ...]:
    """The widths the allocation may give ``stream`` (``name`` ``"k"`` or ``"v"``): those its quantizer stores
    for its width and groups, the fractional ones only with ``half_bits``."""
    store = quantizer(stream.method)
    out = []
    for b in store.widths:
        if not half_bits and b != int(b):
            continue
        try:
            store.check_bits("", stream.method, b, stream.rank, _channel_group(name, stream))
        except KVCompressError:  # not stored for this width and these groups
            continue
        out.append(b)
    return tuple(out)


def _json_bits(bits: float | tuple[int, ...]) -> float | list[int]:
    return list(bits) if isinstance(bits, tuple) else bits


def _layer_from_manifest(lay: dict) -> LayerPlan:
    method = str(lay.get("method", "kivi"))  # manifests before DecoQuant: KIVI; before key_method: the same
    quant = Quant(enabled=True, method=method, key_method=str(lay.get("key_method", method)),
                  sink=int(lay.get("sink", 0)),
                  group_size=int(lay["group_size"]), key_group_size=int(lay.get("key_group_size") or 0),
                  residual_length=int(lay["residual_length"]), segment=int(lay.get("key_segment", 16)),
                  predict_values=bool(lay.get("predicts_values", False)))
    recipe = LayerRecipe(int(lay["layer"]), int(lay["rank_k"]), int(lay["rank_v"]), lay["bits_k"], lay["bits_v"])
    return layer_plan(recipe, quant, bool(lay.get("value_folded", True)))  # manifests before v_up: folded


def layer_plan(lay: LayerRecipe, quant: Quant, folded: bool = True) -> LayerPlan:
    """One layer's plan from its recipe entry and ``[quant]``: the one place where stream defaults resolve
    (key group, flush block, 16 bits when quantization is off)."""

    def stream(rank: int, bits: float | list[int], group: int, segment: int, method: str) -> StreamPlan:
        width = (tuple(int(b) for b in bits) if isinstance(bits, list | tuple) else
                 int(bits) if bits == int(bits) else float(bits)) if quant.enabled else DENSE
        return StreamPlan(rank, width, group, segment, quant.residual_length or group, method, quant.sink)

    return LayerPlan(
        layer=lay.layer,
        keys=stream(lay.rank_k, lay.bits_k, quant.key_group, quant.segment_size("k"), quant.key_quantizer),
        values=stream(lay.rank_v, lay.bits_v, quant.group_size, quant.segment_size("v"), quant.method),
        residual_length=quant.residual_length,
        value_folded=folded,
        predicts_values=quant.enabled and quant.predict_values,
    )


def build_plan(recipe: Recipe, spec: ModelSpec, dtype: str = "float16") -> Plan:
    """The plan of ``recipe`` (with its ``[[layers]]`` filled in) for a model of ``spec``.

    Raises
    ------
    KVCompressError
        An impossible setting for this model (see :func:`kvcompress.recipe.Recipe.validate`).
    """
    check_dtype(dtype)
    recipe.validate(spec)
    layers = tuple(layer_plan(lay, recipe.quant, value_folded(spec, lay.rank_v)) for lay in recipe.layers)
    for lay in layers:
        check_widths(lay)
        for name, stream in (("k", lay.keys), ("v", lay.values)):
            if stream.quantized:
                quantizer(stream.method).check(f"layer {lay.layer}: rank_{name}", stream.rank, stream.block)
            if stream.quantized and stream.sink >= stream.block:
                raise KVCompressError(f"[quant] sink ({stream.sink}) must be shorter than the flush block of layer "
                                      f"{lay.layer}'s {name} ({stream.block} tokens)")
    q = recipe.quant
    return Plan(model_type=spec.model_type, dtype=dtype, head_group=recipe.head_group(spec),
                key_rope=q.key_rope, key_rotation=q.enabled and q.rotation == "orthogonal" and q.key_rope == "post",
                layers=layers, eviction=replace(recipe.lagkv) if recipe.lagkv.enabled else None, recipe=recipe.name,
                key_axes=q.enabled and q.key_axes)
