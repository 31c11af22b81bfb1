"""KV bytes per token: what a cache really stores, by formula (the cache's ``kv_bytes()`` counts it live)."""

from __future__ import annotations

from kvcompress.methods.channels import bit_runs
from kvcompress.methods.decoquant import core_width
from kvcompress.methods.kivi import effective_group
from kvcompress.plan import Plan, StreamPlan
from kvcompress.sources import ModelSpec

FP16 = 2
POSITION = 4  # int32 RoPE position of each stored token, per sequence (per latent head once evicting)


def baseline_bytes_per_token(spec: ModelSpec, element_size: int = FP16) -> int:
    """Uncompressed K and V of every layer, ``element_size`` bytes per value (fp16 by default)."""
    return spec.num_layers * 2 * spec.kv_width * element_size


def stream_bytes(width: int, bits: int, along: str, stream: StreamPlan, method: str, context: int) -> float:
    """Bytes per token, averaged over ``context`` tokens, of ``width`` channels of one K or V ``stream`` (one
    run of equal bits, see ``kvcompress.methods.channels``) at ``bits``.

    Quantized tokens hold packed codes plus an fp16 scale and minimum per group; the tokens not yet
    flushed (``context mod block``) are fp16. DecoQuant adds one fp16 ``k x k`` small core per flushed block.
    """
    if bits >= 16:
        return width * FP16
    quantized = context // stream.block * stream.block
    group = stream.group if along == "tokens" else effective_group(width, stream.group)
    meta = 2 * FP16 * width / group  # keys: one (scale, min) per channel per group of tokens; values: per token
    cores = quantized // stream.block * FP16 * core_width(width, stream.block) ** 2 if method == "decoquant" else 0.0
    return (quantized * (width * bits / 8 + meta) + (context - quantized) * width * FP16 + cores) / context


def compressed_bytes_per_token(spec: ModelSpec, plan: Plan, context: int) -> float:
    """Bytes per stored token of the compressed cache of ``plan`` at ``context`` tokens.

    Latents or codes, scales and minima, residual windows, and positions. With eviction, positions are
    kept per latent head; how many tokens eviction drops depends on the text and is not modelled here.
    """
    groups = plan.groups(spec)
    total = float(len(plan.layers) * POSITION * (groups if plan.eviction is not None else 1))
    for lay in plan.layers:
        for stream, along in ((lay.keys, "tokens"), (lay.values, "channels")):
            for width, bits in bit_runs(stream.bits, stream.rank, stream.segment):
                total += groups * stream_bytes(width, bits, along, stream, lay.method, context)
    return total
