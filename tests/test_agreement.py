"""KL divergence and top-1 agreement against the uncompressed model, through both caches, by position."""

from __future__ import annotations

import itertools
import math
from functools import partial

import pytest
import torch
from transformers import DynamicCache

import kvcompress
from kvcompress.checkpoint.export import export
from kvcompress.evaluate.perplexity import agreement, blocked_perplexity, compare, position_edges
from kvcompress.recipe import Recipe
from kvcompress.sources import open_source

pytestmark = pytest.mark.usefixtures("one_thread")


def _export(tiny, out, **quant):
    rec = Recipe()
    rec.lowrank.target_ratio = 1.0  # full rank: the latents hold K and V exactly
    rec.calibration.max_tokens, rec.calibration.seq_len = 128, 64
    for key, value in quant.items():
        setattr(rec.quant, key, value)
    export(open_source(tiny.path), out, rec, dtype="float32")
    return kvcompress.load(out)[0]


def _ids(n=200, seed=0):
    return torch.randint(4, 500, (1, n), generator=torch.Generator().manual_seed(seed))


def test_position_edges_split_the_window():
    assert position_edges(8192) == [0, 1024, 2048, 4096, 8192]
    assert position_edges(2048) == [0, 256, 512, 1024, 2048]
    assert position_edges(4) == [0, 1, 2, 4]  # short windows merge equal edges


def test_a_cache_that_stores_exactly_has_kl_0_and_agreement_1(llama_gqa, tmp_path):
    model = _export(llama_gqa, tmp_path / "exact")
    base = llama_gqa.model.eval()
    result = agreement(model, base, _ids(), partial(kvcompress.make_cache, model),
                       lambda: DynamicCache(config=base.config), context=96, block=16)
    assert result.kl == pytest.approx(0.0, abs=1e-7)
    assert result.top1 == 1.0
    assert result.compressed.ppl == pytest.approx(result.baseline.ppl, rel=1e-5)


def test_buckets_add_up_to_the_whole_and_match_the_perplexities(llama_gqa, tmp_path):
    model = _export(llama_gqa, tmp_path / "q2", enabled=True, avg_bits=2.0, group_size=8, residual_length=8)
    base = llama_gqa.model.eval()
    ids, new, old = _ids(), partial(kvcompress.make_cache, model), lambda: DynamicCache(config=base.config)
    result = agreement(model, base, ids, new, old, context=96, block=16)
    n = sum(b["tokens"] for b in result.buckets)
    assert n == result.compressed.tokens == result.baseline.tokens == 200 - 3  # 3 windows, one unscored token each
    assert [(b["from"], b["to"]) for b in result.buckets] == list(itertools.pairwise(position_edges(96)))
    assert sum(b["kl"] * b["tokens"] for b in result.buckets) / n == pytest.approx(result.kl, rel=1e-9)
    assert sum(b["top1"] * b["tokens"] for b in result.buckets) / n == pytest.approx(result.top1, rel=1e-9)
    assert result.kl > 1e-4 and result.top1 < 1.0  # 2-bit codes do change the distribution
    log_ratio = sum(math.log(b["ppl_ratio"]) * b["tokens"] for b in result.buckets) / n
    assert math.exp(log_ratio) == pytest.approx(result.compressed.ppl / result.baseline.ppl, rel=1e-9)
    # the same perplexities and bytes as each model streamed on its own
    alone = blocked_perplexity(model, ids, new, 96, 16)
    assert result.compressed.ppl == pytest.approx(alone.ppl, rel=1e-6)  # float32 log_softmax vs cross_entropy
    assert result.compressed.kv_bytes_per_token == alone.kv_bytes_per_token
    assert result.baseline.ppl == pytest.approx(blocked_perplexity(base, ids, old, 96, 16).ppl, rel=1e-6)


def test_compare_reports_kl_top1_and_buckets(llama_gqa, tmp_path):
    model = _export(llama_gqa, tmp_path / "q4", enabled=True, avg_bits=4.0, group_size=8, residual_length=8)
    del model
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 37} and {i % 11}" for i in range(400)))
    result = compare(tmp_path / "q4", text, context=64, block=16, max_tokens=150)
    assert result["kl"] >= 0.0 and 0.0 <= result["top1"] <= 1.0
    assert sum(b["tokens"] for b in result["by_position"]) == result["tokens"]
