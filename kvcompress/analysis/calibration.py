"""Calibration text and the activation statistics that whitened SVD and ``key_axes`` need, in one walk.

Only one decoder layer is materialized at a time, so peak memory is one layer plus the activations
of the calibration tokens, whatever the size of the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from kvcompress.errors import KVCompressError
from kvcompress.kernels.lowrank_rope import rotate
from kvcompress.methods.key_axes import KeyMoments
from kvcompress.methods.value_prediction import PredictorMoments
from kvcompress.skeleton import materialize, release, rotary, skeleton
from kvcompress.sources import Source


def builtin_text() -> str:
    """The short calibration text shipped with kvcompress (not from any evaluation set)."""
    return resources.files("kvcompress").joinpath("data/calibration.txt").read_text()


def calibration_ids(tokenizer, text_file: str | Path | None, max_tokens: int, seq_len: int) -> torch.Tensor:
    """Token ids of the calibration text as a ``[n_seq, seq_len]`` batch (the text repeats if short)."""
    if text_file is None:
        text = builtin_text()
    else:
        path = Path(text_file)
        if not path.is_file():
            raise KVCompressError(f"calibration text not found: {path}")
        text = path.read_text(errors="replace")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt", verbose=False).input_ids[0]
    if ids.numel() == 0:
        raise KVCompressError("calibration text is empty")
    seq_len = min(seq_len, max_tokens)
    n_seq = max(1, max_tokens // seq_len)
    reps = -(-n_seq * seq_len // ids.numel())
    return ids.repeat(reps)[: n_seq * seq_len].reshape(n_seq, seq_len)


def _layer_inputs(source: Source, ids: torch.Tensor, on_layer: Callable[[int], None] | None
                  ) -> Iterator[tuple[nn.Module, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
    """Walk the decoder layers over ``ids``: yield each layer (materialized), the output of its
    ``input_layernorm`` (what ``q_proj``/``k_proj``/``v_proj`` see) and the RoPE ``(cos, sin)``, then run the
    layer and release it. One layer is in memory at a time."""
    model = skeleton(source.config)
    embed = model.model.embed_tokens
    materialize(embed, "model.embed_tokens.", source)
    hidden = embed(ids)
    release(embed)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    rope = rotary(model)(hidden, positions)
    for i, layer in enumerate(model.model.layers):
        materialize(layer, f"model.layers.{i}.", source)
        yield layer, layer.input_layernorm(hidden), rope
        hidden = layer(hidden, attention_mask=None, position_embeddings=rope, position_ids=positions)
        release(layer)
        if on_layer:
            on_layer(i)


@torch.no_grad()
def layer_statistics(
    source: Source, ids: torch.Tensor, grams: bool, key_group: int, predict: bool = False,
    on_layer: Callable[[int], None] | None = None
) -> tuple[list[torch.Tensor] | None, list[KeyMoments] | None, list[PredictorMoments] | None]:
    """Per layer, in one walk over the calibration tokens, what analysis and export need of the activations.

    Parameters
    ----------
    source, ids
        The model and the calibration tokens ``[n_seq, seq_len]``.
    grams
        Whether to collect the Gram matrix ``Σ x xᵀ`` (float64) of the inputs to the K/V projections (the
        output of the layer's ``input_layernorm``, exactly what ``k_proj``/``v_proj`` see), for whitened SVD.
    key_group
        When positive, collect the second moments of the post-RoPE queries and keys (:class:`KeyMoments`,
        keys centred per ``key_group`` tokens) in the model's channel order, as attention turns them by
        ``k_rot``, for ``key_axes``.
    predict
        Whether to collect the sums that fit the value predictor (:class:`PredictorMoments`: the pre-RoPE keys
        against themselves and against the layer inputs), for ``predict_values``.
    on_layer
        Called with each layer's index once it is done.

    Returns
    -------
    tuple
        ``(grams, moments, predictors)``, each a list with one entry per layer, or None when not asked for.
    """
    spec = source.spec
    gram_list = [] if grams else None
    moments = [] if key_group > 0 else None
    predictors = [] if predict else None
    for layer, x, (cos, sin) in _layer_inputs(source, ids, on_layer):
        if gram_list is not None:
            flat = x.reshape(-1, x.shape[-1]).double()
            gram_list.append(flat.T @ flat)
        if moments is None and predictors is None:
            continue
        attn = layer.self_attn
        b, t, _ = x.shape
        k = attn.k_proj(x).view(b, t, spec.num_kv_heads, spec.head_dim)
        qwen3 = getattr(attn, "q_norm", None) is not None  # Qwen3: per-head RMS norms before RoPE
        if qwen3:
            k = attn.k_norm(k)
        if predictors is not None:
            predictors.append(PredictorMoments.measure(x, k))
        if moments is not None:
            q = attn.q_proj(x).view(b, t, spec.num_heads, spec.head_dim)
            if qwen3:
                q = attn.q_norm(q)
            q, k = (rotate(y.transpose(1, 2), cos.unsqueeze(1), sin.unsqueeze(1)) for y in (q, k))
            moments.append(KeyMoments.measure(q, k, key_group))
    return gram_list, moments, predictors
