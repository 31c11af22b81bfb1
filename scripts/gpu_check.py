#!/usr/bin/env python3
"""The whole GPU check of kvcompress in one run (at most 8 minutes on one GPU); ``scripts/gpu-check`` runs it.

Three sections, each written to ``results.json`` and ``results.md`` under ``--out`` (default ``$OUT``):

- ``kernel_tests``: ``tests/test_kernels_gpu.py`` in a pytest of its own with ``TRITON_INTERPRET=0``, the
  compiled Triton kernels against their torch twins at real layouts in float16 and bfloat16 (junit XML and
  log beside the results). A test skipped on the GPU fails the section.
- ``decode_timing``: the packed-KV decode-attention kernel against float16
  ``scaled_dot_product_attention`` over the same logical cache (Llama-3-8B-like heads, 8k/32k/128k tokens,
  batch 1 and 8; min–max keys and values at 4 and 2 bits, and codebook-4x's layout: 4-bit min–max keys,
  3-bit codebook values, a 4-token sink): microseconds per call (CUDA events, warm-up, median), bytes read,
  GB/s against the device's peak, the speedup.
- ``end_to_end``: ``generate`` on SmolLM2 in float16, the baseline (transformers' ``DynamicCache``) against
  the front recipes at 2k and 8k tokens, through ``kvcompress.evaluate.bench``: tokens/s ratio and peak
  CUDA memory. Skipped, with the reason recorded, when the model is absent or the time budget is spent.

``--dry-run`` checks the same pieces on the CPU at small shapes: the kernel tests through Triton's
interpreter, the timing with the torch twins, the end-to-end part on a tiny random model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = Path("models/smollm2-135m-instruct-q4_1")
MODEL_CANDIDATES = (REPO.parent / "shared" / MODEL_DIR, REPO / "shared" / MODEL_DIR)
RECIPES = ("kivi-4bit", "lowrank-3bit", "full-stack")
KERNEL_TESTS = "tests/test_kernels_gpu.py"
# recipes/codebook-4x.toml's layout, timed beside the min-max ones: key bits and tokens per key group, value
# bits and channels per value norm, 16-bit sink tokens
CODEBOOK_4X = {"key_bits": 4, "key_group": 128, "value_bits": 3, "value_group": 64, "sink": 4}
FLUSH_BYTES = 256 * 2**20  # written between timed calls: evicts the inputs from a 60 MB L2
# HBM bandwidth in bytes/s by the vendors' datasheets; the first entry whose words all occur in the device name
PEAK_BANDWIDTH = ((("H200",), 4.8e12), (("H100", "HBM3"), 3.35e12), (("H100", "SXM"), 3.35e12),
                  (("A100", "80GB"), 2.0e12))


@dataclass(frozen=True)
class Plan:
    """The sizes of one run: the GPU check, or the dry run's small ones."""

    dry_run: bool
    pytest_args: tuple[str, ...]  # extra arguments of the kernel-test pytest
    kernel_seconds: float  # time limit of the kernel tests
    kv_heads: int  # timing layout
    query_heads: int
    head_dim: int
    contexts: tuple[int, ...]  # tokens in the timed cache
    batches: tuple[int, ...]
    bits: tuple[int, ...]  # min-max widths of keys and values; codebook-4x's layout is timed besides
    residual: int  # float16 residual window of the timed cache (the recipes' 128)
    group: int  # key and value group size (kivi-4bit's 32)
    warmup: int
    repeats: int
    timing_seconds: float  # no new timing case starts after this long
    copy_bytes: int  # buffer size of the copy-bandwidth measurement
    e2e_contexts: tuple[int, ...]
    e2e_new_tokens: int
    e2e_repeats: int
    e2e_dtype: str
    e2e_first_seconds: float  # a recipe starts only if this much is left (then: 1.2 x the slowest so far)


GPU_PLAN = Plan(dry_run=False, pytest_args=(), kernel_seconds=210, kv_heads=8, query_heads=32, head_dim=128,
                contexts=(8192, 32768, 131072), batches=(1, 8), bits=(4, 2), residual=128, group=32, warmup=5,
                repeats=30, timing_seconds=120, copy_bytes=2**30, e2e_contexts=(2048, 8192 - 32),
                e2e_new_tokens=32, e2e_repeats=2, e2e_dtype="float16", e2e_first_seconds=60)
DRY_PLAN = Plan(dry_run=True, pytest_args=("-k", "smollm2"), kernel_seconds=120, kv_heads=3, query_heads=9,
                head_dim=64, contexts=(256,), batches=(1, 2), bits=(4, 2), residual=128, group=32, warmup=2,
                repeats=20, timing_seconds=60, copy_bytes=2**24, e2e_contexts=(128, 224), e2e_new_tokens=8,
                e2e_repeats=1, e2e_dtype="float32", e2e_first_seconds=0)


class CheckError(Exception):
    """A one-line reason for failing a section or the run."""


def log(message: str) -> None:
    """Progress on stderr (the device tool returns the end of the output)."""
    print(f"[gpu-check] {message}", file=sys.stderr, flush=True)


def peak_bandwidth(device_name: str) -> float | None:
    """HBM bandwidth of a device in bytes/s by its datasheet, or ``None`` for a device not in the table.

    Parameters
    ----------
    device_name
        As ``torch.cuda.get_device_name`` gives it, e.g. ``"NVIDIA H200"``.
    """
    return next((bw for words, bw in PEAK_BANDWIDTH if all(w in device_name for w in words)), None)


# --------------------------------------------------------------------------- kernel tests


@dataclass
class JUnitReport:
    """What a pytest junit XML file records."""

    tests: int
    failures: list[str]  # "test: first line of its message", one per failed or erroring test
    skips: list[str]  # the reason of each skipped test

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def skipped(self) -> int:
        return len(self.skips)

    @property
    def passed(self) -> int:
        return self.tests - self.failed - self.skipped

    def summary(self) -> dict:
        """Counts, the failed tests and the distinct skip reasons (for ``results.json``)."""
        return {"tests": self.tests, "passed": self.passed, "failed": self.failed, "skipped": self.skipped,
                "failed_tests": self.failures, "skip_reasons": sorted(set(self.skips))}


def read_junit(path: Path) -> JUnitReport:
    """Parse pytest's ``--junitxml`` output.

    Parameters
    ----------
    path
        The XML file.

    Returns
    -------
    JUnitReport
        Failures and errors both count as failed.
    """
    tests, failures, skips = 0, [], []
    for case in ET.parse(path).getroot().iter("testcase"):
        tests += 1
        bad = next(iter([*case.findall("failure"), *case.findall("error")]), None)
        if bad is not None:
            lines = (bad.get("message") or "").strip().splitlines()
            failures.append(f"{case.get('name')}: {lines[0] if lines else ''}")
        skips += [s.get("message", "") for s in case.findall("skipped")]
    return JUnitReport(tests, failures, skips)


def judge_kernel_tests(report: JUnitReport, returncode: int, compiled: bool) -> str | None:
    """Why the kernel tests fail, or ``None`` when they pass.

    Parameters
    ----------
    report
        What pytest recorded.
    returncode
        pytest's exit status.
    compiled
        True on the GPU, where a skipped test is a failure: the compiled kernels were not checked.
    """
    if report.failed:
        return f"{report.failed} of {report.tests} kernel tests failed"
    if compiled and report.skipped:
        return f"{report.skipped} kernel tests were skipped on the GPU: {'; '.join(sorted(set(report.skips)))}"
    if not report.passed:
        return "no kernel test ran"
    if returncode:
        return f"pytest exited with status {returncode}"
    return None


def kernel_tests(plan: Plan, out: Path) -> dict:
    """Run the kernel tests in a pytest of their own: compiled on the GPU, interpreted in the dry run."""
    # PYTHONSAFEPATH: the checkout is not put on the path, where kernels/ would shadow Hugging Face's `kernels`
    env = dict(os.environ, TRITON_INTERPRET="1" if plan.dry_run else "0", PYTHONSAFEPATH="1")
    env.pop("KVCOMPRESS_KERNEL_SMOKE", None)
    if plan.dry_run:
        env["KVCOMPRESS_KERNEL_SMOKE"] = "1"
    xml = out / "kernel-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}",
           KERNEL_TESTS, *plan.pytest_args]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=plan.kernel_seconds)
    except subprocess.TimeoutExpired as e:
        raise CheckError(f"kernel tests ran past {plan.kernel_seconds:.0f} s") from e
    (out / "kernel-tests.log").write_text(proc.stdout + proc.stderr)
    if not xml.is_file():
        raise CheckError(f"pytest wrote no report (exit status {proc.returncode}); see kernel-tests.log")
    report = read_junit(xml)
    result = {"mode": "interpreter" if plan.dry_run else "compiled", "command": " ".join(cmd[1:]),
              **report.summary(), "junit": xml.name, "log": "kernel-tests.log"}
    reason = judge_kernel_tests(report, proc.returncode, compiled=not plan.dry_run)
    return {"status": "failed" if reason else "passed", **({"reason": reason} if reason else {}), **result}


# --------------------------------------------------------------------------- decode timing


@dataclass
class DecodeCase:
    """One timed decode-attention comparison."""

    tokens: int
    batch: int
    values: str  # "min-max" (KIVI) or "codebook" values; keys are min-max
    key_bits: int
    value_bits: int
    ours_us: float  # median microseconds per call
    sdpa_us: float
    ours_bytes: int  # bytes one call reads (and writes: query in, output out)
    sdpa_bytes: int
    ours_gbps: float
    sdpa_gbps: float
    ours_peak_fraction: float | None  # of the datasheet HBM bandwidth
    sdpa_peak_fraction: float | None
    speedup: float  # sdpa_us / ours_us
    bytes_ratio: float  # sdpa_bytes / ours_bytes: the speedup a memory-bound kernel would reach
    rel_diff_vs_sdpa: float  # ‖ours − SDPA‖ / ‖SDPA‖: the quantization error of the cache
    calls: int  # timed calls behind each median


class Timer:
    """Seconds per call: CUDA events around each call after writing a buffer larger than L2, or the host clock
    on the CPU; warm-up calls first."""

    def __init__(self, device, warmup: int, repeats: int) -> None:
        import torch

        self.torch, self.device, self.warmup, self.repeats = torch, device, warmup, repeats
        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def median(self, fn: Callable[[], object]) -> float:
        """Median seconds of ``repeats`` calls of ``fn``."""
        for _ in range(self.warmup):
            fn()
        if self.flush is None:
            times = []
            for _ in range(self.repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return statistics.median(times)
        cuda = self.torch.cuda
        events = []
        for _ in range(self.repeats):
            self.flush.zero_()
            start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        cuda.synchronize(self.device)
        return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3

    def copy_gbps(self, nbytes: int) -> float:
        """GB/s of a copy of ``nbytes`` within the device, bytes read plus written: the measured ceiling."""
        src = self.torch.empty(nbytes, dtype=self.torch.uint8, device=self.device)
        dst = self.torch.empty_like(src)
        return 2 * nbytes / self.median(lambda: dst.copy_(src)) / 1e9


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _timed_caches(plan: Plan, k, v, split: int) -> Iterator[tuple]:
    """The packed caches timed over the same first ``split`` tokens, one at a time: ``(values, key bits, value
    bits, keys, values, key sink, value sink)``, min-max at each of ``plan.bits``, then codebook-4x's layout
    (its sink: exact copies of the first tokens)."""
    from kvcompress.methods import codebook
    from kvcompress.methods.kivi import quantize

    for bits in plan.bits:
        yield ("min-max", bits, bits, quantize(k[:, :, :split], bits, plan.group, "tokens"),
               quantize(v[:, :, :split], bits, plan.group, "channels"), None, None)
    cb = CODEBOOK_4X
    yield ("codebook", cb["key_bits"], cb["value_bits"],
           quantize(k[:, :, :split], cb["key_bits"], cb["key_group"], "tokens"),
           codebook.encode(v[:, :, :split], cb["value_bits"], cb["value_group"], "channels"),
           k[:, :, :cb["sink"]], v[:, :, :cb["sink"]])


def decode_timing(plan: Plan, device_name: str) -> dict:
    """Time the packed-KV decode attention against float16 SDPA over the same logical cache."""
    import torch
    import torch.nn.functional as F

    from kvcompress.kernels.decode_attention import decode_attention

    device = torch.device("cpu" if plan.dry_run else "cuda")
    timer = Timer(device, plan.warmup, plan.repeats)
    peak = peak_bandwidth(device_name) if device.type == "cuda" else None
    copy_gbps = timer.copy_gbps(plan.copy_bytes)
    hkv, hq, d = plan.kv_heads, plan.query_heads, plan.head_dim
    sm_scale = d**-0.5
    end = time.monotonic() + plan.timing_seconds
    cases, skipped = [], []
    gen = torch.Generator(device).manual_seed(0)
    for tokens in plan.contexts:
        for batch in plan.batches:
            if time.monotonic() > end:
                skipped.append({"tokens": tokens, "batch": batch,
                                "reason": f"timing budget of {plan.timing_seconds:.0f} s spent"})
                continue
            log(f"decode timing: {tokens} tokens, batch {batch}")
            k, v = (torch.randn(batch, hkv, tokens, d, generator=gen, device=device, dtype=torch.float16)
                    for _ in range(2))
            q = torch.randn(batch, hq, d, generator=gen, device=device, dtype=torch.float16)
            q4 = q.view(batch, hkv, hq // hkv, d)  # GQA decode: a KV head's query heads as query rows

            def sdpa(q4=q4, k=k, v=v):
                return F.scaled_dot_product_attention(q4, k, v, scale=sm_scale)

            sdpa_s, want = timer.median(sdpa), sdpa().reshape(batch, hq, d).float()
            sdpa_bytes = _nbytes(k, v, q, q)  # K, V, query in, output out (float16)
            split = tokens - plan.residual
            k_res, v_res = k[:, :, split:], v[:, :, split:]
            for values, key_bits, value_bits, kq, vq, k_sink, v_sink in _timed_caches(plan, k, v, split):

                def ours(kq=kq, vq=vq, q=q, k_res=k_res, v_res=v_res, k_sink=k_sink, v_sink=v_sink):
                    return decode_attention(q, kq, vq, k_res, v_res, sm_scale, k_sink, v_sink)

                ours_s, (got, lse) = timer.median(ours), ours()
                sink_bytes = 0 if k_sink is None else _nbytes(k_sink, v_sink)
                ours_bytes = kq.nbytes() + vq.nbytes() + sink_bytes + _nbytes(k_res, v_res, q, got, lse)
                if not torch.isfinite(got).all():
                    raise CheckError(f"decode attention gave non-finite output at {tokens} tokens, {values} "
                                     f"values, {key_bits}/{value_bits} bits")
                ours_gbps, sdpa_gbps = ours_bytes / ours_s / 1e9, sdpa_bytes / sdpa_s / 1e9
                cases.append(DecodeCase(
                    tokens=tokens, batch=batch, values=values, key_bits=key_bits, value_bits=value_bits,
                    ours_us=ours_s * 1e6, sdpa_us=sdpa_s * 1e6,
                    ours_bytes=ours_bytes, sdpa_bytes=sdpa_bytes, ours_gbps=ours_gbps, sdpa_gbps=sdpa_gbps,
                    ours_peak_fraction=ours_gbps * 1e9 / peak if peak else None,
                    sdpa_peak_fraction=sdpa_gbps * 1e9 / peak if peak else None,
                    speedup=sdpa_s / ours_s, bytes_ratio=sdpa_bytes / ours_bytes,
                    rel_diff_vs_sdpa=(torch.linalg.norm(got - want) / torch.linalg.norm(want)).item(),
                    calls=plan.repeats))
                del kq, vq, k_sink, v_sink, got, lse
            del k, v, q, q4, k_res, v_res, want
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"status": "passed" if cases else "skipped", **({} if cases else {"reason": "no case was timed"}),
            "layout": {"kv_heads": hkv, "query_heads": hq, "head_dim": d, "residual": plan.residual,
                       "group_size": plan.group, "codebook": CODEBOOK_4X},
            "peak_bandwidth_gbps": peak / 1e9 if peak else None, "copy_gbps": copy_gbps,
            "cases": [asdict(c) for c in cases], "skipped": skipped}


# --------------------------------------------------------------------------- end to end


def find_model(given: str | None) -> Path | None:
    """The SmolLM2 folder: ``given``, else ``../shared/models/...`` beside the repo, else ``shared/models/...``."""
    candidates = (Path(given),) if given else MODEL_CANDIDATES
    return next((p for p in candidates if p.is_dir()), None)


def _e2e_row(recipe: str, results: dict, seconds: float) -> dict:
    """Per context: the recipe's decode tokens/s and peak memory beside the baseline's, from bench's rows."""
    base, ours = results["rows"][0]["speed"], results["rows"][1]["speed"]
    contexts = {}
    for ctx, sp in ours.items():
        b = base[ctx]
        contexts[ctx] = {"tokens_per_second": sp["decode_tokens_per_second"],
                         "baseline_tokens_per_second": b["decode_tokens_per_second"],
                         "tokens_per_second_ratio": sp["decode_ratio"],
                         "peak_memory_bytes": sp["peak_memory_bytes"],
                         "baseline_peak_memory_bytes": b["peak_memory_bytes"],
                         "kv_bytes_per_token": sp["kv_bytes_per_token"],
                         "baseline_kv_bytes_per_token": b["kv_bytes_per_token"]}
    return {"recipe": recipe, "status": "passed", "seconds": seconds, "contexts": contexts}


def end_to_end(plan: Plan, model: Path, deadline: float) -> dict:
    """Baseline against each front recipe through ``bench`` (one call per recipe, so the budget can stop it)."""
    from kvcompress.evaluate.bench import BenchSettings, bench

    settings = BenchSettings(contexts=list(plan.e2e_contexts), text=None, passkey_depths=0,
                             new_tokens=plan.e2e_new_tokens, repeats=plan.e2e_repeats, dtype=plan.e2e_dtype,
                             device="cpu" if plan.dry_run else "cuda", peer=False)
    rows, slowest = [], 0.0
    for recipe in RECIPES:
        left, need = deadline - time.monotonic(), max(plan.e2e_first_seconds, 1.2 * slowest)
        if left < need:
            rows.append({"recipe": recipe, "status": "skipped",
                         "reason": f"time budget: {left:.0f} s left, {need:.0f} s needed"})
            continue
        log(f"end to end: {recipe}")
        start = time.monotonic()
        try:
            row = _e2e_row(recipe, bench(str(model), [recipe], settings), time.monotonic() - start)
        except Exception as e:  # one recipe's failure is recorded; the others still run
            traceback.print_exc()
            row = {"recipe": recipe, "status": "failed", "reason": _one_line(e)}
        slowest = max(slowest, time.monotonic() - start)
        rows.append(row)
    failed = [r["recipe"] for r in rows if r["status"] == "failed"]
    status = "failed" if failed else ("passed" if any(r["status"] == "passed" for r in rows) else "skipped")
    summary = {"failed": f"recipes failed: {', '.join(failed)}", "skipped": "no recipe fitted the time budget"}
    return {"status": status, **({"reason": summary[status]} if status in summary else {}),
            "model": str(model), "dtype": plan.e2e_dtype, "contexts": list(plan.e2e_contexts),
            "new_tokens": plan.e2e_new_tokens, "repeats": plan.e2e_repeats, "recipes": rows}


def _tiny_model(folder: Path) -> Path:
    """The dry run's model: the tiny random Llama that the test suite builds (tests/conftest.py)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny

    return build_tiny("llama_gqa", folder).path


# --------------------------------------------------------------------------- report


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _pct(x: float | None) -> str:
    return f" ({100 * x:.0f}%)" if x is not None else ""


def markdown(results: dict) -> str:
    """``results.md``: the summary tables of ``results.json``."""
    s = results["sections"]
    lines = ["# GPU check", "", f"- device: {results['device']}", f"- dry run: {results['dry_run']}",
             f"- wall time: {results['wall_seconds']:.0f} s (budget {results['budget_seconds']:.0f} s)",
             f"- failures: {'; '.join(results['failures']) or 'none'}", ""]
    kt = s["kernel_tests"]
    lines += [f"## Kernel tests: {kt['status']}", ""]
    if "tests" in kt:
        lines += [f"{kt['mode']} kernels, `{kt['command']}`: {kt['passed']} passed, {kt['failed']} failed, "
                  f"{kt['skipped']} skipped of {kt['tests']}.", *[f"- skipped: {r}" for r in kt["skip_reasons"]]]
    lines += [f"- {kt['reason']}"] if "reason" in kt else []
    dt = s["decode_timing"]
    lines += ["", f"## Decode attention timing: {dt['status']}", ""]
    if "cases" in dt:
        lay, peak = dt["layout"], dt["peak_bandwidth_gbps"]
        cb = lay["codebook"]
        lines += [f"{lay['kv_heads']} KV heads of {lay['head_dim']}, {lay['query_heads']} query heads, min-max "
                  f"groups of {lay['group_size']}; codebook values (codebook-4x): keys in groups of "
                  f"{cb['key_group']} tokens, a norm per {cb['value_group']} value channels, a {cb['sink']}-token "
                  f"sink; {lay['residual']}-token float16 residual window. Peak bandwidth: "
                  f"{f'{peak:.0f} GB/s' if peak else 'unknown for this device'}; measured copy "
                  f"{dt['copy_gbps']:.0f} GB/s.", "",
                  "| tokens | batch | values | K/V bits | ours µs | SDPA µs | speedup | bytes ratio "
                  "| ours GB/s (% peak) | SDPA GB/s (% peak) | rel. diff vs SDPA |", "|" + "---|" * 11]
        lines += [f"| {c['tokens']} | {c['batch']} | {c['values']} | {c['key_bits']}/{c['value_bits']} | "
                  f"{c['ours_us']:.1f} | {c['sdpa_us']:.1f} | "
                  f"{c['speedup']:.2f} | {c['bytes_ratio']:.2f} | {c['ours_gbps']:.4g}{_pct(c['ours_peak_fraction'])} "
                  f"| {c['sdpa_gbps']:.4g}{_pct(c['sdpa_peak_fraction'])} | {c['rel_diff_vs_sdpa']:.3f} |"
                  for c in dt["cases"]]
        lines += [f"- skipped {c['tokens']} tokens, batch {c['batch']}: {c['reason']}" for c in dt["skipped"]]
    lines += [f"- {dt['reason']}"] if "reason" in dt else []
    e2e = s["end_to_end"]
    lines += ["", f"## End-to-end generate: {e2e['status']}", ""]
    if "recipes" in e2e:
        lines += [f"`{e2e['model']}` in {e2e['dtype']}, {e2e['new_tokens']} new tokens, paired runs: "
                  f"{e2e['repeats']}; peak memory is allocated memory above the level before the run.", "",
                  "| recipe | context | tok/s | baseline tok/s | ratio | peak MB | baseline peak MB |",
                  "|" + "---|" * 7]
        for r in e2e["recipes"]:
            lines += [f"| {r['recipe']} | {ctx} | {c['tokens_per_second']:.1f} | {c['baseline_tokens_per_second']:.1f}"
                      f" | {c['tokens_per_second_ratio']:.2f} | {c['peak_memory_bytes'] / 1e6:.1f} | "
                      f"{c['baseline_peak_memory_bytes'] / 1e6:.1f} |" for ctx, c in r.get("contexts", {}).items()]
        lines += [f"- {r['recipe']} {r['status']}: {r['reason']}" for r in e2e["recipes"] if "reason" in r]
    lines += [f"- {e2e['reason']}"] if "reason" in e2e else []
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/gpu-check", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT"), help="results folder (default: $OUT)")
    p.add_argument("--dry-run", action="store_true", help="CPU check of the pieces at small shapes")
    p.add_argument("--model", help="SmolLM2 folder (default: ../shared/models/smollm2-135m-instruct-q4_1 "
                                   "beside the repo, else shared/models/... inside it)")
    p.add_argument("--skip-e2e", action="store_true", help="leave out the end-to-end part")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (default: 480)")
    return p.parse_args(argv)


def run(args: argparse.Namespace, out: Path) -> dict:
    """Run every section; a section that raises is recorded as failed with its one-line reason."""
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    start = time.monotonic()
    import torch
    import transformers
    import triton

    try:
        import kvcompress.kernels
    except ImportError as e:
        raise CheckError("kvcompress is not installed here: run `python3 -m pip install --no-deps "
                         "--no-build-isolation -e .` in the repo first") from e
    from kvcompress.evaluate.bench import _device_name

    if not plan.dry_run and not torch.cuda.is_available():
        raise CheckError("no CUDA device: run this on a GPU, or pass --dry-run")
    if plan.dry_run:
        torch.set_num_threads(1)  # tiny tensors: spinning OpenMP threads on a shared CPU only slow them down
    device_name = _device_name(torch.device("cpu" if plan.dry_run else "cuda"))
    log(f"{'dry run' if plan.dry_run else 'GPU check'} on {device_name}, results in {out}")
    sections: dict[str, dict] = {}

    def section(name: str, fn: Callable[[], dict]) -> None:
        t = time.monotonic()
        log(f"{name} ...")
        try:
            sections[name] = fn()
        except Exception as e:
            traceback.print_exc()
            sections[name] = {"status": "failed", "reason": _one_line(e)}
        sections[name]["seconds"] = time.monotonic() - t
        log(f"{name}: {sections[name]['status']} ({sections[name]['seconds']:.0f} s)")

    section("kernel_tests", lambda: kernel_tests(plan, out))
    section("decode_timing", lambda: decode_timing(plan, device_name))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        model = None if args.skip_e2e else _tiny_model(Path(tmp) / "tiny") if plan.dry_run else find_model(args.model)
        if model is None:
            tried = [args.model] if args.model else [str(p) for p in MODEL_CANDIDATES]
            reason = "--skip-e2e" if args.skip_e2e else f"model not found (tried {', '.join(tried)}; pass --model)"
            sections["end_to_end"] = {"status": "skipped", "reason": reason, "seconds": 0.0}
        else:
            section("end_to_end", lambda: end_to_end(plan, model, start + args.budget))
    failures = [f"{name}: {s['reason']}" for name, s in sections.items() if s["status"] == "failed"]
    return {"dry_run": plan.dry_run, "device": device_name, "budget_seconds": args.budget,
            "wall_seconds": time.monotonic() - start, "python": platform.python_version(),
            "versions": {"kvcompress": kvcompress.__version__, "torch": torch.__version__,
                         "triton": triton.__version__, "transformers": transformers.__version__},
            "sections": sections, "failures": failures}


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns the exit status (1 on any failure)."""
    args = parse_args(argv)
    if not args.out:
        print("gpu-check: no results folder: pass --out DIR or set OUT", file=sys.stderr)
        return 2
    if not args.dry_run:
        os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: compiled kernels only
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        results = run(args, out)
    except CheckError as e:
        print(f"gpu-check: {_one_line(e)}", file=sys.stderr)
        return 1
    (out / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    (out / "results.md").write_text(markdown(results))
    for name, s in results["sections"].items():
        reason = f" ({s['reason']})" if "reason" in s else ""
        print(f"{name}: {s['status']}{reason}")
    print(f"wall time {results['wall_seconds']:.0f} s; results in {out}")
    if results["failures"]:
        print("FAILED: " + "; ".join(results["failures"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
