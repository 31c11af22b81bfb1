"""``load``: a compressed checkpoint back into a transformers model whose attention reads the kvcompress cache."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AttentionInterface, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from kvcompress.checkpoint.manifest import read_checkpoint
from kvcompress.compat import CACHE_ARG, pop_cache
from kvcompress.errors import KVCompressError
from kvcompress.plan import Plan, check_dtype
from kvcompress.runtime.attention import LatentAttention
from kvcompress.runtime.cache import KVCompressCache
from kvcompress.skeleton import hf_config, rotary, skeleton

ATTN_IMPL = "kvcompress"


def _padding_flags(batch_size, q_length, kv_length, *args, attention_mask=None, **kwargs):
    """Mask creation for kvcompress attention: the new tokens' padding flags ``[B, T]`` (None: no padding).

    Causality comes from the cache itself (everything stored is in the past), so the 2D mask is all
    the attention needs; ``KVCompressLayer.get_mask_sizes`` makes ``kv_length`` the query length.
    """
    if attention_mask is None:
        return None
    flags = attention_mask[:, -kv_length:].bool()
    return None if bool(flags.all()) else flags


AttentionInterface.register(ATTN_IMPL, sdpa_attention_forward)
AttentionMaskInterface.register(ATTN_IMPL, _padding_flags)


def make_cache(model) -> KVCompressCache:
    """A fresh kvcompress cache for a model returned by :func:`load` (for hand-written loops).

    Parameters
    ----------
    model : PreTrainedModel
        A model from :func:`load`.

    Returns
    -------
    KVCompressCache
        One layer object per decoder layer, configured from the checkpoint's plan.
    """
    plan: Plan = model.kvcompress_plan
    return KVCompressCache(list(plan.layers), plan.eviction, plan.stores_positions)


def compute_dtype(stored: str, device: str | torch.device | None = None) -> torch.dtype:
    """The dtype a checkpoint stored as ``stored`` computes in by default: its own, except float16 on the
    CPU, which runs as float32 (CPUs have no fast float16 arithmetic: a 128-token block of SmolLM2 took
    1155 ms in float16 against 294 ms in float32 on a 2-core x86 machine)."""
    on_cpu = device is None or torch.device(device).type == "cpu"
    return torch.float32 if stored == "float16" and on_cpu else getattr(torch, stored)


def load_source(manifest: dict, source: str | None = None, dtype: torch.dtype | None = None):
    """The uncompressed model a checkpoint came from (the baseline for evals), on the CPU.

    Parameters
    ----------
    manifest : dict
        The checkpoint's manifest (``model.kvcompress_manifest``).
    source : str, optional
        Where to read the source model (default: the path or id recorded in the manifest).
    dtype : torch.dtype, optional
        Default: :func:`compute_dtype` of the checkpoint's dtype, as :func:`load` gives the compressed model.
    """
    from kvcompress.skeleton import load_full
    from kvcompress.sources import open_source

    recorded = manifest["source"]["model"]
    if source is None and Path(recorded).is_absolute() and not Path(recorded).exists():
        raise KVCompressError(f"the checkpoint's source model is no longer at {recorded}; pass --source PATH")
    return load_full(open_source(source or recorded)).to(dtype or compute_dtype(manifest["dtype"])).eval()


def _compressed_class(base: type) -> type:
    """A subclass of the model class whose ``forward``/``generate`` default to a kvcompress cache.

    ``forward`` keeps the base signature (``functools.wraps``): ``generate`` inspects it, e.g. to pass
    ``logits_to_keep=1`` so a long prompt's prefill computes one row of logits, not one per token.
    """

    @functools.wraps(base.forward)
    def forward(self, *args, use_cache=None, **kwargs):
        cache = pop_cache(kwargs)
        if cache is None and (use_cache if use_cache is not None else self.config.use_cache):
            cache = make_cache(self)
        return base.forward(self, *args, use_cache=use_cache, **kwargs, **{CACHE_ARG: cache})

    def generate(self, *args, **kwargs):
        cache = pop_cache(kwargs)
        kwargs[CACHE_ARG] = cache if cache is not None else make_cache(self)
        eviction = self.kvcompress_plan.eviction
        if eviction is not None and "prefill_chunk_size" not in kwargs:
            kwargs["prefill_chunk_size"] = eviction.lag_size  # evict while reading a long prompt
        return base.generate(self, *args, **kwargs)

    return type(f"KVCompressed{base.__name__}", (base,), {"forward": forward, "generate": generate})


def load(path: str | Path, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
         verify: bool = True, device_map: str | dict | None = None):
    """Load a kvcompress checkpoint.

    Parameters
    ----------
    path : str or Path
        Folder written by ``kvcompress export``.
    device : str or torch.device, optional
        Where to put the model (default CPU). Ignored with ``device_map``.
    dtype : str or torch.dtype, optional
        Compute dtype (default: the checkpoint's, except float32 for a float16 checkpoint on the CPU; see
        :func:`compute_dtype`).
    verify : bool
        Check every file's sha256 against the manifest.
    device_map : str or dict, optional
        Passed to accelerate (e.g. ``"auto"``) to spread layers over several devices.

    Returns
    -------
    tuple
        ``(model, tokenizer)``; ``model.generate`` uses a kvcompress cache unless given another.

    Raises
    ------
    KVCompressError
        Missing or tampered checkpoint, newer manifest schema, pickle weights.
    """
    folder = Path(path)
    checkpoint = read_checkpoint(folder, verify=verify)
    manifest, plan = checkpoint.manifest, checkpoint.plan
    shards = sorted(folder.glob("*.safetensors"))  # read_checkpoint refused a folder without any
    if isinstance(dtype, str):
        check_dtype(dtype)
    config = hf_config(checkpoint.config)
    model = skeleton(config)
    model.model.rotary_emb = rotary(model)
    spec = checkpoint.spec
    for entry, layer in zip(plan.layers, model.model.layers, strict=True):
        old = layer.self_attn
        with torch.device("meta"):
            layer.self_attn = LatentAttention(
                config, old.layer_idx, entry.keys.rank, entry.values.rank, plan.head_group, model.model.rotary_emb,
                bias=spec.attention_bias, q_norm=getattr(old, "q_norm", None), k_norm=getattr(old, "k_norm", None),
                key_rope=plan.key_rope, key_rotation=plan.key_rotation, value_folded=entry.value_folded,
                predicts_values=entry.predicts_values,
            )
    expected = set(model.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
    seen: set[str] = set()
    for shard in shards:
        tensors = load_file(str(shard))
        unexpected = model.load_state_dict(tensors, strict=False, assign=True).unexpected_keys
        if unexpected:
            raise KVCompressError(f"checkpoint has {len(unexpected)} tensors this model does not use, "
                                  f"e.g. {unexpected[0]}")
        seen.update(tensors)
    missing = expected - seen
    if missing:
        raise KVCompressError(f"checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[0]}")
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    placed = device if device_map is None else "cpu" if device_map == "cpu" else "cuda"  # the dtype's device
    target = getattr(torch, dtype) if isinstance(dtype, str) else dtype or compute_dtype(plan.dtype, placed)
    model.to(target)
    model.model.rotary_emb.inv_freq = rotary(model).inv_freq  # RoPE frequencies stay float32
    if device_map is not None:
        from accelerate import dispatch_model, infer_auto_device_map

        dmap = infer_auto_device_map(model) if device_map == "auto" else device_map
        model = dispatch_model(model, device_map=dmap)
    elif device is not None:
        model.to(device)
    model.config._attn_implementation = ATTN_IMPL
    model.__class__ = _compressed_class(type(model))
    model.kvcompress_manifest, model.kvcompress_plan = manifest, plan
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return model, tokenizer
