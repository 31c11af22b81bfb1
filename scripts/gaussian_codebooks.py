"""Fit the vector codebooks of N(0, I_t) that the ``"vector"`` quantizer ships, and write them.

For every ``(t, bits)`` of :data:`kvcompress.methods.codebook.VECTOR_DISTORTION` that the shipped file lacks
(every one with ``--all``), runs the generalized Lloyd algorithm (:func:`kvcompress.methods.codebook.lloyd_gaussian`)
on ``--samples-per-point`` seeded Gaussian samples per point (at least 10^6), then prints the mean squared error
per coordinate on 10^6 fresh samples (seed 1), which the table in ``codebook.py`` quotes. Writes
``kvcompress/data/gaussian_codebooks.safetensors`` (float32, one tensor ``dim{t}_bits{bits:g}`` each) through
a temporary file, so an interrupted run leaves the old file; the codebooks it already holds are kept as they
are, since the shipped recipes were measured with them::

    python scripts/gaussian_codebooks.py --samples-per-point 200 --iterations 100
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kvcompress.methods.codebook import VECTOR_DISTORTION, codebook_name, lloyd_gaussian, nearest

OUT = Path(__file__).resolve().parents[1] / "kvcompress" / "data" / "gaussian_codebooks.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples-per-point", type=int, default=200)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--all", action="store_true", help="refit the codebooks the file already holds too")
    args = parser.parse_args()
    tensors = load_file(args.out) if args.out.exists() and not args.all else {}
    for t, bits in sorted(VECTOR_DISTORTION):
        if codebook_name(t, bits) in tensors:
            continue
        fresh = torch.Generator().manual_seed(1)
        start = time.perf_counter()
        n = 2 ** round(bits * t)
        points, fit = lloyd_gaussian(t, bits, max(1_000_000, args.samples_per_point * n), args.iterations)
        x = torch.randn(1_000_000, t, generator=fresh, dtype=torch.float64)
        mse = float((x - points[nearest(x.float(), points.float())]).square().mean())
        print(f"t={t} bits={bits}: {n} points, distortion {mse:.5g} per coordinate on fresh samples "
              f"({fit:.5g} on the fit's), {time.perf_counter() - start:.0f} s", flush=True)
        tensors[codebook_name(t, bits)] = points.float().contiguous()
    tmp = args.out.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"samples_per_point": str(args.samples_per_point),
                                      "iterations": str(args.iterations), "seed": "0"})
    os.chmod(tmp, 0o644)  # package data: readable by all, as the other files
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
