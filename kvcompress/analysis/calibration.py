"""Calibration text and the input statistics that whitened SVD needs, computed layer by layer.

Only one decoder layer is materialized at a time, so peak memory is one layer plus the activations
of the calibration tokens, whatever the size of the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch

from kvcompress.errors import KVCompressError
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


@torch.no_grad()
def attention_input_grams(
    source: Source, ids: torch.Tensor, on_layer: Callable[[int], None] | None = None
) -> list[torch.Tensor]:
    """Per layer, the Gram matrix ``Σ x xᵀ`` (float64) of the inputs to the K/V projections.

    The input is the output of the layer's ``input_layernorm``, exactly what ``k_proj``/``v_proj`` see.
    """
    model = skeleton(source.config)
    embed = model.model.embed_tokens
    materialize(embed, "model.embed_tokens.", source)
    hidden = embed(ids)
    release(embed)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    rope = rotary(model)(hidden, positions)
    grams = []
    for i, layer in enumerate(model.model.layers):
        materialize(layer, f"model.layers.{i}.", source)
        x = layer.input_layernorm(hidden).reshape(-1, hidden.shape[-1]).double()
        grams.append(x.T @ x)
        hidden = layer(hidden, attention_mask=None, position_embeddings=rope, position_ids=positions)
        release(layer)
        if on_layer:
            on_layer(i)
    return grams
