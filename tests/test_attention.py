"""The latent attention kernel in torch: GQA layout, causal block, padding, and query blocking."""

import pytest
import torch
import torch.nn.functional as F

from kvcompress.runtime import attention


def _inputs(t: int, s: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, groups, per_group, rep, d, r = 2, 2, 2, 3, 16, 12
    q = torch.randn(b, groups * per_group * rep, t, d, generator=g)
    kt = torch.randn(b, groups, per_group, d, s, generator=g)
    v = torch.randn(b, groups, s, r, generator=g)
    valid = torch.rand(b, groups, s, generator=g) > 0.2
    return q, kt, v, valid


def _reference(q, kt, v, valid, scaling):
    # plain SDPA on per-head copies: query head h reads KV head h // rep, whose group's value latent
    b, hq, t, _ = q.shape
    _, groups, per_group, d, s = kt.shape
    rep = hq // (groups * per_group)
    k = kt.transpose(-1, -2).reshape(b, groups * per_group, s, d).repeat_interleave(rep, dim=1)
    vv = v.repeat_interleave(per_group * rep, dim=1)
    mask = torch.ones(t, s, dtype=torch.bool).tril(diagonal=s - t).expand(b, hq, t, s).clone()
    mask &= valid.repeat_interleave(per_group * rep, dim=1).unsqueeze(2)
    mask[..., torch.arange(t), torch.arange(s - t, s)] = True
    return F.scaled_dot_product_attention(q, k, vv, attn_mask=mask, scale=scaling)


def test_matches_sdpa_on_per_head_copies():
    q, kt, v, valid = _inputs(t=5, s=23)
    torch.testing.assert_close(attention.latent_attention(q, kt, v, valid, 0.25), _reference(q, kt, v, valid, 0.25))


def test_single_query_without_padding():
    q, kt, v, _ = _inputs(t=1, s=17, seed=1)
    everything = torch.ones(2, 1, 17, dtype=torch.bool)
    torch.testing.assert_close(attention.latent_attention(q, kt, v, None, 0.5),
                               _reference(q, kt, v, everything.expand(2, 2, 17), 0.5))


def test_query_blocks_give_the_same_result(monkeypatch):
    q, kt, v, valid = _inputs(t=29, s=40, seed=2)
    whole = attention.latent_attention(q, kt, v, valid, 0.3)
    monkeypatch.setattr(attention, "QUERY_BLOCK", 7)
    torch.testing.assert_close(attention.latent_attention(q, kt, v, valid, 0.3), whole)


@pytest.mark.parametrize(("groups", "per_group"), [(2, 2), (1, 3), (3, 1)])  # a copy per group, a stride-0 view,
def test_a_prompt_into_an_empty_cache_takes_fused_causal_attention(monkeypatch, groups, per_group):  # values as is
    g = torch.Generator().manual_seed(groups)
    q = torch.randn(1, groups * per_group * 2, 33, 16, generator=g)
    kt = torch.randn(1, groups, per_group, 16, 33, generator=g)
    v = torch.randn(1, groups, 33, 16, generator=g)
    everything = torch.ones(1, groups, 33, dtype=torch.bool)
    fused = attention.latent_attention(q, kt, v, None, 0.3)
    torch.testing.assert_close(fused, _reference(q, kt, v, everything, 0.3))
    calls = []
    monkeypatch.setattr(attention, "fused_causal_attention", lambda *a: calls.append(a) or fused)
    attention.latent_attention(q, kt, v, None, 0.3)
    attention.latent_attention(q, kt, v, everything, 0.3)  # a padding mask: the score blocks
    attention.latent_attention(q[:, :, 1:], kt, v, None, 0.3)  # earlier tokens in the cache: the score blocks
    # values wider than the keys (a joint latent): SDPA would take its math path and hold all scores
    wide = torch.randn(1, groups, 33, 48, generator=g)
    want = _reference(q, kt, wide, everything, 0.3)
    torch.testing.assert_close(attention.latent_attention(q, kt, wide, None, 0.3), want)
    assert len(calls) == 1
