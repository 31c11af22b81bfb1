"""The typed plan: built once from a recipe, written into the manifest and read back unchanged; a manifest
written by kvcompress 0.1.0 (checked in) still loads, into the same plan and the same model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_tiny

import kvcompress
from kvcompress.checkpoint.export import export
from kvcompress.checkpoint.manifest import MANIFEST_NAME
from kvcompress.errors import KVCompressError
from kvcompress.methods import VectorCodebookStore, make_store
from kvcompress.plan import Plan, build_plan
from kvcompress.recipe import LayerRecipe, load_recipe, recipe_from_dict
from kvcompress.sources import ModelSpec, open_source

pytestmark = pytest.mark.usefixtures("one_thread")

OLD_MANIFEST = Path(__file__).parent / "data" / "manifest-0.1.0-full-stack.json"
SPEC = ModelSpec("llama", 2, 64, 8, 2, 16, 1e4, False, False)


def _small(name: str):
    """A shipped recipe shrunk to a tiny model, exactly as the checked-in 0.1.0 manifest was exported."""
    rec = load_recipe(name)
    rec.quant.group_size, rec.quant.residual_length = 8, 16
    if rec.quant.key_group_size:
        rec.quant.key_group_size = 4
    rec.lagkv.lag_size, rec.lagkv.sink_size = 8, 2
    rec.calibration.max_tokens, rec.calibration.seq_len = 128, 64
    return rec


@pytest.mark.parametrize("quant", [
    {"enabled": True, "key_rope": "post", "avg_bits": 4.0},
    {"enabled": True, "allocation": "channels", "segment": 8, "group_size": 16, "residual_length": 32},
    {"enabled": True, "method": "decoquant", "key_group_size": 8},
    {"enabled": False},
])
def test_plan_survives_the_manifest(quant):
    layers = [{"layer": 0, "rank_k": 32, "rank_v": 16, "bits_k": [4, 2, 2, 2] if "segment" in quant else 2,
               "bits_v": 4}, {"layer": 1, "rank_k": 32, "rank_v": 32, "bits_k": 8, "bits_v": 2}]
    rec = recipe_from_dict({"name": "mine", "lowrank": {"enabled": quant.get("key_rope") != "post"}, "quant": quant,
                            "lagkv": {"enabled": True, "keep_ratio": 0.25}, "layers": layers})
    plan = build_plan(rec, SPEC, "bfloat16")
    assert Plan.from_manifest(plan.to_manifest()) == plan
    keys = plan.layers[0].keys
    assert keys.quantized == rec.quant.enabled and plan.eviction.keep_ratio == 0.25
    assert plan.eviction is not rec.lagkv  # the plan keeps its own copy: editing the recipe later changes nothing


def _half_bit(method: str, bits_v: float = 1.5, group_size: int = 16):
    return recipe_from_dict({"quant": {"enabled": True, "method": method, "key_method": "kivi", "key_rope": "post",
                                       "group_size": group_size, "residual_length": 32},
                             "lowrank": {"enabled": False, "head_group": 1},
                             "layers": [{"layer": i, "rank_k": 16, "rank_v": 16, "bits_k": 2, "bits_v": bits_v}
                                        for i in range(2)]})


def test_a_vector_codebook_plan_holds_half_bit_values_through_the_manifest():
    plan = build_plan(_half_bit("vector"), SPEC)
    manifest = plan.to_manifest()
    assert [lay["bits_v"] for lay in manifest["layers"]] == [1.5, 1.5]
    again = Plan.from_manifest(json.loads(json.dumps(manifest)))
    assert again == plan and again.layers[0].values.bits == 1.5 and again.layers[0].keys.bits == 2
    store = make_store(1.5, 16, "channels", 32, "vector")
    assert type(store) is VectorCodebookStore and store.tuple_size(16) == 4


@pytest.mark.parametrize(("method", "bits_v", "group", "pattern"), [
    ("codebook", 1.5, 16, r"layer 0: bits_v: codebook codes are 1, 2, 3, 4, 5, 6, 7, 8 bits wide, got 1.5 "
                          r"\(1.5 bits is a vector codebook's width: \[quant\] method = \"vector\"\)"),
    ("kivi", 1.5, 16, r"kivi codes are 1, 2, .* got 1.5 \(1.5 bits is a vector codebook's width"),
    ("vector", 2.5, 16, r"layer 0: bits_v: vector codes are 1, 1.5, 2, 3, 4, 5, 6, 7, 8 bits wide, got 2.5$"),
    ("vector", 1.5, 1, r"layer 0: bits_v: 1.5-bit codes need groups of an even number of channels, got 1"),
])
def test_a_width_the_quantizer_does_not_store_is_refused_when_the_plan_is_built(method, bits_v, group, pattern):
    rec = _half_bit(method, bits_v, group)
    rec.quant.residual_length = 0
    with pytest.raises(KVCompressError, match=pattern) as e:
        build_plan(rec, SPEC)
    assert "\n" not in str(e.value)


def test_a_manifest_holding_a_width_its_quantizer_does_not_store_is_corrupt():
    manifest = build_plan(_half_bit("vector"), SPEC).to_manifest()
    manifest["layers"][1]["method"] = "codebook"
    with pytest.raises(KVCompressError, match=r"^corrupt manifest: layer 1: bits_v: codebook codes are 1, 2, .* "
                                              r"got 1.5 \(1.5 bits is a vector codebook's width"):
        Plan.from_manifest(manifest)


def test_make_store_takes_segment_bits_as_a_list_or_a_tuple():
    for bits in ([4, 2], (4, 2)):
        store = make_store(bits, 8, "tokens", 8, segment=8)
        assert type(store).__name__ == "SegmentedStore"


def test_plan_resolves_the_flush_block_without_a_window():
    rec = recipe_from_dict({"quant": {"enabled": True, "group_size": 8, "key_group_size": 4, "residual_length": 0},
                            "layers": [{"layer": i, "rank_k": 16, "rank_v": 16, "bits_k": 2, "bits_v": 2}
                                       for i in range(2)]})
    lay = build_plan(rec, SPEC).layers[0]
    assert (lay.keys.group, lay.keys.block, lay.values.group, lay.values.block) == (4, 4, 8, 8)


def test_manifest_of_0_1_0_loads_into_the_same_plan_and_model(tmp_path):
    tiny = build_tiny("llama_gqa", tmp_path / "src", seed=5)  # the model the checked-in manifest describes
    new = tmp_path / "new"
    recipe = _small("full-stack")
    # the 0.1.0 allocation chose from {2, 4, 8}; any width 1-8 allocates differently, so pin its layers
    recipe.layers = [LayerRecipe(lay["layer"], lay["rank_k"], lay["rank_v"], lay["bits_k"], lay["bits_v"])
                     for lay in json.loads(OLD_MANIFEST.read_text())["layers"]]
    export(open_source(tiny.path), new, recipe, dtype="float32")
    old = tmp_path / "old"
    shutil.copytree(new, old)
    manifest = json.loads(OLD_MANIFEST.read_text())
    written = json.loads((new / MANIFEST_NAME).read_text())["files"]
    assert manifest["files"].keys() == written.keys()  # 0.1.0 wrote and checksummed the same files
    # Bytes that are not ours to pin: the low-rank weights depend on the machine's float kernels (the SVD,
    # the whitening GEMMs), and the configs export copies from the tiny source on which transformers
    # serializes (5.25 writes fields 5.24 did not). Take this export's digests for those; the tokenizer's
    # bytes must be 0.1.0's.
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        manifest["files"][name] = written[name]
    assert manifest["files"] == written
    source_config = json.loads((tiny.path / "config.json").read_text())
    assert json.loads((new / "config.json").read_text()) == {**source_config, "dtype": "float32"}
    assert (new / "generation_config.json").read_bytes() == (tiny.path / "generation_config.json").read_bytes()
    (old / MANIFEST_NAME).write_text(json.dumps(manifest))
    model_old, _ = kvcompress.load(old)  # verify=True: files checked against the 0.1.0 manifest's digests (as above)
    model_new, _ = kvcompress.load(new)
    assert model_old.kvcompress_manifest["schema_version"] == 1 and model_new.kvcompress_manifest["schema_version"] == 2
    assert model_old.kvcompress_plan == model_new.kvcompress_plan
    assert model_new.kvcompress_plan.eviction is not None and model_new.kvcompress_plan.layers[0].keys.quantized
    ids = torch.randint(4, 500, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model_old(ids).logits, model_new(ids).logits)


def test_old_manifest_fields_read_with_the_defaults_of_their_time():
    manifest = json.loads(OLD_MANIFEST.read_text())
    for lay in manifest["layers"]:
        for key in ("method", "value_folded", "key_segment"):
            lay.pop(key, None)
    plan = Plan.from_manifest(manifest)
    assert all(lay.keys.method == lay.values.method == "kivi" and lay.value_folded and lay.keys.segment == 16
               for lay in plan.layers)
    assert plan.recipe == "full-stack"
    assert [LayerRecipe(lay.layer, lay.keys.rank, lay.values.rank) for lay in plan.layers] == [
        LayerRecipe(e["layer"], e["rank_k"], e["rank_v"]) for e in manifest["layers"]]
