"""KV-cache compression kernels."""
