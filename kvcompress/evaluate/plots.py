"""PNG plots of ``bench`` results (needs the ``plot`` extra: matplotlib)."""

from __future__ import annotations

from pathlib import Path

from kvcompress.errors import KVCompressError


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (fewer bytes and lower perplexity), by bytes."""
    order = sorted(range(len(points)), key=lambda i: points[i])
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


SPEED_PLOTS = (("decode_speed.png", "decode_tokens_per_second", "decode tokens/s", 1.0),
               ("peak_memory.png", "peak_memory_bytes", "peak MB", 1e-6),
               ("prefill.png", "prefill_seconds", "prefill seconds", 1.0))
"""Per plot against context: file, the speed entry it shows, its axis label, and the factor to that unit."""


def write_plots(results: dict, out: Path) -> list[Path]:
    """Write ``pareto.png`` (perplexity vs KV bytes per token) and, per entry of :data:`SPEED_PLOTS`, decode
    tokens/s, peak memory and prefill time against context on log axes (one bar per system when a single
    context was timed).

    Returns
    -------
    list of Path
        The files written (the Pareto plot only when perplexity was measured; a speed plot only when some
        system has its entry, e.g. llama.cpp's rows have no peak memory).

    Raises
    ------
    KVCompressError
        When matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KVCompressError("plots need matplotlib: pip install 'kvcompress[plot]'") from None
    rows, written = results["rows"], []
    rated = [r for r in rows if "ppl" in r and "kv_bytes_per_token" in r]
    if rated:
        _pareto_plot(results, rated, plt, out / "pareto.png")
        written.append(out / "pareto.png")
    for name, key, label, unit in SPEED_PLOTS:
        timed = [r for r in rows if any(key in sp for sp in r.get("speed", {}).values())]
        if timed:
            _speed_plot(results, timed, key, label, unit, plt, out / name)
            written.append(out / name)
    return written


def _speed_plot(results: dict, timed: list[dict], key: str, label: str, unit: float, plt, path: Path) -> None:
    """``key`` of each system's speed runs: a line per system over the contexts on log-log axes, or a bar
    per system when there is one context (a line through a single point would be a lone dot per system)."""
    contexts = sorted({int(c) for r in timed for c, sp in r["speed"].items() if key in sp})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    where = f"on {results['device']}, {results['dtype']}"
    if len(contexts) == 1:
        values = [r["speed"][str(contexts[0])][key] * unit for r in timed]
        bars = ax.bar(range(len(timed)), values, color=[f"C{i % 10}" for i in range(len(timed))])
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(range(len(timed)), [r["name"] for r in timed], rotation=20, ha="right", fontsize=7)
        _finish(fig, ax, "", label, f"{label} at {contexts[0]} tokens {where}", path)
        return
    for i, r in enumerate(timed):
        mine = sorted(int(c) for c, sp in r["speed"].items() if key in sp)
        ax.plot(mine, [r["speed"][str(c)][key] * unit for c in mine], marker="o", label=r["name"],
                color=f"C{i % 10}", ls="-" if i < 10 else "--", lw=2.5 if r["kind"] == "baseline" else 1.2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    fig.set_size_inches(10, 4.5)  # room for the legend beside the lines, which it would otherwise cover
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    _finish(fig, ax, "context (tokens, log)", f"{label} (log)", f"{label} vs context {where}", path)


_NEAR = 1.10
"""At least three systems within this factor of the best perplexity, and others above, get a zoomed panel."""


def _pareto_plot(results: dict, rated: list[dict], plt, path: Path) -> None:
    """Perplexity vs KV bytes per token with the Pareto front, and a panel zoomed on the systems close to
    the best perplexity when others sit far above them."""
    points = [(r["kv_bytes_per_token"], r["ppl"]) for r in rated]
    best = min(y for _, y in points)
    near = [p for p in points if p[1] <= _NEAR * best]
    zoomed = 3 <= len(near) < len(points)
    fig, axes = plt.subplots(1, 1 + zoomed, figsize=(6.5 * (1 + zoomed), 4.5), squeeze=False)
    axes = list(axes[0])
    front = [points[i] for i in pareto_front(points)]
    fp16 = results["fp16_kv_bytes_per_token"]
    for ax in axes:
        ax.scatter(*zip(*points, strict=True), color="tab:blue", zorder=3)
        ax.plot(*zip(*front, strict=True), color="tab:orange", lw=1.5, label="Pareto front", zorder=2)
        ax.set_xscale("log")
        ax.set_xlabel("KV bytes per token (log)")
        ax.set_ylabel(f"perplexity ({rated[0].get('ppl_tokens', '?')} tokens)")
    in_zoom = [False] * len(points)
    if zoomed:
        xs, ys = zip(*near, strict=True)
        span = max(max(ys) - min(ys), 1e-3 * best)
        axes[1].set_xlim(min(xs) / 1.08, max(xs) * 1.08)
        axes[1].set_ylim(min(ys) - 0.08 * span, max(ys) + 0.15 * span)
        axes[1].set_title(f"within {_NEAR - 1:.0%} of the best perplexity", fontsize=9)
        axes[0].axhspan(*axes[1].get_ylim(), color="grey", alpha=0.12, lw=0, label="zoomed at right")
        (x0, x1), (y0, y1) = axes[1].get_xlim(), axes[1].get_ylim()
        in_zoom = [x0 <= x <= x1 and y0 <= y <= y1 for x, y in points]
    for ax in axes:
        if ax is axes[0] or ax.get_xlim()[0] <= fp16 <= ax.get_xlim()[1]:  # the zoom may leave it out
            ax.axvline(fp16, color="grey", ls="--", lw=1, label="fp16 KV cache")
        ax.legend(fontsize=7)
    fig.suptitle(f"{Path(results['model']).name}: quality vs KV memory")
    fig.tight_layout()
    for ax, zoom in zip(axes, (False, True), strict=False):
        shown = [i for i in range(len(points)) if in_zoom[i] == zoom]
        _label_points(ax, [rated[i]["name"] for i in shown], [points[i] for i in shown])
    fig.savefig(path, dpi=130)
    plt.close(fig)


_OFFSETS = [(4, 4), *((dx, dy) for dy in (15, -12, 26, -23, 37, -34, 48, -45) for dx in (14, -14))]
"""Label offsets from a point (typographic points), tried in order until a label lies inside the axes and
covers no other label or point: rows 11 points apart, above (label's bottom) and below (label's top) the
point, to its right and left."""
_MARKER = 3.0  # radius of a scatter point, typographic points


def _label_points(ax, names: list[str], points: list[tuple[float, float]]) -> None:
    """Name each point, moving a label off its point (with a leader line) where it would cover another
    label or a point, or leave the axes; a label with no free place takes the first one.

    Call it once the figure's layout is final: it draws the figure to settle the axis limits, then
    places labels where they will be drawn.
    """
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    radius = _MARKER * fig.dpi / 72
    marks = [ax.transData.transform(p) for c in ax.collections for p in c.get_offsets()]
    placed = [Bbox.from_extents(x - radius, y - radius, x + radius, y + radius) for x, y in marks]
    first = _OFFSETS[0]
    for i in sorted(range(len(points)), key=lambda i: points[i]):
        tries = [*_OFFSETS, first]  # the last is the fallback
        for n, (dx, dy) in enumerate(tries):
            label = ax.annotate(names[i], points[i], textcoords="offset points", xytext=(dx, dy), fontsize=7,
                                ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "top",
                                arrowprops={"arrowstyle": "-", "lw": 0.6, "color": "grey"} if (dx, dy) != first
                                else None)
            label.update_positions(renderer)
            box = Text.get_window_extent(label, renderer)  # the words, not the leader line
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            if n == len(tries) - 1 or (inside and not any(box.overlaps(other) for other in placed)):
                break
            label.remove()
        placed.append(box)


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    """Label, lay out, write and close one figure."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ax.get_legend() is None and ax.get_legend_handles_labels()[1]:  # bars are named on their axis instead
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
