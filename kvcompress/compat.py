"""Differences between transformers 5.x releases that kvcompress bridges in one place."""

from __future__ import annotations

import inspect

from transformers.models.llama.modeling_llama import LlamaModel

# transformers 5.24 renamed the cache argument of forward/generate from ``past_key_values`` to ``cache``
# (the old name still works there, with a deprecation warning, until 5.40).
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def pop_cache(kwargs: dict):
    """Remove and return the cache from call ``kwargs``, under either name (None if absent)."""
    new, old = kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
    return new if new is not None else old
