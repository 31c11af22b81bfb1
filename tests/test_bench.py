"""`kvcompress bench` on a tiny model: every row measured, bytes exact, ratios against the same run."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, python_env, run_cli

from kvcompress.compat import CACHE_ARG
from kvcompress.evaluate.bench import (
    BACKENDS,
    HQQ_MISSING,
    PEER_KEYS,
    PEERS,
    QUANTO_MISSING,
    BenchSettings,
    _installed,
    _peer_system,
    bench,
    growth_slopes,
    skipped_lines,
    slope_table,
    summary_table,
)
from kvcompress.evaluate.llamacpp import LLAMA_MISSING
from kvcompress.evaluate.perplexity import cache_bytes, tensor_bytes
from kvcompress.evaluate.plots import _label_points, pareto_front, write_plots
from kvcompress.evaluate.speed import PeakMemory
from kvcompress.recipe import Recipe

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "the", "dog", "ran", "to", "the", "park",
         "where", "birds", "sang", "in", "tall", "trees"]


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(" ".join(WORDS[i % len(WORDS)] for i in range(600)))
    return path


def _recipe(tmp_path, name: str, **quant) -> str:
    rec = Recipe(name=name)
    rec.lowrank.enabled = False
    rec.quant.enabled = True
    rec.quant.avg_bits = 2.0
    rec.quant.group_size = 8
    rec.quant.residual_length = 16
    for key, value in quant.items():
        setattr(rec.quant, key, value)
    rec.calibration.max_tokens, rec.calibration.seq_len = 256, 128
    path = tmp_path / f"{name}.toml"
    rec.save(path)
    return str(path)


def test_bench_measures_every_row(llama_gqa, tmp_path, text):
    settings = BenchSettings(contexts=[24, 40], text=text, ppl_context=64, ppl_tokens=200, block=16,
                             passkey_depths=0, new_tokens=4, repeats=2, peer=False)
    results = bench(str(llama_gqa.path), [_recipe(tmp_path, "q2")], settings)
    base, q2 = results["rows"]
    assert (base["kind"], q2["kind"], q2["name"]) == ("baseline", "recipe", "q2")
    cfg = llama_gqa.model.config
    kv_width = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    # float32 DynamicCache: exactly layers x (K + V) x width x 4 bytes per token
    assert base["kv_bytes_per_token"] == cfg.num_hidden_layers * 2 * kv_width * 4
    assert results["fp16_kv_bytes_per_token"] == base["kv_bytes_per_token"] / 2
    assert q2["kv_bytes_per_token"] < results["fp16_kv_bytes_per_token"] / 2
    assert q2["x_smaller_than_fp16"] == pytest.approx(results["fp16_kv_bytes_per_token"] / q2["kv_bytes_per_token"])
    assert q2["ppl_ratio"] == pytest.approx(q2["ppl"] / base["ppl"]) and base["ppl_delta_pct"] == 0
    for row in (base, q2):
        assert set(row["speed"]) == {"24", "40"}
        for context, s in row["speed"].items():
            assert s["decode_tokens_per_second"] > 0 and s["prefill_seconds"] > 0 and s["runs"] == 2
            assert s["kv_bytes_per_token"] > 0
            held = s["kv_bytes_per_token"] * (int(context) + settings.new_tokens - 1)  # the cache at the end
            assert held <= s["peak_memory_bytes"] < held + 50e6
    # the baseline's float32 cache is the larger, and its peak grows with the context by at least that much
    grown = 16 * base["kv_bytes_per_token"]
    assert base["speed"]["40"]["peak_memory_bytes"] - base["speed"]["24"]["peak_memory_bytes"] >= grown
    assert base["speed"]["24"]["decode_ratio"] == 1.0
    assert 0 < q2["speed"]["40"]["decode_ratio"] < 100
    written = write_plots(results, tmp_path)
    assert [p.name for p in written] == ["pareto.png", "decode_speed.png", "peak_memory.png", "prefill.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_peak_memory_counts_tensor_bytes_in_time_order():
    keep = torch.empty(10_000)  # allocated before: not counted
    with PeakMemory(torch.device("cpu")) as mem:
        a = torch.empty(1_000_000)  # 4 MB
        del a
        b = torch.empty(250_000)  # 1 MB, reusing what the allocator kept: still counted
        c = b + 1  # 1 MB more: 2 MB, below the first peak
    assert mem.peak == 4_000_000
    with PeakMemory(torch.device("cpu")) as mem:
        parts = [torch.empty(250_000) for _ in range(3)] + [c]
        d = torch.cat(parts)  # 3 MB held plus its 4 MB result at once
    assert mem.peak == 7_000_000 and keep.numel() and d.numel()


def test_bench_cli_writes_results_and_json(llama_gqa, tmp_path, text):
    out = tmp_path / "out"
    result = run_cli("bench", llama_gqa.path, "--recipes", _recipe(tmp_path, "q4", avg_bits=4.0), "--contexts", "24",
                     "--text", text, "--ppl-tokens", "100", "--ppl-context", "50", "--passkey-depths", "0",
                     "--new-tokens", "3", "--repeats", "1", "--no-peer", "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    assert json.loads((out / "results.json").read_text()) == printed
    table = (out / "results.md").read_text().splitlines()
    assert len(table) == 2 + 2 and table[3].startswith("| q4 | ")  # header, rule, baseline, q4
    assert table[0].endswith("| peak MB @24 |")
    peak = printed["rows"][1]["speed"]["24"]["peak_memory_bytes"]
    assert table[3].endswith(f"| {peak / 1e6:.1f} |") and peak > 0
    assert [r["name"] for r in printed["rows"]] == ["baseline (DynamicCache)", "q4"]


QUICK = ("--recipes", "", "--contexts", "24", "--passkey-depths", "0", "--new-tokens", "3", "--repeats", "1")
"""A bench of the baseline (and the peers) alone, one short context: seconds on a tiny model."""
QUANTO_ROWS = [p.name for p in PEERS if p.backend == "quanto"]
HQQ_ROWS = [p.name for p in PEERS if p.backend == "hqq"]


def test_peer_table_states_each_setting_in_its_name():
    settings = [(p.backend, p.nbits, p.q_group_size, p.axis_key, p.axis_value, p.residual_length) for p in PEERS]
    assert settings == [("quanto", 4, 64, -1, 0, 128), ("quanto", 2, 64, -1, 0, 128), ("quanto", 4, 64, 0, 0, 128),
                        ("quanto", 2, 32, -1, -1, 128), ("hqq", 4, 64, 1, 1, 128)]
    assert [p.name for p in PEERS] == [
        "QuantizedCache quanto 4-bit g64 axis_key=-1 axis_value=0 residual=128",
        "QuantizedCache quanto 2-bit g64 axis_key=-1 axis_value=0 residual=128",
        "QuantizedCache quanto 4-bit g64 axis_key=0 axis_value=0 residual=128",
        "QuantizedCache quanto 2-bit g32 axis_key=-1 axis_value=-1 residual=128 (the old default row)",
        "QuantizedCache hqq 4-bit g64 axis_key=1 axis_value=1 residual=128"]
    for p in PEERS:  # what QuantizedCache is given is what the name says
        assert p.config() == {"backend": p.backend, "nbits": p.nbits, "q_group_size": p.q_group_size,
                              "residual_length": p.residual_length, "axis_key": p.axis_key,
                              "axis_value": p.axis_value}
        assert set(BACKENDS) >= {p.backend} and p.why


def _fake_package(root: Path, monkeypatch, name: str, sub: str | None = None) -> None:
    """An importable, empty package ``name`` (with an empty ``name.sub`` if given) first on ``sys.path``."""
    package = root / name
    (package / sub if sub else package).mkdir(parents=True)
    (package / "__init__.py").write_text("")
    if sub:
        (package / sub / "__init__.py").write_text("")
    names = {name, f"{name}.{sub}"} if sub else {name}
    for module in names | {m for m in sys.modules if m.startswith(f"{name}.")}:
        monkeypatch.setitem(sys.modules, module, None)  # undone last: the fakes imported here do not stay
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.syspath_prepend(str(root))


def _fake_optimum(root: Path, monkeypatch, quanto: bool) -> None:
    """An importable ``optimum`` package first on ``sys.path``, with an empty ``optimum.quanto`` if asked."""
    _fake_package(root, monkeypatch, "optimum", "quanto" if quanto else None)


@pytest.mark.parametrize("setup", ["no optimum", "optimum without quanto", "quanto transformers cannot use"])
def test_bench_without_quanto_skips_the_peers_in_one_line_each(llama_gqa, tmp_path, monkeypatch, setup):
    monkeypatch.setitem(sys.modules, "hqq", None)  # as in CI, where hqq and llama-cpp-python are not installed either
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    if setup == "no optimum":
        monkeypatch.setitem(sys.modules, "optimum", None)  # `import optimum` fails, as on a fresh install
    else:
        _fake_optimum(tmp_path / "site", monkeypatch, quanto=setup != "optimum without quanto")
    if setup == "quanto transformers cannot use":  # found, but QuantizedCache refuses it (too old, broken)
        import transformers.cache_utils

        monkeypatch.setattr(transformers.cache_utils, "is_optimum_quanto_available", lambda: False)
    out = tmp_path / "out"
    result = run_cli("bench", llama_gqa.path, *QUICK, "--out", out, "--json")
    assert result.exit_code == 0 and result.exception is None, result.stderr
    printed = json.loads(result.stdout)  # the notes went to stderr: stdout is only the JSON
    assert json.loads((out / "results.json").read_text()) == printed
    base, *peers = printed["rows"]
    assert base["speed"]["24"]["decode_tokens_per_second"] > 0
    assert [(p["name"], p["kind"]) for p in peers] == [(p.name, "peer") for p in PEERS] + [("llama.cpp", "peer")]
    assert all("speed" not in p and "ppl" not in p for p in peers)
    assert result.stderr.strip().splitlines() == skipped_lines(peers)  # one line per backend and reason
    assert len(skipped_lines(peers)) == 3
    assert peers[-1]["error"] == LLAMA_MISSING and f"llama.cpp skipped: {LLAMA_MISSING}" in skipped_lines(peers)
    quanto = [p for p in peers if p["name"] in QUANTO_ROWS]
    assert len(quanto) == 4 and all(p["cache"]["backend"] == "quanto" for p in quanto)
    for p in quanto:
        if setup == "quanto transformers cannot use":
            assert "pip install optimum-quanto" in p["error"] and "\n" not in p["error"]
        else:
            assert p["error"] == QUANTO_MISSING
    assert [p["error"] for p in peers if p["name"] in HQQ_ROWS] == [HQQ_MISSING]
    assert [row[0] for row in summary_table(printed)[1]] == ["baseline (DynamicCache)"]  # no failed row shown


@pytest.mark.parametrize("setup", ["no hqq", "hqq transformers cannot use"])
def test_bench_without_hqq_skips_its_row_in_one_line(llama_gqa, tmp_path, monkeypatch, setup):
    monkeypatch.setitem(sys.modules, "optimum", None)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    if setup == "no hqq":
        monkeypatch.setitem(sys.modules, "hqq", None)
    else:  # found, but QuantizedCache refuses it (too old, broken)
        import transformers.cache_utils

        _fake_package(tmp_path / "site", monkeypatch, "hqq")
        monkeypatch.setattr(transformers.cache_utils, "is_hqq_available", lambda: False)
    result = run_cli("bench", llama_gqa.path, *QUICK, "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0 and result.exception is None, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert [r["name"] for r in rows] == ["baseline (DynamicCache)", *(p.name for p in PEERS), "llama.cpp"]
    (hqq,) = [r for r in rows if r["name"] in HQQ_ROWS]
    assert hqq["kind"] == "peer" and hqq["cache"]["backend"] == "hqq" and "speed" not in hqq
    if setup == "no hqq":
        assert hqq["error"] == HQQ_MISSING
    else:
        assert "pip install hqq" in hqq["error"] and "\n" not in hqq["error"]
    assert f"{hqq['name']} skipped: {hqq['error']}" in result.stderr.strip().splitlines()
    assert f"4 QuantizedCache quanto rows skipped: {QUANTO_MISSING}" in result.stderr.strip().splitlines()
    assert all(r["error"] == QUANTO_MISSING for r in rows if r["name"] in QUANTO_ROWS)


def _expected_bytes(cfg, peer, tokens: int) -> int:
    """Packed codes (nbits per element) and one float32 scale and shift (zero) per group, K and V, every layer."""
    numel = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * tokens
    return cfg.num_hidden_layers * 2 * (numel * peer.nbits // 8 + 2 * 4 * numel // peer.q_group_size)


def _generic_bytes(cache) -> int:
    """A count of only the tensors a layer holds as attributes (what `cache_bytes` counted before it walked tuples)."""
    return sum(tensor_bytes(t) for layer in cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("peer", PEERS, ids=lambda p: p.name)
def test_each_installed_peer_holds_exactly_its_codes_scales_and_shifts(llama_gqa, peer):
    pytest.importorskip(BACKENDS[peer.backend][0])
    model, tokens = llama_gqa.model, 64  # one quantization of the prompt, then an empty residual window
    cache = _peer_system(model, peer).new_cache()
    with torch.no_grad():
        model(input_ids=torch.arange(10, 10 + tokens).unsqueeze(0), use_cache=True, **{CACHE_ARG: cache})
    assert cache.get_seq_length() == tokens
    assert cache_bytes(cache) == _expected_bytes(model.config, peer, tokens)
    if peer.backend == "quanto":  # nothing missed or counted twice against the plain count
        assert _generic_bytes(cache) == cache_bytes(cache)
    else:  # HQQ keeps (packed, meta) tuples, which a count of plain tensors misses
        assert _generic_bytes(cache) == 0
    with torch.no_grad():  # 16 more tokens stay in the float32 residual window
        model(input_ids=torch.arange(10, 26).unsqueeze(0), use_cache=True, **{CACHE_ARG: cache},
              position_ids=torch.arange(tokens, tokens + 16).unsqueeze(0))
    cfg = model.config
    window = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 16 * 4
    assert cache_bytes(cache) == _expected_bytes(cfg, peer, tokens) + window


def test_installed_peers_are_measured_like_the_recipes(llama_gqa, tmp_path, text):
    installed = [p for p in PEERS if _installed(BACKENDS[p.backend][0])]
    if not installed:
        pytest.skip("neither optimum-quanto nor hqq is installed")
    # 32-token prompts, 128-token blocks: multiples of q_group_size / kv_heads, as quanto's per-channel axis -1 needs
    settings = BenchSettings(contexts=[32], text=text, ppl_context=256, ppl_tokens=256, block=128, passkey_depths=0,
                             new_tokens=3, repeats=1)
    results = bench(str(llama_gqa.path), [], settings)
    rows = {r["name"]: r for r in results["rows"][1:]}
    for p in installed:
        row = rows[p.name]
        assert "error" not in row, row["error"]
        assert row["kind"] == "peer" and row["cache"] == p.config() and p.why in row["description"]
        assert row["ppl"] > 1 and row["speed"]["32"]["decode_tokens_per_second"] > 0
        # 256 tokens: the second block of 128 flushes everything into the quantized states, no residual window
        assert row["ppl_tokens"] == 255
        assert row["kv_bytes_per_token"] == _expected_bytes(llama_gqa.model.config, p, 256) / 256


def _run_piped(code: str, *args: str) -> subprocess.CompletedProcess:
    """``python -c CODE ARGS`` in a fresh process, stdout and stderr piped, kineto and rich left to their
    defaults (no log level or terminal forced from outside)."""
    env = python_env({k: v for k, v in os.environ.items()
                      if k not in ("KINETO_LOG_LEVEL", "FORCE_TERMINAL", "TTY_COMPATIBLE")}, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_bench_on_a_fresh_install_prints_only_its_own_lines_and_full_tables(llama_gqa, tmp_path):
    out = tmp_path / "out"
    hide = ("import sys; sys.modules['optimum'] = sys.modules['hqq'] = sys.modules['llama_cpp'] = None; "
            "from kvcompress.cli import app; app()")
    proc = _run_piped(hide, "bench", str(llama_gqa.path), *QUICK, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    # one line of ours per peer, nothing from the profiler (kineto's profiler_start, gpuGetDeviceCount failed)
    hqq = next(p for p in PEERS if p.backend == "hqq")
    skipped = [f"4 QuantizedCache quanto rows skipped: {QUANTO_MISSING}", f"{hqq.name} skipped: {HQQ_MISSING}",
               f"llama.cpp skipped: {LLAMA_MISSING}"]
    assert proc.stderr.strip().splitlines() == skipped, proc.stderr
    results = json.loads((out / "results.json").read_text())
    plots = [out / name for name in ("decode_speed.png", "peak_memory.png", "prefill.png")]
    assert (out / "results.md").is_file() and all(p.is_file() for p in plots)
    head, rows = summary_table(results)
    lines = proc.stdout.splitlines()
    assert "…" not in proc.stdout and max(map(len, lines)) > 80  # the table is wider than 80 columns
    for cell in [*head, *rows[0]]:  # each header and cell whole, on one line
        assert any(cell in line for line in lines), cell
    assert f"wrote {out / 'results.json'}, {out / 'results.md'}, " + ", ".join(map(str, plots)) in lines


def test_peak_memory_on_the_cpu_keeps_stderr_and_the_environment_clean():
    code = ("import os, torch; from kvcompress.evaluate.speed import PeakMemory\n"
            "for n in (1000, 2000):\n"
            "    with PeakMemory(torch.device('cpu')) as mem:\n"
            "        x = torch.empty(n)\n"
            "    print(mem.peak, os.environ.get('KINETO_LOG_LEVEL'))")
    proc = _run_piped(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.splitlines() == ["4000 None", "8000 None"]


def test_bench_rejects_bad_input(llama_gqa, tmp_path):
    assert_one_line_error(run_cli("bench", llama_gqa.path, "--contexts", "8"), "contexts")
    assert_one_line_error(run_cli("bench", llama_gqa.path, "--text", tmp_path / "missing.txt"), "not found")
    assert_one_line_error(run_cli("bench", llama_gqa.path, "--recipes", "no-such-recipe"), "recipe not found")
    assert_one_line_error(run_cli("bench", llama_gqa.path, "--peers", "quanto-4bit,llama.cpp"),
                          "unknown peer quanto-4bit", "llama.cpp", PEERS[0].key)


def test_bench_peers_runs_only_the_rows_it_names(llama_gqa, monkeypatch):
    monkeypatch.setitem(sys.modules, "optimum", None)  # each row named is one error row: quick, and still named
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    settings = BenchSettings(contexts=[24], passkey_depths=0, new_tokens=3, repeats=1, peers=(PEERS[2].key,))
    assert [r["name"] for r in bench(str(llama_gqa.path), [], settings)["rows"]][1:] == [PEERS[2].name]
    settings.peers = (PEER_KEYS[-1], PEERS[0].key)
    assert [r["name"] for r in bench(str(llama_gqa.path), [], settings)["rows"]][1:] == [PEERS[0].name, "llama.cpp"]
    assert len(set(PEER_KEYS)) == len(PEERS) + 1


def test_pareto_front_keeps_points_nothing_beats():
    points = [(10, 5.0), (20, 4.0), (15, 6.0), (40, 4.5), (5, 9.0)]
    assert pareto_front(points) == [4, 0, 1]


def _png_width(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")  # IHDR: width, then height


def test_pareto_plot_zooms_on_systems_near_the_best_perplexity(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep each figure for a look at its legends
    rows = [{"name": f"r{i}", "kind": "recipe", "kv_bytes_per_token": 5000.0 + 300 * i, "ppl": 19.0 + 0.1 * i}
            for i in range(5)]
    results = {"rows": rows, "model": "m", "fp16_kv_bytes_per_token": 20000.0}
    for name in ("near", "spread", "flat"):
        (tmp_path / name).mkdir()
    (single,) = write_plots(results, tmp_path / "near")
    rows.append({"name": "far", "kind": "recipe", "kv_bytes_per_token": 9000.0, "ppl": 35.0})
    (zoomed,) = write_plots(results, tmp_path / "spread")
    assert _png_width(zoomed) == 2 * _png_width(single)  # a second panel for the five close ones
    for row in rows[:5]:
        row["ppl"] = 19.0  # all close ones equal: the zoom still gets a height of its own
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (flat,) = write_plots(results, tmp_path / "flat")
    assert _png_width(flat) == _png_width(zoomed)
    overview, zoom = (_legend(ax) for ax in figures[-1].axes)
    assert "fp16 KV cache" in overview and "fp16 KV cache" not in zoom  # 20,000 is off the zoom
    results["fp16_kv_bytes_per_token"] = 5500.0
    write_plots(results, tmp_path / "flat")
    assert all("fp16 KV cache" in _legend(ax) for ax in figures[-1].axes)


@pytest.mark.parametrize("contexts", [[256], [256, 1024, 4096]])
def test_decode_speed_plot_bars_for_one_context_lines_for_more(tmp_path, monkeypatch, contexts):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    names = ["baseline (DynamicCache)", "q2", "q4"]
    rate = {(name, c): 1000.0 / (1 + i) - c / 100 for i, name in enumerate(names) for c in contexts}
    rows = [{"name": name, "kind": "baseline" if i == 0 else "recipe",
             "speed": {str(c): {"decode_tokens_per_second": rate[name, c]} for c in contexts}}
            for i, name in enumerate(names)]
    rows.append({"name": "failed peer", "kind": "peer", "error": "not installed"})  # no speed: not drawn
    (path,) = write_plots({"rows": rows, "device": "CPU", "dtype": "float32"}, tmp_path)
    assert path.name == "decode_speed.png" and path.read_bytes()[:4] == b"\x89PNG"
    (ax,) = figures[-1].axes
    if len(contexts) == 1:  # a bar per system, named on the x axis, its rate written on it
        assert not ax.lines and ax.get_legend() is None
        assert [bar.get_height() for bar in ax.patches] == [rate[n, 256] for n in names]
        assert [t.get_text() for t in ax.get_xticklabels()] == names
        assert [t.get_text() for t in ax.texts] == [f"{rate[n, 256]:.0f}" for n in names]
        assert "256 tokens" in ax.get_title()
    else:  # a line per system over the contexts, on a log axis
        assert not ax.patches and ax.get_xscale() == ax.get_yscale() == "log"
        assert [list(line.get_xdata()) for line in ax.lines] == [contexts] * len(names)
        assert [list(line.get_ydata()) for line in ax.lines] == [[rate[n, c] for c in contexts] for n in names]
        assert _legend(ax) == names


def test_growth_slopes_fit_how_each_entry_grows_with_context():
    contexts = [1024, 2048, 4096, 8192]
    rows = [{"name": "quadratic prefill", "kind": "baseline",
             "speed": {str(c): {"prefill_seconds": 3e-7 * c**2, "decode_tokens_per_second": 5e4 / c,
                                "peak_memory_bytes": 2e5 + 40.0 * c} for c in contexts}},
            {"name": "one context", "kind": "recipe", "speed": {"1024": {"prefill_seconds": 1.0}}},
            {"name": "failed", "kind": "peer", "error": "not installed"}]
    slopes = growth_slopes({"rows": rows})
    assert set(slopes) == {"quadratic prefill"}  # one point fits no slope
    fit = slopes["quadratic prefill"]
    assert fit["prefill_seconds"] == pytest.approx(2.0) and fit["decode_tokens_per_second"] == pytest.approx(-1.0)
    assert 0.2 < fit["peak_memory_bytes"] < 0.6  # a constant part flattens a linear growth
    table = slope_table({"rows": rows}).splitlines()
    assert table[2] == "| quadratic prefill | -1.00 | +2.00 | " + f"{fit['peak_memory_bytes']:+.2f} |"
    assert slope_table({"rows": rows[1:]}) == ""


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_point_labels_do_not_cover_each_other():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    points = [(5000.0 + 40 * i, 19.0 + 0.02 * i) for i in range(6)] + [(2000.0, 15.0), (20000.0, 30.0)]
    ax.scatter(*zip(*points, strict=True))
    ax.set_xscale("log")
    _label_points(ax, [f"recipe-{i}" for i in range(len(points))], points)
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    boxes = []
    for label in ax.texts:
        label.update_positions(renderer)
        boxes.append(Text.get_window_extent(label, renderer))
    plt.close(fig)
    marks = [ax.transData.transform(p) for p in points]
    assert len(boxes) == len(points)
    assert all(frame.contains(b.x0, b.y0) and frame.contains(b.x1, b.y1) for b in boxes)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert not any(b.contains(x, y) for b in boxes for x, y in marks)  # no label covers a point


def test_a_length_quanto_per_channel_cannot_take_is_an_error_row_saying_so(llama_gqa, monkeypatch):
    pytest.importorskip("optimum.quanto")
    import kvcompress.evaluate.bench as bench_module

    monkeypatch.setattr(bench_module, "PEERS", (PEERS[0], PEERS[2]))  # axis_key=-1, then both axes 0
    settings = BenchSettings(contexts=[24], passkey_depths=0, new_tokens=3, repeats=1)  # 2 KV heads x 24 = 48
    _, channel, token, llama = bench(str(llama_gqa.path), [], settings)["rows"]
    assert llama["name"] == "llama.cpp" and "error" in llama  # not a GGUF (or no llama-cpp-python)
    assert channel["error"].startswith("Group size (64) must be a divisor of (48)") and "\n" not in channel["error"]
    assert "multiple of 64" in channel["error"] and "speed" not in channel
    assert "error" not in token and token["speed"]["24"]["decode_tokens_per_second"] > 0


@pytest.mark.parametrize("only", ["quality", "speed"])
def test_bench_runs_one_part_at_a_time(llama_gqa, tmp_path, text, only):
    out = tmp_path / "out"
    result = run_cli("bench", llama_gqa.path, "--recipes", _recipe(tmp_path, "q4", avg_bits=4.0), "--contexts", "24",
                     "--text", text, "--ppl-tokens", "100", "--ppl-context", "50", "--passkey-depths", "0",
                     "--new-tokens", "3", "--repeats", "1", "--no-peer", "--only", only, "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert [r["name"] for r in rows] == ["baseline (DynamicCache)", "q4"]
    for row in rows:
        assert ("speed" in row) == (only == "speed")
        assert ("kv_bytes_per_token" in row) == (only == "quality")


def test_bench_refuses_an_unknown_part(llama_gqa, tmp_path):
    result = run_cli("bench", llama_gqa.path, *QUICK, "--only", "memory", "--out", tmp_path / "out")
    assert result.exit_code != 0 and "the parts of a bench run are quality and speed, got memory" in result.stderr


def test_bench_reports_kl_and_top1_beside_the_baseline(llama_gqa, tmp_path, text):
    out = tmp_path / "out"
    result = run_cli("bench", llama_gqa.path, "--recipes", _recipe(tmp_path, "q2", avg_bits=2.0), "--contexts", "24",
                     "--text", text, "--ppl-tokens", "100", "--ppl-context", "50", "--passkey-depths", "0",
                     "--new-tokens", "3", "--repeats", "1", "--no-peer", "--only", "quality", "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    base, q2 = json.loads(result.stdout)["rows"]
    assert "kl" not in base  # the baseline against itself is not measured
    assert q2["kl"] > 0 and 0 < q2["top1"] <= 1
    assert sum(b["tokens"] for b in q2["by_position"]) == q2["ppl_tokens"]
    head, rows = summary_table(json.loads(result.stdout))
    assert head[5:7] == ["KL (nats)", "top-1"] and rows[1][5] == f"{q2['kl']:.4f}" and rows[0][5] == "-"
