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


def write_plots(results: dict, out: Path) -> list[Path]:
    """Write ``pareto.png`` (perplexity vs KV bytes per token) and ``decode_speed.png`` (tokens/s vs context).

    Returns
    -------
    list of Path
        The files written (the Pareto plot only when perplexity was measured).

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
        fig, ax = plt.subplots(figsize=(7, 4.5))
        points = [(r["kv_bytes_per_token"], r["ppl"]) for r in rated]
        ax.scatter(*zip(*points, strict=True), color="tab:blue", zorder=3)
        for r, (x, y) in zip(rated, points, strict=True):
            ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = [points[i] for i in pareto_front(points)]
        ax.plot(*zip(*front, strict=True), color="tab:orange", lw=1.5, label="Pareto front", zorder=2)
        ax.axvline(results["fp16_kv_bytes_per_token"], color="grey", ls="--", lw=1, label="fp16 KV cache")
        ax.set_xscale("log")
        _finish(fig, ax, "KV bytes per token (log)", f"perplexity ({rated[0].get('ppl_tokens', '?')} tokens)",
                f"{Path(results['model']).name}: quality vs KV memory", out / "pareto.png")
        written.append(out / "pareto.png")
    timed = [r for r in rows if "speed" in r]
    if timed:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in timed:
            contexts = sorted(int(c) for c in r["speed"])
            ax.plot(contexts, [r["speed"][str(c)]["decode_tokens_per_second"] for c in contexts], marker="o",
                    label=r["name"], lw=2.5 if r["kind"] == "baseline" else 1.2)
        ax.set_xscale("log", base=2)
        _finish(fig, ax, "context (tokens)", "decode tokens/s",
                f"decode speed on {results['device']}, {results['dtype']}", out / "decode_speed.png")
        written.append(out / "decode_speed.png")
    return written


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    """Label, lay out, write and close one figure."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
