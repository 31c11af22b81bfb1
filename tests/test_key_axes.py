"""Post-RoPE keys in the queries' principal axes: moments, axes, water-filled bits, export and runtime."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import SMOLLM, VOCAB_TEXT
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import kvcompress
from kvcompress.analysis.analyze import analyze
from kvcompress.analysis.calibration import builtin_text, calibration_ids, layer_statistics
from kvcompress.checkpoint.export import export
from kvcompress.checkpoint.manifest import MANIFEST_NAME
from kvcompress.compat import CACHE_ARG
from kvcompress.errors import KVCompressError
from kvcompress.memory import compressed_bytes_per_token
from kvcompress.methods import make_store
from kvcompress.methods.codebook import CodebookStore
from kvcompress.methods.key_axes import KeyMoments, query_axes, segment_bits
from kvcompress.methods.rotation import random_orthogonal
from kvcompress.plan import build_plan
from kvcompress.recipe import LayerRecipe, load_recipe, recipe_from_dict, shipped_recipe_path
from kvcompress.sources import ModelSpec, open_source

pytestmark = pytest.mark.usefixtures("one_thread")


def test_moments_group_queries_by_kv_head_and_centre_keys_per_group():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 10, 6, generator=gen), torch.randn(2, 2, 10, 6, generator=gen) + 3.0
    m = KeyMoments.measure(q, k, group=4)  # 2 whole groups of 4 tokens; the last 2 tokens are left out
    qh = q[:, 2:4].reshape(-1, 6).double()  # query heads 2 and 3 read KV head 1
    kh = k[:, 1, :8].double().reshape(2, 2, 4, 6)
    kh = (kh - kh.mean(dim=2, keepdim=True)).reshape(-1, 6)
    assert m.counts == (2 * 2 * 10, 2 * 8)
    torch.testing.assert_close(m.queries[1], qh.T @ qh)
    torch.testing.assert_close(m.keys[1], kh.T @ kh)


def test_axes_are_orthonormal_and_sorted_by_query_times_key_energy():
    d = 6
    basis = random_orthogonal(d, 3)
    # the queries' eigenvalues (descending) and the keys' energies along the same axes
    eq = torch.tensor([9.0, 4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    ek = torch.tensor([0.1, 1.0, 5.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    cq, ck = basis @ torch.diag(eq) @ basis.T, basis @ torch.diag(ek) @ basis.T
    rot, w = query_axes(KeyMoments(cq[None], ck[None], (1, 1)))
    torch.testing.assert_close(rot[0] @ rot[0].T, torch.eye(d, dtype=torch.float64))
    expected = (eq * ek).sort(descending=True)
    torch.testing.assert_close(w[0], expected.values)
    # each axis is the basis vector of its weight, up to sign
    cos = (rot[0] @ basis).abs()
    assert torch.equal(cos.argmax(dim=1), expected.indices)
    assert cos.max(dim=1).values.min() > 1 - 1e-9


def test_axes_refuse_empty_moments():
    z = torch.zeros(1, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least one query and one whole key group"):
        query_axes(KeyMoments(z, z, (10, 0)))


def test_segment_bits_spend_the_budget_where_the_weight_is():
    w = torch.tensor([64.0] * 8 + [16.0] * 8 + [4.0] * 8 + [1.0] * 8)
    bits = segment_bits(w, 3.0, 8)
    assert sum(bits) * 8 == 3 * 32  # the whole budget, exactly
    assert list(bits) == sorted(bits, reverse=True) and bits[0] > bits[-1]
    half = segment_bits(w, 3.5, 8)
    assert sum(half) * 8 == 3.5 * 32
    assert segment_bits(torch.ones(32), 3.0, 8) == 3  # equal weights: one width


def _logit_error(q: torch.Tensor, k: torch.Tensor, rot: torch.Tensor, bits) -> float:
    """Mean squared ``qᵀ(k̂ − k)`` for KIVI per-channel codes of ``k`` turned by ``rot`` (bits per segment of 4)."""
    turned = k @ rot.T
    store = make_store(bits, 32, "tokens", 32, segment=4)
    store.append(turned[None, None].float())
    store.flush(turned.shape[0])
    err = store.read()[0, 0].double() @ rot - k
    return float(((q @ err.T) ** 2).mean())


def test_water_filled_codes_in_the_query_axes_beat_even_codes_there_and_in_a_random_rotation():
    gen = torch.Generator().manual_seed(1)
    d, t = 16, 256
    basis = random_orthogonal(d, 5)
    scale = torch.logspace(0, -1.5, d, dtype=torch.float64)
    q = (torch.randn(512, d, generator=gen, dtype=torch.float64) * scale) @ basis.T
    k = (torch.randn(t, d, generator=gen, dtype=torch.float64) * scale.flip(0).sqrt()) @ basis.T
    rot, w = query_axes(KeyMoments.measure(q[None, None], k[None, None], 32))
    bits = segment_bits(w[0], 3.0, 4)
    assert not isinstance(bits, int)
    water = _logit_error(q, k, rot[0], tuple(bits))
    even_here = _logit_error(q, k, rot[0], 3)  # the same axes, the same bits spent evenly
    even = _logit_error(q, k, random_orthogonal(d, 9), 3)
    assert water < 0.8 * even_here
    assert water < 0.7 * even


def _hf_post_rope(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's post-RoPE ``(q, k)`` for ``ids``, computed from HF's own projections, norms and RoPE."""
    cfg, captured = model.config, []
    b, t = ids.shape

    def grab(module, args, kwargs):  # the layer's input, through its q/k path
        x, (cos, sin) = kwargs["hidden_states"], kwargs["position_embeddings"]
        q = module.q_proj(x).view(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = module.k_proj(x).view(b, t, cfg.num_key_value_heads, cfg.head_dim)
        if hasattr(module, "q_norm"):
            q, k = module.q_norm(q), module.k_norm(k)
        captured.append(apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin))

    hooks = [layer.self_attn.register_forward_pre_hook(grab, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return captured


@pytest.mark.parametrize("name", ["llama_gqa", "qwen3"])
def test_layer_statistics_moments_match_the_source_models_own_attention(tiny_factory, name):
    tiny = tiny_factory(name)
    ids = torch.randint(4, 400, (1, 64), generator=torch.Generator().manual_seed(2))
    grams, got, _ = layer_statistics(open_source(tiny.path), ids, grams=False, key_group=16)
    assert grams is None
    captured = _hf_post_rope(tiny.model, ids)
    assert len(got) == len(captured) == tiny.config.num_hidden_layers
    for mine, (q, k) in zip(got, captured, strict=True):
        want = KeyMoments.measure(q, k, 16)
        torch.testing.assert_close(mine.queries, want.queries, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine.keys, want.keys, rtol=1e-4, atol=1e-5)


def test_one_walk_collects_the_grams_and_the_moments_that_separate_walks_do(llama_gqa):
    source = open_source(llama_gqa.path)
    ids = torch.randint(4, 400, (2, 32), generator=torch.Generator().manual_seed(6))
    grams, moments, _ = layer_statistics(source, ids, grams=True, key_group=16)
    alone, none, _ = layer_statistics(source, ids, grams=True, key_group=0)
    assert none is None and len(grams) == len(moments) == llama_gqa.config.num_hidden_layers
    assert all(torch.equal(a, b) for a, b in zip(grams, alone, strict=True))
    _, again, _ = layer_statistics(source, ids, grams=False, key_group=16)
    assert all(torch.equal(a.queries, b.queries) and torch.equal(a.keys, b.keys) and a.counts == b.counts
               for a, b in zip(moments, again, strict=True))
    x = llama_gqa.model.model.layers[0].input_layernorm(llama_gqa.model.model.embed_tokens(ids)).reshape(-1, 64)
    torch.testing.assert_close(grams[0], (x.T @ x).double().detach(), rtol=1e-4, atol=1e-4)


def _hold_in_16_bits(model) -> None:
    """Turn off the loaded model's K/V quantization, keeping its ``k_rot`` (the axes)."""
    model.kvcompress_plan = dataclasses.replace(model.kvcompress_plan, layers=tuple(
        dataclasses.replace(lay, keys=dataclasses.replace(lay.keys, bits=16),
                            values=dataclasses.replace(lay.values, bits=16)) for lay in model.kvcompress_plan.layers))


def _axes_recipe(**quant):
    return recipe_from_dict({
        "name": "axes", "lowrank": {"enabled": False, "head_group": 1},
        "calibration": {"max_tokens": 128, "seq_len": 64},
        "quant": {"enabled": True, "method": "codebook", "key_method": "kivi", "key_rope": "post",
                  "key_axes": True, "segment": 4, "key_bits": 3.5, "value_bits": 3, "group_size": 8,
                  "key_group_size": 16, "residual_length": 16, **quant}})


@pytest.mark.parametrize("name", ["llama_gqa", "qwen3"])
def test_export_writes_the_query_axes_as_k_rot_and_the_model_stays_exact(tiny_factory, tmp_path, name):
    tiny = tiny_factory(name)
    out = tmp_path / "ckpt"
    recipe = _axes_recipe()
    export(open_source(tiny.path), out, recipe, dtype="float32")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["key_axes"] is True
    assert all(isinstance(e["bits_k"], list) and sum(e["bits_k"]) * 4 == 3.5 * 8 for e in manifest["layers"])
    model, tok = kvcompress.load(out)
    ids = calibration_ids(tok, None, 128, 64)
    attn = [m for m in model.modules() if getattr(m, "k_rot", None) is not None]
    assert len(attn) == tiny.config.num_hidden_layers
    heads, group = tiny.config.num_key_value_heads, tiny.config.num_attention_heads // tiny.config.num_key_value_heads
    # HF's own post-RoPE q/k of the calibration text, turned as attention turns them by the loaded k_rot:
    # channel j's logit weight E[q_j²]·Var(k_j) falls along the axes, and the written bits fall with it
    for m, (q, k), entry in zip(attn, _hf_post_rope(tiny.model, ids), manifest["layers"], strict=True):
        rot = m.k_rot.detach().double()  # [kv_heads, d, d]
        qt = torch.einsum("hij,bhgtj->bhgti", rot, q.double().unflatten(1, (heads, group)))
        kt = torch.einsum("hij,bhtj->bhti", rot, k.double()).unflatten(2, (-1, 16))
        w = qt.square().mean(dim=(0, 2, 3)) * (kt - kt.mean(dim=3, keepdim=True)).square().mean(dim=(0, 2, 3))
        assert (w[:, :-1] >= w[:, 1:] * (1 - 1e-6)).all()
        assert (w[:, 0] > 1.5 * w[:, -1]).all()  # the spread the bits are spent on
        assert entry["bits_k"] == sorted(entry["bits_k"], reverse=True) and entry["bits_k"][0] > entry["bits_k"][-1]
    # 16-bit K/V through the axes: the same model (the axes are a rotation)
    _hold_in_16_bits(model)
    ids = torch.randint(4, 400, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = tiny.model(ids).logits
        got = model(ids, **{CACHE_ARG: kvcompress.make_cache(model)}).logits
    assert (ref - got).abs().max() < 1e-4


def test_decode_through_the_water_filled_keys_matches_a_forward_over_the_same_codes(llama_gqa, tmp_path):
    out = tmp_path / "ckpt"
    export(open_source(llama_gqa.path), out, _axes_recipe(), dtype="float32")
    model, _ = kvcompress.load(out)
    ids = torch.randint(4, 400, (1, 49), generator=torch.Generator().manual_seed(4))
    cache = kvcompress.make_cache(model)
    with torch.no_grad():
        model(ids[:, :48], **{CACHE_ARG: cache})  # 3 whole blocks of 16: all quantized, in runs
        keys = cache.layers[0].key_store
        assert keys.quantized_length == 48 and len(keys.runs) == 2
        step = model(ids[:, 48:], **{CACHE_ARG: cache}).logits[0, -1]  # one decode step reads the codes
        # the same codes read back densely: a cache that holds exactly what was read
        held = [(lay.key_store.read(), lay.value_store.read()) for lay in cache.layers]
    held_bytes = cache.kv_bytes()
    want = compressed_bytes_per_token(open_source(llama_gqa.path).spec, model.kvcompress_plan, 49) * 49
    assert held_bytes == pytest.approx(want)
    _hold_in_16_bits(model)
    dense = kvcompress.make_cache(model)
    with torch.no_grad():
        for i, (k, v) in enumerate(held):
            dense.layers[i].step(k[..., :48, :], v[..., :48, :])
        again = model(ids[:, 48:], **{CACHE_ARG: dense}, position_ids=torch.tensor([[48]])).logits[0, -1]
        exact = model(ids).logits[0, -1]  # no codes at all
    gap = (step - again).abs().max()
    assert gap < 2e-3  # the new token's 16-bit rounding in the residual window, nothing else
    assert (step - exact).abs().max() > 10 * gap


def test_export_of_a_recipe_with_layers_measures_the_same_axes(llama_gqa, tmp_path):
    source = open_source(llama_gqa.path)
    export(source, tmp_path / "a", _axes_recipe(), dtype="float32")
    filled = _axes_recipe()
    filled.layers = analyze(source, source.tokenizer(), _axes_recipe()).recipe.layers
    export(source, tmp_path / "b", filled, dtype="float32")
    a, b = (json.loads((tmp_path / x / MANIFEST_NAME).read_text()) for x in "ab")
    assert a["layers"] == b["layers"]
    ma, _ = kvcompress.load(tmp_path / "a")
    mb, _ = kvcompress.load(tmp_path / "b")
    rots = [(x.k_rot, y.k_rot) for x, y in zip(ma.modules(), mb.modules(), strict=True)
            if getattr(x, "k_rot", None) is not None]
    assert rots and all(torch.equal(x, y) for x, y in rots)


def test_segmented_store_holds_runs_of_the_streams_quantizer():
    store = make_store((4, 2), 8, "channels", 16, method="codebook", segment=8)
    x = torch.randn(1, 2, 16, 16)
    store.append(x)
    store.flush(16)
    assert [type(s) for _, s in store.runs] == [CodebookStore, CodebookStore]
    assert [s.bits for _, s in store.runs] == [4, 2]
    err = (store.read() - x).square().mean(dim=(0, 1, 2))
    assert err[:8].mean() < err[8:].mean()  # 4-bit channels are closer than 2-bit ones
    # and a KIVI run holds what a KIVI store of its channels holds
    runs, alone = make_store((4, 2), 8, "tokens", 16, segment=8), make_store(4, 8, "tokens", 16)
    runs.append(x)
    alone.append(x[..., :8])
    runs.flush(16)
    alone.flush(16)
    assert torch.equal(runs.read()[..., :8], alone.read())


@pytest.mark.parametrize(("quant", "pattern"), [
    ({"key_rope": "pre"}, r"key_axes needs key_rope = 'post'"),
    ({"rotation": "none"}, r"key_axes needs key_rope = 'post', rotation = 'orthogonal'"),
    ({"allocation": "channels", "method": "kivi"}, r"allocation = 'stream'"),
    ({"key_axes": False}, r"key_bits any real number in \[1, 8\] with key_axes\), got 3.5 and 3"),
    ({"key_bits": 8.5}, r"key_bits and value_bits must both be 0"),
    ({"key_method": "codebook"}, r"key_axes needs KIVI's per-channel key codes \(key_method = 'kivi'\), "
                                 r"got 'codebook'"),
    ({"key_group_size": 128, "residual_length": 128}, r"whole groups of 128 tokens: \[calibration\] seq_len and "
                                                      r"max_tokens must be at least that, got 64 and 128"),
])
def test_impossible_key_axes_recipes_are_refused(quant, pattern):
    with pytest.raises(KVCompressError, match=pattern) as e:
        _axes_recipe(**quant).validate()
    assert "\n" not in str(e.value)



def test_fractional_layer_bits_are_refused_in_one_line():
    recipe = _axes_recipe()
    recipe.layers = [LayerRecipe(0, 8, 8, 3.5, 3)]  # a width by its form, which no key quantizer stores
    with pytest.raises(KVCompressError, match=r"layer 0: bits_k: kivi codes are 1, 2, 3, 4, 5, 6, 7, 8 bits wide, "
                                              r"got 3.5$") as e:
        build_plan(recipe, ModelSpec("llama", 1, 16, 2, 1, 8, 1e4, False, False))
    assert "\n" not in str(e.value)
    recipe.layers = [LayerRecipe(0, 8, 8, 3.25, 3)]
    with pytest.raises(KVCompressError, match=r"layer 0: bits_k must be a code width from 1 to 8 .*got 3.25"):
        recipe.validate()


def test_analyze_with_quantization_off_ignores_the_key_axes(llama_gqa):
    source = open_source(llama_gqa.path)
    recipe = _axes_recipe(enabled=False)
    layers = analyze(source, source.tokenizer(), recipe).recipe.layers
    assert layers and all(lay.bits_k == 3 and lay.bits_v == 3 for lay in layers)


def test_latent_groups_of_two_heads_spread_each_heads_bits_over_its_own_axes(llama_gqa, tmp_path):
    recipe = _axes_recipe()
    recipe.lowrank.head_group = 2  # both KV heads in one latent: 16 channels, the axes of each head in turn
    out = tmp_path / "ckpt"
    source = open_source(llama_gqa.path)
    export(source, out, recipe, dtype="float32")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    d = llama_gqa.config.head_dim
    for entry in manifest["layers"]:
        bits = entry["bits_k"]
        assert len(bits) == 2 * d // 4 and sum(bits) * 4 == 3.5 * 2 * d
        for head in (bits[:d // 4], bits[d // 4:]):  # each head's segments follow its own sorted axes
            assert head == sorted(head, reverse=True)
    model, _ = kvcompress.load(out)
    ids = torch.randint(4, 400, (1, 49), generator=torch.Generator().manual_seed(5))
    cache = kvcompress.make_cache(model)
    with torch.no_grad():
        got = model(ids, **{CACHE_ARG: cache}).logits
        exact = llama_gqa.model(ids).logits
    assert cache.kv_bytes() == pytest.approx(compressed_bytes_per_token(source.spec, model.kvcompress_plan, 49) * 49)
    assert (got - exact).abs().max() < 0.05  # 3.5-bit keys, 3-bit values: close, not equal
    assert (got - exact).abs().max() > 1e-4


@pytest.mark.skipif(not SMOLLM.is_dir(), reason="shared SmolLM2 absent")
def test_codebook_45x_calibrates_on_distinct_long_sequences_of_the_builtin_text():
    """The post-RoPE moments depend on the positions they are measured at, so `codebook-4.5x` reads
    2048-token sequences; the built-in text must fill them all without repeating itself."""
    from transformers import AutoTokenizer

    cal = load_recipe(shipped_recipe_path("codebook-4.5x")).calibration
    assert cal.text == "" and cal.seq_len >= 2048
    tok = AutoTokenizer.from_pretrained(str(SMOLLM))
    ids = calibration_ids(tok, None, cal.max_tokens, cal.seq_len)
    assert ids.shape == (cal.max_tokens // cal.seq_len, cal.seq_len)
    whole = tok(builtin_text(), add_special_tokens=False, return_tensors="pt", verbose=False).input_ids[0]
    assert whole.numel() >= cal.max_tokens  # no wrap-around: every sequence is new text
    assert torch.equal(ids.flatten(), whole[: ids.numel()])


def test_builtin_text_starts_with_the_text_of_0_1_0():
    # recipes that read fewer tokens than the old text held calibrate exactly as before it grew
    old = VOCAB_TEXT.read_text().rstrip("\n")
    assert builtin_text().startswith(old + "\n\n") and len(builtin_text()) > 10 * len(old)
