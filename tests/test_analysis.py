"""analyze: SVD factorizations, rank schedules, bit allocation, the end-to-end report, and recipes."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcompress.analysis import schedule as schedules
from kvcompress.analysis.analyze import PROBE_SEED, analyze, sensitivity_probes
from kvcompress.errors import KVCompressError
from kvcompress.methods.codebook import decode as cb_decode
from kvcompress.methods.codebook import encode as cb_encode
from kvcompress.methods.kivi import dequantize, quantize
from kvcompress.methods.lowrank import energy_kept, group_svd, whitening_factor
from kvcompress.methods.minikv import allocate_bits
from kvcompress.methods.rotation import random_orthogonal
from kvcompress.plan import build_plan
from kvcompress.recipe import LayerRecipe, Quant, Recipe, load_recipe, recipe_from_dict
from kvcompress.sources import ModelSpec, open_source

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _activations(n: int, hidden: int, seed: int, huge: tuple[int, ...] = (3, 17, 40), scale: float = 300.0
                 ) -> torch.Tensor:
    """``[n, hidden]`` float64 activations with a few huge channels (outlier features, as in real LLMs)."""
    x = torch.randn(n, hidden, generator=_gen(seed), dtype=torch.float64)
    x[:, list(huge)] *= scale
    return x


# --------------------------------------------------------------------------- SVD


@pytest.mark.parametrize("whitened", [False, True])
@pytest.mark.parametrize("shape", [(16, 64), (8, 64), (32, 48)])
def test_full_rank_factors_reconstruct_exactly(shape, whitened):
    out, hidden = shape
    w = torch.randn(out, hidden, generator=_gen(out * hidden), dtype=torch.float64)
    s = None
    if whitened:
        x = _activations(4 * hidden, hidden, seed=1)
        s = whitening_factor(x.T @ x)
        assert torch.allclose(s, s.tril())  # lower Cholesky factor
    svd = group_svd(w, s)
    assert svd.width == min(out, hidden)
    down, up = svd.factors(svd.width)
    assert down.shape == (svd.width, hidden) and up.shape == (out, svd.width)
    assert down.dtype == up.dtype == torch.float64
    torch.testing.assert_close(up @ down, w, atol=1e-8, rtol=0)


def test_whitening_factor_survives_a_singular_gram():
    x = _activations(10, 64, seed=2)  # rank 10 < 64: the Gram matrix is singular
    s = whitening_factor(x.T @ x)
    assert torch.isfinite(s).all() and (s.diagonal() > 0).all()


@pytest.mark.parametrize("rank", [2, 4, 8, 12])
def test_whitened_truncation_has_lower_output_error(rank):
    hidden, out = 64, 16
    w = torch.randn(out, hidden, generator=_gen(3), dtype=torch.float64)
    x = _activations(512, hidden, seed=4)
    plain = group_svd(w).factors(rank)
    white = group_svd(w, whitening_factor(x.T @ x)).factors(rank)

    def output_error(factors):
        down, up = factors
        return torch.linalg.norm((w - up @ down) @ x.T).item()

    def weight_error(factors):
        down, up = factors
        return torch.linalg.norm(w - up @ down).item()

    # on the activations it was fitted to, whitening wins clearly...
    assert output_error(white) < 0.9 * output_error(plain)
    # ...while plain SVD is the best approximation of W itself (Eckart-Young), so the test has teeth
    assert weight_error(plain) <= weight_error(white) + 1e-9


def test_energy_kept():
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert energy_kept(sigma, 0) == 0.0
    assert energy_kept(sigma, 1) == pytest.approx(9 / 14)
    assert energy_kept(sigma, 4) == pytest.approx(1.0)


# --------------------------------------------------------------------------- schedules

WIDTH_MULTIPLE = st.sampled_from([(8, 8), (16, 8), (32, 8), (64, 8), (64, 16), (24, 1), (16, 4), (12, 8)])
LOG_KAPPAS = st.lists(st.floats(min_value=0.0, max_value=25.0, allow_nan=False), min_size=1, max_size=16)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(log_kappa=LOG_KAPPAS, wm=WIDTH_MULTIPLE, target=st.sampled_from([0.25, 0.5, 0.75, 1.0]))
def test_progressive_schedule_properties(log_kappa, wm, target):
    width, multiple = wm
    ranks = schedules.progressive(log_kappa, width, target, multiple)
    step = min(multiple, width)
    assert len(ranks) == len(log_kappa)
    assert all(isinstance(r, int) for r in ranks)
    assert all(a >= b for a, b in itertools.pairwise(ranks)), ranks  # never increases with depth
    assert all(step <= r <= width for r in ranks), ranks
    assert all(r % step == 0 or r == width for r in ranks), ranks
    mean = sum(ranks) / len(ranks)
    assert abs(mean / width - target) <= step / width + 1e-9, (ranks, target)
    if target == 1.0 and width % multiple == 0:
        assert ranks == [width] * len(ranks)


def test_full_target_keeps_full_width_when_width_is_not_a_multiple():
    """``round_rank`` promises ``width`` is always allowed: target 1.0 must stay lossless."""
    for width, multiple in [(12, 8), (64, 48), (40, 16)]:
        case = f"width {width}, multiple {multiple}"
        assert schedules.uniform(3, width, 1.0, multiple) == [width] * 3, case
        assert schedules.progressive([0.0, 1.0, 0.0], width, 1.0, multiple) == [width] * 3, case
        assert schedules.progressive([3.0, 2.0, 1.0, 0.5], width, 1.0, multiple) == [width] * 4, case
        # nearest allowed value: width - 0.5 is closer to width than to the multiple below it
        assert schedules.round_rank(width - 0.5, width, multiple) == width, case


def test_progressive_schedule_favours_shallow_layers():
    ranks = schedules.progressive([2.0, 1.5, 1.0, 1.0, 0.5, 0.5, 0.2, 0.1], 64, 0.5, 8)
    assert ranks[0] > ranks[-1]
    assert ranks[0] == 64  # r_max is the full width when the budget allows it
    assert sum(ranks) / len(ranks) == pytest.approx(32, abs=8)


@pytest.mark.parametrize("target", [0.25, 0.5, 0.75, 1.0])
def test_uniform_schedule(target):
    ranks = schedules.uniform(5, 64, target, 8)
    assert ranks == [round(64 * target / 8) * 8] * 5


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sigmas=st.lists(st.lists(st.floats(min_value=0.0, max_value=100.0, allow_nan=False), min_size=32, max_size=32)
                    .map(lambda s: sorted(s, reverse=True)).filter(lambda s: s[0] > 1e-3), min_size=1, max_size=4),
    keep=st.sampled_from([0.5, 0.8, 0.9, 0.95, 0.99, 1.0]),
    multiple=st.sampled_from([1, 4, 8]),
)
def test_energy_schedule_meets_energy_minimally(sigmas, keep, multiple):
    width = 32
    ranks = schedules.energy(sigmas, width, keep, multiple)
    assert len(ranks) == len(sigmas)
    for sig, r in zip(sigmas, ranks, strict=True):
        t = torch.tensor(sig, dtype=torch.float64)
        assert multiple <= r <= width and r % multiple == 0
        assert energy_kept(t, r) >= keep - 1e-9  # energy met
        if r > multiple:  # one rounding step less would not meet it
            assert energy_kept(t, r - multiple) < keep + 1e-9


# --------------------------------------------------------------------------- bit allocation

SENS = st.lists(st.floats(min_value=0.0, max_value=1e3, allow_nan=False), min_size=1, max_size=24)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sens=SENS, avg=st.floats(min_value=1.0, max_value=8.0))
def test_allocate_bits_properties(sens, avg):
    bits = allocate_bits(sens, avg)
    assert len(bits) == len(sens)
    assert set(bits) <= set(range(1, 9))  # every width 1-8 is a choice
    n = len(sens)
    assert sum(bits) <= avg * n + 1e-6  # average budget respected
    for i in range(n):
        for j in range(n):
            if sens[i] > sens[j]:
                assert bits[i] >= bits[j], (sens, bits)
    # greedy stops only when no further upgrade fits the budget
    left = avg * n - sum(bits)
    assert all(b == 8 for b in bits) or left < 1 - 1e-9, (bits, left)  # one more bit no longer fits


def test_allocate_bits_spends_on_the_most_sensitive_layer():
    # damage s * 4^-(b-1): the 5.0 stream's third extra bit (5 * 3/4 * 4^-2 = 0.23) beats the 0.3 stream's
    # first (0.225), its fourth (0.06) loses to the 0.1 stream's first (0.075)
    assert allocate_bits([0.1, 5.0, 0.2, 0.3], 2.5) == [2, 4, 2, 2]
    assert allocate_bits([1.0] * 4, 2.0) == [2, 2, 2, 2]
    assert allocate_bits([1.0, 2.0], 8.0) == [8, 8]
    assert allocate_bits([1.0, 1.0, 1.0], 3.0) == [3, 3, 3]  # a 3-bit average is 3 bits, not a 2/4 mix
    assert allocate_bits([0.1, 5.0, 0.2, 0.3], 2.5, choices=(2, 4, 8)) == [2, 4, 2, 2]


def test_a_ladder_with_half_a_bit_takes_the_half_step_where_a_whole_bit_does_not_fit():
    # a vector codebook's values also store 1.5 bits: from 1 bit everywhere, half a bit of budget per unit
    vector, kivi = (1, 1.5, 2, 3, 4, 5, 6, 7, 8), tuple(range(1, 9))
    assert allocate_bits([1.0, 1.0], 1.25, ladders=[vector, kivi]) == [1.5, 1]  # the other's 1-bit step won't fit
    assert allocate_bits([1.0, 1.0], 1.25) == [1, 1]
    assert allocate_bits([1.0, 1.0], 1.5, ladders=[vector, vector]) == [1.5, 1.5]
    # per bit, 1 -> 1.5 halves the damage (1/2 per half bit) and beats 1 -> 2 (3/4 per bit); then 1.5 -> 2 follows
    assert allocate_bits([1.0, 1.0], 1.5, ladders=[vector, kivi]) == [2, 1]
    assert sorted(allocate_bits([1.0, 1.0], 1.5)) == [1, 2]  # integer ladders: the whole bit goes to one of them
    # the damage model s·4^-(b-1): the 1.5 step halves a unit's damage, so the more sensitive unit goes first
    assert allocate_bits([1.0, 3.0], 1.25, ladders=[vector, vector]) == [1, 1.5]


@settings(max_examples=200, deadline=None)
@given(sens=SENS, avg=st.floats(min_value=1.0, max_value=8.0), seed=st.integers(0, 1000))
def test_allocate_bits_over_per_unit_ladders_stays_on_each_ladder_and_within_the_budget(sens, avg, seed):
    g = torch.Generator().manual_seed(seed)
    ladders = [(1, 1.5, 2, 3, 4, 5, 6, 7, 8) if int(torch.randint(0, 2, (1,), generator=g)) else tuple(range(1, 9))
               for _ in sens]
    widths = torch.randint(1, 33, (len(sens),), generator=g).tolist()
    bits = allocate_bits(sens, avg, widths=widths, ladders=ladders)
    assert all(b in ladder for b, ladder in zip(bits, ladders, strict=True))
    spent = sum(b * w for b, w in zip(bits, widths, strict=True))
    assert spent <= avg * sum(widths) + 1e-6
    # greedy stops only when no unit's next step fits what is left
    left = avg * sum(widths) - spent
    for b, w, ladder in zip(bits, widths, ladders, strict=True):
        assert b == 8 or (ladder[ladder.index(b) + 1] - b) * w > left - 1e-9


def test_equal_sensitivities_get_uniform_bits():
    # --no-sensitivity measures nothing (all zeros): the budget must spread evenly, not pile onto one stream
    assert allocate_bits([0.0] * 4, 4.0) == [4, 4, 4, 4]
    assert allocate_bits([0.0] * 6, 8.0) == [8] * 6
    assert allocate_bits([0.0] * 6, 3.0) == [3] * 6


@settings(max_examples=200, deadline=None)
@given(sens=SENS, avg=st.floats(min_value=1.0, max_value=8.0), seed=st.integers(0, 1000))
def test_allocate_bits_with_widths_respects_the_channel_budget(sens, avg, seed):
    widths = torch.randint(1, 33, (len(sens),), generator=torch.Generator().manual_seed(seed)).tolist()
    bits = allocate_bits(sens, avg, widths=widths)
    assert set(bits) <= set(range(1, 9))
    assert sum(b * w for b, w in zip(bits, widths, strict=True)) <= avg * sum(widths) + 1e-6
    left = avg * sum(widths) - sum(b * w for b, w in zip(bits, widths, strict=True))
    assert all(b == 8 or w > left + 1e-9 for b, w in zip(bits, widths, strict=True))  # no +1 bit fits
    assert allocate_bits([8.0, 1.0], 3.0, widths=[16, 16]) == [4, 2]  # per channel damage decides
    assert allocate_bits([8.0, 1.0], 3.0, widths=[64, 2], choices=(2, 4, 8)) == [2, 8]  # 64 more bits do not fit


def test_channel_allocation_follows_the_spectrum(tiny_factory):
    from kvcompress.methods.channels import mean_bits

    tiny = tiny_factory("llama_gqa")
    source = open_source(tiny.path)
    rec = _small_calibration(Recipe())
    rec.lowrank.enabled = False
    rec.quant.enabled, rec.quant.allocation, rec.quant.segment, rec.quant.avg_bits = True, "channels", 4, 3.0
    rec.quant.group_size, rec.quant.residual_length = 4, 16
    result = analyze(source, source.tokenizer(), rec, sensitivity=True)
    rec.validate(source.spec)
    width = tiny.config.num_key_value_heads * tiny.config.head_dim
    channel_bits = 0.0
    lists = 0
    for lay in rec.layers:
        for bits in (lay.bits_k, lay.bits_v):
            channel_bits += mean_bits(bits, width, 4) * width
            if isinstance(bits, list):
                lists += 1
                assert len(bits) == width // 4
                assert bits == sorted(bits, reverse=True)  # the leading principal axes carry the most energy
    assert lists > 0  # the spectrum made some stream mix widths
    assert channel_bits / (2 * width * len(rec.layers)) <= 3.0 + 1e-9
    assert "bits_k" in result.to_json()["layers"][0]


# --------------------------------------------------------------------------- analyze end to end

TOP_KEYS = {"model", "num_layers", "num_kv_heads", "head_dim", "head_group", "group_width", "svd", "schedule",
            "target_ratio", "layers", "kv_bytes_per_token", "compression_ratio"}
LAYER_KEYS = {"layer", "rank_k", "rank_v", "kappa_k", "kappa_v", "energy_k", "energy_v", "bits_k", "bits_v",
              "sensitivity", "sensitivity_k", "sensitivity_v"}


def _small_calibration(rec: Recipe) -> Recipe:
    rec.calibration.max_tokens = 256
    rec.calibration.seq_len = 128
    return rec


def _check_report(js: dict, tiny, head_group: int, target: float) -> None:
    assert set(js) >= TOP_KEYS
    json.dumps(js)  # plain JSON types
    cfg = tiny.config
    width = head_group * cfg.head_dim
    assert (js["num_layers"], js["num_kv_heads"], js["head_dim"]) == (3, cfg.num_key_value_heads, cfg.head_dim)
    assert (js["head_group"], js["group_width"], js["target_ratio"]) == (head_group, width, target)
    assert len(js["layers"]) == 3
    for i, row in enumerate(js["layers"]):
        assert set(row) == LAYER_KEYS, set(row) ^ LAYER_KEYS
        assert row["layer"] == i
        assert 1 <= row["rank_v"] <= width and 1 <= row["rank_k"] <= width
        assert row["kappa_k"] >= 1.0 and row["kappa_v"] >= 1.0
        assert 0.0 < row["energy_k"] <= 1.0 + 1e-9 and 0.0 < row["energy_v"] <= 1.0 + 1e-9
        assert row["bits_k"] in range(1, 9) and row["bits_v"] in range(1, 9)
    ranks = [row["rank_k"] for row in js["layers"]]
    assert ranks == sorted(ranks, reverse=True)
    assert abs(sum(ranks) / len(ranks) / width - target) <= 8 / width + 1e-9
    kv = js["kv_bytes_per_token"]
    groups = cfg.num_key_value_heads // head_group
    assert kv["baseline"] == 3 * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    positions = 4 * len(js["layers"])  # an int32 RoPE position per stored token per layer
    assert kv["compressed"] == pytest.approx(
        sum(2 * (r["rank_k"] + r["rank_v"]) * groups for r in js["layers"]) + positions)
    assert js["compression_ratio"] == pytest.approx(kv["baseline"] / kv["compressed"])


@pytest.mark.parametrize("name", ["llama_gqa", "llama_mha"])
def test_analyze_end_to_end_with_sensitivity(tiny_factory, name):
    tiny = tiny_factory(name)
    source = open_source(tiny.path)
    rec = _small_calibration(Recipe())
    rec.quant.avg_bits = 3.5  # not a width every stream can get: the sensitivity decides
    result = analyze(source, source.tokenizer(), rec, sensitivity=True)
    js = result.to_json()
    _check_report(js, tiny, tiny.config.num_key_value_heads, 0.5)
    sens = [row["sensitivity"] for row in js["layers"]]
    assert all(s > 0 and math.isfinite(s) for s in sens)  # measured, not the uniform placeholder
    for row in js["layers"]:  # keys and values are measured apart, and the total is their sum
        assert row["sensitivity_k"] > 0 and row["sensitivity_v"] > 0
        assert row["sensitivity"] == pytest.approx(row["sensitivity_k"] + row["sensitivity_v"])
    assert js["sensitivity_method"] != "none (uniform bits)"
    # the recipe was filled in, consistently with the report
    assert [(lay.rank_k, lay.rank_v, lay.bits_k, lay.bits_v) for lay in rec.layers] == \
        [(r["rank_k"], r["rank_v"], r["bits_k"], r["bits_v"]) for r in js["layers"]]
    bits = [b for r in js["layers"] for b in (r["bits_k"], r["bits_v"])]
    assert sum(bits) / len(bits) <= rec.quant.avg_bits + 1e-9
    rec.validate(source.spec)


@pytest.mark.parametrize("half_bits", [False, True])
def test_the_allocation_gives_vector_values_half_bits_only_when_asked(llama_gqa, half_bits):
    source = open_source(llama_gqa.path)
    rec = _small_calibration(Recipe())
    rec.lowrank.target_ratio = 1.0
    avg = 13 / 12  # three layers, six streams: half a bit over 1 bit each, too little for a whole-bit step
    for key, value in dict(enabled=True, method="vector", key_method="kivi", avg_bits=avg, group_size=8,
                           key_group_size=4, residual_length=8, half_bits=half_bits).items():
        setattr(rec.quant, key, value)
    rows = analyze(source, source.tokenizer(), rec, sensitivity=True).to_json()["layers"]
    vector, kivi = (1, 1.5, *range(2, 9)), tuple(range(1, 9))
    want = allocate_bits([s for r in rows for s in (r["sensitivity_k"], r["sensitivity_v"])], avg,
                         ladders=[kivi, vector if half_bits else kivi] * len(rows))
    assert [b for r in rows for b in (r["bits_k"], r["bits_v"])] == want  # the measured sensitivities, allocated
    assert want.count(1.5) == half_bits and sum(want) <= 6.5  # with half bits, one value stream takes 1.5
    build_plan(rec, source.spec)


def test_half_bits_needs_a_quantizer_that_stores_them():
    with pytest.raises(KVCompressError, match=r"half_bits needs a quantizer that stores 1.5 bits \(method or "
                                              r"key_method = 'vector'\), got 'codebook' and 'codebook'"):
        recipe_from_dict({"quant": {"enabled": True, "method": "codebook", "half_bits": True}})


def test_allocate_bits_takes_one_ladder_for_all_or_one_per_unit_not_both():
    with pytest.raises(ValueError, match="not both"):
        allocate_bits([1.0], 2.0, choices=(2, 4), ladders=[(2, 4)])


def test_analyze_refuses_fixed_widths_the_quantizer_does_not_store_before_any_work(llama_gqa, monkeypatch):
    import kvcompress.analysis.analyze as analyze_mod

    monkeypatch.setattr(analyze_mod, "calibration_ids", lambda *a, **k: pytest.fail("calibrated before refusing"))
    source = open_source(llama_gqa.path)
    rec = recipe_from_dict({"quant": {"enabled": True, "method": "codebook", "key_bits": 4, "value_bits": 1.5,
                                      "group_size": 8}})
    with pytest.raises(KVCompressError, match=r"layer 0: bits_v: codebook codes are 1, .* got 1.5 \(1.5 bits is a "
                                              r"vector codebook's width"):
        analyze(source, source.tokenizer(), rec)


def test_analyze_cli_per_head_groups_on_gqa(llama_gqa):
    res = run_cli("analyze", llama_gqa.path, "--head-group", "1", "--no-sensitivity", "--json")
    assert res.exit_code == 0, res.stderr
    js = json.loads(res.stdout)
    _check_report(js, llama_gqa, 1, 0.5)
    assert js["group_width"] == 8 and js["head_group"] == 1


def test_analyze_cli_writes_a_loadable_recipe(llama_gqa, tmp_path):
    out = tmp_path / "r.toml"
    res = run_cli("analyze", llama_gqa.path, "--schedule", "uniform", "--target-ratio", "0.25", "--svd", "weight",
                  "--no-sensitivity", "--json", "-o", out)
    assert res.exit_code == 0, res.stderr
    rec = recipe_from_dict(tomllib.loads(out.read_text()))
    assert rec.lowrank.schedule == "uniform" and rec.lowrank.svd == "weight"
    assert [(lay.rank_k, lay.rank_v) for lay in rec.layers] == [(8, 8)] * 3  # 0.25 * 16 = 4 -> one step of 8


def test_analyze_cli_avg_bits_turns_quantization_on(llama_gqa, tmp_path):
    out = tmp_path / "r.toml"
    res = run_cli("analyze", llama_gqa.path, "--avg-bits", "3.5", "--svd", "weight", "--no-sensitivity", "-o", out)
    assert res.exit_code == 0, res.stderr
    rec = recipe_from_dict(tomllib.loads(out.read_text()))
    assert rec.quant.enabled and rec.quant.avg_bits == 3.5
    assert sorted({lay.bits_k for lay in rec.layers} | {lay.bits_v for lay in rec.layers}) == [3, 4]


def test_analyze_skips_sensitivity_when_every_stream_gets_the_average(llama_gqa, monkeypatch):
    import kvcompress.analysis.analyze as analyze_mod

    def no_model(_source):
        raise AssertionError("the sensitivity pass loaded the model")

    monkeypatch.setattr(analyze_mod, "load_full", no_model)
    source = open_source(llama_gqa.path)
    rec = _small_calibration(Recipe())
    rec.quant.enabled, rec.quant.avg_bits, rec.quant.group_size, rec.quant.residual_length = True, 4.0, 8, 16
    result = analyze_mod.analyze(source, source.tokenizer(), rec, sensitivity=True)
    assert result.sensitivity_method.startswith("not needed")
    assert all(lay.bits_k == lay.bits_v == 4 for lay in rec.layers)
    rec.quant.avg_bits = 3.5  # a mix of widths: now the sensitivity decides, and needs the model
    with pytest.raises(AssertionError, match="loaded the model"):
        analyze_mod.analyze(source, source.tokenizer(), rec, sensitivity=True)


def test_analyze_cli_bad_head_group_is_one_line(llama_gqa):
    assert_one_line_error(run_cli("analyze", llama_gqa.path, "--head-group", "3", "--no-sensitivity"),
                          "head_group 3")


# --------------------------------------------------------------------------- recipes

SPEC = ModelSpec(model_type="llama", num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=2, head_dim=8,
                 rope_theta=10000.0, attention_bias=False, qk_norm=False)


def _full_recipe() -> Recipe:
    rec = Recipe(name="mine", description="a test recipe")
    rec.lowrank.svd, rec.lowrank.schedule, rec.lowrank.target_ratio = "weight", "energy", 0.375
    rec.lowrank.head_group, rec.lowrank.energy = 1, 0.9
    rec.quant.avg_bits, rec.quant.group_size, rec.quant.residual_length = 4.5, 16, 64
    rec.lagkv.enabled, rec.lagkv.keep_ratio = True, 0.25
    rec.calibration.text, rec.calibration.max_tokens = "calib.txt", 512
    rec.layers = [LayerRecipe(0, 8, 8, 8, 4), LayerRecipe(1, 4, 8, 2, 16)]
    return rec


def test_recipe_toml_round_trip():
    rec = _full_recipe()
    text = rec.dumps()
    back = recipe_from_dict(tomllib.loads(text))
    assert back == rec
    assert back.dumps() == text
    assert text.lstrip().startswith("schema_version")
    back.validate(SPEC)


def test_recipe_save_and_shipped_default_round_trip(tmp_path):

    rec = _full_recipe()
    rec.save(tmp_path / "r.toml")
    assert load_recipe(tmp_path / "r.toml") == rec
    assert recipe_from_dict({}) == Recipe()


def _layers(rank_k=8, rank_v=8, bits_k=16, bits_v=16):
    return [{"layer": i, "rank_k": rank_k, "rank_v": rank_v, "bits_k": bits_k, "bits_v": bits_v} for i in range(2)]


@pytest.mark.parametrize(("data", "pattern"), [
    ({"lowrank": {"target_ratio": 0}}, r"target_ratio must be in \(0, 1\], got 0"),
    ({"lowrank": {"target_ratio": 1.5}}, r"target_ratio must be in \(0, 1\], got 1.5"),
    ({"layers": _layers(bits_k=9)}, r"layer 0: bits_k must be a code width from 1 to 8 \(an integer, or 1.5 for "
                                    r"method = 'vector'; 16 = off\), got 9"),
    ({"layers": _layers(bits_v=0)}, r"bits_v must be a code width from 1 to 8 .*got 0"),
    ({"layers": _layers(bits_v=2.25)}, r"bits_v must be a code width from 1 to 8 .*got 2.25"),
    ({"quant": {"key_bits": 4, "value_bits": 2.25}}, r"key_bits and value_bits must both be 0 .*got 4 and 2.25"),
    ({"layers": _layers(bits_k=[4])}, r"bits_k is a list; that needs \[quant\] allocation = 'channels'"),
    ({"quant": {"allocation": "channels", "segment": 4}, "layers": _layers(bits_k=[4, 12])},
     r"bits_k entries must be integers from 1 to 8, got \[4, 12\]"),
    ({"quant": {"avg_bits": 0.5}}, r"avg_bits must be in \[1, 8\], got 0.5"),
    ({"quant": {"key_method": "gptq"}}, r"quant key_method must be empty or one of"),
    ({"quant": {"allocation": "channels", "segment": 4}, "layers": _layers(bits_k=[4, 2, 2])},
     r"bits_k: 3 segment bits for 2 segments of 4 in 8 channels"),
    ({"quant": {"allocation": "channels", "segment": 4, "key_rope": "post"}, "layers": _layers(bits_k=[4, 2])},
     r"post-RoPE keys have principal axes only with key_axes = true"),
    ({"quant": {"allocation": "rows"}}, r"allocation must be one of"),
    ({"quant": {"allocation": "channels", "method": "decoquant"}}, r"allocation = 'channels' needs method = 'kivi'"),
    ({"quant": {"group_size": 32, "residual_length": 100}}, r"residual_length \(100\).*multiple of group_size \(32\)"),
    ({"schema_version": 2}, r"schema_version 2 is newer.*upgrade"),
    ({"colour": "blue"}, r"unknown recipe key\(s\): colour"),
    ({"lowrank": {"ratio": 0.5}}, r"unknown setting\(s\) in \[lowrank\]: ratio"),
    ({"layers": [{"layer": 0, "rank_k": 8, "rank_v": 8, "bits": 4}]},
     r"unknown setting\(s\) in \[\[layers\]\] entry 1: bits"),
    ({"layers": [{"rank_k": 8, "rank_v": 8}]}, r"\[\[layers\]\] entry 1 is missing layer"),
    ({"quant": {"avg_bits": "three"}}, r"\[quant\] avg_bits must be a number, got 'three'"),
    ({"quant": {"enabled": 1}}, r"\[quant\] enabled must be true or false, got 1"),
    ({"lowrank": {"head_group": 1.5}}, r"\[lowrank\] head_group must be an integer, got 1.5"),
    ({"layers": [{"layer": 0, "rank_k": 8, "rank_v": 8, "bits_k": "4"}]},
     r"\[\[layers\]\] entry 1 bits_k must be a number or a list of integers, got '4'"),
    ({"quant": 4}, r"\[quant\] must be a table"),
    ({"name": 3}, r"recipe name must be a string"),
    ({"lowrank": {"svd": "qr"}}, r"svd must be one of"),
])
def test_impossible_recipes_are_refused(data, pattern):
    with pytest.raises(KVCompressError, match=pattern) as e:
        recipe_from_dict(data)
    assert "\n" not in str(e.value)


def test_rank_above_group_width_is_refused():
    rec = recipe_from_dict({"layers": _layers(rank_k=17)})  # fine without a model...
    with pytest.raises(KVCompressError, match=r"layer 0: rank_k 17 exceeds the head group's width 16"):
        rec.validate(SPEC)  # ...but a 2-head x 8 group is 16 wide
    per_head = recipe_from_dict({"lowrank": {"head_group": 1}, "layers": _layers(rank_v=9)})
    with pytest.raises(KVCompressError, match=r"rank_v 9 exceeds the head group's width 8"):
        per_head.validate(SPEC)


def test_recipe_layer_count_must_match_model():
    rec = recipe_from_dict({"layers": _layers()[:1]})
    with pytest.raises(KVCompressError, match="1 layer entries; the model has 2 layers"):
        rec.validate(SPEC)


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].joinpath("recipes").glob("*.toml")),
                         ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_by_name_and_validates(path):
    rec = load_recipe(path.stem)  # installed as kvcompress.recipes
    rec.validate()
    assert rec.name == path.stem and rec.description


def test_sensitivity_probes_round_trip_through_the_recipes_own_quantizers():
    x = torch.randn(1, 2, 256 + 40, 16, generator=torch.Generator().manual_seed(0))  # a ragged tail of 40
    q = Quant(method="codebook", key_method="kivi", group_size=16, key_group_size=128, probe_bits=3)
    key_probe, value_probe, label = sensitivity_probes(q, 16)  # enabled or not, the probe quantizes
    turn = random_orthogonal(16, PROBE_SEED).float()
    xr = (x @ turn).half().float()  # the store holds float16
    keys = dequantize(quantize(xr[..., :256, :], 3, 128, "tokens"), torch.float32)
    values = cb_decode(cb_encode(xr[..., :256, :], 3, 16, "channels"))
    for probe, head in ((key_probe, keys), (value_probe, values)):
        got = probe(x)
        assert torch.allclose(got[..., :256, :], head @ turn.T, atol=1e-5)
        assert torch.allclose(got[..., 256:, :], xr[..., 256:, :] @ turn.T, atol=1e-5)  # the tail stays 16-bit
    assert label.startswith("3-bit") and "codebook" in label and "rotated" in label
    plain = sensitivity_probes(Quant(rotation="none", probe_bits=2), 16)[0](x)
    assert torch.allclose(plain[..., :32, :], dequantize(quantize(x[..., :32, :].half().float(), 2, 32, "tokens"),
                                                         torch.float32))


def test_probe_bits_outside_1_to_8_are_refused():
    rec = Recipe()
    rec.quant.probe_bits = 9
    with pytest.raises(KVCompressError, match="probe_bits"):
        rec.validate()
