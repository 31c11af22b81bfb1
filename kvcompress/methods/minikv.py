"""Per-layer sensitivity to low-bit K/V and the layer-discriminative bit allocation built on it.

Sensitivity of a stream (layer l's keys, or its values): fake-quantize that stream alone while
everything else stays exact, and measure the mean next-token KL(p_exact ‖ p_quantized) on calibration
text. The caller says how each stream is fake-quantized (a :data:`Probe`); ``analyze`` round-trips it
through the recipe's own quantizer at ``[quant] probe_bits``, rotated as the export rotates it, so the
allocation sees the errors the cache will make (a KIVI probe misjudges codebook values, for one).
MiniKV (arXiv 2411.18077) varies its budget by layer with a fixed pyramid; we measure instead, keys and
values apart (keys are usually far more sensitive), and spend bits where the measured damage is largest
(see :func:`allocate_bits`).

Allocation: minimize ``Σ_u s_u · 4^-(b_u − b_min)`` (error energy falls about 4× per bit) subject to
``Σ_u w_u b_u ≤ avg_bits · Σ_u w_u``, greedily by damage reduction per extra bit and channel. Run by
``analyze`` (per stream here, per channel segment in :mod:`kvcompress.methods.channels`); what it decides
reaches the checkpoint as each layer's ``bits_k`` / ``bits_v`` in the manifest, and the runtime reads them
with the stream's quantizer, whose formula gives the bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

Probe = Callable[[torch.Tensor], torch.Tensor]
"""Fake quantization of one stream: post-RoPE keys or values ``[B, H, T, D]`` in, the same shape back."""

ATTN_IMPL = "kvcompress_fake_quant"


def _fake_quant_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA attention that round-trips this layer's K/V through the probes when the layer is marked."""
    probes = getattr(module, "kvc_fake_quant", None)
    if probes is not None:  # a batch of two copies: keys quantized in the first, values in the second
        key_probe, value_probe = probes
        key = torch.cat([key_probe(key[:1]), key[1:]])
        value = torch.cat([value[:1], value_probe(value[1:])])
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPL, _fake_quant_attention)


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    ids: torch.Tensor,
    key_probe: Probe,
    value_probe: Probe,
    on_layer: Callable[[int], None] | None = None,
) -> list[tuple[float, float]]:
    """Mean next-token KL divergence caused by quantizing each layer's K, then its V, alone.

    The exact pass keeps every layer's input, so perturbing layer l reruns only layers l..L-1.

    Parameters
    ----------
    model : nn.Module
        A full causal LM in memory (float32).
    ids : torch.Tensor
        ``[1, seq_len]`` calibration token ids.
    key_probe, value_probe : Probe
        How a layer's keys and its values are fake-quantized.
    on_layer : callable, optional
        Called with the layer index after each layer is measured (progress).
    """
    model.set_attn_implementation(ATTN_IMPL)
    inner = model.model
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    hidden = inner.embed_tokens(ids)
    rope = inner.rotary_emb(hidden, positions)

    def run(h: torch.Tensor, start: int, inputs: list | None = None) -> torch.Tensor:
        for layer in inner.layers[start:]:
            if inputs is not None:
                inputs.append(h)
            h = layer(h, attention_mask=None, position_embeddings=rope, position_ids=positions)
        return F.log_softmax(model.lm_head(inner.norm(h)).float(), dim=-1)

    layer_inputs: list[torch.Tensor] = []
    exact = run(hidden, 0, layer_inputs)
    scores = []
    for i, layer in enumerate(inner.layers):
        layer.self_attn.kvc_fake_quant = (key_probe, value_probe)
        approx = run(layer_inputs[i].expand(2, -1, -1), i)  # [K quantized, V quantized]
        del layer.self_attn.kvc_fake_quant
        kl = F.kl_div(approx, exact.expand(2, -1, -1), log_target=True, reduction="none").sum(-1).mean(-1)
        scores.append((float(kl[0]), float(kl[1])))
        if on_layer:
            on_layer(i)
    model.set_attn_implementation("sdpa")
    return scores


def allocate_bits(sensitivity: list[float], avg_bits: float, choices: Sequence[float] | None = None,
                  widths: list[int] | None = None, ladders: Sequence[Sequence[float]] | None = None) -> list[float]:
    """Bits for each unit under an average budget (a unit: one layer's K or V, or a segment of one).

    Quantization error energy falls about 4x per extra bit, so a unit's damage at b bits is modelled
    as ``s · 4^-(b - b_min)``. Starting from each unit's lowest width, we greedily take the upgrade
    with the largest damage reduction per extra bit (per extra bit *and channel*, for units of
    ``widths`` channels) while the channel-weighted mean stays within ``avg_bits``.

    ``choices`` are the widths every unit may take (default 1 to 8); ``ladders`` instead gives each unit its own
    (the widths its quantizer stores: a vector codebook's values also take 1.5 bits, a step of half a bit).
    """
    if choices is not None and ladders is not None:
        raise ValueError("give choices (one ladder for every unit) or ladders (one per unit), not both")
    widths = widths or [1] * len(sensitivity)
    ladders = ([sorted(x) for x in ladders] if ladders is not None
               else [sorted(choices or range(1, 9))] * len(sensitivity))
    bits = [ladder[0] for ladder in ladders]
    budget = avg_bits * sum(widths) - sum(b * w for b, w in zip(bits, widths, strict=True))
    low = min(bits)

    def damage(s: float, b: float) -> float:
        return s * 4.0 ** -(b - low)

    while True:
        best, best_key = None, (0.0, 0.0, 0.0)
        for i, (s, b, w, ladder) in enumerate(zip(sensitivity, bits, widths, ladders, strict=True)):
            up = ladder.index(b) + 1
            if up == len(ladder) or (ladder[up] - b) * w > budget + 1e-9:
                continue
            # ties: the more sensitive unit, then the one with fewer bits (equal sensitivities: uniform bits)
            key = ((damage(s, b) - damage(s, ladder[up])) / ((ladder[up] - b) * w), s, -b)
            if best is None or key > best_key:
                best, best_key = i, key
        if best is None:
            return bits
        ladder = ladders[best]
        nxt = ladder[ladder.index(bits[best]) + 1]
        budget -= (nxt - bits[best]) * widths[best]
        bits[best] = nxt
