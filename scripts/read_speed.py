"""CPU micro-benchmark: one full read of a KIVI min–max store against the codebook stores at the same width.

For code widths 1 to 8, each store (min–max, the scalar codebook ``"codebook"`` and the vector codebook
``"vector"``) gets ``--tokens`` tokens of ``--heads`` heads of ``--dim`` channels
(batch 1, float32 in), all of them flushed into packed form, then ``store.read(out)`` de-quantizes
everything into one preallocated float32 buffer. Layouts, as the plan builds them:

* values (``along="channels"``): KIVI groups of 32 channels (fp16 scale and minimum per group), codebook
  groups of 64 channels (one fp16 norm per group);
* keys (``along="tokens"``): groups of 128 tokens per channel for both (KIVI: scale and minimum; codebook:
  mean and deviation).

Prints the median microseconds per read over ``--repeats`` reads (after warm-up; each repeat reads the stores of
a row in turn) and the ratios codebook /
min–max and vector / min–max, one row per width and stream. Width 1.5 exists only in the vector store
(64 points of 4 channels, one 6-bit code); its row compares it with min–max at 2 bits, the narrowest
integer width that holds at least as many bits, and has no scalar codebook column. Runs on one torch
thread unless ``--threads`` says otherwise::

    python scripts/read_speed.py --tokens 2048 --dim 64 --heads 3 --repeats 50
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from kvcompress.methods import CodebookStore, QuantizedStore, VectorCodebookStore

BLOCK = 128  # tokens flushed at once: one key group
LAYOUTS = {  # stream -> (along, KIVI group, codebook group)
    "values": ("channels", 32, 64),
    "keys": ("tokens", 128, 128),
}


def filled(store_cls: type[QuantizedStore], bits: float, along: str, group: int, x: torch.Tensor) -> QuantizedStore:
    """A store of ``store_cls`` holding ``x`` (``[1, H, T, D]``), every whole block flushed."""
    store = store_cls(bits, group, along, BLOCK)
    store.append(x)
    store.flush(x.shape[-2])
    return store


def median_us(stores: list[QuantizedStore], out: torch.Tensor, repeats: int, warmup: int) -> list[float]:
    """Median wall time of ``store.read(out)`` in microseconds, per store. Each repeat reads every store once,
    in turn, so that a machine whose speed drifts (a shared one) slows them all alike."""
    times: list[list[float]] = [[] for _ in stores]
    for i in range(warmup + repeats):
        for store, kept in zip(stores, times, strict=True):
            start = time.perf_counter()
            store.read(out)
            if i >= warmup:
                kept.append(time.perf_counter() - start)
    return [statistics.median(kept) * 1e6 for kept in times]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per head (default 2048)")
    ap.add_argument("--dim", type=int, default=64, help="channels per head vector (default 64)")
    ap.add_argument("--heads", type=int, default=3, help="heads (default 3)")
    ap.add_argument("--repeats", type=int, default=50, help="timed reads per store (default 50)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed reads first (default 5)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.tokens < BLOCK or args.tokens % BLOCK:
        ap.error(f"--tokens must be a positive multiple of {BLOCK}, so that every token is flushed")
    torch.set_num_threads(args.threads)

    x = torch.randn(1, args.heads, args.tokens, args.dim, generator=torch.Generator().manual_seed(args.seed))
    out = torch.empty_like(x)
    print(f"read of {args.heads} heads x {args.tokens} tokens x {args.dim} channels into float32, "
          f"median of {args.repeats} reads, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    header = f"{'bits':>5}  {'stream':<6}  {'along':<8}  {'groups kivi/cb':>14}  {'min-max us':>10}  " \
             f"{'codebook us':>11}  {'cb/mm':>6}  {'vector us':>9}  {'vec/mm':>6}  {'B/token mm':>10}  " \
             f"{'B/token vec':>11}"
    print("bits a/b: the vector store at a bits against min-max at b bits")
    print(header)
    print("-" * len(header))
    per = args.heads * args.tokens
    for bits in (1, 1.5, *range(2, 9)):
        mm_bits = math.ceil(bits)  # min-max and the scalar codebook take integer widths only
        for stream, (along, g_kivi, g_cb) in LAYOUTS.items():
            kivi = filled(QuantizedStore, mm_bits, along, g_kivi, x)
            vec = filled(VectorCodebookStore, bits, along, g_cb, x)
            cb = filled(CodebookStore, bits, along, g_cb, x) if bits == mm_bits else None
            assert kivi.quantized_length == vec.quantized_length == args.tokens
            if cb is None:
                t_kivi, t_vec = median_us([kivi, vec], out, args.repeats, args.warmup)
                cb_cols = f"{'-':>11}  {'-':>6}"
            else:
                assert cb.quantized_length == args.tokens and vec.nbytes() == cb.nbytes()
                t_kivi, t_vec, t_cb = median_us([kivi, vec, cb], out, args.repeats, args.warmup)
                cb_cols = f"{t_cb:>11.1f}  {t_cb / t_kivi:>6.2f}"
            label = f"{bits:g}" if bits == mm_bits else f"{bits:g}/{mm_bits}"
            print(f"{label:>5}  {stream:<6}  {along:<8}  {f'{g_kivi}/{g_cb}':>14}  {t_kivi:>10.1f}  {cb_cols}  "
                  f"{t_vec:>9.1f}  {t_vec / t_kivi:>6.2f}  {kivi.nbytes() / per:>10.1f}  {vec.nbytes() / per:>11.1f}")


if __name__ == "__main__":
    main()
