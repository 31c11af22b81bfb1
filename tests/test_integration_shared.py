"""Integration tests on the real pretrained models in ``../shared`` (skipped when that folder is absent)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHARED, SMOLLM

import kvcompress
from kvcompress.analysis.analyze import analyze
from kvcompress.checkpoint.export import export
from kvcompress.recipe import Recipe
from kvcompress.sources import GGUFSource, ModelSpec, open_source

STORIES = SHARED / "models" / "stories260k"
TINYSTORIES = SHARED / "data" / "tinystories" / "tinystories-valid-excerpt.txt"

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread", "shared_models")]


@pytest.fixture(scope="module")
def shared_models():
    if not (STORIES / "config.json").is_file():
        pytest.skip(f"shared models not found at {SHARED}")


def _recipe(ratio: float) -> Recipe:
    rec = Recipe()
    rec.lowrank.schedule, rec.lowrank.target_ratio = "progressive", ratio  # LoRC: ranks never grow with depth
    if TINYSTORIES.is_file():
        rec.calibration.text = str(TINYSTORIES)  # in-domain calibration text
    rec.calibration.max_tokens = 512
    return rec


@pytest.fixture(scope="module")
def stories_exports(tmp_path_factory):
    """``get(ratio)`` -> (checkpoint folder, loaded model, tokenizer)."""
    root = tmp_path_factory.mktemp("stories")
    cache = {}

    def get(ratio: float):
        if ratio not in cache:
            out = root / f"r{ratio}"
            export(open_source(STORIES), out, _recipe(ratio), dtype="float32")
            cache[ratio] = (out, *kvcompress.load(out))
        return cache[ratio]

    return get


def test_stories_analyze_half(tmp_path):
    source = open_source(STORIES)
    assert source.spec.num_layers == 5 and source.spec.kv_width == 32
    rec = _recipe(0.5)
    rec.quant.avg_bits = 3.5  # not a width every stream can get: the sensitivity pass runs
    result = analyze(source, source.tokenizer(), rec, sensitivity=True)
    js = result.to_json()
    width = js["group_width"]
    assert width == 32 and js["head_group"] == 4
    ranks_k = [row["rank_k"] for row in js["layers"]]
    ranks_v = [row["rank_v"] for row in js["layers"]]
    assert ranks_k == sorted(ranks_k, reverse=True) and ranks_v == sorted(ranks_v, reverse=True)
    assert all(r % 8 == 0 and 8 <= r <= width for r in ranks_k + ranks_v)
    assert abs(sum(ranks_k) / len(ranks_k) / width - 0.5) <= 8 / width
    assert js["compression_ratio"] > 1.5
    assert all(row["sensitivity"] > 0 for row in js["layers"])
    assert rec.layers and [lay.rank_k for lay in rec.layers] == ranks_k


def test_stories_export_load_generate(stories_exports):
    out, model, tok = stories_exports(0.5)
    manifest = json.loads((out / "kvcompress.json").read_text())
    assert manifest["model_type"] == "llama" and len(manifest["layers"]) == 5
    prompt = tok("Once upon a time, there was a little girl", return_tensors="pt")
    n = prompt.input_ids.shape[1]
    with torch.no_grad():
        ids = model.generate(**prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert ids.shape == (1, n + 8)
    assert torch.equal(ids[0, :n], prompt.input_ids[0])
    assert tok.decode(ids[0, n:]).strip()


def test_stories_full_rank_matches_source(stories_exports):
    from transformers import AutoModelForCausalLM

    _, model, tok = stories_exports(1.0)
    ref = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32, use_kernels=False).eval()
    prompt = tok("The little dog ran to the park and", return_tensors="pt")
    with torch.no_grad():
        assert (ref(**prompt).logits - model(**prompt, use_cache=False).logits).abs().max() < 1e-4
        got = model.generate(**prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        want = ref.generate(**prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.skipif(not TINYSTORIES.is_file(), reason="tinystories excerpt absent")
def test_stories_half_rank_keeps_the_model_usable(stories_exports):
    """At half the K/V width the pretrained model must still predict TinyStories text (not collapse)."""
    from transformers import AutoModelForCausalLM

    _, model, tok = stories_exports(0.5)
    ref = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32, use_kernels=False).eval()
    text = TINYSTORIES.read_text()[-3000:]  # the calibration used the start of the file
    ids = tok(text, return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        base = ref(ids, labels=ids).loss.item()
        comp = model(ids, labels=ids, use_cache=False).loss.item()
    assert base < comp < base + 1.0, (base, comp)


@pytest.mark.skipif(not SMOLLM.is_dir(), reason="SmolLM2 GGUF absent")
def test_gguf_source_spec_and_tensor():
    src = open_source(SMOLLM)
    assert isinstance(src, GGUFSource)
    assert src.spec == ModelSpec(model_type="llama", num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3,
                                 head_dim=64, rope_theta=100000.0, attention_bias=False, qk_norm=False)
    k = src.tensor("model.layers.0.self_attn.k_proj.weight")
    assert k.shape == (192, 576) and k.dtype == torch.float32
    assert torch.isfinite(k).all() and k.abs().sum() > 0
