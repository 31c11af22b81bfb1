"""KV bytes per token: what a cache really stores, by formula (the cache's ``kv_bytes()`` counts it live)."""

from __future__ import annotations

from kvcompress.cache.channels import bit_runs
from kvcompress.cache.decoquant import core_width
from kvcompress.cache.quant import effective_group
from kvcompress.recipe import LayerRecipe, Quant
from kvcompress.sources import ModelSpec

FP16 = 2
POSITION = 4  # int32 RoPE position of each stored token, per sequence (per latent head once evicting)


def baseline_bytes_per_token(spec: ModelSpec, element_size: int = FP16) -> int:
    """Uncompressed K and V of every layer, ``element_size`` bytes per value (fp16 by default)."""
    return spec.num_layers * 2 * spec.kv_width * element_size


def stream_bytes(width: int, bits: int, along: str, quant: Quant, context: int) -> float:
    """Bytes per token, averaged over ``context`` tokens, of one K or V stream (or run of channels, see
    ``kvcompress.cache.channels``) ``width`` channels wide.

    Quantized tokens hold packed codes plus an fp16 scale and minimum per group; the tokens not yet
    flushed from the residual window (``context mod residual_length``) are fp16. DecoQuant adds one fp16
    ``k x k`` small core per flushed block (``residual_length`` tokens, or one group without a window).
    """
    if bits >= 16:
        return width * FP16
    window = quant.residual_length
    quantized = context // window * window if window else context
    if along == "tokens":  # keys: one (scale, min) pair per channel per group of tokens
        meta = 2 * FP16 * width / quant.key_group
    else:  # values: one pair per token per group of channels
        meta = 2 * FP16 * width / effective_group(width, quant.group_size)
    cores = 0.0
    if quant.method == "decoquant":
        block = window or (quant.key_group if along == "tokens" else quant.group_size)  # the store's flush unit
        cores = quantized // block * FP16 * core_width(width, block) ** 2
    return (quantized * (width * bits / 8 + meta) + (context - quantized) * width * FP16 + cores) / context


def compressed_bytes_per_token(
    spec: ModelSpec, layers: list[LayerRecipe], head_group: int, quant: Quant, context: int,
    evicting: bool = False,
) -> float:
    """Bytes per stored token of the compressed cache at ``context`` tokens.

    Latents or codes, scales and minima, residual windows, and positions. With eviction, positions are
    kept per latent head; how many tokens eviction drops depends on the text and is not modelled here.
    """
    groups = spec.num_kv_heads // head_group
    total = float(len(layers) * POSITION * (groups if evicting else 1))
    for lay in layers:
        streams = (("k", lay.rank_k, lay.bits_k, "tokens"), ("v", lay.rank_v, lay.bits_v, "channels"))
        for stream, rank, bits, along in streams:
            for width, b in bit_runs(bits if quant.enabled else 16, rank, quant.segment_size(stream)):
                total += groups * stream_bytes(width, b, along, quant, context)
    return total


def checkpoint_bytes_per_token(manifest: dict, spec: ModelSpec, context: int) -> float:
    """:func:`compressed_bytes_per_token` of an exported checkpoint, from its manifest's per-layer settings
    (16-bit for layers it does not quantize; eviction's savings are not modelled)."""
    layers = [LayerRecipe(lay["layer"], lay["rank_k"], lay["rank_v"], lay["bits_k"], lay["bits_v"])
              for lay in manifest["layers"]]
    first = manifest["layers"][0]
    quant = Quant(enabled=True, method=first.get("method", "kivi"), group_size=first["group_size"],
                  key_group_size=first.get("key_group_size", 0), residual_length=first["residual_length"],
                  segment=first.get("key_segment", 16))
    return compressed_bytes_per_token(spec, layers, int(manifest["head_group"]), quant, context,
                                      manifest.get("eviction") is not None)
