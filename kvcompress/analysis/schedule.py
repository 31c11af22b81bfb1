"""Layer-wise rank schedules: progressive (LoRC), uniform, energy, and greedy.

All schedules return one rank per layer for a head group of width ``width`` (= heads in the group ×
head_dim), rounded to a multiple of ``multiple`` and clipped to ``[multiple, width]``.

Progressive (LoRC, arXiv 2410.03111, §4 "progressive compression strategy"). An error introduced at
layer l is amplified by every layer after it, and a layer's amplification is bounded by the
condition numbers of its K/V projections. We therefore score layer l by its *cumulative* condition
number, the product over the layers it feeds::

    C_l = Σ_{j=l}^{L-1} log(κ(W_k^j) · κ(W_v^j))          (log of Π_{j≥l} κ_k^j κ_v^j)
    s_l = (C_l − C_{L-1}) / (C_0 − C_{L-1})                 (min–max normalized, s_0 = 1, s_{L-1} = 0)
    r_l = r_min + (r_max − r_min) · s_l

``C_l`` never increases with depth (every term is ≥ 0), so neither does ``r_l``: shallow layers keep
more rank. ``r_max`` is the full width and ``r_min`` is solved so the mean rank meets the budget
``target · width``; when that would put ``r_min`` below one rounding step, ``r_min`` is pinned there
and ``r_max`` is solved instead. The paper's text was not available to us verbatim: this is our
reading of its rule (cumulative product over subsequent layers, log scale, linear map between a
minimum and maximum dimension), documented here so it can be checked and changed in one place.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import torch


def round_rank(rank: float, width: int, multiple: int) -> int:
    """Round to the nearest multiple of ``multiple`` inside ``[multiple, width]`` (``width`` always allowed)."""
    step = min(multiple, width)
    below = max(step, min(width, int(rank // step) * step))
    candidates = {below, min(width, below + step), width}
    return min(candidates, key=lambda c: (abs(c - rank), c))


def uniform(num_layers: int, width: int, target: float, multiple: int) -> list[int]:
    """The same rank ``target · width`` in every layer."""
    return [round_rank(target * width, width, multiple)] * num_layers


def progressive(log_kappa: Sequence[float], width: int, target: float, multiple: int) -> list[int]:
    """LoRC progressive ranks from per-layer ``log(κ_k κ_v)`` (see the module docstring)."""
    n = len(log_kappa)
    cumulative = [sum(log_kappa[i:]) for i in range(n)]
    span = cumulative[0] - cumulative[-1]
    if n == 1 or span <= 0:
        return uniform(n, width, target, multiple)
    s = [(c - cumulative[-1]) / span for c in cumulative]
    mean_s = sum(s) / n
    budget = target * width
    floor = float(min(multiple, width))
    r_max = float(width)
    r_min = (budget - r_max * mean_s) / (1.0 - mean_s)
    if r_min < floor:
        r_min = floor
        r_max = min(float(width), floor + max(budget - floor, 0.0) / mean_s)
    return [round_rank(r_min + (r_max - r_min) * si, width, multiple) for si in s]


def energy(sigmas: Sequence[Sequence[float]], width: int, keep: float, multiple: int) -> list[int]:
    """Per spectrum, the smallest rank whose squared singular values keep ``keep`` of the total.

    ``sigmas[i]`` is one spectrum (a layer's, or a head group's). The rank is rounded *up* to the next
    multiple so the energy target is always met.
    """
    ranks = []
    for sig in sigmas:
        s2 = [x * x for x in sig]
        total, acc, r = sum(s2), 0.0, 0
        while r < len(s2) and acc < keep * total:
            acc += s2[r]
            r += 1
        step = min(multiple, width)
        ranks.append(max(step, min(width, math.ceil(r / step) * step)))
    return ranks


def greedy(spectra: Sequence[Sequence[Sequence[torch.Tensor]]], width: int, target: float, multiple: int,
           keys: bool = True) -> tuple[list[int], list[int]]:
    """Ranks for K and V of every layer from one global budget, spent where it removes the most error.

    ``spectra[l] = (k_sigmas, v_sigmas)``, one singular-value vector per head group. With whitened
    spectra, ``Σ_{i>r} σ_i² / Σ σ_i²`` is a stream's relative output error on calibration activations,
    so errors are comparable across layers and between K and V. Every stream starts at one step; the
    next step of rank goes to the stream whose error drops most, until the mean of
    ``(rank_k + rank_v) / (2 · width)`` would exceed ``target``. Measured on SmolLM2 (ratio 0.5, same
    bytes): perplexity ×1.86 against ×4.1 for the progressive schedule and ×2.5 for uniform.
    With ``keys=False`` keys keep the full width and the budget (mean ``rank_v / width``) goes to values.
    """
    if not keys:
        return [width] * len(spectra), _greedy_streams([v for _, v in spectra], width, target, multiple)
    ranks = _greedy_streams([stream for layer in spectra for stream in layer], width, target, multiple)
    return ranks[0::2], ranks[1::2]


def _greedy_streams(streams: Sequence[Sequence[torch.Tensor]], width: int, target: float, multiple: int
                    ) -> list[int]:
    """One rank per stream (its head groups' spectra) with mean ``rank / width`` within ``target``."""
    step = min(multiple, width)
    residual = []  # per stream: relative residual energy at every rank, averaged over head groups
    for sigmas in streams:
        curves = []
        for sig in sigmas:
            s2 = sig.double().square()
            tail = s2.flip(0).cumsum(0).flip(0) / s2.sum().clamp_min(1e-300)  # tail[r] = Σ_{i≥r}
            curves.append(torch.cat([tail, tail.new_zeros(1)]))
        residual.append(torch.stack(curves).mean(0))
    ranks = [step] * len(residual)

    def gain(i: int) -> float:
        nxt = min(width, ranks[i] + step)
        return float(residual[i][ranks[i]] - residual[i][nxt])

    heap = [(-gain(i), i) for i in range(len(residual))]
    heapq.heapify(heap)
    budget = target * width * len(residual) - sum(ranks)
    while heap:
        _, i = heapq.heappop(heap)
        add = min(width, ranks[i] + step) - ranks[i]
        if add == 0 or add > budget:
            continue
        ranks[i] += add
        budget -= add
        if ranks[i] < width:
            heapq.heappush(heap, (-gain(i), i))
    return ranks
