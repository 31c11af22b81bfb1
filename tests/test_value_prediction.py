"""Values predicted from the same layer's keys: the fit, the inverse RoPE, export, and the closed-loop cache."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import run_cli
from safetensors import safe_open
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import kvcompress
from kvcompress.analysis.analyze import analyze
from kvcompress.analysis.calibration import layer_statistics
from kvcompress.checkpoint.export import export
from kvcompress.checkpoint.manifest import MANIFEST_NAME
from kvcompress.compat import CACHE_ARG
from kvcompress.errors import KVCompressError
from kvcompress.kernels.lowrank_rope import pair_order
from kvcompress.memory import compressed_bytes_per_token
from kvcompress.methods.rotation import key_rotations, turn_keys
from kvcompress.methods.value_prediction import HeldPrediction, PredictorMoments, ValuePredictor, fit
from kvcompress.recipe import recipe_from_dict
from kvcompress.sources import open_source

pytestmark = pytest.mark.usefixtures("one_thread")


def _recipe(**quant):
    return recipe_from_dict({
        "name": "predicted", "lowrank": {"enabled": False, "head_group": 1},
        "calibration": {"max_tokens": 256, "seq_len": 64},
        "quant": {"enabled": True, "method": "vector", "key_method": "kivi", "key_rope": "post",
                  "key_bits": 4, "value_bits": 2, "group_size": 16, "key_group_size": 16, "residual_length": 16,
                  "sink": 2, "predict_values": True, **quant}})


def test_fit_recovers_an_exact_linear_map_from_the_sums():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=gen, dtype=torch.float64)
    w_k = torch.randn(8, 12, generator=gen, dtype=torch.float64)
    m = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    k = x @ w_k.T + 0.5  # keys with a bias: the intercept column absorbs it
    v_down = m @ w_k  # value latents m·(k − 0.5), exactly linear in the keys
    a = fit(PredictorMoments.measure(x, k), v_down, ridge=0.0)
    torch.testing.assert_close(a[:, :-1], m)
    torch.testing.assert_close(a[:, -1], -0.5 * m.sum(dim=1))
    shrunk = fit(PredictorMoments.measure(x, k), v_down, ridge=1.0)
    assert shrunk[:, :-1].norm() < 0.9 * m.norm()  # the ridge shrinks the map


def _phase_table(freqs: torch.Tensor):
    """A ``phases`` callable for :class:`ValuePredictor`: ``e^{i n θ}`` ``[T, d/2]`` at positions ``n``."""
    return lambda positions: torch.polar(torch.ones(len(positions), len(freqs)), positions[:, None] * freqs)


def test_pre_rope_undoes_rope_and_the_key_turn():
    gen = torch.Generator().manual_seed(1)
    b, heads, t, d, start = 2, 4, 7, 16, 3
    pre = torch.randn(b, heads, t, d, generator=gen)
    freqs = torch.rand(d // 2, generator=gen)
    angles = torch.arange(start, start + t)[:, None] * freqs
    cos, sin = angles.cos().repeat(1, 2).expand(b, t, d), angles.sin().repeat(1, 2).expand(b, t, d)
    post, _ = apply_rotary_pos_emb(pre, pre, cos, sin)  # what attention caches, before the turn
    rot = key_rotations(0, heads, d).float()
    grouped = post.transpose(1, 2).reshape(b, t, 2, 2, d).transpose(1, 2)  # 2 latent groups of 2 heads
    stored = turn_keys(grouped, rot).reshape(b, 2, t, 2 * d)
    phases = _phase_table(freqs)
    weight = torch.randn(6, heads * d + 1, generator=gen)
    for k_rot, keys in ((rot, stored), (None, post.transpose(1, 2).reshape(b, t, 2, 2 * d).transpose(1, 2))):
        predictor = ValuePredictor(weight, phases, k_rot, d)
        got = predictor.pre_rope(keys, start)
        torch.testing.assert_close(got, pair_order(pre, d), atol=1e-5, rtol=1e-5)
        flat = pre.transpose(1, 2).reshape(b * t, heads * d)  # the model's channel order, as A was fitted
        want = (flat @ weight[:, :-1].T + weight[:, -1]).view(b, t, 2, 3).transpose(1, 2)
        torch.testing.assert_close(predictor(keys, start), want, atol=1e-4, rtol=1e-4)


def test_attend_is_the_weighted_sum_of_the_predictions():
    gen = torch.Generator().manual_seed(2)
    b, groups, g, t, d, r, q = 2, 3, 1, 9, 8, 5, 4
    weight = torch.randn(groups * r, groups * g * d + 1, generator=gen)
    freqs = torch.rand(d // 2, generator=gen)
    phases = _phase_table(freqs)
    predictor = ValuePredictor(weight, phases, key_rotations(3, groups * g, d).float(), d)
    keys = torch.randn(b, groups, t, g * d, generator=gen)
    probs = torch.rand(b, groups, q, t, generator=gen)
    want = probs @ predictor(keys, 5)  # each group's rows weigh that group's predicted latents
    torch.testing.assert_close(predictor.attend(probs, keys, 5), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2", "qwen3"])
def test_predictor_sums_use_the_keys_attention_sees_before_rope(tiny_factory, name):
    tiny = tiny_factory(name)
    ids = torch.randint(4, 400, (2, 24), generator=torch.Generator().manual_seed(2))
    _, _, got = layer_statistics(open_source(tiny.path), ids, grams=False, key_group=0, predict=True)
    attn = tiny.model.model.layers[0].self_attn
    captured = {}
    hooks = [tiny.model.model.layers[0].input_layernorm.register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("x", out))]
    with torch.no_grad():
        tiny.model(ids)
    for h in hooks:
        h.remove()
    x = captured["x"]
    k = attn.k_proj(x).view(*x.shape[:2], -1, attn.head_dim)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    want = PredictorMoments.measure(x, k.detach())
    assert len(got) == tiny.config.num_hidden_layers
    torch.testing.assert_close(got[0].keys, want.keys, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[0].inputs, want.inputs, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("quant, pattern", [
    ({"key_rope": "pre"}, "predict_values needs"),
    ({"key_bits": 0, "value_bits": 0}, "predict_values needs"),
    ({"enabled": False}, "predict_values needs"),
])
def test_impossible_predicted_recipes_are_refused_in_one_line(quant, pattern):
    with pytest.raises(KVCompressError, match=pattern) as err:
        _recipe(**quant).validate()
    assert "\n" not in str(err.value)


def test_predicting_with_lagkv_is_refused():
    recipe = _recipe()
    recipe.lagkv.enabled = True
    with pytest.raises(KVCompressError, match="no \\[lagkv\\]"):
        recipe.validate()


@pytest.fixture
def predicted(llama_gqa, tmp_path):
    out = tmp_path / "ckpt"
    export(open_source(llama_gqa.path), out, _recipe(), dtype="float32")
    return out


def test_export_writes_v_pred_and_the_manifest_says_so(predicted, llama_gqa):
    manifest = json.loads((predicted / MANIFEST_NAME).read_text())
    cfg = llama_gqa.config
    assert all(lay["predicts_values"] for lay in manifest["layers"])
    shard = next(predicted.glob("*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        names = [n for n in f.keys() if n.endswith("v_pred")]  # noqa: SIM118 (safe_open is not iterable)
        shape = tuple(f.get_slice(names[0]).get_shape())
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert len(names) == cfg.num_hidden_layers
    assert shape == (cfg.num_key_value_heads * head_dim, cfg.num_key_value_heads * head_dim + 1)
    model, _ = kvcompress.load(predicted)
    assert all(m.v_pred is not None for m in model.modules() if hasattr(m, "v_pred"))


def _stream(model, ids, block=16):
    cache = kvcompress.make_cache(model)
    with torch.no_grad():
        for s in range(0, ids.shape[1], block):
            model(ids[:, s:s + block], position_ids=torch.arange(s, min(s + block, ids.shape[1]))[None],
                  **{CACHE_ARG: cache})
    return cache


def test_codes_hold_the_residual_and_reads_add_the_prediction_back(predicted, llama_gqa):
    model, _ = kvcompress.load(predicted)
    ids = torch.randint(4, 400, (1, 56), generator=torch.Generator().manual_seed(5))
    captured = []
    attn = next(m for m in model.modules() if hasattr(m, "v_pred"))
    hook = attn.v_down.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    cache = _stream(model, ids)
    hook.remove()
    layer = cache.layers[0]
    values, keys = layer.value_store, layer.key_store
    assert values.quantized_length == 48  # 3 blocks of 16 coded, 8 tokens in the window
    exact = torch.cat(captured, dim=1).view(1, 56, -1, values.shape[-1]).transpose(1, 2)  # [B, G, T, r_v]
    with torch.no_grad():
        held = layer._read("dense", exact, attn.value_predictor()).values
        prediction = attn.value_predictor()(keys.read()[..., 2:48, :], 2)
    codes_only = values.read()
    torch.testing.assert_close(held[..., 2:48, :], codes_only[..., 2:48, :] + prediction)
    torch.testing.assert_close(held[..., :2, :], exact[..., :2, :].half().float())  # the sink's copies
    # closed loop: the codes' error is the read's error, and predicting lowers it against plain codes
    err = (held[..., 2:48, :] - exact[..., 2:48, :]).square().sum()
    plain = kvcompress.make_cache(model)  # the same stores, fed without the predictor
    for s in range(0, 48, 16):
        plain.layers[0].value_store.append(exact[..., s:s + 16, :])
        plain.layers[0].value_store.flush(s + 16)
    plain_err = (plain.layers[0].value_store.read()[..., 2:48, :] - exact[..., 2:48, :]).square().sum()
    assert err < 0.9 * plain_err  # 0.82 here: this random layer's keys see a quarter of its input


def test_decode_reads_the_same_values_as_the_dense_path(predicted, monkeypatch):
    model, _ = kvcompress.load(predicted)
    ids = torch.randint(4, 400, (1, 50), generator=torch.Generator().manual_seed(6))
    cache = _stream(model, ids[:, :48])
    folded = []  # the one-token step adds the prediction's weighted sum, not a prediction per token
    attend = HeldPrediction.attend
    monkeypatch.setattr(HeldPrediction, "attend", lambda self, *a: folded.append(self.stop) or attend(self, *a))
    with torch.no_grad():
        step = model(ids[:, 48:49], position_ids=torch.tensor([[48]]), **{CACHE_ARG: cache}).logits[0, -1]
    assert folded and set(folded) == {48}  # every predicted layer, over its 48 coded tokens
    again = _stream(model, ids[:, :48])
    with torch.no_grad():  # two query rows: the generic dense path, not the one-token decode path
        both = model(ids[:, 48:50], position_ids=torch.tensor([[48, 49]]), **{CACHE_ARG: again}).logits[0, 0]
    torch.testing.assert_close(step, both, atol=2e-4, rtol=1e-4)


def test_prediction_adds_no_bytes_per_token(predicted, llama_gqa):
    model, _ = kvcompress.load(predicted)
    ids = torch.randint(4, 400, (1, 64), generator=torch.Generator().manual_seed(7))
    cache = _stream(model, ids)
    spec = open_source(llama_gqa.path).spec
    plan = model.kvcompress_plan
    unpredicted = dataclasses.replace(plan, layers=tuple(
        dataclasses.replace(lay, predicts_values=False) for lay in plan.layers))
    want = compressed_bytes_per_token(spec, plan, 64) * 64
    assert cache.kv_bytes() == pytest.approx(want)
    assert compressed_bytes_per_token(spec, unpredicted, 64) * 64 == want


def test_positions_that_do_not_count_from_zero_are_refused(predicted):
    model, _ = kvcompress.load(predicted)
    cache = kvcompress.make_cache(model)
    ids = torch.randint(4, 400, (1, 8), generator=torch.Generator().manual_seed(8))
    with torch.no_grad(), pytest.raises(KVCompressError, match="positions must count"):
        model(ids, position_ids=torch.arange(5, 13)[None], **{CACHE_ARG: cache})
    padded = torch.ones(2, 8, dtype=torch.long)
    padded[0, :3] = 0
    with torch.no_grad(), pytest.raises(KVCompressError, match="no padding"):
        model.generate(ids.expand(2, -1), attention_mask=padded, max_new_tokens=2, do_sample=False)


def test_export_of_a_recipe_with_layers_fits_the_same_predictor(predicted, llama_gqa, tmp_path):
    source = open_source(llama_gqa.path)
    filled = _recipe()
    filled.layers = analyze(source, source.tokenizer(), _recipe()).recipe.layers
    export(source, tmp_path / "filled", filled, dtype="float32")
    a, _ = kvcompress.load(predicted)
    b, _ = kvcompress.load(tmp_path / "filled")
    pairs = [(x.v_pred, y.v_pred) for x, y in zip(a.modules(), b.modules(), strict=True)
             if getattr(x, "v_pred", None) is not None]
    assert len(pairs) == llama_gqa.config.num_hidden_layers
    assert all(torch.equal(x, y) for x, y in pairs)


def test_inspect_counts_the_predicted_layers(predicted, llama_gqa):
    result = run_cli("inspect", predicted, "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["values_predicted_from_keys"] == llama_gqa.config.num_hidden_layers


def test_stock_generate_runs_through_the_predicted_cache(predicted):
    model, _ = kvcompress.load(predicted)
    ids = torch.randint(4, 400, (1, 40), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
        cache = kvcompress.make_cache(model)
        again = model.generate(ids, max_new_tokens=8, do_sample=False, past_key_values=cache)
    assert out.shape == (1, 48) and torch.equal(out, again)
    assert cache.layers[0].value_store.quantized_length == 32  # two blocks of 16 coded as residuals
