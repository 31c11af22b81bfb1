"""kvcompress: smaller KV caches for Hugging Face causal LMs, shipped as loadable checkpoints."""

from kvcompress.errors import KVCompressError

__version__ = "0.1.0"
__all__ = ["KVCompressError", "__version__", "load", "make_cache"]


def __getattr__(name: str):
    # load/make_cache pull in torch and transformers; import them only when used
    if name in ("load", "make_cache"):
        from importlib import import_module

        return getattr(import_module("kvcompress.checkpoint.loading"), name)
    raise AttributeError(f"module 'kvcompress' has no attribute {name!r}")
