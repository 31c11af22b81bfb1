"""Recipes: what to compress and how, as a schema-versioned TOML file users edit and ship.

A recipe has method sections (``[lowrank]``, ``[quant]``, ``[lagkv]``, ``[calibration]``) and, once
``analyze`` has run, one ``[[layers]]`` table per decoder layer with its ranks and bits.
"""

from __future__ import annotations

import sys
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import tomli_w

from kvcompress.errors import KVCompressError

if TYPE_CHECKING:
    from kvcompress.sources import ModelSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RECIPE_SCHEMA_VERSION = 1
SVD_MODES = ("whitened", "weight")
SCHEDULES = ("progressive", "uniform", "energy", "greedy")  # kvcompress.analysis.schedule implements each

BITS = tuple(range(1, 9))  # integer code widths; 16 means a stream is not quantized


def is_width(bits: object) -> bool:
    """Whether ``bits`` is a code width a recipe may name: a multiple of 0.5 from 1 to 8 (the stream's quantizer
    decides, when the plan is built, which it stores: every quantizer the integers, ``"vector"`` also 1.5)."""
    return isinstance(bits, int | float) and not isinstance(bits, bool) and 1 <= bits <= 8 and bits * 2 == int(bits * 2)

# what `export` writes without --recipe: within 1% perplexity on the shared SmolLM2, the fastest to decode and
# the one the fused CUDA kernel reads (minikv-3bit is smaller within 1%, and slower; README Results)
DEFAULT_RECIPE = "kivi-4bit"
QUANT_METHODS = ("kivi", "decoquant", "codebook", "vector")  # kvcompress.methods.QUANTIZERS implements each
ALLOCATIONS = ("stream", "channels")


@dataclass
class LowRank:
    """Low-rank latent K/V (LoRC). ``head_group`` 0 means all KV heads of a layer share one latent."""

    enabled: bool = True
    svd: str = "whitened"
    schedule: str = "greedy"
    target_ratio: float = 0.5
    head_group: int = 0
    rank_multiple: int = 8
    energy: float = 0.95


@dataclass
class Quant:
    """Packed low-bit K/V (KIVI/MiniKV grouping); per-layer bits come from ``[[layers]]``.

    ``key_rope``: ``"pre"`` caches key latents before RoPE (KVQuant's choice, and the only one for
    low-rank keys); ``"post"`` caches rotated full-width keys (KIVI's); low-rank then applies to values only.
    ``key_group_size``: tokens per key group (0 = ``group_size``); keys lose most at low bits, and a
    finer key group costs few bytes.
    ``rotation``: ``"orthogonal"`` mixes each latent's channels by a seeded random rotation: folded into the
    weights for values and pre-RoPE key latents; with ``key_rope = "post"``, applied to queries and keys
    after RoPE at run time (QuaRot). ``"none"`` keeps the principal axes.
    ``allocation``: ``"stream"`` gives each layer's K and each layer's V one bit width (MiniKV's
    layer-discriminative bits; with ``key_axes``, the keys' width is then spread over their axes);
    ``"channels"`` gives one width per segment of the latent's principal axes
    (``segment`` channels for keys, ``group_size`` for values), so bits follow the energy of each axis
    (see ``kvcompress.methods.channels``); the rotation then mixes channels only within runs of equal bits.
    ``method``: the quantizer (``"kivi"`` min–max groups, ``"decoquant"``, ``"codebook"`` Lloyd–Max codes
    with one norm per group, ``"vector"`` the same with tuples of channels coded jointly by a vector
    codebook); ``key_method`` gives the keys another one (empty: the same).
    ``sink``: the first tokens keep a 16-bit copy once quantized (the attention sink).
    ``key_bits`` / ``value_bits``: every layer's K and V widths, instead of allocating ``avg_bits``
    (both 0: allocate). ``value_bits`` may be 1.5 with ``method = "vector"`` (64-point codebooks of 4 channels).
    ``half_bits``: the allocation of ``avg_bits`` (``allocation = "stream"``, an ``avg_bits`` that is not an
    integer width) may also give a stream 1.5 bits where its quantizer stores that width (``method`` or
    ``key_method = "vector"``, an even channel group); off, it allocates integer widths. Fixed widths and
    ``allocation = "channels"`` ignore it. It pays at 6× on SmolLM2 (×1.067
    → ×1.048 over seven slices) and costs at 5× (×1.023 → ×1.032), where the whole bits of the 4^-b damage
    model already fit (README, Measured).
    ``key_axes``: post-RoPE keys turned into the principal axes of the queries, measured on the calibration
    text, instead of a random rotation; each layer's key bits are then spread over segments of ``segment``
    axes by reverse water-filling (``kvcompress.methods.key_axes``), so ``key_bits`` may be any real number
    in [1, 8] (the segments round it down to a multiple of ``segment`` channel-bits). With ``avg_bits``
    instead, the stream allocation comes first, from keys probed in a random rotation at uniform bits, and
    each layer's share is then spread over its axes. Needs ``key_rope = "post"``, ``rotation =
    "orthogonal"``, ``allocation = "stream"`` and KIVI's per-channel key codes.
    ``predict_values``: each layer's values are predicted from its keys by a linear map fitted on the
    calibration text, and the value codes hold only the residual (AQUA-KV's predictor,
    ``kvcompress.methods.value_prediction``): no bytes per token more, and on SmolLM2 2-bit residuals do what
    3-bit values do. Needs ``key_rope = "post"``, fixed ``key_bits`` and ``value_bits``, ``allocation =
    "stream"`` and no ``[lagkv]``.
    ``probe_bits``: the width at which ``analyze`` fake-quantizes each stream alone, with these quantizers,
    to measure the sensitivity that allocates ``avg_bits``; near the widths allocated is best.
    """

    enabled: bool = False
    method: str = "kivi"
    key_method: str = ""
    key_rope: str = "pre"
    rotation: str = "orthogonal"
    avg_bits: float = 3.0
    group_size: int = 32
    key_group_size: int = 0
    residual_length: int = 128
    allocation: str = "stream"
    segment: int = 16
    sink: int = 0
    key_bits: float = 0
    value_bits: float = 0
    probe_bits: int = 2
    half_bits: bool = False
    key_axes: bool = False
    predict_values: bool = False

    @property
    def key_quantizer(self) -> str:
        """The keys' quantizer: ``key_method``, or ``method`` when it is empty."""
        return self.key_method or self.method

    @property
    def key_group(self) -> int:
        """Tokens per key quantization group."""
        return self.key_group_size or self.group_size

    def segment_size(self, stream: str) -> int:
        """Channels per segment of the ``"k"`` or ``"v"`` latent under ``allocation = "channels"``: value
        segments are whole quantization groups, so they cost no extra scales."""
        return self.segment if stream == "k" else self.group_size


@dataclass
class LagKV:
    """LagKV eviction (arXiv 2504.04704), the recipe's ``[lagkv]`` and the cache's settings alike.

    Parameters
    ----------
    enabled : bool
        Whether the recipe evicts (a cache given these settings always does).
    sink_size : int
        Leading tokens that are never evicted (attention sink). Zero disables the sink.
    lag_size : int
        Tokens per chunk; each chunk is scored against the next chunk of this size.
    keep_ratio : float
        Fraction of each scored chunk that is KEPT, in (0, 1]. Note the conventions differ elsewhere:
        the LagKV paper/code's ``ratio`` is also the kept fraction, whereas kvpress's
        ``compression_ratio`` is the fraction REMOVED (``keep_ratio = 1 - compression_ratio``).
    value_weight : float
        Weight of the value score relative to the key score (``score_v_ratio`` in the paper's code).
    """

    enabled: bool = False
    sink_size: int = 16
    lag_size: int = 128
    keep_ratio: float = 0.5
    value_weight: float = 1.0

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise :class:`KVCompressError` naming the first impossible setting."""
        _check(self.sink_size >= 0, f"LagKV sink_size must be >= 0, got {self.sink_size}")
        _check(self.lag_size >= 1, f"LagKV lag_size must be >= 1, got {self.lag_size}")
        _check(0.0 < self.keep_ratio <= 1.0,
               f"LagKV keep_ratio (fraction kept) must be in (0, 1], got {self.keep_ratio}")
        _check(self.value_weight >= 0.0, f"LagKV value_weight must be >= 0, got {self.value_weight}")

    @property
    def keep_per_chunk(self) -> int:
        """Tokens kept per scored chunk: ``round(keep_ratio * lag_size)`` (half to even), at least 1."""
        return max(1, round(self.keep_ratio * self.lag_size))


@dataclass
class Calibration:
    """Calibration text (a file path; empty = the built-in text) and how many tokens to use."""

    text: str = ""
    max_tokens: int = 1024
    seq_len: int = 256


@dataclass
class LayerRecipe:
    """One decoder layer's ranks (per head group) and bits (16 = not quantized; a list gives one width
    per channel segment, see ``Quant.allocation``)."""

    layer: int
    rank_k: int
    rank_v: int
    bits_k: float | list[int] = 16
    bits_v: float | list[int] = 16


@dataclass
class Recipe:
    """A whole recipe; see the README's "Recipes" section for every field."""

    name: str = "custom"
    description: str = ""
    lowrank: LowRank = field(default_factory=LowRank)
    quant: Quant = field(default_factory=Quant)
    lagkv: LagKV = field(default_factory=LagKV)
    calibration: Calibration = field(default_factory=Calibration)
    layers: list[LayerRecipe] = field(default_factory=list)
    schema_version: int = RECIPE_SCHEMA_VERSION

    def validate(self, spec: ModelSpec | None = None) -> Recipe:
        """Check every setting; with ``spec``, also check per-layer entries against the model.

        Raises
        ------
        KVCompressError
            One line naming the first impossible setting.
        """
        lr, q, lag = self.lowrank, self.quant, self.lagkv
        _check(self.schema_version <= RECIPE_SCHEMA_VERSION,
               f"recipe schema_version {self.schema_version} is newer than supported ({RECIPE_SCHEMA_VERSION}); "
               "upgrade kvcompress")
        _check(0.0 < lr.target_ratio <= 1.0, f"target_ratio must be in (0, 1], got {lr.target_ratio}")
        _check(lr.svd in SVD_MODES, f"svd must be one of {SVD_MODES}, got {lr.svd!r}")
        _check(lr.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {lr.schedule!r}")
        _check(lr.head_group >= 0, f"head_group must be >= 0, got {lr.head_group}")
        _check(lr.rank_multiple >= 1, f"rank_multiple must be >= 1, got {lr.rank_multiple}")
        _check(0.0 < lr.energy <= 1.0, f"energy must be in (0, 1], got {lr.energy}")
        _check(q.method in QUANT_METHODS, f"quant method must be one of {QUANT_METHODS}, got {q.method!r}")
        _check(q.key_method in ("", *QUANT_METHODS),
               f"quant key_method must be empty or one of {QUANT_METHODS}, got {q.key_method!r}")
        _check(q.key_rope in ("pre", "post"), f"key_rope must be 'pre' or 'post', got {q.key_rope!r}")
        _check(q.rotation in ("orthogonal", "none"), f"rotation must be 'orthogonal' or 'none', got {q.rotation!r}")
        _check(1.0 <= q.avg_bits <= 8.0, f"avg_bits must be in [1, 8], got {q.avg_bits}")
        _check(q.group_size >= 1 and q.key_group_size >= 0, "group_size must be >= 1 and key_group_size >= 0")
        for name, size in (("group_size", q.group_size), ("key_group_size", q.key_group)):
            _check(q.residual_length % size == 0,
                   f"residual_length ({q.residual_length}) must be a multiple of {name} ({size})")
        _check(q.residual_length >= 0, "residual_length must be >= 0")
        _check(q.sink >= 0, f"sink must be >= 0, got {q.sink}")
        _check(q.probe_bits in range(1, 9), f"probe_bits must be an integer from 1 to 8, got {q.probe_bits}")
        key_ok = q.key_bits in (0, *BITS) or (q.key_axes and 1 <= q.key_bits <= 8)
        _check((q.key_bits == 0) == (q.value_bits == 0) and key_ok and (q.value_bits == 0 or is_width(q.value_bits)),
               f"key_bits and value_bits must both be 0 (allocate from avg_bits) or both code widths in 1-8 "
               f"(integers; value_bits 1.5 with method = 'vector'; key_bits any real number in [1, 8] with key_axes), "
               f"got {q.key_bits} and {q.value_bits}")
        lag.check()
        _check(self.calibration.max_tokens >= 1 and self.calibration.seq_len >= 1,
               "calibration max_tokens and seq_len must be >= 1")
        _check(q.allocation in ALLOCATIONS, f"allocation must be one of {ALLOCATIONS}, got {q.allocation!r}")
        _check(q.segment >= 4 and q.segment % 4 == 0, f"segment must be a positive multiple of 4, got {q.segment}")
        _check(q.allocation == "stream" or q.method == q.key_quantizer == "kivi",
               "allocation = 'channels' needs method = 'kivi'")
        _check(not q.key_axes or (q.key_rope == "post" and q.rotation == "orthogonal" and q.allocation == "stream"),
               "key_axes needs key_rope = 'post', rotation = 'orthogonal' and allocation = 'stream'")
        _check(not q.half_bits or "vector" in (q.method, q.key_quantizer),
               f"half_bits needs a quantizer that stores 1.5 bits (method or key_method = 'vector'), got "
               f"{q.method!r} and {q.key_quantizer!r}")
        _check(not q.key_axes or q.key_quantizer == "kivi",
               f"key_axes needs KIVI's per-channel key codes (key_method = 'kivi'), got {q.key_quantizer!r}")
        _check(not q.predict_values or (q.enabled and q.key_rope == "post" and q.value_bits > 0
                                        and q.allocation == "stream" and not lag.enabled),
               "predict_values needs [quant] enabled, key_rope = 'post', fixed key_bits and value_bits, "
               "allocation = 'stream' and no [lagkv]")
        cal = self.calibration
        _check(not q.key_axes or min(cal.seq_len, cal.max_tokens) >= q.key_group,
               f"key_axes measures keys in whole groups of {q.key_group} tokens: [calibration] seq_len and "
               f"max_tokens must be at least that, got {cal.seq_len} and {cal.max_tokens}")
        for lay in self.layers:
            _check(lay.rank_k >= 1 and lay.rank_v >= 1, f"layer {lay.layer}: ranks must be >= 1")
            for stream, bits, rank in (("k", lay.bits_k, lay.rank_k), ("v", lay.bits_v, lay.rank_v)):
                self._check_bits(lay.layer, stream, bits, rank)
        if spec is not None:
            self._validate_for(spec)
        return self

    def _check_bits(self, layer: int, stream: str, bits: float | list[int], rank: int) -> None:
        name = f"layer {layer}: bits_{stream}"
        if not isinstance(bits, list):
            _check(bits == 16 or is_width(bits),
                   f"{name} must be a code width from 1 to 8 (an integer, or 1.5 for method = 'vector'; 16 = off), "
                   f"got {bits!r}")
            return
        _check(self.quant.allocation == "channels" or (stream == "k" and self.quant.key_axes),
               f"{name} is a list; that needs [quant] allocation = 'channels' (or key_axes, for keys)")
        _check(stream == "v" or self.quant.key_rope == "pre" or self.quant.key_axes,
               f"{name} is a list; post-RoPE keys have principal axes only with key_axes = true")
        _check(all(b in BITS for b in bits), f"{name} entries must be integers from 1 to 8, got {bits}")
        size = self.quant.segment_size(stream)
        segments = -(-rank // size)
        _check(len(bits) == segments, f"{name}: {len(bits)} segment bits for {segments} segments of {size} in "
                                      f"{rank} channels")

    def _validate_for(self, spec: ModelSpec) -> None:
        g = self.head_group(spec)
        _check(spec.num_kv_heads % g == 0,
               f"head_group {g} does not divide the model's {spec.num_kv_heads} KV heads")
        width = g * spec.head_dim
        if self.layers:
            _check(len(self.layers) == spec.num_layers and
                   [lay.layer for lay in self.layers] == list(range(spec.num_layers)),
                   f"recipe has {len(self.layers)} layer entries; the model has {spec.num_layers} layers")
        for lay in self.layers:
            for name, r in (("rank_k", lay.rank_k), ("rank_v", lay.rank_v)):
                _check(r <= width, f"layer {lay.layer}: {name} {r} exceeds the head group's width {width} "
                       f"({g} heads x head_dim {spec.head_dim})")
            _check(self.lowrank_keys or lay.rank_k == width,
                   f"layer {lay.layer}: key_rope = 'post' caches full-width keys; rank_k must be {width}, "
                   f"got {lay.rank_k}")

    @property
    def lowrank_keys(self) -> bool:
        """Whether keys are cached as low-rank latents: post-RoPE keys are always full width (only values
        are factorized then), because RoPE cannot be applied to a latent."""
        return self.lowrank.enabled and self.quant.key_rope == "pre"

    def head_group(self, spec: ModelSpec) -> int:
        """KV heads per latent group for ``spec`` (``0`` in the recipe = all KV heads)."""
        return self.lowrank.head_group or spec.num_kv_heads

    def to_dict(self) -> dict:
        """Plain dict in file order (schema first)."""
        d = asdict(self)
        return {"schema_version": d.pop("schema_version"), **d}

    def dumps(self) -> str:
        """TOML text."""
        return tomli_w.dumps(self.to_dict())

    def save(self, path: str | Path) -> None:
        """Write TOML to ``path``."""
        Path(path).write_text(self.dumps())


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise KVCompressError(message)


def _section(cls, data: object, name: str):
    """Build ``cls`` from one TOML table, refusing unknown, missing and mistyped settings by name."""
    _check(isinstance(data, dict), f"{name} must be a table, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    _check(not unknown, f"unknown setting(s) in {name}: {', '.join(sorted(unknown))}")
    missing = [k for k, f in known.items() if f.default is MISSING and f.default_factory is MISSING and k not in data]
    _check(not missing, f"{name} is missing {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        _check(_has_type(value, hints[key]), f"{name} {key} must be {_type_name(hints[key])}, got {value!r}")
    return cls(**data)


def _has_type(value: object, hint: object) -> bool:
    """Whether a TOML value fits a field's annotation (an int is a valid float; a bool is never a number)."""
    if isinstance(hint, types.UnionType):
        return any(_has_type(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_has_type(v, item) for v in value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: object) -> str:
    if isinstance(hint, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0]).split(' ', 1)[1]}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]


def recipe_from_dict(data: dict) -> Recipe:
    """Build and validate a recipe from parsed TOML."""
    sections = {"lowrank": LowRank, "quant": Quant, "lagkv": LagKV, "calibration": Calibration}
    unknown = set(data) - set(sections) - {"name", "description", "layers", "schema_version"}
    _check(not unknown, f"unknown recipe key(s): {', '.join(sorted(unknown))}")
    for key, kind in (("name", str), ("description", str), ("schema_version", int)):
        _check(key not in data or _has_type(data[key], kind), f"recipe {key} must be {_type_name(kind)}, "
               f"got {data.get(key)!r}")
    layers = data.get("layers", [])
    _check(isinstance(layers, list), "recipe layers must be an array of [[layers]] tables")
    recipe = Recipe(
        name=data.get("name", "custom"),
        description=data.get("description", ""),
        schema_version=data.get("schema_version", RECIPE_SCHEMA_VERSION),
        layers=[_section(LayerRecipe, d, f"[[layers]] entry {i + 1}") for i, d in enumerate(layers)],
        **{k: _section(cls, data.get(k, {}), f"[{k}]") for k, cls in sections.items()},
    )
    return recipe.validate()


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file (or a shipped recipe by name, e.g. ``lorc-progressive-50``)."""
    p = Path(path)
    if not p.is_file():
        shipped = shipped_recipe_path(str(path))
        if shipped is None:
            raise KVCompressError(f"recipe not found: {path} (not a file; shipped recipes: "
                                  f"{', '.join(shipped_recipe_names())})")
        p = shipped
    try:
        data = tomllib.loads(p.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise KVCompressError(f"cannot read recipe {p}: {e}") from None
    return recipe_from_dict(data)


def shipped_recipe_names() -> list[str]:
    """Names of the recipes shipped in ``recipes/``, sorted."""
    from importlib import resources

    return sorted(p.name.removesuffix(".toml") for p in resources.files("kvcompress.recipes").iterdir()
                  if p.name.endswith(".toml"))


def shipped_recipe_path(name: str) -> Path | None:
    """Path of a recipe shipped in ``recipes/`` (installed with the package), or None."""
    from importlib import resources

    stem = name.removesuffix(".toml")
    candidate = resources.files("kvcompress.recipes").joinpath(f"{stem}.toml")
    return Path(str(candidate)) if candidate.is_file() else None
