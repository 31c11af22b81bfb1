"""KV bytes per token: what a cache really stores, by formula (the cache's ``kv_bytes()`` counts it live)."""

from __future__ import annotations

from kvcompress.methods import dense, quantizer
from kvcompress.methods.channels import bit_runs
from kvcompress.methods.dense import FP16
from kvcompress.plan import DENSE, Plan, StreamPlan
from kvcompress.sources import ModelSpec

POSITION = 4  # int32 RoPE position of each stored token, per sequence (per latent head once evicting)


def baseline_bytes_per_token(spec: ModelSpec, element_size: int = FP16) -> int:
    """Uncompressed K and V of every layer, ``element_size`` bytes per value (fp16 by default)."""
    return spec.num_layers * 2 * spec.kv_width * element_size


def stream_bytes(width: int, bits: int, along: str, stream: StreamPlan, context: int) -> float:
    """Bytes per token, averaged over ``context`` tokens, of ``width`` channels of one K or V ``stream`` (one
    run of equal bits, see ``kvcompress.methods.channels``) at ``bits``: 16-bit, or the formula of the
    stream's quantizer (``bytes_per_token`` of its store class)."""
    if bits >= DENSE:
        return dense.bytes_per_token(width)
    return quantizer(stream.method).bytes_per_token(width, bits, along, stream.group, stream.block, context,
                                                    stream.sink)


def compressed_bytes_per_token(spec: ModelSpec, plan: Plan, context: int) -> float:
    """Bytes per stored token of the compressed cache of ``plan`` at ``context`` tokens.

    Latents or codes, scales and minima, residual windows, and positions where the plan keeps them
    (:attr:`kvcompress.plan.Plan.stores_positions`). With eviction, positions are kept per latent head;
    how many tokens eviction drops depends on the text and is not modelled here.
    """
    groups = plan.groups(spec)
    per_layer = POSITION * (groups if plan.eviction is not None else 1) if plan.stores_positions else 0
    total = float(len(plan.layers) * per_layer)
    for lay in plan.layers:
        for stream, along in ((lay.keys, "tokens"), (lay.values, "channels")):
            for width, bits in bit_runs(stream.bits, stream.rank, stream.segment):
                total += groups * stream_bytes(width, bits, along, stream, context)
    return total
