"""The compression methods, one file each: its paper and equations, validation, bytes formula, the
tensors it writes and the runtime that reads them.

========================  ==========================================  =========================================
file                      method                                      role
========================  ==========================================  =========================================
``lowrank.py``            LoRC low-rank K/V (arXiv 2410.03111)        SVDs, factorized tensors, o_proj folding
``rotation.py``           random orthogonal latent / key rotation     folded into the weights, ``k_rot``
``dense.py``              16-bit storage                              the store every quantizer builds on
``kivi.py``               KIVI min–max groups (arXiv 2402.02750)      quantizer ``"kivi"``
``decoquant.py``          DecoQuant two-core MPO (arXiv 2405.12591)   quantizer ``"decoquant"``
``codebook.py``           Lloyd–Max codebook + norm per vector         quantizers ``"codebook"`` and ``"vector"``
                          (TurboQuant, arXiv 2504.19874); vector      (tuples of channels coded jointly)
                          codebooks of N(0, I_t) (LBG 1980)
``channels.py``           bits per channel segment                    allocation and segmented store
``key_axes.py``           post-RoPE keys in the queries' principal    moments, axes (``k_rot``), their weights
                          axes (transform coding)
``minikv.py``             MiniKV layer-discriminative bits            sensitivity and bit allocation
                          (arXiv 2411.18077)
``lagkv.py``              LagKV eviction (arXiv 2504.04704)           scores and the eviction step
``value_prediction.py``   values predicted from the same layer's      fit (``v_pred``), inverse RoPE, the
                          keys (AQUA-KV, arXiv 2501.19392)            cache's closed-loop predictor
========================  ==========================================  =========================================

A quantizer is a store class registered in :data:`QUANTIZERS` under the name a recipe's ``[quant]
method`` gives. It provides ``check(name, width, block)`` (refuse a stream it cannot hold, when the plan is
built), ``coded_bytes(width, bits, along, group, block)`` (the bytes of one quantized token, from which
``bytes_per_token`` adds the residual window and the sink) and the store interface of
:mod:`kvcompress.methods.dense`, constructed as ``Store(bits, group_size, along, block, sink)``.
"""

from __future__ import annotations

from kvcompress.methods.channels import SegmentedStore
from kvcompress.methods.codebook import CodebookStore, VectorCodebookStore
from kvcompress.methods.decoquant import DecoQuantStore
from kvcompress.methods.dense import DenseStore
from kvcompress.methods.kivi import QuantizedStore

QUANTIZERS: dict[str, type[QuantizedStore]] = {
    "kivi": QuantizedStore, "decoquant": DecoQuantStore, "codebook": CodebookStore, "vector": VectorCodebookStore}

Store = DenseStore | QuantizedStore | SegmentedStore


def quantizer(method: str) -> type[QuantizedStore]:
    """The store class registered as ``method``; ``ValueError`` naming the known ones otherwise."""
    if method not in QUANTIZERS:
        raise ValueError(f"unknown quant method {method!r}; expected one of {tuple(QUANTIZERS)}")
    return QUANTIZERS[method]


def make_store(bits: float | tuple[int, ...], group_size: int, along: str, block: int,
               method: str = "kivi", segment: int = 0, sink: int = 0) -> Store:
    """A dense store for 16 bits, otherwise the quantizer ``method``'s (with ``sink`` 16-bit first tokens).
    A tuple of bits (one per ``segment`` channels) makes a :class:`~kvcompress.methods.channels.SegmentedStore`."""
    if isinstance(bits, list | tuple):
        if len(set(bits)) == 1:
            return make_store(bits[0], group_size, along, block, method, sink=sink)
        return SegmentedStore(tuple(bits), segment, group_size, along, block, sink, quantizer(method))
    if bits >= 16:
        return DenseStore()
    return quantizer(method)(bits, group_size, along, block, sink)
