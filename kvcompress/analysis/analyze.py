"""``analyze``: spectra, rank schedule and bit allocation for one model, turned into a recipe."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch

from kvcompress.analysis import schedule as schedules
from kvcompress.analysis.calibration import calibration_ids, layer_statistics
from kvcompress.memory import baseline_bytes_per_token, compressed_bytes_per_token
from kvcompress.methods import make_store
from kvcompress.methods.channels import channel_bits
from kvcompress.methods.key_axes import query_axes, segment_bits
from kvcompress.methods.lowrank import (
    GroupSVD,
    condition_number,
    energy_kept,
    layer_group_svds,
    split_groups,
    whitening_factor,
)
from kvcompress.methods.minikv import Probe, allocate_bits, layer_sensitivity
from kvcompress.methods.rotation import random_orthogonal
from kvcompress.methods.value_prediction import PredictorMoments
from kvcompress.plan import StreamPlan, build_plan, check_widths, layer_plan, stream_widths
from kvcompress.recipe import BITS, LayerRecipe, Quant, Recipe
from kvcompress.skeleton import load_full
from kvcompress.sources import Source, attn_prefix

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass
class LayerReport:
    """One row of the analysis table."""

    layer: int
    rank_k: int
    rank_v: int
    kappa_k: float
    kappa_v: float
    energy_k: float
    energy_v: float
    bits_k: float | list[int]
    bits_v: float | list[int]
    sensitivity: float
    sensitivity_k: float
    sensitivity_v: float


@dataclass
class Analysis:
    """Everything ``analyze`` found, plus the recipe it produced."""

    model: str
    recipe: Recipe
    num_layers: int
    num_kv_heads: int
    head_dim: int
    head_group: int
    group_width: int
    layers: list[LayerReport]
    kv_bytes_per_token: dict[str, float]
    compression_ratio: float
    context: int
    sensitivity_method: str
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    svds: list[tuple[list[GroupSVD], list[GroupSVD]]] = field(default_factory=list, repr=False)  # for export
    key_axes: list[torch.Tensor] | None = field(default=None, repr=False)  # per layer, k_rot (for export)
    predictors: list[PredictorMoments] | None = field(default=None, repr=False)  # per layer, for v_pred (export)

    def to_json(self) -> dict:
        """The ``--json`` object."""
        lr = self.recipe.lowrank
        return {
            "model": self.model,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "head_group": self.head_group,
            "group_width": self.group_width,
            "svd": lr.svd,
            "schedule": lr.schedule,
            "target_ratio": lr.target_ratio,
            "avg_bits": self.recipe.quant.avg_bits,
            "quant_enabled": self.recipe.quant.enabled,
            "sensitivity_method": self.sensitivity_method,
            "context": self.context,
            "layers": [asdict(r) for r in self.layers],
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "compression_ratio": self.compression_ratio,
            "seconds": round(self.seconds, 2),
        }


def _log_kappa(source: Source, layer: int, head_group: int) -> tuple[float, float]:
    spec = source.spec
    logs = []
    for proj in ("k", "v"):
        w = source.tensor(f"{attn_prefix(layer)}{proj}_proj.weight")
        groups = split_groups(w, spec.num_kv_heads, spec.head_dim, head_group)
        logs.append(sum(math.log(condition_number(g)) for g in groups) / len(groups))  # geometric mean
    return logs[0], logs[1]


PROBE_SEED = 104729  # the probes' rotation: any seeded orthogonal matrix is distributed as the export's


def stream_probe(stream: StreamPlan, along: str, rotate: bool) -> Probe:
    """Fake quantization of one stream as the cache would hold it: a fresh store of ``stream``'s quantizer
    takes the tokens, quantizes every whole flush block (a ragged tail stays in 16 bits) and reads them back;
    with ``rotate``, each head vector is turned by a seeded orthogonal matrix before and back after, as the
    export's folded rotation and ``k_rot`` turn them."""

    rotation = random_orthogonal(stream.rank, PROBE_SEED) if rotate else None

    def probe(x: torch.Tensor) -> torch.Tensor:
        turn = None if rotation is None else rotation.to(x)
        store = make_store(stream.bits, stream.group, along, stream.block, stream.method, stream.segment,
                           stream.sink)
        store.append(x if turn is None else x @ turn)
        store.flush(x.shape[-2])
        y = store.read().to(x.dtype)
        return y if turn is None else y @ turn.T

    return probe


def sensitivity_probes(quant: Quant, width: int) -> tuple[Probe, Probe, str]:
    """The keys' and values' probes at ``quant.probe_bits`` with the recipe's quantizers, and a description."""
    lay = layer_plan(LayerRecipe(0, width, width, quant.probe_bits, quant.probe_bits), replace(quant, enabled=True))
    rotate = quant.rotation == "orthogonal"
    label = (f"{quant.probe_bits}-bit fake quantization of one layer's K ({lay.keys.method}, groups of "
             f"{lay.keys.group} tokens per channel) or V ({lay.values.method}, groups of {lay.values.group} "
             f"channels) at a time{', head vectors rotated' if rotate else ''}, sink {quant.sink}; mean next-token KL "
             "divergence against the exact model on calibration text")
    return stream_probe(lay.keys, "tokens", rotate), stream_probe(lay.values, "channels", rotate), label


def _check_fixed_widths(q: Quant, width: int) -> None:
    """Refuse fixed ``key_bits`` / ``value_bits`` that the streams' quantizers do not store, before any work."""
    if q.enabled and q.allocation == "stream" and q.key_bits and q.value_bits:
        fixed = layer_plan(LayerRecipe(0, width, width, 16 if q.key_axes else q.key_bits, q.value_bits), q)
        check_widths(fixed)


def analyze(
    source: Source,
    tokenizer,
    recipe: Recipe,
    context: int = 2048,
    sensitivity: bool = True,
    progress: Progress | None = None,
    keep_svds: bool = False,
) -> Analysis:
    """Analyse ``source`` under ``recipe``'s settings and fill in its per-layer ranks and bits.

    Parameters
    ----------
    source : Source
        The model, read tensor by tensor.
    tokenizer
        Its tokenizer (for the calibration text).
    recipe : Recipe
        Method settings; its ``layers`` are replaced.
    context : int
        Context length at which KV bytes per token are reported.
    sensitivity : bool
        Measure per-layer KL sensitivity (needs the model in memory); if False, bits are uniform.
    progress : callable, optional
        ``(phase, done, total)`` callback.
    keep_svds : bool
        Keep every layer's K and V SVDs in the result (``svds``), for an export that follows; they hold
        float64 factors and whitening matrices, so only keep them to use them.
    """
    start = time.perf_counter()
    spec = source.spec
    recipe.validate(spec)
    lr, cal = recipe.lowrank, recipe.calibration
    g = recipe.head_group(spec)
    width = g * spec.head_dim
    _check_fixed_widths(recipe.quant, width)
    tick = progress or (lambda *_: None)
    ids = calibration_ids(tokenizer, cal.text or None, cal.max_tokens, cal.seq_len)

    grams = moments = predictors = None
    by_channels = recipe.quant.enabled and recipe.quant.allocation == "channels"
    whitened = lr.svd == "whitened"  # the latents' principal axes, as exported
    key_group = recipe.quant.key_group if recipe.quant.enabled and recipe.quant.key_axes else 0
    predict = recipe.quant.enabled and recipe.quant.predict_values
    if whitened or key_group or predict:
        grams, moments, predictors = layer_statistics(source, ids, whitened, key_group, predict,
                                                      lambda i: tick("calibrate", i + 1, spec.num_layers))

    key_axes = key_weights = None
    if moments is not None:  # post-RoPE keys in the queries' principal axes
        axes = [query_axes(m) for m in moments]
        key_axes = [rot for rot, _ in axes]
        key_weights = [w.view(-1, width).mean(0) for _, w in axes]  # per latent group's channels

    kappas, energy_k, energy_v = [], [], []
    spectra = []  # per layer: (K sigmas, V sigmas), one per head group
    svds = []  # per layer, with keep_svds: (K SVDs, V SVDs), for export to factorize
    for i in range(spec.num_layers):
        kappas.append(_log_kappa(source, i, g))
        s = whitening_factor(grams[i]) if grams is not None else None
        k_svds, v_svds = layer_group_svds(source, i, g, s)
        spectra.append(([x.sigma for x in k_svds], [x.sigma for x in v_svds]))
        if keep_svds:
            svds.append((k_svds, v_svds))
        tick("svd", i + 1, spec.num_layers)

    n = spec.num_layers
    if not lr.enabled:
        ranks_k = ranks_v = [width] * n
    elif lr.schedule == "progressive":
        ranks_k = ranks_v = schedules.progressive([a + b for a, b in kappas], width, lr.target_ratio,
                                                  lr.rank_multiple)
    elif lr.schedule == "uniform":
        ranks_k = ranks_v = schedules.uniform(n, width, lr.target_ratio, lr.rank_multiple)
    elif lr.schedule == "greedy":
        ranks_k, ranks_v = schedules.greedy(spectra, width, lr.target_ratio, lr.rank_multiple,
                                            keys=recipe.lowrank_keys)
    else:
        # the rank a layer needs is the rank its hungriest head group needs
        ranks_k = [max(schedules.energy([x.tolist() for x in k], width, lr.energy, lr.rank_multiple))
                   for k, _ in spectra]
        ranks_v = [max(schedules.energy([x.tolist() for x in v], width, lr.energy, lr.rank_multiple))
                   for _, v in spectra]
    if not recipe.lowrank_keys:  # post-RoPE keys are cached at full width
        ranks_k = [width] * n
    for i, (k_sig, v_sig) in enumerate(spectra):
        energy_k.append(sum(energy_kept(x, ranks_k[i]) for x in k_sig) / len(k_sig))
        energy_v.append(sum(energy_kept(x, ranks_v[i]) for x in v_sig) / len(v_sig))

    q = recipe.quant
    fixed = q.allocation == "stream" and bool(q.key_bits and q.value_bits)  # every layer's K and V widths given
    uniform = fixed or (q.allocation == "stream" and q.avg_bits in BITS)
    if sensitivity and not uniform:
        model = load_full(source)
        key_probe, value_probe, method = sensitivity_probes(q, spec.head_dim)
        sens = layer_sensitivity(model, ids[:1], key_probe, value_probe,
                                 on_layer=lambda i: tick("sensitivity", i + 1, n))
        del model
    else:
        sens = [(0.0, 0.0)] * n
        method = (f"not needed: keys at {q.key_bits}, values at {q.value_bits} bits" if fixed
                  else f"not needed: every stream at {q.avg_bits:g} bits" if uniform else "none (uniform bits)")
    if fixed:
        bits_k, bits_v = [q.key_bits if key_weights is not None else int(q.key_bits)] * n, [q.value_bits] * n
    elif by_channels:
        energies = [tuple(torch.stack([x.double()[:r].square() for x in sig]).mean(0) for sig, r in
                          ((k_sig, ranks_k[i]), (v_sig, ranks_v[i]))) for i, (k_sig, v_sig) in enumerate(spectra)]
        bits_k, bits_v = channel_bits(energies, sens, (q.segment_size("k"), q.segment_size("v")), q.avg_bits,
                                      q.key_rope == "post")
    else:
        streams = [layer_plan(LayerRecipe(i, ranks_k[i], ranks_v[i]), replace(q, enabled=True)) for i in range(n)]
        ladders = [stream_widths(name, getattr(lay, attr), q.half_bits)  # K, V of each layer: the widths they store
                   for lay in streams for name, attr in (("k", "keys"), ("v", "values"))]
        bits = allocate_bits([s for pair in sens for s in pair], recipe.quant.avg_bits, ladders=ladders)
        bits_k, bits_v = bits[0::2], bits[1::2]
    if key_weights is not None:  # each layer's key bits spread over the axes by their weights
        bits_k = [segment_bits(w, b, q.segment) for w, b in zip(key_weights, bits_k, strict=True)]

    recipe.layers = [LayerRecipe(i, ranks_k[i], ranks_v[i], bits_k[i], bits_v[i]) for i in range(n)]
    reports = [
        LayerReport(i, ranks_k[i], ranks_v[i], math.exp(kappas[i][0]), math.exp(kappas[i][1]),
                    energy_k[i], energy_v[i], bits_k[i], bits_v[i], sum(sens[i]), sens[i][0], sens[i][1])
        for i in range(n)
    ]
    base = baseline_bytes_per_token(spec)
    comp = compressed_bytes_per_token(spec, build_plan(recipe, spec), context)
    return Analysis(
        model=source.origin, recipe=recipe, num_layers=n, num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, head_group=g, group_width=width, layers=reports,
        kv_bytes_per_token={"baseline": base, "compressed": comp}, compression_ratio=base / comp,
        context=context, sensitivity_method=method, seconds=time.perf_counter() - start,
        svds=svds, key_axes=key_axes, predictors=predictors,
    )
