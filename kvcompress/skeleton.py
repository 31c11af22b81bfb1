"""Build a transformers model without weights and fill it from a :class:`~kvcompress.sources.Source`.

The skeleton lives on the ``meta`` device; modules are materialized one at a time, so callers choose
how much of the model is in memory (one decoder layer during calibration, everything for evaluation).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from kvcompress.sources import Source


def hf_config(config: dict) -> PretrainedConfig:
    """A transformers config from a ``config.json`` dict (SDPA attention)."""
    fields = {k: v for k, v in config.items() if k != "model_type"}
    cfg = AutoConfig.for_model(config["model_type"], **fields)
    cfg._attn_implementation = "sdpa"
    return cfg


def skeleton(config: dict | PretrainedConfig) -> nn.Module:
    """An ``AutoModelForCausalLM`` on the meta device: the structure, no memory."""
    cfg = config if isinstance(config, PretrainedConfig) else hf_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    return model


def materialize(module: nn.Module, prefix: str, source: Source, dtype: torch.dtype = torch.float32) -> None:
    """Fill ``module``'s parameters from ``source``, reading one tensor at a time.

    Parameters
    ----------
    module : nn.Module
        A submodule of a :func:`skeleton` (parameters on ``meta``).
    prefix : str
        Its Hugging Face name prefix, e.g. ``"model.layers.3."``.
    source : Source
        Where tensors come from.
    dtype : torch.dtype
        Parameter dtype after loading.
    """
    for name, param in list(module.named_parameters(recurse=True)):
        full = prefix + name
        if full == "lm_head.weight" and not source.has(full):
            full = "model.embed_tokens.weight"  # tied embeddings
        owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
        leaf = name.rpartition(".")[2]
        value = source.tensor(full).to(dtype)
        setattr(owner, leaf, nn.Parameter(value.reshape(param.shape), requires_grad=False))


def release(module: nn.Module) -> None:
    """Send a materialized module's parameters back to ``meta`` to free their memory."""
    module.to_empty(device="meta")


def rotary(model: nn.Module) -> nn.Module:
    """A real (CPU) rotary-embedding module for ``model``; its buffers are not in any checkpoint."""
    rope = model.model.rotary_emb
    with torch.device("cpu"):
        return type(rope)(config=model.config)


def load_full(source: Source, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The whole model in memory, built tensor by tensor (no second copy of the weights)."""
    model = skeleton(source.config)
    materialize(model, "", source, dtype)
    model.model.rotary_emb = rotary(model)
    if getattr(model.config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    return model
