"""``kvcompress generate``'s report: KV bytes against an fp16 cache of the same model, and the residual window."""

from __future__ import annotations

import pytest
from conftest import build_tiny, run_cli

import kvcompress
from kvcompress.checkpoint.export import export
from kvcompress.memory import baseline_bytes_per_token
from kvcompress.recipe import Recipe
from kvcompress.runtime.generation import generate
from kvcompress.sources import ModelSpec, open_source

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tiny = build_tiny("llama_gqa", root / "src", seed=3)
    rec = Recipe(name="q4")
    rec.lowrank.enabled = False
    rec.quant.enabled, rec.quant.avg_bits, rec.quant.group_size, rec.quant.residual_length = True, 4.0, 8, 16
    rec.calibration.max_tokens, rec.calibration.seq_len = 128, 64
    export(open_source(tiny.path), root / "ckpt", rec, dtype="float32")
    return root / "ckpt"


@pytest.mark.parametrize(("words", "new"), [(3, 4), (60, 8)])
def test_report_counts_the_window_and_compares_with_fp16(quantized, words, new):
    model, tok = kvcompress.load(quantized)
    report = generate(model, tok, " ".join(["the cat sat"] * words), max_new_tokens=new)
    seen = report.prompt_tokens + report.generated_tokens - 1  # the last token is never fed back
    spec = ModelSpec.from_config(model.config.to_dict())
    assert report.held_tokens == seen  # no eviction
    assert report.kv_bytes_fp16 == seen * baseline_bytes_per_token(spec)
    assert report.window_tokens == seen % 16  # flushed in whole blocks of the 16-token window
    assert report.to_json()["x_smaller_than_fp16"] == pytest.approx(report.kv_bytes_fp16 / report.kv_bytes)


def test_cli_says_when_the_window_dominates(quantized):
    short = run_cli("generate", quantized, "--prompt", "the cat", "--max-new-tokens", "3")
    assert short.exit_code == 0, short.stderr
    assert "smaller than an fp16 cache of this model" in short.stdout
    assert "still in the 16-bit residual window" in short.stdout
    long = run_cli("generate", quantized, "--prompt", " ".join(["the cat sat"] * 60), "--max-new-tokens", "3")
    assert long.exit_code == 0 and "residual window" not in long.stdout
    assert long.stdout.startswith("the cat sat")  # the prompt is echoed before the generated text
