"""llama.cpp's peer rows: bytes from the cache types, the row skipped cleanly without llama-cpp-python, and
(when it and the shared GGUF are here) perplexity, agreement and speed through its cache."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from kvcompress.evaluate import llamacpp
from kvcompress.evaluate.bench import _llama_rows, skipped_lines
from kvcompress.evaluate.llamacpp import CACHE_TYPES, F16, LLAMA_MISSING, LlamaBench, gguf_file
from kvcompress.memory import baseline_bytes_per_token
from kvcompress.sources import open_source

SMOLLM = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "smollm2-135m-instruct-q4_1"


def test_cache_type_bytes_follow_their_block_layouts():
    # SmolLM2-135M: 30 layers, 3 KV heads x 64 = 192 values of K and of V per layer and token
    assert F16.bytes_per_token(30, 192) == 23_040
    assert [kv.bytes_per_token(30, 192) for kv in CACHE_TYPES] == [12_240, 7_920, 6_480]  # 8.5, 5.5, 4.5 bits
    assert [kv.name for kv in CACHE_TYPES] == ["q8_0", "q5_0", "q4_0"]


def test_f16_bytes_are_the_fp16_baseline_of_any_model(llama_gqa):
    spec = open_source(llama_gqa.path).spec
    assert F16.bytes_per_token(spec.num_layers, spec.kv_width) == baseline_bytes_per_token(spec)


def test_gguf_file_is_the_file_or_the_one_in_its_folder(tmp_path):
    assert gguf_file(tmp_path) is None
    (tmp_path / "a.gguf").write_bytes(b"")
    assert gguf_file(tmp_path) == tmp_path / "a.gguf" == gguf_file(tmp_path / "a.gguf")
    (tmp_path / "b.gguf").write_bytes(b"")
    assert gguf_file(tmp_path) is None  # which one would be a guess
    assert gguf_file(tmp_path / "missing") is None


class _Measure:
    """What ``_llama_rows`` reads of ``bench``'s measurer, for rows that are skipped before any run."""

    s = None


def test_rows_are_one_error_row_when_llama_cpp_python_is_absent(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as on a fresh install of .[dev]
    assert not llamacpp.installed()
    (tmp_path / "m.gguf").write_bytes(b"")
    (row,) = _llama_rows(_Measure(), str(tmp_path), None, torch.device("cpu"))
    assert row == {"name": "llama.cpp", "kind": "peer", "cache": {"backend": "llama.cpp"}, "error": LLAMA_MISSING}
    assert skipped_lines([row]) == [f"llama.cpp skipped: {LLAMA_MISSING}"]


def test_rows_say_why_when_the_model_is_not_gguf_or_the_bench_is_not_on_the_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(llamacpp, "installed", lambda: True)
    (row,) = _llama_rows(_Measure(), str(tmp_path), None, torch.device("cpu"))
    assert "MODEL is not one" in row["error"]
    (tmp_path / "m.gguf").write_bytes(b"")
    (row,) = _llama_rows(_Measure(), str(tmp_path), None, torch.device("cuda"))
    assert row["error"] == "llama.cpp runs on the CPU here, and this bench runs on cuda"


@pytest.fixture(scope="module")
def smollm_gguf():
    pytest.importorskip("llama_cpp")
    found = gguf_file(SMOLLM)
    if found is None:
        pytest.skip(f"shared SmolLM2 GGUF not found at {SMOLLM}")
    return found


def _bench(gguf: Path, ids: torch.Tensor | None, speed: bool) -> LlamaBench:
    spec = open_source(gguf).spec
    prompt = torch.randint(100, 30000, (1, 64), generator=torch.Generator().manual_seed(0)) if speed else None
    return LlamaBench(gguf, spec.num_layers, spec.kv_width, ids, 192, 64, prompt, [32, 64], 4, 1,
                      lambda *_: None)


def test_llama_rows_measure_each_cache_type_against_f16(smollm_gguf):
    source = open_source(smollm_gguf)
    text = " ".join(["Tom and his sister went to the park to see the ducks in the pond."] * 40)
    ids = source.tokenizer()(text, return_tensors="pt").input_ids[:, :400]
    rows = _bench(smollm_gguf, ids, speed=True).rows()
    assert [r["name"] for r in rows] == ["llama.cpp f16 K/V", "llama.cpp q8_0 K/V", "llama.cpp q5_0 K/V",
                                         "llama.cpp q4_0 K/V"]
    f16, *quantized = rows
    assert f16["kv_bytes_per_token"] == 23_040 and 1 < f16["ppl"] < 50  # a repeated sentence: easy text
    assert f16["ppl_tokens"] == 399 - 2  # windows of 192: 191 + 191 + 15 predicted tokens
    for row, kv in zip(quantized, CACHE_TYPES, strict=True):
        assert row["kv_bytes_per_token"] == kv.bytes_per_token(30, 192)
        assert row["reference_ppl"] == pytest.approx(f16["ppl"], rel=1e-6)  # the same f16 run each time
        assert 0 <= row["kl"] < 0.1 and 0.8 < row["top1"] <= 1
        assert sum(b["tokens"] for b in row["by_position"]) == row["ppl_tokens"]  # buckets add up to the whole
        for sp in row["speed"].values():
            assert sp["decode_tokens_per_second"] > 0 and 0 < sp["decode_ratio"] < 10 and sp["runs"] == 1
    assert quantized[-1]["kl"] > quantized[0]["kl"]  # 4.5 bits per value moves the logits more than 8.5 do
    assert set(f16["speed"]) == {"32", "64"}
    assert f16["speed"]["64"]["runs"] == 3  # one f16 run beside each type, no warm-up pair


def test_llama_f16_against_itself_agrees_exactly(smollm_gguf, monkeypatch):
    monkeypatch.setattr(llamacpp, "CACHE_TYPES", (F16,))  # f16 measured against f16
    source = open_source(smollm_gguf)
    ids = source.tokenizer()("Once upon a time there was a little dog. " * 20, return_tensors="pt").input_ids
    (_, same) = _bench(smollm_gguf, ids[:, :200], speed=False).rows()
    assert same["kl"] == pytest.approx(0, abs=1e-6) and same["top1"] == 1.0
    assert same["ppl"] == pytest.approx(same["reference_ppl"], rel=1e-6)
