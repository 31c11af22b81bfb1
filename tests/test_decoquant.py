"""DecoQuant (two-core MPO + low-bit large core): the math, the store, the bytes, and a tiny model end to end."""

from __future__ import annotations

import pytest
import torch

import kvcompress
from kvcompress.checkpoint.export import export
from kvcompress.compat import CACHE_ARG
from kvcompress.errors import KVCompressError
from kvcompress.memory import compressed_bytes_per_token
from kvcompress.methods import DecoQuantStore, QuantizedStore, make_store
from kvcompress.methods import decoquant as dq
from kvcompress.methods.kivi import dequantize, quantize
from kvcompress.plan import Plan, build_plan
from kvcompress.recipe import LayerRecipe, Quant, Recipe, recipe_from_dict
from kvcompress.sources import ModelSpec, open_source


def _kv(*shape: int, seed: int = 0, outliers: bool = True) -> torch.Tensor:
    """Gaussian features with a few large fixed channels (the outliers DecoQuant moves to the small core)."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    if outliers:
        x[..., ::13] *= 20.0
    return x


# --------------------------------------------------------------------------- the decomposition


@pytest.mark.parametrize(
    ("dim", "tokens", "expected"),
    [(192, 128, 16), (64, 128, 16), (48, 32, 16), (40, 64, 10), (24, 16, 12), (16, 8, 8), (67, 128, 1)],
)
def test_core_width_divides_and_keeps_full_bond_rank(dim, tokens, expected):
    k = dq.core_width(dim, tokens)
    assert k == expected
    assert dim % k == 0 and k * k <= tokens * dim


@pytest.mark.parametrize("shape", [(2, 3, 128, 64), (1, 1, 16, 24), (1, 2, 8, 16)])
def test_full_precision_cores_reconstruct_exactly(shape):
    x = _kv(*shape)
    k = dq.core_width(shape[-1], shape[-2])
    a, b = dq.decompose(x, k)
    assert a.shape == x.shape  # the large core has M's layout and size
    assert b.shape == (*shape[:-2], k, k)
    assert torch.allclose(dq.compose(a, b), x, atol=1e-4 * x.abs().max().item())


def test_large_core_has_a_narrower_range_than_the_block():
    x = _kv(1, 1, 128, 64)
    a, _ = dq.decompose(x, 16)
    assert a.abs().max() < 0.5 * x.abs().max()  # outliers moved into the small core


@pytest.mark.parametrize(
    ("bits", "along", "group"), [(2, "tokens", 16), (4, "tokens", 32), (2, "channels", 32), (8, "channels", 16)]
)
def test_reconstruction_error_is_bounded_by_the_large_cores_quantization_error(bits, along, group):
    x = _kv(2, 2, 256, 64, seed=bits)
    p = dq.encode(x, bits, group, along, block=128)
    err = (dq.decode(p) - x).reshape(2, 2, 2, 128, 64)
    a, b = dq.decompose(x.reshape(2, 2, 2, 128, 64), 16)
    da = (dequantize(quantize(a.reshape(x.shape), bits, group, along)) - a.reshape(x.shape)).reshape(a.shape)
    b16 = b.half().float()
    # per block: M - M_hat = A B - (A + dA) B16 = A (B - B16) - dA B16
    bound = da.flatten(-2).norm(dim=-1) * torch.linalg.matrix_norm(b16, ord=2) + a.flatten(-2).norm(
        dim=-1
    ) * torch.linalg.matrix_norm(b - b16, ord=2)
    assert (err.flatten(-2).norm(dim=-1) <= bound * 1.001 + 1e-4).all()
    rel = (err.norm() / x.norm()).item()
    assert rel < {2: 0.6, 4: 0.12, 8: 0.01}[bits]


@pytest.mark.parametrize("value", [0.0, 3.0, -1234.5])
@pytest.mark.parametrize("along", ["tokens", "channels"])
def test_constant_blocks_stay_finite_and_close(value, along):
    x = torch.full((1, 2, 64, 32), value)
    y = dq.decode(dq.encode(x, 2, 16, along, block=32))
    assert torch.isfinite(y).all()
    assert (y - x).abs().max() <= 1e-2 * max(1.0, abs(value))


def test_packed_bytes_are_exact():
    x = _kv(2, 3, 256, 48)
    p = dq.encode(x, 4, 32, "channels", block=128)
    assert p.small.dtype == torch.float16 and p.small.shape == (2, 3, 2, 16, 16)
    plain = quantize(x, 4, 32, "channels")
    assert p.nbytes() == plain.nbytes() + 2 * 3 * 2 * 16 * 16 * 2  # KIVI's bytes plus the fp16 small cores
    assert p.large.nbytes() == plain.nbytes()


def test_mismatched_blocks_are_refused():
    with pytest.raises(ValueError, match="whole blocks"):
        dq.encode(torch.randn(1, 1, 100, 16), 2, 4, "tokens", block=32)
    with pytest.raises(ValueError, match="does not divide"):
        dq.decompose(torch.randn(1, 1, 8, 16), 5)


# --------------------------------------------------------------------------- the store


def test_make_store_picks_the_method():
    assert type(make_store(2, 8, "tokens", 16)) is QuantizedStore
    assert type(make_store(2, 8, "tokens", 16, "decoquant")) is DecoQuantStore
    with pytest.raises(ValueError, match="unknown quant method"):
        make_store(2, 8, "tokens", 16, "gptq")


def test_store_flushes_whole_blocks_and_counts_bytes():
    store = DecoQuantStore(bits=2, group_size=8, along="tokens", block=16)
    x = _kv(2, 2, 40, 16)
    store.append(x)
    store.flush(settled=30)
    assert store.quantized_length == 16
    assert torch.equal(store.residual(), x[..., 16:, :].half().float())
    store.flush(settled=40)
    assert store.quantized_length == 32
    assert store.read().shape == x.shape
    residual = 2 * 2 * 8 * 16 * 2
    assert store.nbytes() == store.packed.large.nbytes() + 2 * 2 * 2 * 16 * 16 * 2 + residual
    store.select_batch(torch.tensor([1]))
    assert store.read().shape == (1, 2, 40, 16)
    assert store.packed.small.shape[0] == 1


def test_8bit_store_reads_back_close():
    x = _kv(1, 2, 64, 16, outliers=False)
    store = DecoQuantStore(8, 32, "channels", 32)
    store.append(x)
    store.flush(64)
    assert (store.read() - x).abs().max() < 0.05


def test_memory_formula_adds_one_fp16_core_per_block_and_stream():
    # the live cache is checked against the formula in test_cache.test_live_bytes_match_the_memory_formula
    spec = ModelSpec("llama", 1, 64, 1, 1, 16, 1e4, False, False)

    def per_token(method: str) -> float:
        quant = Quant(enabled=True, method=method, group_size=8, key_group_size=4, residual_length=16)
        rec = Recipe(quant=quant, layers=[LayerRecipe(0, 16, 8, 2, 4)])
        rec.lowrank.head_group = 1
        return compressed_bytes_per_token(spec, build_plan(rec, spec), 100)

    # 6 flushed blocks of 16 tokens, each with a 16x16 (keys) and an 8x8 (values) fp16 core
    assert 100 * (per_token("decoquant") - per_token("kivi")) == pytest.approx(6 * 2 * (16 * 16 + 8 * 8))


# --------------------------------------------------------------------------- recipes


def test_recipe_refuses_widths_without_a_usable_core():
    spec = ModelSpec("llama", 1, 64, 2, 2, 34, 1e4, False, False)
    layers = [{"layer": 0, "rank_k": 32, "rank_v": 17, "bits_k": 2, "bits_v": 2}]
    rec = recipe_from_dict({"quant": {"enabled": True, "method": "decoquant"}, "layers": layers})
    with pytest.raises(KVCompressError, match=r"layer 0: rank_v: decoquant needs a width with a divisor in "
                                              r"\[4, 16\].*got 17"):
        build_plan(rec, spec)
    layers[0]["bits_v"] = 16  # an unquantized stream needs no core
    build_plan(recipe_from_dict({"quant": {"enabled": True, "method": "decoquant"}, "layers": layers}), spec)


def test_shipped_recipe_loads():
    from kvcompress.recipe import load_recipe

    rec = load_recipe("decoquant-2bit")
    assert rec.quant.method == "decoquant" and rec.quant.enabled and rec.quant.avg_bits == 2.0
    minikv = load_recipe("minikv-2bit")
    assert (rec.quant.group_size, rec.quant.key_group, rec.quant.residual_length) == (
        minikv.quant.group_size,
        minikv.quant.key_group,
        minikv.quant.residual_length,
    )


# --------------------------------------------------------------------------- a tiny model end to end


def _export(tiny, folder, method: str, bits: float):
    rec = Recipe()
    rec.lowrank.target_ratio = 1.0
    rec.calibration.max_tokens, rec.calibration.seq_len = 256, 128
    rec.quant.enabled, rec.quant.method, rec.quant.avg_bits = True, method, bits
    rec.quant.group_size, rec.quant.residual_length = 8, 16
    export(open_source(tiny.path), folder, rec, dtype="float32")
    return kvcompress.load(folder)[0]


def _chunked_logits(model, ids: torch.Tensor):
    cache = kvcompress.make_cache(model)
    with torch.no_grad():
        for start in range(0, ids.shape[1], 16):
            logits = model(
                input_ids=ids[:, start : start + 16],
                **{CACHE_ARG: cache},
                position_ids=torch.arange(start, start + 16)[None],
            ).logits
    return logits, cache


def test_decoquant_export_loads_and_tracks_kivi_and_the_exact_model(llama_gqa, tmp_path, one_thread):
    deco = _export(llama_gqa, tmp_path / "deco", "decoquant", 8.0)
    kivi = _export(llama_gqa, tmp_path / "kivi", "kivi", 8.0)
    layers = deco.kvcompress_manifest["layers"]
    assert all(lay["method"] == "decoquant" and lay["bits_k"] == 8 for lay in layers)
    ids = torch.randint(4, 300, (1, 64), generator=torch.Generator().manual_seed(0))
    logits, cache = _chunked_logits(deco, ids)
    assert all(isinstance(layer.key_store, DecoQuantStore) for layer in cache.layers)
    assert cache.layers[0].key_store.quantized_length == 64
    kivi_logits, _ = _chunked_logits(kivi, ids)
    with torch.no_grad():
        exact = llama_gqa.model(ids).logits[:, -16:]
    scale = exact.abs().max()
    assert (logits - exact).abs().max() < 0.05 * scale
    assert (logits - kivi_logits).abs().max() < 0.05 * scale
    out = deco.generate(ids[:, :20], max_new_tokens=20, do_sample=False)
    assert out.shape == (1, 40)


def test_old_manifests_without_a_method_get_kivi(llama_gqa, tmp_path, one_thread):
    model = _export(llama_gqa, tmp_path / "deco", "decoquant", 2.0)
    for lay in model.kvcompress_manifest["layers"]:
        del lay["method"], lay["key_method"]  # written since DecoQuant and since per-stream quantizers
    model.kvcompress_plan = Plan.from_manifest(model.kvcompress_manifest)  # as load() reads it
    cache = kvcompress.make_cache(model)
    assert all(type(layer.key_store) is QuantizedStore for layer in cache.layers)
