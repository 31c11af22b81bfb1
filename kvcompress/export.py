"""``export``: factorize K/V projections, stream weights into safetensors shards, write atomically."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from kvcompress.analysis.analyze import analyze, layer_group_svds
from kvcompress.analysis.calibration import attention_input_grams, calibration_ids
from kvcompress.analysis.svd import whitening_factor
from kvcompress.cache.channels import bit_runs
from kvcompress.errors import KVCompressError
from kvcompress.manifest import write_manifest
from kvcompress.recipe import Recipe
from kvcompress.sources import Source, attn_prefix, sha256_file

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SHARD_BYTES = 2 << 30
_REPLACED = ("k_proj", "v_proj", "o_proj")


@dataclass
class ExportResult:
    """Where the checkpoint went and what it holds."""

    path: Path
    recipe: Recipe
    dtype: str
    dtype_reason: str  # why this dtype: "as asked", "the source's", "the source is GGUF-quantized", ...
    shards: int
    bytes: int


class ShardWriter:
    """Collects tensors and writes ``model-XXXXX-of-YYYYY.safetensors`` shards of at most ``limit`` bytes."""

    def __init__(self, folder: Path, limit: int = SHARD_BYTES):
        self.folder, self.limit = folder, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.shards: list[tuple[str, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue a tensor, flushing a shard first if it would overflow."""
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.size + nbytes > self.limit:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.size += nbytes

    def flush(self) -> None:
        """Write the queued tensors as one shard (temporarily numbered)."""
        if not self.pending:
            return
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(self.folder / name), metadata={"format": "pt"})
        self.shards.append((name, list(self.pending)))
        self.pending, self.size = {}, 0

    def close(self) -> int:
        """Flush, give shards their final names, write the index if sharded; return the shard count."""
        self.flush()
        n = len(self.shards)
        if n == 1:
            (self.folder / self.shards[0][0]).rename(self.folder / "model.safetensors")
            return 1
        weight_map = {}
        for i, (tmp, names) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / tmp).rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return n


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A seeded Haar-distributed ``n × n`` orthogonal matrix (float64)."""
    generator = torch.Generator().manual_seed(seed)
    q, tri = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(tri))


def rotate_latent(down: torch.Tensor, up: torch.Tensor, seed: int, blocks: list[int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate a latent by a seeded random orthogonal ``Q``: ``(Q·down, up·Qᵀ)``, so ``up @ down`` is unchanged.

    The principal axes put most energy in a few latent channels; mixing them spreads outliers evenly, so
    group-wise low-bit quantization loses less (QuaRot/SpinQuant's idea, applied where it is free: the
    rotation is folded into the exported weights). 2-bit K/V on SmolLM2: perplexity x1.226 -> x1.117.
    With ``blocks`` (channel counts summing to the rank), ``Q`` is block-diagonal: channels mix only within
    each block, e.g. each run of equal bits under ``allocation = "channels"``.
    """
    sizes = blocks or [down.shape[0]]
    q = torch.block_diag(*(random_orthogonal(n, seed + 7919 * i) for i, n in enumerate(sizes)))
    return q @ down, up @ q.T


def _run_widths(bits: int | list[int], rank: int, segment: int) -> list[int]:
    """Channels of each run of equal bits (one block for a single width)."""
    return [w for w, _ in bit_runs(bits, rank, segment)]


def value_folded(spec, head_group: int, rank_v: int) -> bool:
    """Whether folding ``U_v`` into ``o_proj`` makes fewer weights than keeping it apart.

    Folded: ``hidden × heads·r_v``. Apart: ``U_v`` (``kv_heads·d × r_v``) plus the original ``hidden ×
    heads·d``. Every weight is read at each decode step, so fewer weights is also faster decoding.
    """
    folded = spec.hidden_size * spec.num_heads * rank_v
    return folded <= spec.num_kv_heads * spec.head_dim * rank_v + spec.hidden_size * spec.num_heads * spec.head_dim


def factorized_attention(source: Source, layer: int, recipe: Recipe, s_factor: torch.Tensor | None
                         ) -> dict[str, torch.Tensor]:
    """One layer's replacement tensors: ``k_down``, ``k_up``, ``k_bias``, ``v_down``, ``o_proj`` (with ``U_v``
    folded in, or ``v_up`` beside it; see :func:`value_folded`), and ``k_rot`` (one orthogonal ``d × d``
    per KV head) when post-RoPE keys are rotated.

    ``o_proj`` folding: query head h reads KV head j = h // n_rep, member jj of group G; its value is
    ``U_v[G][jj] c_v + b_v[j]``, so ``W_o'[:, h] = W_o[:, h] @ U_v[G][jj]`` and the value bias becomes
    ``b_o' = b_o + Σ_h W_o[:, h] b_v[j]`` (attention weights sum to one).
    """
    spec = source.spec
    lay = recipe.layers[layer]
    g, d = recipe.head_group(spec), spec.head_dim
    p = attn_prefix(layer)
    k_svds, v_svds = layer_group_svds(source, layer, g, s_factor)
    k_factors = [x.factors(lay.rank_k) for x in k_svds]
    v_factors = [x.factors(lay.rank_v) for x in v_svds]
    q = recipe.quant
    out = {}
    if q.enabled and q.rotation == "orthogonal":
        if q.key_rope == "post":  # RoPE sits between k_up and the cache: rotate q and k after RoPE at run time
            out[f"{p}k_rot"] = torch.stack([random_orthogonal(d, 2 * (layer * spec.num_kv_heads + h))
                                            for h in range(spec.num_kv_heads)])
        else:
            blocks = _run_widths(lay.bits_k, lay.rank_k, q.segment_size("k"))
            k_factors = [rotate_latent(down, up, 2 * (layer * len(k_factors) + group), blocks)
                         for group, (down, up) in enumerate(k_factors)]
        blocks = _run_widths(lay.bits_v, lay.rank_v, q.segment_size("v"))
        v_factors = [rotate_latent(down, up, 2 * (layer * len(v_factors) + group) + 1, blocks)
                     for group, (down, up) in enumerate(v_factors)]
    out[f"{p}k_down.weight"] = torch.cat([down for down, _ in k_factors])
    out[f"{p}k_up"] = torch.stack([up for _, up in k_factors])
    out[f"{p}v_down.weight"] = torch.cat([down for down, _ in v_factors])
    w_o = source.tensor(f"{p}o_proj.weight").double()
    n_rep = spec.num_heads // spec.num_kv_heads
    if value_folded(spec, g, lay.rank_v):
        blocks = []
        for h in range(spec.num_heads):
            j = h // n_rep
            up = v_factors[j // g][1][(j % g) * d:(j % g + 1) * d]  # this KV head's rows of U_v, d × r_v
            blocks.append(w_o[:, h * d:(h + 1) * d] @ up)
        out[f"{p}o_proj.weight"] = torch.cat(blocks, dim=1)
    else:
        out[f"{p}v_up"] = torch.stack([up for _, up in v_factors])
        out[f"{p}o_proj.weight"] = w_o
    bias = source.tensor(f"{p}o_proj.bias").double() if source.has(f"{p}o_proj.bias") else None
    if source.has(f"{p}v_proj.bias"):
        b_v = source.tensor(f"{p}v_proj.bias").double().view(spec.num_kv_heads, d)
        folded = sum(w_o[:, h * d:(h + 1) * d] @ b_v[h // n_rep] for h in range(spec.num_heads))
        bias = folded if bias is None else bias + folded
    if bias is not None:
        out[f"{p}o_proj.bias"] = bias
    if source.has(f"{p}k_proj.bias"):
        out[f"{p}k_bias"] = source.tensor(f"{p}k_proj.bias")
    return out


def export(
    source: Source,
    out: Path,
    recipe: Recipe,
    dtype: str | None = None,
    force: bool = False,
    shard_bytes: int = SHARD_BYTES,
    progress: Callable[[str, int, int], None] | None = None,
) -> ExportResult:
    """Write a compressed checkpoint to ``out`` atomically.

    Parameters
    ----------
    source : Source
        The model to compress.
    out : Path
        Output folder; must not exist unless ``force``.
    recipe : Recipe
        Settings; if it has no ``[[layers]]``, ``analyze`` fills them in first.
    dtype : str, optional
        ``float16``, ``bfloat16`` or ``float32``; default: float16 for a quantized GGUF, else the source's
        dtype (float16 if unknown).
    force : bool
        Replace an existing ``out``.
    shard_bytes : int
        Largest shard size.
    progress : callable, optional
        ``(phase, done, total)`` callback.

    Raises
    ------
    KVCompressError
        Existing output without ``force``, bad dtype, impossible recipe. On any error or Ctrl-C nothing
        is left at ``out`` (and an existing ``out`` is untouched).
    """
    spec = source.spec
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KVCompressError(f"{out} is a file; the output must be a folder")
    if out.exists() and not force:
        raise KVCompressError(f"{out} exists; pass --force to replace it")
    dtype, dtype_reason = (dtype, "as asked") if dtype else source.default_dtype()
    if dtype not in DTYPES:
        raise KVCompressError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    tick = progress or (lambda *_: None)
    tokenizer = source.tokenizer()
    if not recipe.layers:
        analyze(source, tokenizer, recipe, sensitivity=recipe.quant.enabled, progress=progress)
    recipe.validate(spec)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        shards = _write(source, tmp, recipe, DTYPES[dtype], shard_bytes, tokenizer, tick)
        _write_config(source, tmp, dtype)
        manifest = _manifest(source, recipe, dtype)
        write_manifest(tmp, manifest)
        _readable_by_all(tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.iterdir())
    return ExportResult(path=out, recipe=recipe, dtype=dtype, dtype_reason=dtype_reason, shards=shards, bytes=size)


def _readable_by_all(folder: Path) -> None:
    """Give every file the mode a new file gets (0644 under the usual umask): safetensors writes 0600 and
    copies keep a read-only source's mode."""
    umask = os.umask(0)
    os.umask(umask)
    for p in folder.rglob("*"):
        if p.is_file():
            p.chmod(0o666 & ~umask)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is replaced, and restored if the swap fails."""
    if not out.exists():
        tmp.rename(out)
        return
    trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    out.rename(trash)
    try:
        tmp.rename(out)
    except BaseException:
        trash.rename(out)
        raise
    shutil.rmtree(trash)


def _write(source: Source, folder: Path, recipe: Recipe, dtype: torch.dtype, shard_bytes: int, tokenizer,
           tick: Callable[[str, int, int], None]) -> int:
    spec = source.spec
    grams = None
    if recipe.lowrank.svd == "whitened":
        cal = recipe.calibration
        ids = calibration_ids(tokenizer, cal.text or None, cal.max_tokens, cal.seq_len)
        grams = attention_input_grams(source, ids, lambda i: tick("calibrate", i + 1, spec.num_layers))
    writer = ShardWriter(folder, shard_bytes)
    replaced = {f"{attn_prefix(i)}{proj}.{kind}" for i in range(spec.num_layers)
                for proj in _REPLACED for kind in ("weight", "bias")}
    for name in source.names():
        if name not in replaced:
            writer.add(name, source.tensor(name).to(dtype))
    for i in range(spec.num_layers):
        s = whitening_factor(grams[i]) if grams is not None else None
        for name, tensor in factorized_attention(source, i, recipe, s).items():
            writer.add(name, tensor.to(dtype))
        tick("export", i + 1, spec.num_layers)
    n = writer.close()
    tokenizer.save_pretrained(str(folder))
    return n


def _write_config(source: Source, folder: Path, dtype: str) -> None:
    config = dict(source.config)
    config["dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = source.folder() / "generation_config.json"
    if gen.is_file():
        shutil.copy(gen, folder / gen.name)


def _manifest(source: Source, recipe: Recipe, dtype: str) -> dict:
    spec = source.spec
    q, lag = recipe.quant, recipe.lagkv
    return {
        "format": "kvcompress-latent",
        "source": {"model": source.origin, "files": {p.name: sha256_file(p) for p in source.files()}},
        "model_type": spec.model_type,
        "dtype": dtype,
        "head_group": recipe.head_group(spec),
        "layers": [
            {"layer": lay.layer, "rank_k": lay.rank_k, "rank_v": lay.rank_v,
             "value_folded": value_folded(spec, recipe.head_group(spec), lay.rank_v),
             "bits_k": lay.bits_k if q.enabled else 16, "bits_v": lay.bits_v if q.enabled else 16,
             "group_size": q.group_size, "key_group_size": q.key_group, "key_segment": q.segment,
             "residual_length": q.residual_length,
             "method": q.method}
            for lay in recipe.layers
        ],
        "quant": {"enabled": q.enabled, "method": q.method},
        "key_rope": q.key_rope,
        "key_rotation": q.enabled and q.rotation == "orthogonal" and q.key_rope == "post",
        "eviction": ({"method": "lagkv", "sink_size": lag.sink_size, "lag_size": lag.lag_size,
                      "keep_ratio": lag.keep_ratio, "value_weight": lag.value_weight} if lag.enabled else None),
        "kernel_backend": "auto",
        "recipe": recipe.to_dict(),
    }
