"""The kvcompress cache: quantized stores, LagKV eviction and their composition, in isolation and in a model."""

from __future__ import annotations

import pytest
import torch

import kvcompress
from kvcompress.analysis.schedule import greedy
from kvcompress.checkpoint.export import export
from kvcompress.compat import CACHE_ARG
from kvcompress.evaluate.speed import PeakMemory
from kvcompress.memory import compressed_bytes_per_token
from kvcompress.methods import DenseStore, QuantizedStore
from kvcompress.methods.lagkv import max_stored_tokens
from kvcompress.methods.rotation import turn_keys
from kvcompress.plan import Plan, layer_plan
from kvcompress.recipe import LagKV, LayerRecipe, Quant, Recipe
from kvcompress.runtime.cache import KVCompressCache, KVCompressLayer
from kvcompress.sources import open_source


def _feed(layer: KVCompressLayer, total: int, block: int, d_k: int = 16, d_v: int = 8, heads: int = 2,
          batch: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream random K/V through ``layer`` the way attention does (each update evicts after its read); return
    the inputs."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, total, d_k, generator=g).to(dtype)
    values = torch.randn(batch, heads, total, d_v, generator=g).to(dtype)
    for start in range(0, total, block):
        stop = min(total, start + block)
        layer.update(keys[:, :, start:stop], values[:, :, start:stop],
                     {"positions": torch.arange(start, stop).expand(batch, -1)})
    return keys, values


# --------------------------------------------------------------------------- stores


def test_quantized_store_packs_only_settled_whole_blocks():
    store = QuantizedStore(bits=2, group_size=8, along="tokens", block=16)
    x = torch.randn(1, 2, 40, 16)
    store.append(x)
    store.flush(settled=30)  # one whole 16-token block lies within the settled 30
    assert store.quantized_length == 16
    assert store.residual().shape[-2] == 24
    assert torch.equal(store.residual(), x[..., 16:, :].half().float())  # a 16-bit window
    store.flush(settled=40)
    assert store.quantized_length == 32
    assert store.read().shape == x.shape


def test_quantized_store_bytes_are_codes_scales_and_residual():
    store = QuantizedStore(bits=4, group_size=8, along="channels", block=16)
    x = torch.randn(2, 3, 37, 16, dtype=torch.float16)
    store.append(x)
    store.flush(settled=37)
    codes = 2 * 3 * 32 * 16 * 4 // 8
    scales = 2 * 3 * 32 * (16 // 8) * 2 * 2  # fp16 scale and minimum per token per group of 8 channels
    residual = 2 * 3 * 5 * 16 * 2
    assert store.nbytes() == codes + scales + residual


def test_dense_and_quantized_8bit_read_back_close():
    x = torch.randn(1, 2, 64, 16)
    dense, quant = DenseStore(), QuantizedStore(8, 32, "tokens", 32)
    for store in (dense, quant):
        store.append(x)
        store.flush(64)
    assert torch.equal(dense.read(), x)
    assert (quant.read() - x).abs().max() < 0.03


# --------------------------------------------------------------------------- layer: quantization and eviction


@pytest.mark.parametrize("method", ["kivi", "decoquant"])
@pytest.mark.parametrize("key_group", [0, 4])
def test_live_bytes_match_the_memory_formula(key_group, method):
    quant = Quant(enabled=True, method=method, group_size=8, key_group_size=key_group, residual_length=16)
    plan = layer_plan(LayerRecipe(0, 16, 8, 2, 4), quant)
    layer = KVCompressLayer(plan)
    _feed(layer, total=100, block=7, d_k=16, d_v=8, heads=1)  # float32 in: the residual is still 16-bit
    packed = layer.key_store.packed if method == "kivi" else layer.key_store.packed.large
    assert packed.scale.shape[-2] == 96 // (key_group or 8)
    formula = compressed_bytes_per_token(_spec(kv_heads=1, head_dim=16), _plan(plan), context=100)
    assert layer.kv_bytes() == pytest.approx(100 * formula)  # formula counts the int32 positions too


def test_segmented_store_quantizes_each_run_on_its_own():
    from kvcompress.methods import SegmentedStore, make_store

    store = make_store((8, 4, 4, 2), 8, "channels", 16, segment=8)  # runs: 8 ch @ 8 bits, 16 @ 4, 8 @ 2
    assert isinstance(store, SegmentedStore)
    x = torch.randn(1, 2, 40, 32)
    store.append(x)
    store.flush(40)
    assert [(w, s.bits) for w, s in store.runs] == [(8, 8), (16, 4), (8, 2)]
    assert store.quantized_length == 32
    expect = []
    for (width, run), start in zip(store.runs, [0, 8, 24], strict=True):
        alone = QuantizedStore(run.bits, 8, "channels", 16)
        alone.append(x[..., start:start + width])
        alone.flush(40)
        expect.append(alone.read())
        assert alone.nbytes() == run.nbytes()
    assert store.nbytes() == sum(run.nbytes() for _, run in store.runs)
    assert torch.equal(store.read(), torch.cat(expect, dim=-1))
    assert torch.equal(store.residual(), x[..., 32:, :].half().float())
    assert isinstance(make_store((4, 4), 8, "channels", 16, segment=8), QuantizedStore)  # one run: plain store


def test_segmented_layer_bytes_match_the_memory_formula():
    quant = Quant(enabled=True, group_size=4, residual_length=16, allocation="channels", segment=4)
    plan = layer_plan(LayerRecipe(0, 16, 8, [8, 2, 2, 4], [4, 2]), quant)
    layer = KVCompressLayer(plan)
    _feed(layer, total=90, block=9, d_k=16, d_v=8, heads=1)
    formula = compressed_bytes_per_token(_spec(kv_heads=1, head_dim=16), _plan(plan), context=90)
    assert layer.kv_bytes() == pytest.approx(90 * formula)


def test_channel_allocation_export_rotates_within_runs_and_stays_exact(llama_gqa, tmp_path, one_thread):
    from kvcompress.methods import SegmentedStore

    model = _export(llama_gqa, tmp_path, lowrank={"enabled": False},
                    quant={"enabled": True, "allocation": "channels", "segment": 4, "avg_bits": 4.0,
                           "group_size": 4, "residual_length": 4096})
    layers = model.kvcompress_manifest["layers"]
    assert any(isinstance(lay["bits_k"], list) or isinstance(lay["bits_v"], list) for lay in layers)
    ids = torch.randint(4, 300, (1, 20), generator=torch.Generator().manual_seed(11))
    cache = kvcompress.make_cache(model)
    logits = model(input_ids=ids, **{CACHE_ARG: cache}, position_ids=torch.arange(20)[None]).logits
    assert any(isinstance(s, SegmentedStore) for lay in cache.layers for s in (lay.key_store, lay.value_store))
    assert torch.allclose(logits, llama_gqa.model(ids).logits, atol=1e-2)  # every token in the 16-bit window


def _storage(bits_k=16, bits_v=16, group_size=32, residual_length=128, key_group_size=0, method="kivi",
             key_segment=16):
    """One layer's plan from the settings a layer stores by (the ranks play no part in a layer alone)."""
    quant = Quant(enabled=True, method=method, group_size=group_size, key_group_size=key_group_size,
                  residual_length=residual_length, segment=key_segment)
    return layer_plan(LayerRecipe(0, 1, 1, bits_k if isinstance(bits_k, int) else list(bits_k), bits_v), quant)


def _plan(*layers) -> Plan:
    """A one-group plan of these layer plans (what the memory formula reads)."""
    return Plan("llama", "float32", head_group=1, key_rope="pre", key_rotation=False, layers=layers, eviction=None)


def _spec(kv_heads: int, head_dim: int):
    from kvcompress.sources import ModelSpec

    return ModelSpec("llama", 1, 64, kv_heads, kv_heads, head_dim, 1e4, False, False)


@pytest.mark.parametrize("block", [1, 5, 64])
def test_lagkv_layer_memory_is_bounded_and_positions_stay_true(block):
    cfg = LagKV(sink_size=4, lag_size=16, keep_ratio=0.25)
    layer = KVCompressLayer(eviction=cfg)
    keys, _ = _feed(layer, total=150, block=block)
    assert layer.stored_length == max_stored_tokens(150, cfg)
    assert layer.get_seq_length() == 150
    pos = layer.positions
    assert pos.shape[1] == 2  # selection is per head
    assert torch.all(pos[..., 1:] > pos[..., :-1])  # kept tokens stay in order
    assert torch.equal(pos[..., :4], torch.arange(4).expand(1, 2, 4))  # sink kept
    # every kept key is the key that was fed at its recorded position
    stored = layer.key_store.read()
    expected = keys.gather(2, pos.long().unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]))
    assert torch.equal(stored, expected)


def test_eviction_happens_before_quantization():
    cfg = LagKV(sink_size=4, lag_size=16, keep_ratio=0.5)
    layer = KVCompressLayer(layer_plan(LayerRecipe(0, 16, 16, 2, 2), Quant(enabled=True, group_size=8,
                                                                           residual_length=8)), cfg)
    _, values = _feed(layer, total=200, block=3, d_k=16, d_v=16)
    assert layer.stored_length == max_stored_tokens(200, cfg)
    assert 0 < layer.key_store.quantized_length <= layer.settled
    assert layer.value_store.quantized_length == layer.key_store.quantized_length
    # the 16-bit residual holds exactly the tokens fed at the recorded positions (evicted, not yet quantized)
    done = layer.value_store.quantized_length
    pos = layer.positions[..., done:].long()
    expected = values.gather(2, pos.unsqueeze(-1).expand(-1, -1, -1, 16))
    assert layer.value_store.fp.dtype == torch.float16
    assert torch.equal(layer.value_store.residual(), expected.half().float())


def test_a_step_reads_every_new_token_and_evicts_after():
    cfg = LagKV(sink_size=2, lag_size=8, keep_ratio=0.5)
    storage = _storage(bits_k=2, bits_v=2, group_size=8, residual_length=8)
    layer = KVCompressLayer(storage, cfg)
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(1, 2, 60, 16, generator=g), torch.randn(1, 2, 60, 16, generator=g)
    keys, values, positions, valid = layer.update(k, v, {"positions": torch.arange(60)[None]})
    assert keys.shape[-2] == values.shape[-2] == positions.shape[-1] == 60  # the block's queries see it all
    assert valid is None
    torch.testing.assert_close(keys, k, atol=0, rtol=2**-10)  # nothing was packed before: the 16-bit window
    assert layer.stored_length == max_stored_tokens(60, cfg) < 60  # what it holds counts after eviction
    assert layer.key_store.quantized_length == 24  # the settled 2 + 6 * 4 tokens, in whole blocks of 8
    k2, v2 = torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g)
    packed = layer.step(k2, v2, torch.tensor([[60]]), layout="packed")
    assert packed.keys.num_tokens == packed.values.num_tokens == 24
    assert packed.keys.num_tokens + packed.key_residual.shape[-2] == max_stored_tokens(60, cfg) + 1
    assert torch.equal(packed.key_residual[..., -1:, :], k2.half().float())


def test_layers_offer_the_packed_layout_only_for_plain_kivi_stores_without_padding():
    kivi = _storage(bits_k=2, bits_v=4, group_size=8, residual_length=8)
    assert KVCompressLayer(kivi).can_read("packed")
    assert not KVCompressLayer().can_read("packed")  # dense stores
    assert not KVCompressLayer(_storage(bits_k=2, bits_v=2, method="decoquant")).can_read("packed")
    assert not KVCompressLayer(_storage(bits_k=(2, 4), bits_v=2, key_segment=8)).can_read("packed")
    for layout in ("dense", "workspace"):
        assert KVCompressLayer().can_read(layout) and KVCompressLayer(kivi).can_read(layout)
    padded = KVCompressLayer(kivi)
    padded.step(torch.randn(2, 1, 4, 8), torch.randn(2, 1, 4, 8), valid=torch.tensor([[0, 1, 1, 1], [1] * 4]).bool())
    assert not padded.can_read("packed")
    with pytest.raises(ValueError, match="KIVI"):
        padded.step(torch.randn(2, 1, 1, 8), torch.randn(2, 1, 1, 8), layout="packed")


def test_workspace_layout_reads_into_the_shared_buffers():
    kivi = _storage(bits_k=4, bits_v=4, group_size=4, residual_length=4)
    cache = KVCompressCache([kivi, _storage()])
    k, v = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    quantized = cache.layers[0].step(k, v, layout="workspace")
    dense = cache.layers[1].step(k, v, layout="workspace")
    assert quantized.workspace is dense.workspace is not None
    assert quantized.keys.data_ptr() == quantized.workspace.take("keys", (1,), k.dtype, k.device).data_ptr()
    assert dense.keys is k  # a dense store of the compute dtype is read as it is
    assert torch.equal(quantized.keys, k.half().float())  # read before the step's flush: the 16-bit window
    stored = cache.layers[0].key_store.read().clone()  # now 8 tokens packed, 2 in the window
    again = cache.layers[0].step(k[..., :1, :], v[..., :1, :], layout="workspace")
    assert torch.equal(again.keys[..., :10, :], stored)
    assert cache.layers[0].step(k, v).workspace is None


def test_lagkv_padding_tokens_are_evicted_first():
    cfg = LagKV(sink_size=0, lag_size=8, keep_ratio=0.5)
    layer = KVCompressLayer(eviction=cfg)
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 1, 16, 4, generator=g), torch.randn(2, 1, 16, 4, generator=g)
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[1, :4] = False  # sequence 1 is left-padded by 4 tokens
    layer.update(k, v, {"positions": torch.arange(16).expand(2, -1), "valid": valid})
    assert layer.stored_length == 12
    kept_first_chunk = layer.positions[1, 0, :4]
    assert torch.all(kept_first_chunk >= 4)  # the 4 padding tokens were the ones dropped
    assert torch.all(layer.valid[1, 0])


# --------------------------------------------------------------------------- in a model


def _export(tiny, tmp_path, **sections):
    rec = Recipe()
    rec.lowrank.target_ratio = 1.0
    rec.calibration.max_tokens, rec.calibration.seq_len = 256, 128
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(rec, section), key, value)
    out = tmp_path / "ckpt"
    export(open_source(tiny.path), out, rec, dtype="float32")
    return kvcompress.load(out)[0]


def test_8bit_cache_tracks_the_exact_model(llama_gqa, tmp_path, one_thread):
    model = _export(llama_gqa, tmp_path, quant={"enabled": True, "avg_bits": 8.0, "group_size": 8,
                                                "residual_length": 8})
    assert all(lay["bits_k"] == 8 for lay in model.kvcompress_manifest["layers"])
    ids = torch.randint(4, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    cache = kvcompress.make_cache(model)
    for start in range(0, 40, 10):
        logits = model(input_ids=ids[:, start:start + 10], **{CACHE_ARG: cache},
                       position_ids=torch.arange(start, start + 10)[None]).logits
    assert cache.layers[0].key_store.quantized_length == 40
    exact = llama_gqa.model(ids).logits[:, -10:]
    assert (logits - exact).abs().max() < 0.05 * exact.abs().max()


def test_multi_token_forward_after_eviction_matches_token_by_token(llama_gqa, tmp_path, one_thread):
    model = _export(llama_gqa, tmp_path, lagkv={"enabled": True, "sink_size": 2, "lag_size": 8,
                                                "keep_ratio": 0.5})
    ids = torch.randint(4, 300, (2, 45), generator=torch.Generator().manual_seed(0))

    def prefix_cache():
        cache = kvcompress.make_cache(model)
        model(input_ids=ids[:, :36], **{CACHE_ARG: cache}, position_ids=torch.arange(36)[None])
        return cache

    cache = prefix_cache()
    assert cache.layers[0].stored_length < 36  # tokens were evicted (and none will be within the block)
    block = model(input_ids=ids[:, 36:39], **{CACHE_ARG: cache}, position_ids=torch.arange(36, 39)[None]).logits
    cache = prefix_cache()
    single = [model(input_ids=ids[:, i:i + 1], **{CACHE_ARG: cache}, position_ids=torch.tensor([[i]])).logits
              for i in range(36, 39)]
    assert torch.allclose(block, torch.cat(single, dim=1), atol=1e-4)


def test_cache_with_eviction_and_quantization_builds_from_manifest(llama_gqa, tmp_path, one_thread):
    model = _export(llama_gqa, tmp_path, quant={"enabled": True, "avg_bits": 2.0, "group_size": 8,
                                                "residual_length": 8},
                    lagkv={"enabled": True, "sink_size": 2, "lag_size": 8, "keep_ratio": 0.25})
    cache = kvcompress.make_cache(model)
    assert isinstance(cache, KVCompressCache)
    assert cache.layers[0].eviction == LagKV(True, 2, 8, 0.25, 1.0)
    assert cache.layers[0].plan.keys.bits == 2
    out = model.generate(torch.randint(4, 300, (1, 30)), **{CACHE_ARG: cache}, max_new_tokens=20, do_sample=False)
    assert out.shape[1] == 50
    assert cache.layers[0].stored_length == max_stored_tokens(49, cache.layers[0].eviction)
    assert cache.layers[0].key_store.quantized_length > 0


# --------------------------------------------------------------------------- greedy schedule


def test_greedy_meets_the_budget_and_prefers_the_stream_with_more_energy_left():
    flat = torch.ones(32)  # slow decay: needs rank
    steep = torch.tensor([10.0] + [0.01] * 31)  # all energy in one direction
    spectra = [([steep], [flat]), ([steep], [flat])]
    ranks_k, ranks_v = greedy(spectra, width=32, target=0.5, multiple=8)
    assert (sum(ranks_k) + sum(ranks_v)) / (2 * 2 * 32) == pytest.approx(0.5, abs=8 / 32)
    assert all(k == 8 for k in ranks_k) and all(v > 8 for v in ranks_v)
    assert all(r % 8 == 0 and 8 <= r <= 32 for r in ranks_k + ranks_v)


# --------------------------------------------------------------------------- key layout


@pytest.mark.parametrize("key_rope", ["pre", "post"])
def test_both_key_layouts_are_exact_without_compression(llama_gqa, tmp_path, one_thread, key_rope):
    model = _export(llama_gqa, tmp_path, lowrank={"enabled": False}, quant={"key_rope": key_rope})
    ids = torch.randint(4, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    cache = kvcompress.make_cache(model)
    logits = torch.cat([model(input_ids=ids[:, i:i + 6], **{CACHE_ARG: cache},
                              position_ids=torch.arange(i, i + 6)[None]).logits for i in range(0, 24, 6)], dim=1)
    assert torch.allclose(logits, llama_gqa.model(ids).logits, atol=1e-4)
    width = llama_gqa.config.num_key_value_heads * llama_gqa.config.head_dim
    assert cache.layers[0].key_store.read().shape == (2, 1, 24, width)


def test_post_rope_keys_store_the_rotated_keys(llama_gqa, tmp_path, one_thread):
    model = _export(llama_gqa, tmp_path, lowrank={"enabled": False}, quant={"key_rope": "post"})
    ids = torch.randint(4, 300, (1, 10), generator=torch.Generator().manual_seed(4))
    cache = kvcompress.make_cache(model)
    model(input_ids=ids, **{CACHE_ARG: cache}, position_ids=torch.arange(10)[None])
    reference = llama_gqa.model(ids, use_cache=True).past_key_values.layers[0].keys  # rotated, [1, Hkv, 10, d]
    stored = cache.layers[0].key_store.read()  # [1, G, 10, g·d], heads grouped per latent
    stored = stored.view(1, stored.shape[1], 10, -1, reference.shape[-1]).transpose(2, 3).reshape(reference.shape)
    assert torch.allclose(stored, reference, atol=1e-4)


def test_post_rope_key_rotation_is_exact_and_rotates_what_is_cached(llama_gqa, tmp_path, one_thread):
    # QuaRot-style: queries and keys are turned by one orthogonal matrix per KV head after RoPE, so the
    # scores are unchanged (a residual window longer than the text keeps every token in 16 bits)
    model = _export(llama_gqa, tmp_path, lowrank={"enabled": False},
                    quant={"enabled": True, "key_rope": "post", "rotation": "orthogonal", "avg_bits": 8.0,
                           "group_size": 8, "residual_length": 4096})
    assert model.kvcompress_manifest["key_rotation"]
    ids = torch.randint(4, 300, (1, 12), generator=torch.Generator().manual_seed(7))
    cache = kvcompress.make_cache(model)
    logits = model(input_ids=ids, **{CACHE_ARG: cache}, position_ids=torch.arange(12)[None]).logits
    assert torch.allclose(logits, llama_gqa.model(ids).logits, atol=1e-2)
    reference = llama_gqa.model(ids, use_cache=True).past_key_values.layers[0].keys  # [1, Hkv, 12, d]
    rot = model.model.layers[0].self_attn.k_rot  # [Hkv, d, d]
    stored = cache.layers[0].key_store.read().float()  # [1, 1, 12, Hkv·d]
    stored = stored.view(1, 12, rot.shape[0], -1).transpose(1, 2)
    assert torch.allclose(stored, reference @ rot.transpose(-1, -2), atol=1e-2)
    assert not torch.allclose(stored, reference, atol=1e-1)
    assert torch.allclose(rot @ rot.transpose(-1, -2), torch.eye(rot.shape[-1]).expand_as(rot), atol=1e-6)


def test_flushed_residual_window_is_released(llama_gqa, tmp_path, one_thread):
    # after a flush the residual keeps only its remainder allocated, not the whole window it was cut from
    model = _export(llama_gqa, tmp_path, lowrank={"enabled": False},
                    quant={"enabled": True, "avg_bits": 4.0, "group_size": 8, "residual_length": 16})
    cache = kvcompress.make_cache(model)
    ids = torch.randint(4, 300, (1, 100), generator=torch.Generator().manual_seed(5))
    model(input_ids=ids, **{CACHE_ARG: cache}, position_ids=torch.arange(100)[None], logits_to_keep=1)
    for layer in cache.layers:
        for store in (layer.key_store, layer.value_store):
            assert store.quantized_length == 96 and store.fp.shape[-2] == 4
            assert store.fp.untyped_storage().nbytes() == store.fp.numel() * store.fp.element_size()


def test_keys_turn_per_head_without_copying_the_rotations():
    g = torch.Generator().manual_seed(3)
    k = torch.randn(1, 1, 2048, 3, 64, generator=g)  # one latent group of 3 KV heads
    rot = torch.linalg.qr(torch.randn(3, 64, 64, generator=g))[0]
    with PeakMemory(torch.device("cpu")) as mem:
        turned = turn_keys(k, rot)
    expected = torch.stack([k[:, :, :, h] @ rot[h].T for h in range(3)], dim=3)
    torch.testing.assert_close(turned, expected)
    assert mem.peak < 4 * k.numel() * 4  # a copy of each rotation per token would be 64x the keys


@pytest.mark.parametrize("schedule", ["greedy", "uniform"])
def test_post_rope_keys_stay_full_width_while_values_are_factorized(llama_gqa, tmp_path, one_thread, schedule):
    model = _export(llama_gqa, tmp_path, lowrank={"enabled": True, "target_ratio": 0.5, "schedule": schedule,
                                                  "rank_multiple": 4},
                    quant={"key_rope": "post"})
    width = llama_gqa.config.num_key_value_heads * llama_gqa.config.head_dim
    layers = model.kvcompress_manifest["layers"]
    assert all(lay["rank_k"] == width for lay in layers)
    assert sum(lay["rank_v"] for lay in layers) / len(layers) <= 0.5 * width + 4
    ids = torch.randint(4, 300, (1, 16), generator=torch.Generator().manual_seed(8))
    cache = kvcompress.make_cache(model)
    model(input_ids=ids, **{CACHE_ARG: cache}, position_ids=torch.arange(16)[None])
    assert cache.layers[0].key_store.read().shape[-1] == width
    assert cache.layers[0].value_store.read().shape[-1] == layers[0]["rank_v"] < width


def test_post_rope_recipe_refuses_low_rank_keys():
    rec = Recipe()
    rec.quant.key_rope = "post"
    rec.layers = [LayerRecipe(0, rank_k=8, rank_v=8)]
    spec = type("Spec", (), {"num_kv_heads": 2, "head_dim": 8, "num_layers": 1})()
    with pytest.raises(kvcompress.KVCompressError, match="full-width keys; rank_k must be 16"):
        rec.validate(spec)


def test_latent_rotation_is_exact_in_full_precision(llama_gqa, tmp_path, one_thread):
    # with quantization on but a residual window longer than the text, every token stays in the 16-bit
    # window, so the rotated export must reproduce the model up to float16 rounding of the window
    model = _export(llama_gqa, tmp_path, lowrank={"enabled": False},
                    quant={"enabled": True, "rotation": "orthogonal", "avg_bits": 8.0, "group_size": 8,
                           "residual_length": 4096})
    ids = torch.randint(4, 300, (1, 20), generator=torch.Generator().manual_seed(5))
    cache = kvcompress.make_cache(model)
    logits = model(input_ids=ids, **{CACHE_ARG: cache}, position_ids=torch.arange(20)[None]).logits
    assert cache.layers[0].key_store.quantized_length == 0
    assert torch.allclose(logits, llama_gqa.model(ids).logits, atol=1e-2)


def test_rotation_changes_the_stored_latent_not_the_product():
    from kvcompress.methods.rotation import rotate_latent

    down, up = torch.randn(6, 10, dtype=torch.float64), torch.randn(12, 6, dtype=torch.float64)
    r_down, r_up = rotate_latent(down, up, seed=3)
    assert torch.allclose(r_up @ r_down, up @ down)
    assert not torch.allclose(r_down, down)
    assert torch.equal(rotate_latent(down, up, seed=3)[0], r_down)  # seeded: the same export twice


# post-RoPE full-width keys, one latent per KV head: the fused path's layouts
FUSED_LAYOUTS = {
    "kivi": {"enabled": True, "key_rope": "post", "avg_bits": 2.0, "group_size": 8, "residual_length": 8},
    # recipes/codebook-4x.toml in small: 4-bit min-max keys, 3-bit codebook values with a norm per head vector,
    # a sink, a residual window
    "codebook-4x": {"enabled": True, "key_rope": "post", "method": "codebook", "key_method": "kivi", "key_bits": 4,
                    "value_bits": 3, "group_size": 8, "key_group_size": 8, "residual_length": 8, "sink": 2},
}


@pytest.mark.parametrize("layout", sorted(FUSED_LAYOUTS))
def test_packed_decode_kernel_matches_the_torch_path(llama_gqa, tmp_path, one_thread, monkeypatch, layout):
    # the fused path (Triton decode attention over packed codes, the sink's copies and the residual) runs on
    # CUDA only; here the Triton kernel runs in the interpreter on CPU tensors, forced in place of the CUDA check
    from kvcompress.kernels.decode_attention import decode_attention_triton
    from kvcompress.runtime import attention

    model = _export(llama_gqa, tmp_path, lowrank={"enabled": False, "head_group": 1}, quant=FUSED_LAYOUTS[layout])
    ids = torch.randint(4, 300, (1, 30), generator=torch.Generator().manual_seed(6))

    def decode_logits() -> list[torch.Tensor]:
        cache = kvcompress.make_cache(model)
        model(input_ids=ids[:, :20], **{CACHE_ARG: cache}, position_ids=torch.arange(20)[None])
        steps = [model(input_ids=ids[:, i:i + 1], **{CACHE_ARG: cache}, position_ids=torch.tensor([[i]])).logits
                 for i in range(20, 30)]
        assert cache.layers[0].key_store.quantized_length == 24  # packed blocks and a residual both read
        return steps

    with torch.no_grad():
        torch_path = decode_logits()
        calls = []

        def fused(*args):
            calls.append(args[6] is not None)  # a sink handed over
            return decode_attention_triton(*args)

        monkeypatch.setattr(attention, "decode_attention", fused)
        monkeypatch.setattr(attention, "FUSED_DEVICES", ("cpu",))
        kernel_path = decode_logits()
    assert len(calls) == 10 * model.config.num_hidden_layers
    assert set(calls) == {bool(FUSED_LAYOUTS[layout].get("sink"))}
    for a, b in zip(torch_path, kernel_path, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_one_table_picks_the_decode_path(llama_gqa, tmp_path, one_thread, monkeypatch):
    from kvcompress.runtime import attention
    assert [path.name for path in attention.DECODE_PATHS] == ["fused", "workspace", "generic"]
    assert attention.DECODE_PATHS[-1] is attention.GENERIC and all(path.when for path in attention.DECODE_PATHS)
    model = _export(llama_gqa, tmp_path, lowrank={"enabled": False, "head_group": 1}, quant=FUSED_LAYOUTS["kivi"])
    attn, cache = model.model.layers[0].self_attn, kvcompress.make_cache(model)
    layer, one, block = cache.layers[0], torch.zeros(1, 8, 1, 16), torch.zeros(1, 8, 3, 16)

    def picked(q: torch.Tensor, valid: torch.Tensor | None = None, layer=layer) -> str:
        return attn.decode_path(layer, q, valid).name

    assert picked(block) == picked(one, layer=None) == picked(one, torch.ones(1, 1).bool()) == "generic"
    with torch.no_grad():
        assert picked(one) == "workspace"
        assert picked(one.double()) == "generic"
        monkeypatch.setattr(attention, "FUSED_DEVICES", ("cpu",))
        assert picked(one) == "fused"
        assert picked(one, layer=KVCompressLayer()) == "workspace"  # dense stores: nothing packed to read
        decoquant = {"enabled": True, "method": "decoquant", "group_size": 8, "residual_length": 8}
        for quant, path in ((FUSED_LAYOUTS["codebook-4x"], "fused"), (decoquant, "workspace")):
            other = KVCompressLayer(layer_plan(LayerRecipe(0, 16, 8, 4, 4), Quant(**quant)))
            assert picked(one, layer=other) == path, quant
    assert picked(one) == "fused"  # gradients bar only the in-place workspace path
    monkeypatch.undo()
    assert picked(one) == "generic"


WORKSPACE_CASES = {
    "latent keys, 2/4 bits, LagKV": ("llama_gqa", {
        "lowrank": {"target_ratio": 0.6, "head_group": 0},
        "quant": {"enabled": True, "avg_bits": 3.0, "group_size": 8, "key_group_size": 4, "residual_length": 8},
        "lagkv": {"enabled": True, "sink_size": 2, "lag_size": 8, "keep_ratio": 0.5}}),
    "latent keys with bias, one head per latent": ("qwen2", {
        "lowrank": {"target_ratio": 0.7, "head_group": 1},
        "quant": {"enabled": True, "avg_bits": 2.0, "group_size": 8, "residual_length": 8}}),
    "channel runs": ("llama_gqa", {
        "lowrank": {"target_ratio": 0.75},
        "quant": {"enabled": True, "avg_bits": 3.0, "allocation": "channels", "group_size": 8,
                  "residual_length": 8}}),
    "post-RoPE keys, rotated": ("llama_gqa", {
        "lowrank": {"enabled": False, "head_group": 1},
        "quant": {"enabled": True, "key_rope": "post", "avg_bits": 2.0, "group_size": 8, "residual_length": 8}}),
    "dense stores": ("mistral", {"lowrank": {"target_ratio": 0.5}}),
}


@pytest.mark.parametrize("case", list(WORKSPACE_CASES))
def test_workspace_decode_matches_the_generic_path(request, tmp_path, one_thread, monkeypatch, case):
    # inference (no gradients) on the CPU decodes through kvcompress.runtime.latent_decode; with gradients on,
    # the same steps take the generic path (latent_attention over a read of the whole cache)
    from kvcompress.runtime import latent_decode
    name, sections = WORKSPACE_CASES[case]
    model = _export(request.getfixturevalue(name), tmp_path, **sections)
    ids = torch.randint(4, 300, (2, 40), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second sequence: stored padding flags are masked out
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    calls = []
    spy = latent_decode.latent_decode
    monkeypatch.setattr(latent_decode, "latent_decode", lambda *a: calls.append(1) or spy(*a))

    def decode_logits() -> list[torch.Tensor]:
        cache = kvcompress.make_cache(model)
        model(input_ids=ids[:, :24], attention_mask=mask[:, :24], **{CACHE_ARG: cache},
              position_ids=positions[:, :24])
        steps = [model(input_ids=ids[:, i:i + 1], attention_mask=mask[:, :i + 1], **{CACHE_ARG: cache},
                       position_ids=positions[:, i:i + 1]).logits.detach() for i in range(24, 40)]
        if model.kvcompress_manifest["layers"][0]["bits_k"] != 16:
            assert cache.layers[0].key_store.quantized_length > 0  # packed blocks and a residual both read
        return steps

    with torch.enable_grad():
        generic = decode_logits()
    assert not calls
    with torch.no_grad():
        fast = decode_logits()
    assert len(calls) == 16 * model.config.num_hidden_layers
    for a, b in zip(generic, fast, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


PINNED_CASES = {
    "post-RoPE keys, 2 bits, LagKV": {
        "lowrank": {"enabled": False, "head_group": 1},
        "quant": {"enabled": True, "key_rope": "post", "avg_bits": 2.0, "group_size": 8, "residual_length": 8},
        "lagkv": {"enabled": True, "sink_size": 2, "lag_size": 8, "keep_ratio": 0.5}},
    "latent keys, 2/4 bits, LagKV": WORKSPACE_CASES["latent keys, 2/4 bits, LagKV"][1],
}
# Measured once with the code before attention read the cache through KVCompressLayer.step (issue 15):
# per path, the bytes held after the prefill and after each decode step, and a checksum of each step's
# last logits per sequence (the sum of their absolute values, to 4 decimals).
PINNED = {
    "post-RoPE keys, 2 bits, LagKV": {
        "generic": (
            [6912, 7344, 7776, 8208, 8640, 9072, 5856, 6288, 6720, 7152, 7584, 8016, 8448],
            [[309.5096, 327.0], [311.7906, 309.4414], [316.9357, 324.0138], [316.034, 317.4908], [315.6848, 321.059],
             [292.9808, 321.7328], [311.6036, 334.4412], [301.0561, 315.3298], [309.191, 327.4086],
             [304.0464, 309.9783], [323.8868, 306.3856], [310.0051, 309.6651], [314.7192, 309.0559]]),
        "workspace": (
            [6912, 7344, 7776, 8208, 8640, 9072, 5856, 6288, 6720, 7152, 7584, 8016, 8448],
            [[309.5096, 327.0], [311.7906, 309.4414], [316.9357, 324.0138], [316.034, 317.4908], [315.6848, 321.059],
             [292.9808, 321.7328], [311.6036, 334.4412], [301.0561, 315.3298], [309.191, 327.4086],
             [304.0464, 309.9783], [323.8868, 306.3856], [310.0051, 309.6651], [314.7192, 309.0559]]),
        "fused": (
            [6912, 7344, 7776, 8208, 8640, 9072, 5856, 6288, 6720, 7152, 7584, 8016, 8448],
            [[309.5096, 327.0], [311.7905, 309.4414], [316.9357, 324.0137], [316.034, 317.4908], [315.6847, 321.059],
             [292.9808, 321.7328], [311.6036, 334.4411], [301.056, 315.3299], [309.1911, 327.4086],
             [304.0464, 309.9784], [323.8868, 306.3856], [310.0052, 309.6651], [314.7191, 309.0559]]),
    },
    "latent keys, 2/4 bits, LagKV": {
        "generic": (
            [3968, 4216, 4464, 4712, 4960, 5208, 3728, 3976, 4224, 4472, 4720, 4968, 5216],
            [[319.9252, 322.6584], [308.9794, 320.2127], [329.7211, 324.8302], [331.9688, 330.4743],
             [315.429, 325.1989], [323.3205, 324.4868], [327.4768, 322.368], [311.2164, 335.15], [305.0268, 328.3104],
             [303.7509, 331.0582], [326.3451, 322.1017], [314.4803, 336.9025], [326.3575, 304.6552]]),
        "workspace": (
            [3968, 4216, 4464, 4712, 4960, 5208, 3728, 3976, 4224, 4472, 4720, 4968, 5216],
            [[319.9252, 322.6584], [308.9794, 320.2127], [329.7211, 324.8302], [331.9688, 330.4743],
             [315.429, 325.1989], [323.3205, 324.4868], [327.4768, 322.368], [311.2164, 335.15], [305.0268, 328.3104],
             [303.7509, 331.0582], [326.3451, 322.1017], [314.4803, 336.9025], [326.3575, 304.6552]]),
    },
}


def _pinned_run(model, monkeypatch, path: str) -> tuple[list[int], list[list[float]]]:
    """Prefill 20 tokens of two sequences, then decode 12 more on ``path``; bytes held and logit checksums."""
    from kvcompress.kernels.decode_attention import decode_attention_triton
    from kvcompress.runtime import attention

    if path == "fused":
        monkeypatch.setattr(attention, "FUSED_DEVICES", ("cpu",))
        monkeypatch.setattr(attention, "decode_attention", decode_attention_triton)
    ids = torch.randint(4, 300, (2, 32), generator=torch.Generator().manual_seed(11))
    cache = kvcompress.make_cache(model)
    held, sums = [], []
    with torch.set_grad_enabled(path == "generic"):
        for start, stop in [(0, 20), *((i, i + 1) for i in range(20, 32))]:
            logits = model(input_ids=ids[:, start:stop], **{CACHE_ARG: cache},
                           position_ids=torch.arange(start, stop)[None]).logits
            held.append(cache.kv_bytes())
            sums.append(logits[:, -1].abs().sum(-1).tolist())
    monkeypatch.undo()
    return held, sums


@pytest.mark.parametrize("case", list(PINNED_CASES))
def test_lagkv_quantized_decode_is_pinned(llama_gqa, tmp_path, one_thread, monkeypatch, case):
    # every decode path gives the logits and the bytes held that it gave before the cache layer took over
    # its own eviction step: a block's queries see all of its tokens, and kv_bytes counts after eviction
    import kvcompress.analysis.analyze as analyze_mod

    # the pinned runs allocated from {2, 4, 8}, before any width 1-8 could be chosen
    allocate = analyze_mod.allocate_bits
    monkeypatch.setattr(analyze_mod, "allocate_bits", lambda sens, avg, **_: allocate(sens, avg, choices=(2, 4, 8)))
    monkeypatch.setattr(analyze_mod, "BITS", (2, 4, 8))  # so a 3-bit average is measured and mixed
    model = _export(llama_gqa, tmp_path, **PINNED_CASES[case])
    monkeypatch.undo()
    for path, (held, sums) in PINNED[case].items():
        got_held, got_sums = _pinned_run(model, monkeypatch, path)
        assert got_held == held, path
        # sums of |logits| (about 320), pinned to 4 decimals; the CPU's float32 GEMM kernels differ by machine:
        # one machine of this CI's kind gave 4.9e-4 (1.5e-6 relative) off the pins
        torch.testing.assert_close(torch.tensor(got_sums), torch.tensor(sums), rtol=5e-6, atol=1e-4, msg=path)


def test_workspace_reuses_one_buffer_and_grows_by_doubling():
    from kvcompress.runtime.workspace import Workspace

    ws = Workspace()
    a = ws.take("keys", (1, 2, 10, 4), torch.float32, torch.device("cpu"))
    b = ws.take("keys", (1, 2, 6, 4), torch.float32, torch.device("cpu"))
    assert b.data_ptr() == a.data_ptr() and b.is_contiguous()  # smaller: a view of the same memory
    c = ws.take("keys", (1, 2, 11, 4), torch.float32, torch.device("cpu"))
    assert c.data_ptr() != a.data_ptr()
    d = ws.take("keys", (1, 2, 20, 4), torch.float32, torch.device("cpu"))
    assert d.data_ptr() == c.data_ptr()  # the growth doubled 80 -> 160 elements, enough for 20 tokens
    other = ws.take("values", (1, 2, 6, 4), torch.float32, torch.device("cpu"))
    assert other.data_ptr() != d.data_ptr()
    assert ws.take("keys", (1, 2, 6, 4), torch.float16, torch.device("cpu")).dtype == torch.float16


@pytest.mark.parametrize(("key_rope", "lagkv"), [("post", False), ("pre", False), ("post", True)])
def test_positions_are_kept_only_where_something_reads_them(llama_gqa, tmp_path, one_thread, key_rope, lagkv):
    sections = {"lowrank": {"enabled": key_rope == "pre"},
                "quant": {"enabled": True, "key_rope": key_rope, "avg_bits": 4.0, "group_size": 8,
                          "residual_length": 8}}
    if lagkv:
        sections["lagkv"] = {"enabled": True, "sink_size": 4, "lag_size": 8, "keep_ratio": 0.5}
    model = _export(llama_gqa, tmp_path, **sections)
    plan = model.kvcompress_plan
    assert plan.stores_positions == (key_rope == "pre" or lagkv)
    ids = torch.randint(4, 300, (1, 37), generator=torch.Generator().manual_seed(9))
    lean, kept = kvcompress.make_cache(model), KVCompressCache(list(plan.layers), plan.eviction, True)
    with torch.no_grad():
        out = [model.generate(input_ids=ids, **{CACHE_ARG: c}, max_new_tokens=6, do_sample=False)
               for c in (lean, kept)]
    assert torch.equal(out[0], out[1])  # the same tokens: nothing needed the positions that were not kept
    tokens = lean.layers[0].stored_length
    assert tokens == kept.layers[0].stored_length and (tokens < 42 if lagkv else tokens == 42)
    per_layer = 0 if plan.stores_positions else 4 * tokens  # int32 positions, shared by the heads
    assert kept.kv_bytes() - lean.kv_bytes() == per_layer * len(lean.layers)
    spec = open_source(llama_gqa.path).spec
    if not lagkv:  # the formula follows the live cache
        assert lean.kv_bytes() == pytest.approx(compressed_bytes_per_token(spec, plan, tokens) * tokens)


def test_an_evicting_layer_refuses_to_drop_positions():
    with pytest.raises(ValueError, match="must keep positions"):
        KVCompressLayer(eviction=LagKV(enabled=True), keep_positions=False)
