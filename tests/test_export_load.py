"""export -> load round trips on tiny random models: exactness, caching, generation, safety of the write path."""

from __future__ import annotations

import json
import pathlib
import shutil
from pathlib import Path

import pytest
import torch
from conftest import PAD_ID, TINY_MODELS, TinyModel, build_tiny, copy_checkpoint, tiny_config, write_json
from transformers import DynamicCache, Qwen2Config

import kvcompress
import kvcompress.checkpoint.export as export_mod
import kvcompress.plan as plan_mod
from kvcompress.checkpoint.export import export
from kvcompress.checkpoint.manifest import MANIFEST_NAME
from kvcompress.compat import CACHE_ARG
from kvcompress.errors import KVCompressError
from kvcompress.recipe import Recipe
from kvcompress.runtime.cache import KVCompressCache
from kvcompress.sources import open_source

pytestmark = pytest.mark.usefixtures("one_thread")

load = kvcompress.load
make_cache = kvcompress.make_cache


def _recipe(ratio: float, svd: str = "whitened") -> Recipe:
    rec = Recipe()
    rec.lowrank.target_ratio = ratio
    rec.lowrank.svd = svd
    rec.calibration.max_tokens = 256
    rec.calibration.seq_len = 128
    return rec


@pytest.fixture(scope="session")
def exported(tiny_factory, tmp_path_factory):
    """``get(name, ratio, svd)`` -> (TinyModel, checkpoint folder, loaded model), cached per session."""
    cache: dict[tuple, tuple[TinyModel, Path, torch.nn.Module]] = {}
    root = tmp_path_factory.mktemp("exports")

    def get(name: str, ratio: float = 1.0, svd: str = "whitened"):
        key = (name, ratio, svd)
        if key not in cache:
            tiny = tiny_factory(name)
            out = root / f"{name}-{svd}-{ratio}"
            export(open_source(tiny.path), out, _recipe(ratio, svd), dtype="float32")
            model, _ = load(out)
            cache[key] = (tiny, out, model)
        return cache[key]

    return get


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(4, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("svd", ["whitened", "weight"])
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_full_rank_export_reproduces_logits(exported, name, svd):
    tiny, out, model = exported(name, 1.0, svd)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    width = tiny.config.num_key_value_heads * tiny.config.head_dim
    assert all(e["rank_k"] == width and e["rank_v"] == width for e in manifest["layers"])
    ids = _ids(2, 24, seed=1)
    with torch.no_grad():
        ref = tiny.model(ids).logits
        got = model(ids, use_cache=False).logits
    assert _max_diff(ref, got) < 1e-4


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_reduced_rank_changes_logits(exported, name):
    tiny, out, model = exported(name, 0.5)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    width = tiny.config.num_key_value_heads * tiny.config.head_dim
    assert any(e["rank_k"] < width for e in manifest["layers"])
    ids = _ids(2, 24, seed=2)
    with torch.no_grad():
        diff = _max_diff(tiny.model(ids).logits, model(ids, use_cache=False).logits)
    assert diff > 1e-3


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2"])
def test_value_up_projection_folded_or_kept_gives_the_same_model(tiny_factory, tmp_path, monkeypatch, name):
    # rank 8 of 16: folding U_v into o_proj (8 heads x 8 inputs) is smaller than keeping it, so export folds;
    # forcing it to keep v_up must give the same logits (attention weights sum to one, both are exact)
    tiny = tiny_factory(name)
    export(open_source(tiny.path), tmp_path / "folded", _recipe(0.5), dtype="float32")
    monkeypatch.setattr(plan_mod, "value_folded", lambda *_: False)
    export(open_source(tiny.path), tmp_path / "kept", _recipe(0.5), dtype="float32")
    folded, kept = load(tmp_path / "folded")[0], load(tmp_path / "kept")[0]
    assert all(lay["value_folded"] for lay in folded.kvcompress_manifest["layers"])
    assert not any(lay["value_folded"] for lay in kept.kvcompress_manifest["layers"])
    attn = kept.model.layers[0].self_attn
    assert attn.v_up is not None and folded.model.layers[0].self_attn.v_up is None
    assert attn.o_proj.in_features == tiny.config.num_attention_heads * tiny.config.head_dim
    ids = _ids(2, 12, seed=9)
    torch.testing.assert_close(kept(ids).logits, folded(ids).logits, atol=1e-4, rtol=1e-4)


def test_decode_copy_of_the_key_up_projection_follows_it(tiny_factory, tmp_path):
    # without gradients, decode keeps a pair-ordered contiguous copy of U_k; changing the parameter in
    # place (as load_state_dict does) must renew it
    tiny = tiny_factory("llama_gqa")
    export(open_source(tiny.path), tmp_path / "out", _recipe(0.5), dtype="float32")
    attn = load(tmp_path / "out")[0].model.layers[0].self_attn
    with torch.no_grad():
        before = attn._pair_ordered_up()[0].clone()
        attn.k_up.mul_(3)
        after = attn._pair_ordered_up()[0]
    torch.testing.assert_close(after, 3 * before)


def test_full_rank_values_keep_their_up_projection(exported):
    _, _, model = exported("llama_gqa", 1.0)  # r_v = 16: folding would take 8 x 16 inputs instead of 8 x 8
    assert not any(lay["value_folded"] for lay in model.kvcompress_manifest["layers"])


def test_qwen2_config_without_attention_bias_field(tmp_path):
    """Real Qwen2 config.json files have no ``attention_bias`` key: Qwen2 always has q/k/v biases.

    The export keeps them (``ModelSpec`` defaults attention_bias to True for qwen2), so loading must too.
    """
    fields = {k: v for k, v in tiny_config("qwen2").to_dict().items() if k not in ("attention_bias", "model_type")}
    plain = Qwen2Config(**fields)
    plain._attn_implementation = "sdpa"
    assert not hasattr(plain, "attention_bias")
    tiny = build_tiny("qwen2_plain", tmp_path / "src", seed=7, config=plain)
    assert "attention_bias" not in json.loads((tiny.path / "config.json").read_text())
    assert tiny.model.model.layers[0].self_attn.k_proj.bias is not None
    export(open_source(tiny.path), tmp_path / "out", _recipe(1.0), dtype="float32")
    model, _ = load(tmp_path / "out")
    ids = _ids(1, 16, seed=3)
    with torch.no_grad():
        assert _max_diff(tiny.model(ids).logits, model(ids, use_cache=False).logits) < 1e-4


# --------------------------------------------------------------------------- cache and generation


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_token_by_token_cache_matches_full_forward(exported, name):
    _, _, model = exported(name, 0.5)
    ids = _ids(2, 12, seed=4)
    cache = make_cache(model)
    assert isinstance(cache, KVCompressCache)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        steps = [model(ids[:, t:t + 1], **{CACHE_ARG: cache}, use_cache=True).logits[:, -1]
                 for t in range(ids.shape[1])]
    assert cache.get_seq_length() == ids.shape[1]
    assert _max_diff(torch.stack(steps, dim=1), full) < 1e-4


def _greedy_no_cache(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2", "qwen3"])
def test_greedy_generate_matches_uncached_decoding(exported, name):
    _, _, model = exported(name, 0.5)
    prompt = _ids(1, 6, seed=5)
    with torch.no_grad():
        got = model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert got.shape == (1, 16)
    assert torch.equal(got, _greedy_no_cache(model, prompt, 10))


def test_generate_computes_logits_of_the_last_prompt_token_only(exported):
    """``generate`` passes ``logits_to_keep=1`` when the forward signature has it: prefill makes one row of
    logits instead of one per prompt token (at 2048 tokens and a 49k vocabulary, 400 MB in float32)."""
    _, _, model = exported("llama_gqa", 0.5)
    rows = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: rows.append(out.shape[1]))
    try:
        with torch.no_grad():
            model.generate(_ids(1, 9, seed=4), max_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
    assert rows == [1, 1, 1]


def test_full_rank_generate_matches_source_model(exported):
    tiny, _, model = exported("llama_gqa", 1.0)
    prompt = _ids(1, 5, seed=6)
    with torch.no_grad():
        got = model.generate(prompt, max_new_tokens=10, do_sample=False)
        ref = tiny.model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2"])
def test_left_padded_batch_generates_like_single_sequences(exported, name):
    _, _, model = exported(name, 0.5)
    prompts = [_ids(1, n, seed=10 + n)[0] for n in (7, 3, 5)]
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), PAD_ID)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = p
        mask[i, longest - len(p):] = 1
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=PAD_ID)
        for i, p in enumerate(prompts):
            alone = model.generate(p[None], max_new_tokens=8, do_sample=False, pad_token_id=PAD_ID)
            assert torch.equal(batch[i, longest:], alone[0, len(p):]), f"sequence {i}"


def test_sampling_is_deterministic_under_seed(exported):
    _, _, model = exported("llama_gqa", 0.5)
    prompt = _ids(2, 4, seed=7)

    def sample(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=12, do_sample=True, top_k=0, temperature=1.5)

    first = sample(123)
    assert torch.equal(first, sample(123))
    # and it really samples: different seeds do not all give the same continuation
    assert len({tuple(sample(s).flatten().tolist()) for s in range(4)}) > 1


def test_kv_bytes_counts_what_is_stored(exported):
    tiny, _, model = exported("llama_gqa", 0.5)
    ids = _ids(2, 20, seed=8)
    cache = make_cache(model)
    with torch.no_grad():
        model(ids, **{CACHE_ARG: cache}, use_cache=True)
        ref_cache = DynamicCache(config=tiny.config)
        tiny.model(ids, **{CACHE_ARG: ref_cache}, use_cache=True)
    b, t = ids.shape
    expected = 0
    for layer, attn in zip(cache.layers, (lay.self_attn for lay in model.model.layers), strict=True):
        k, v = layer.key_store.read(), layer.value_store.read()
        assert k.shape == (b, attn.groups, t, attn.rank_k)
        assert v.shape == (b, attn.groups, t, attn.rank_v)
        assert layer.positions.dtype == torch.int32 and layer.positions.numel() == b * t
        expected += (k.numel() + v.numel()) * k.element_size() + layer.positions.numel() * 4
    assert cache.kv_bytes() == expected
    dense = sum(x.numel() * x.element_size() for lay in ref_cache.layers for x in (lay.keys, lay.values))
    assert dense == 3 * 2 * b * t * tiny.config.num_key_value_heads * tiny.config.head_dim * 4
    assert cache.kv_bytes() < dense


# --------------------------------------------------------------------------- corrupt or unsafe input


def test_tampered_weight_file_fails_checksum(exported, tmp_path):
    _, out, _ = exported("llama_gqa", 1.0)
    ckpt = copy_checkpoint(out, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(KVCompressError, match="checksum") as e:
        load(ckpt)
    assert "model.safetensors" in str(e.value) and "\n" not in str(e.value)


def test_newer_manifest_schema_is_refused(exported, tmp_path):
    _, out, _ = exported("llama_gqa", 1.0)
    ckpt = copy_checkpoint(out, tmp_path / "ckpt")
    manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
    manifest["schema_version"] = 999
    write_json(ckpt / MANIFEST_NAME, manifest)
    with pytest.raises(KVCompressError, match=r"schema_version 999.*upgrade"):
        load(ckpt)


def test_folder_without_manifest_is_refused(llama_gqa):
    # the source checkpoint itself: a valid HF folder, but not a kvcompress export
    with pytest.raises(KVCompressError, match=r"no kvcompress\.json.*not a kvcompress checkpoint"):
        load(llama_gqa.path)


def test_missing_checkpoint_folder(tmp_path):
    with pytest.raises(KVCompressError, match="not found"):
        load(tmp_path / "nope")


def test_pickle_only_source_is_refused(llama_gqa, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(llama_gqa.path / "config.json", folder / "config.json")
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    with pytest.raises(KVCompressError, match="safetensors") as e:
        open_source(folder)
    assert "pickle" in str(e.value)


def test_pickle_only_checkpoint_is_refused(exported, tmp_path):
    _, out, _ = exported("llama_gqa", 1.0)
    ckpt = copy_checkpoint(out, tmp_path / "ckpt")
    (ckpt / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(2)}, ckpt / "pytorch_model.bin")
    with pytest.raises(KVCompressError, match="safetensors"):
        load(ckpt, verify=False)


# --------------------------------------------------------------------------- atomic export


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _interrupt_factorization(monkeypatch, at_layer: int = 1):
    real = export_mod.factorized_attention
    calls = []

    def boom(source, layer, *args):
        calls.append(layer)
        if layer == at_layer:
            raise KeyboardInterrupt
        return real(source, layer, *args)

    monkeypatch.setattr(export_mod, "factorized_attention", boom)
    return calls


def test_interrupted_export_leaves_nothing(llama_gqa, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = _interrupt_factorization(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        export(open_source(llama_gqa.path), out, _recipe(0.5, "weight"), dtype="float32")
    assert calls == [0, 1]  # it really stopped midway
    assert not out.exists()
    assert _leftovers(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_interrupt_while_writing_manifest_leaves_nothing(llama_gqa, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def boom(folder, manifest):
        assert any(folder.glob("*.safetensors"))  # the weights were written already
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "write_manifest", boom)
    with pytest.raises(KeyboardInterrupt):
        export(open_source(llama_gqa.path), out, _recipe(0.5, "weight"), dtype="float32")
    assert not out.exists() and _leftovers(out) == []


def test_exported_files_are_readable_by_everyone(llama_gqa, tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        out = tmp_path / "out"
        export(open_source(llama_gqa.path), out, _recipe(0.5, "weight"), dtype="float32")
    finally:
        os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


def test_export_refuses_to_overwrite_without_force(llama_gqa, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(KVCompressError, match=r"exists.*--force"):
        export(open_source(llama_gqa.path), out, _recipe(0.5, "weight"), dtype="float32")
    assert _snapshot(out) == {"keep.txt": b"mine"}


def test_failed_forced_export_keeps_existing_out(exported, llama_gqa, tmp_path, monkeypatch):
    _, previous, _ = exported("llama_gqa", 1.0)
    out = copy_checkpoint(previous, tmp_path / "out")
    before = _snapshot(out)
    _interrupt_factorization(monkeypatch, at_layer=2)
    with pytest.raises(KeyboardInterrupt):
        export(open_source(llama_gqa.path), out, _recipe(0.5, "weight"), dtype="float32", force=True)
    assert _snapshot(out) == before
    assert _leftovers(out) == []
    load(out)  # still a valid checkpoint


def test_forced_export_failing_at_the_swap_keeps_existing_out(exported, llama_gqa, tmp_path, monkeypatch):
    """The last step swaps the new folder in; if that fails, the old checkpoint must still be at OUT."""
    _, previous, _ = exported("llama_gqa", 1.0)
    out = copy_checkpoint(previous, tmp_path / "out")
    before = _snapshot(out)
    real_rename = pathlib.Path.rename

    def rename(self, target):
        if self.name.startswith(f".{out.name}.tmp-") and Path(target) == out:
            raise OSError("simulated failure moving the new checkpoint into place")
        return real_rename(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        export(open_source(llama_gqa.path), out, _recipe(0.5, "weight"), dtype="float32", force=True)
    monkeypatch.undo()
    assert out.is_dir() and _snapshot(out) == before
    assert _leftovers(out) == []


def test_forced_export_replaces_existing_out(llama_gqa, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    export(open_source(llama_gqa.path), out, _recipe(0.5, "weight"), dtype="float32", force=True)
    assert not (out / "stale.txt").exists() and (out / MANIFEST_NAME).is_file()
    assert _leftovers(out) == []


# --------------------------------------------------------------------------- sharding


def test_sharded_export_loads_identically(exported, llama_gqa, tmp_path):
    _, _, model = exported("llama_gqa", 0.5)
    out = tmp_path / "sharded"
    result = export(open_source(llama_gqa.path), out, _recipe(0.5), dtype="float32", shard_bytes=40_000)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert result.shards == len(shards) > 2
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert {s.name for s in shards} <= set(manifest["files"])
    sharded_model, _ = load(out)
    assert sharded_model.state_dict().keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(value, sharded_model.state_dict()[name]), name
    ids = _ids(1, 10, seed=9)
    with torch.no_grad():
        # weights are bitwise equal (above); BLAS may round differently for differently aligned buffers
        torch.testing.assert_close(model(ids).logits, sharded_model(ids).logits, rtol=1e-5, atol=1e-5)
    # the sharded checkpoint also reads back as a *source* (index file)
    src = open_source(out)
    assert src.has("model.layers.0.self_attn.k_down.weight") and len(src.files()) == len(shards)


def test_device_map_is_passed_to_accelerate(exported):
    _, out, reference = exported("llama_gqa")
    model, _ = load(out, device_map={"": "cpu"})
    ids = _ids(1, 12, seed=7)
    with torch.no_grad():
        assert _max_diff(model(ids).logits, reference(ids).logits) < 1e-5
    assert getattr(model, "hf_device_map", None) == {"": "cpu"}


def test_unknown_dtype_and_missing_config_are_clear_errors(exported, tmp_path):
    _, out, _ = exported("llama_gqa")
    with pytest.raises(kvcompress.KVCompressError, match="dtype must be one of"):
        load(out, dtype="float8")
    broken = copy_checkpoint(out, tmp_path / "broken")
    (broken / "config.json").unlink()
    with pytest.raises(kvcompress.KVCompressError, match=r"config\.json"):
        load(broken, verify=False)
