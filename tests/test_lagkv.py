"""Tests for the LagKV eviction policy (kvcompress.methods.lagkv)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompress.errors import KVCompressError
from kvcompress.methods.lagkv import (
    RANGE_EPS,
    chunk_scores,
    compress_step,
    max_stored_tokens,
)
from kvcompress.recipe import LagKV


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather ``x`` ``[B, H, T, ...]`` along the token axis with ``index`` ``[B, H, T']``."""
    index = index.view(*index.shape, *([1] * (x.dim() - 3))).expand(*index.shape, *x.shape[3:])
    return torch.gather(x, 2, index)


def _reference_scores(keys, values, ref_keys, ref_values, value_weight, valid, ref_valid) -> torch.Tensor:
    """Direct, unoptimised transcription of the LagKV score, one token and channel at a time."""

    def stds(rows: list[list[float]], ref_rows: list[list[float]], ref_ok: list[bool]) -> list[float]:
        used = [r for r, ok in zip(ref_rows, ref_ok, strict=True) if ok]
        out = []
        for row in rows:
            normed = []
            for d, x in enumerate(row):
                lo, hi = (min(r[d] for r in used), max(r[d] for r in used)) if used else (0.0, 1.0)
                normed.append((x - lo) / max(hi - lo, RANGE_EPS))
            mean = sum(normed) / len(normed)
            out.append(math.sqrt(sum((v - mean) ** 2 for v in normed) / (len(normed) - 1)))
        return out

    def softmax(xs: list[float], ok: list[bool]) -> list[float]:
        top = max(x for x, o in zip(xs, ok, strict=True) if o)
        exps = [math.exp(x - top) if o else 0.0 for x, o in zip(xs, ok, strict=True)]
        return [e / sum(exps) for e in exps]

    batch, heads, chunks, length, _ = keys.shape
    out = torch.empty(batch, heads, chunks, length, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for c in range(chunks):
                ok, ref_ok = valid[b, h, c].tolist(), ref_valid[b, h, c].tolist()
                if not any(ok):
                    out[b, h, c] = float("-inf")
                    continue
                key_score = softmax(stds(keys[b, h, c].tolist(), ref_keys[b, h, c].tolist(), ref_ok), ok)
                val_score = softmax(stds(values[b, h, c].tolist(), ref_values[b, h, c].tolist(), ref_ok), ok)
                for t in range(length):
                    out[b, h, c, t] = key_score[t] + value_weight * val_score[t] if ok[t] else float("-inf")
    return out


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(*(st.integers(1, n) for n in (2, 3, 3)), st.integers(2, 6)),
    dims=st.tuples(st.integers(2, 5), st.integers(2, 5)),
    value_weight=st.floats(0.0, 2.0),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunk_scores_match_reference_loop(shape, dims, value_weight, masked, seed):
    keys, ref_keys = (_randn(*shape, dims[0], seed=seed + i) for i in (0, 1))
    values, ref_values = (3.0 * _randn(*shape, dims[1], seed=seed + i) for i in (2, 3))
    if masked:
        valid = _randn(*shape, seed=seed + 4) > -0.5
        ref_valid = _randn(*shape, seed=seed + 5) > -0.5
        ref_valid[0, 0, 0] = False  # a reference chunk with no valid token: the fallback path
    else:
        valid = ref_valid = torch.ones(shape, dtype=torch.bool)
    got = chunk_scores(keys, values, ref_keys, ref_values, value_weight, valid, ref_valid)
    want = _reference_scores(keys, values, ref_keys, ref_values, value_weight, valid, ref_valid)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    if not masked:
        torch.testing.assert_close(chunk_scores(keys, values, ref_keys, ref_values, value_weight), got)


def test_chunk_scores_broadcast_mask_matches_full_mask():
    keys, ref_keys, values, ref_values = (_randn(2, 3, 2, 5, 4, seed=i) for i in range(4))
    valid = torch.tensor([[True, False, True, True, False], [False, True, True, True, True]])
    per_seq = valid.view(2, 1, 1, 5).expand(2, 1, 2, 5)
    full = per_seq.expand(2, 3, 2, 5)
    got = chunk_scores(keys, values, ref_keys, ref_values, 1.0, per_seq, per_seq)
    want = chunk_scores(keys, values, ref_keys, ref_values, 1.0, full.clone(), full.clone())
    torch.testing.assert_close(got, want)


def test_keep_index_counts_order_and_untouched_sink_and_tail():
    cfg = LagKV(sink_size=4, lag_size=8, keep_ratio=0.5)
    keys, values = _randn(2, 3, 47, 6, seed=0), _randn(2, 3, 47, 5, seed=1)
    keep_index, settled = compress_step(keys, values, 0, cfg)

    # 47 = 4 sink + 5 chunks + 3; chunks 0-3 are scored, chunk 4 and the remainder wait.
    assert keep_index is not None
    assert keep_index.dtype == torch.int64
    assert keep_index.shape == (2, 3, max_stored_tokens(47, cfg)) == (2, 3, 4 + 4 * 4 + 11)
    assert settled == 4 + 4 * 4
    assert bool((keep_index.diff(dim=-1) > 0).all())
    assert torch.equal(keep_index[..., :4], torch.arange(4).expand(2, 3, 4))
    assert torch.equal(keep_index[..., settled:], torch.arange(36, 47).expand(2, 3, 11))
    kept_keys, kept_values = _gather(keys, keep_index), _gather(values, keep_index)
    assert torch.equal(kept_keys[..., :4, :], keys[..., :4, :])
    assert torch.equal(kept_values[..., settled:, :], values[..., 36:, :])

    chunks = [slice(4 + 8 * c, 12 + 8 * c) for c in range(5)]
    scores = chunk_scores(
        torch.stack([keys[..., s, :] for s in chunks[:-1]], dim=2),
        torch.stack([values[..., s, :] for s in chunks[:-1]], dim=2),
        torch.stack([keys[..., s, :] for s in chunks[1:]], dim=2),
        torch.stack([values[..., s, :] for s in chunks[1:]], dim=2),
        cfg.value_weight,
    )
    for c in range(4):
        picked = keep_index[..., 4 + 4 * c : 8 + 4 * c]
        assert bool(((picked >= chunks[c].start) & (picked < chunks[c].stop)).all())
        kept = torch.zeros(2, 3, 8, dtype=torch.bool).scatter_(-1, picked - chunks[c].start, True)
        chunk_score = scores[:, :, c]
        lowest_kept = chunk_score.masked_fill(~kept, float("inf")).amin(dim=-1)
        highest_evicted = chunk_score.masked_fill(kept, float("-inf")).amax(dim=-1)
        assert bool((lowest_kept > highest_evicted).all())

    again, settled_again = compress_step(kept_keys, kept_values, settled, cfg)
    assert again is None
    assert settled_again == settled


def _stream(keys, values, blocks, cfg, valid=None):
    """Feed tokens block by block like a cache would, checking the memory bound after every step."""
    batch, heads = keys.shape[:2]
    stored_k, stored_v = keys[..., :0, :], values[..., :0, :]
    positions = torch.zeros(batch, heads, 0, dtype=torch.int64)
    stored_valid = None if valid is None else torch.zeros(batch, heads, 0, dtype=torch.bool)
    settled = seen = 0
    for size in blocks:
        new = slice(seen, seen + size)
        stored_k = torch.cat([stored_k, keys[..., new, :]], dim=2)
        stored_v = torch.cat([stored_v, values[..., new, :]], dim=2)
        positions = torch.cat([positions, torch.arange(seen, seen + size).expand(batch, heads, size)], 2)
        if valid is not None:
            stored_valid = torch.cat([stored_valid, valid[:, None, new].expand(batch, heads, size)], 2)
        seen += size
        keep_index, settled = compress_step(stored_k, stored_v, settled, cfg, stored_valid)
        if keep_index is not None:
            stored_k, stored_v = _gather(stored_k, keep_index), _gather(stored_v, keep_index)
            positions = torch.gather(positions, 2, keep_index)
            if valid is not None:
                stored_valid = torch.gather(stored_valid, 2, keep_index)
        assert stored_k.shape[2] == stored_v.shape[2] == max_stored_tokens(seen, cfg)
        if seen >= cfg.sink_size:
            assert stored_k.shape[2] - settled < 2 * cfg.lag_size
    assert seen == keys.shape[2]
    assert torch.equal(stored_k, _gather(keys, positions))
    return positions


STREAM_CFG = LagKV(sink_size=3, lag_size=4, keep_ratio=0.5)
STREAM_N = 51


def _aligned_blocks(first: int, step: int) -> list[int]:
    blocks = [first]
    while sum(blocks) < STREAM_N:
        blocks.append(min(step, STREAM_N - sum(blocks)))
    return blocks


@pytest.mark.parametrize("padded", [False, True])
def test_decode_and_chunked_prefill_agree_and_stay_bounded(padded):
    keys, values = _randn(2, 2, STREAM_N, 4, seed=7), _randn(2, 2, STREAM_N, 3, seed=8)
    valid = None
    if padded:
        valid = torch.ones(2, STREAM_N, dtype=torch.bool)
        valid[0, :9] = False  # left padding over the sink and into the first chunks
    token_wise = _stream(keys, values, [1] * STREAM_N, STREAM_CFG, valid)
    one_shot = _stream(keys, values, [STREAM_N], STREAM_CFG, valid)
    for blocks in (_aligned_blocks(3, 4), _aligned_blocks(3, 8), _aligned_blocks(11, 12)):
        assert torch.equal(_stream(keys, values, blocks, STREAM_CFG, valid), token_wise)
    assert torch.equal(one_shot, token_wise)
    assert token_wise.shape[2] < STREAM_N


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(1, STREAM_N - 1), max_size=12, unique=True))
def test_any_block_split_gives_the_token_wise_kept_set(cuts):
    keys, values = _randn(1, 2, STREAM_N, 4, seed=3), _randn(1, 2, STREAM_N, 4, seed=4)
    bounds = [0, *sorted(cuts), STREAM_N]
    blocks = [hi - lo for lo, hi in itertools.pairwise(bounds)]
    token_wise = _stream(keys, values, [1] * STREAM_N, STREAM_CFG)
    assert torch.equal(_stream(keys, values, blocks, STREAM_CFG), token_wise)


def test_max_stored_tokens_hand_computed():
    cfg = LagKV(sink_size=4, lag_size=8, keep_ratio=0.5)
    expected = {0: 0, 3: 3, 4: 4, 19: 19, 20: 16, 27: 23, 28: 20, 47: 31, 1004: 4 + 124 * 4 + 8}
    assert {n: max_stored_tokens(n, cfg) for n in expected} == expected
    with pytest.raises(ValueError):
        max_stored_tokens(-1, cfg)


def test_constant_keys_and_values_are_finite_and_keep_earliest_on_ties():
    cfg = LagKV(sink_size=2, lag_size=64, keep_ratio=0.5)
    total = 2 + 64 * 4 + 5
    keys, values = torch.full((1, 2, total, 4), 3.0), torch.full((1, 2, total, 5), -1.0)
    chunk_k, next_k = keys[..., 2:66, :].unsqueeze(2), keys[..., 66:130, :].unsqueeze(2)
    chunk_v, next_v = values[..., 2:66, :].unsqueeze(2), values[..., 66:130, :].unsqueeze(2)
    scores = chunk_scores(chunk_k, chunk_v, next_k, next_v, 1.0)
    torch.testing.assert_close(scores, torch.full((1, 2, 1, 64), 2.0 / 64))

    keep_index, settled = compress_step(keys, values, 0, cfg)
    assert keep_index is not None
    assert settled == 2 + 3 * 32
    # Ties keep the earliest tokens: the first half of each scored chunk.
    kept_chunks = [t for c in range(3) for t in range(2 + 64 * c, 34 + 64 * c)]
    expected = [0, 1, *kept_chunks, *range(2 + 64 * 3, total)]
    assert keep_index.tolist() == [[expected, expected]]


def test_constant_reference_with_varying_chunk_is_finite():
    keys, values = _randn(1, 1, 2, 8, 4, seed=5), _randn(1, 1, 2, 8, 4, seed=6)
    scores = chunk_scores(keys, values, torch.zeros_like(keys), torch.ones_like(values), 1.0)
    assert bool(torch.isfinite(scores).all())
    torch.testing.assert_close(scores.sum(dim=-1), torch.full((1, 1, 2), 2.0))


@pytest.mark.parametrize(("total", "settled"), [(0, 0), (1, 0), (16, 0), (16 + 2 * 8 - 1, 0), (40, 25)])
def test_too_short_to_score_returns_none(total, settled):
    cfg = LagKV(sink_size=16, lag_size=8)
    keys, values = _randn(1, 2, total, 4, seed=0), _randn(1, 2, total, 4, seed=1)
    keep_index, new_settled = compress_step(keys, values, settled, cfg)
    assert keep_index is None
    assert new_settled == max(settled, min(total, cfg.sink_size))


def test_keep_everything_settles_without_evicting():
    cfg = LagKV(sink_size=2, lag_size=4, keep_ratio=1.0)
    keys = _randn(1, 1, 2 + 4 * 4 + 1, 4, seed=0)
    assert compress_step(keys, keys, 0, cfg) == (None, 2 + 3 * 4)


def test_padding_is_evicted_first_and_does_not_leak_across_sequences():
    cfg = LagKV(sink_size=2, lag_size=6, keep_ratio=0.5)
    total, keep = 2 + 6 * 5 + 2, cfg.keep_per_chunk
    keys, values = _randn(3, 2, total, 4, seed=11), _randn(3, 2, total, 5, seed=12)
    valid = torch.ones(3, total, dtype=torch.bool)
    valid[0, :12] = False  # left padding: sink, all of chunk 0 and 4 tokens of chunk 1
    valid[2, [15, 17, 19]] = False  # holes inside chunk 2
    valid[2, 26:] = False  # right padding: chunk 4, the reference of chunk 3, is all padding

    keep_index, settled = compress_step(keys, values, 0, cfg, valid)
    assert keep_index is not None
    assert keep_index.shape == (3, 2, 2 + 4 * keep + 8)
    assert settled == 2 + 4 * keep
    for b in range(3):
        for h in range(2):
            for c in range(4):
                picked = keep_index[b, h, 2 + keep * c : 2 + keep * (c + 1)]
                assert bool(((picked >= 2 + 6 * c) & (picked < 8 + 6 * c)).all())
                chunk_valid = valid[b, 2 + 6 * c : 8 + 6 * c].nonzero().flatten() + 2 + 6 * c
                if len(chunk_valid) >= keep:
                    assert bool(valid[b, picked].all()), (b, h, c)
                else:
                    assert set(chunk_valid.tolist()) <= set(picked.tolist()), (b, h, c)

    alone, _ = compress_step(keys[1:2], values[1:2], 0, cfg)
    assert torch.equal(keep_index[1:2], alone)
    per_head, _ = compress_step(keys, values, 0, cfg, valid[:, None, :].expand(3, 2, total))
    assert torch.equal(per_head, keep_index)


def test_sequences_and_heads_select_independently():
    cfg = LagKV(sink_size=2, lag_size=6, keep_ratio=0.5)
    keys, values = _randn(2, 3, 2 + 6 * 4 + 3, 4, seed=21), _randn(2, 3, 2 + 6 * 4 + 3, 5, seed=22)
    keep_index, _ = compress_step(keys, values, 0, cfg)
    assert keep_index is not None
    for b in range(2):
        for h in range(3):
            alone, _ = compress_step(keys[b : b + 1, h : h + 1], values[b : b + 1, h : h + 1], 0, cfg)
            assert torch.equal(keep_index[b : b + 1, h : h + 1], alone)
    assert not torch.equal(keep_index[0, 0], keep_index[0, 1])
    assert not torch.equal(keep_index[0, 0], keep_index[1, 0])


@pytest.mark.parametrize(
    "bad",
    [
        {"lag_size": 0},
        {"sink_size": -1},
        {"keep_ratio": 0.0},
        {"keep_ratio": 1.5},
        {"keep_ratio": float("nan")},
        {"value_weight": -1.0},
    ],
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(KVCompressError):
        LagKV(**bad)


@pytest.mark.parametrize(
    ("keep_ratio", "lag_size", "keep"),
    [(0.5, 128, 64), (0.3, 10, 3), (0.66, 10, 7), (0.001, 8, 1), (1.0, 7, 7)],
)
def test_keep_per_chunk(keep_ratio, lag_size, keep):
    assert LagKV(lag_size=lag_size, keep_ratio=keep_ratio).keep_per_chunk == keep
