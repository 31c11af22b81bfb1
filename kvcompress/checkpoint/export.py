"""``export``: factorize K/V projections, stream weights into safetensors shards, write atomically."""

from __future__ import annotations

import json
import shutil
import signal
import stat
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from kvcompress.analysis.analyze import analyze
from kvcompress.analysis.calibration import calibration_ids, layer_statistics
from kvcompress.checkpoint.manifest import write_manifest
from kvcompress.errors import KVCompressError
from kvcompress.methods.key_axes import query_axes
from kvcompress.methods.lowrank import factorized_attention, layer_group_svds, whitening_factor
from kvcompress.methods.value_prediction import PredictorMoments
from kvcompress.methods.value_prediction import fit as fit_predictor
from kvcompress.plan import Plan, build_plan, check_dtype
from kvcompress.recipe import Recipe
from kvcompress.sources import Source, attn_prefix, sha256_file

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
    check_dtype(dtype)  # before any calibration or SVD
    tick = progress or (lambda *_: None)
    tokenizer = source.tokenizer()
    svds = key_axes = predictors = None
    if not recipe.layers:  # its calibration, SVDs, key axes and predictor sums serve the factorization below
        analysis = analyze(source, tokenizer, recipe, sensitivity=recipe.quant.enabled, progress=progress,
                           keep_svds=True)
        svds, key_axes, predictors = analysis.svds, analysis.key_axes, analysis.predictors
    plan = build_plan(recipe, spec, dtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        shards = _write(source, tmp, recipe, plan, shard_bytes, tokenizer, tick, svds, key_axes, predictors)
        _write_config(source, tmp, dtype)
        write_manifest(tmp, {"format": "kvcompress-latent", "source": {
            "model": source.origin, "files": {p.name: sha256_file(p) for p in source.files()}}, **plan.to_manifest()})
        _readable_by_all(tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.iterdir())
    return ExportResult(path=out, recipe=recipe, dtype=dtype, dtype_reason=dtype_reason, shards=shards, bytes=size)


def _readable_by_all(folder: Path) -> None:
    """Give every file the mode ``config.json`` got as a new file (0644 under the usual umask): safetensors
    writes 0600 and copies keep a read-only source's mode."""
    mode = stat.S_IMODE((folder / "config.json").stat().st_mode)
    for p in folder.rglob("*"):
        if p.is_file():
            p.chmod(mode)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is replaced, and restored if the swap fails."""
    if not out.exists():
        tmp.rename(out)
        return
    trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    stops = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    held = signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # a stop arrives after the swap, not inside it
    try:
        out.rename(trash)
        try:
            tmp.rename(out)
        except BaseException:
            trash.rename(out)
            raise
        shutil.rmtree(trash)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _write(source: Source, folder: Path, recipe: Recipe, plan: Plan, shard_bytes: int, tokenizer,
           tick: Callable[[str, int, int], None], svds: list | None = None,
           key_axes: list[torch.Tensor] | None = None, predictors: list[PredictorMoments] | None = None) -> int:
    """Stream every tensor into shards: the untouched ones as they are, each layer's attention factorized
    from ``svds`` (analyze's, per layer) or from SVDs computed here, one layer at a time; ``k_rot`` from
    ``key_axes`` (analyze's) or measured here when the plan turns keys into the queries' axes; ``v_pred``
    fitted from ``predictors`` (analyze's, or measured here) when the plan predicts values."""
    spec, dtype = source.spec, getattr(torch, plan.dtype)
    rotate = recipe.quant.enabled and recipe.quant.rotation == "orthogonal"
    grams = None
    cal = recipe.calibration
    whitened = svds is None and recipe.lowrank.svd == "whitened"
    key_group = recipe.quant.key_group if plan.key_axes and key_axes is None else 0
    predict = predictors is None and any(lay.predicts_values for lay in plan.layers)
    if whitened or key_group or predict:
        ids = calibration_ids(tokenizer, cal.text or None, cal.max_tokens, cal.seq_len)
        grams, moments, measured = layer_statistics(source, ids, whitened, key_group, predict,
                                                    lambda i: tick("calibrate", i + 1, spec.num_layers))
        if moments is not None:
            key_axes = [query_axes(m)[0] for m in moments]
        predictors = measured or predictors
    writer = ShardWriter(folder, shard_bytes)
    replaced = {f"{attn_prefix(i)}{proj}.{kind}" for i in range(spec.num_layers)
                for proj in _REPLACED for kind in ("weight", "bias")}
    for name in source.names():
        if name not in replaced:
            writer.add(name, source.tensor(name).to(dtype))
    for i in range(spec.num_layers):
        if svds is not None:
            layer_svds = svds[i]
        else:
            s = whitening_factor(grams[i]) if grams is not None else None
            layer_svds = layer_group_svds(source, i, plan.head_group, s)
        key_rot = key_axes[i] if plan.key_axes else None
        tensors = factorized_attention(source, i, plan, layer_svds, rotate, key_rot)
        if plan.layers[i].predicts_values:
            tensors[f"{attn_prefix(i)}v_pred"] = fit_predictor(predictors[i], tensors[f"{attn_prefix(i)}v_down.weight"])
        for name, tensor in tensors.items():
            writer.add(name, tensor.to(dtype))
        if svds is not None:
            svds[i] = None  # release each layer's SVDs once written
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
