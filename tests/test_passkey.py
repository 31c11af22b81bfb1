"""Passkey retrieval (kvcompress.evaluate.passkey and ``kvcompress eval --passkey``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, build_tiny, run_cli, save_tokenizer, tiny_config
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kvcompress.checkpoint.export import export
from kvcompress.compat import pop_cache
from kvcompress.errors import KVCompressError
from kvcompress.evaluate.passkey import (
    FILLER,
    INSTRUCTION,
    NEEDLE,
    QUESTION,
    depth_fractions,
    is_correct,
    make_prompts,
    parse_lengths,
    passkey_accuracy,
)
from kvcompress.recipe import Recipe
from kvcompress.sources import open_source

pytestmark = pytest.mark.usefixtures("one_thread")

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260k"
MAX_POS = 256


def digit_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer that knows every word of the passkey prompts and spells digits one by one."""
    split = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    words = ["[UNK]", "[PAD]", "[BOS]", "[EOS]", *(str(d) for d in range(10))]
    for text in (INSTRUCTION, FILLER, NEEDLE.format(key="0"), QUESTION, "the quick brown fox"):
        for word, _ in split.pre_tokenize_str(text):
            if word not in words:
                words.append(word)
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = split
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token="[BOS]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return digit_tokenizer()


def n_tokens(tok, text: str) -> int:
    return len(tok(text).input_ids)


def find(seq: list[int], sub: list[int]) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    return -1


# --------------------------------------------------------------------------- prompts


def test_lengths_within_a_few_tokens_of_targets(tok):
    targets = [64, 100, 181, 256, 1000]
    prompts = make_prompts(tok, targets, depths=5, digits=5, seed=0)
    assert len(prompts) == len(targets) * 5
    for p in prompts:
        assert p.tokens == len(tok(p.text).input_ids)
        assert 0 <= p.length - p.tokens <= 3, (p.length, p.tokens)


@pytest.mark.skipif(not STORIES.is_dir(), reason="shared stories260k model not present")
def test_lengths_with_a_subword_tokenizer():
    tok = AutoTokenizer.from_pretrained(str(STORIES))
    for p in make_prompts(tok, [256, 400, 512], depths=4, digits=7, seed=3):
        assert 0 <= p.length - p.tokens <= 8, (p.length, p.tokens)
        assert p.key in "".join(tok.decode(p.input_ids[p.needle_at:], skip_special_tokens=True).split())


def test_key_sits_at_the_requested_depth(tok):
    prompts = make_prompts(tok, [128, 256, 1000], depths=5, digits=6, seed=1)
    head = n_tokens(tok, INSTRUCTION)
    tail = n_tokens(tok, QUESTION)
    for p in prompts:
        needle = tok(NEEDLE.format(key=p.key)).input_ids
        at = find(p.input_ids, needle)
        assert at == p.needle_at, (at, p.needle_at)
        assert p.text.count(p.key) == 2  # the key occurs only in the needle sentence
        filler = p.tokens - head - len(needle) - tail
        rel = (at - head) / filler
        tolerance = 6 / filler + 0.01  # the needle snaps to a sentence boundary (<= 6 tokens here)
        assert abs(rel - p.depth) <= tolerance, (p.length, p.depth, rel)
        assert abs(p.depth_actual - rel) < 0.01
        if p.depth == 0.0:
            assert p.text.startswith(INSTRUCTION + " " + NEEDLE.format(key=p.key))
        if p.depth == 1.0:
            assert p.text.endswith(NEEDLE.format(key=p.key) + " " + QUESTION)
        assert p.text.endswith(QUESTION)


def test_prompts_are_deterministic_per_seed(tok):
    a = make_prompts(tok, [100, 200], depths=4, digits=8, seed=7)
    b = make_prompts(tok, [100, 200], depths=4, digits=8, seed=7)
    c = make_prompts(tok, [100, 200], depths=4, digits=8, seed=8)
    assert [(p.text, p.input_ids, p.key) for p in a] == [(p.text, p.input_ids, p.key) for p in b]
    assert [p.key for p in a] != [p.key for p in c]
    keys = [p.key for p in a]
    assert len(set(keys)) == len(keys)  # one key per prompt
    assert all(len(k) == 8 and k.isdigit() for k in keys)


@pytest.mark.parametrize("digits", [0, 4, 65, 100])
def test_digits_outside_5_to_64_are_refused(tok, digits):
    with pytest.raises(KVCompressError, match="digits"):
        make_prompts(tok, [128], depths=2, digits=digits)


@pytest.mark.parametrize("digits", [5, 64])
def test_digits_at_the_bounds_are_accepted(tok, digits):
    (p,) = make_prompts(tok, [256], depths=1, digits=digits)
    assert len(p.key) == digits and p.depth == 0.5


def test_depths_and_lengths_validation(tok):
    assert depth_fractions(1) == [0.5]
    assert depth_fractions(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_lengths("256, 128,256") == [256, 128]
    for bad in ("abc", "0", "12,-3", ""):
        with pytest.raises(KVCompressError):
            parse_lengths(bad)
    with pytest.raises(KVCompressError, match="depths"):
        make_prompts(tok, [128], depths=0)
    with pytest.raises(KVCompressError, match="max_position_embeddings"):
        make_prompts(tok, [128, 300], depths=2, max_length=256)
    with pytest.raises(KVCompressError, match="too short"):
        make_prompts(tok, [20], depths=2)


def test_tokenizer_that_cannot_spell_digits_is_refused(tmp_path):
    wordy = save_tokenizer(tmp_path)  # the shared test vocabulary maps numbers to [UNK]
    with pytest.raises(KVCompressError, match="cannot spell"):
        make_prompts(wordy, [128], depths=2)


# --------------------------------------------------------------------------- scoring


class FakeCache:
    """Stands in for a cache: ``kv_bytes`` is 100 bytes per token seen."""

    def __init__(self) -> None:
        self.seen = 0

    def kv_bytes(self) -> int:
        return 100 * self.seen

    def get_seq_length(self) -> int:
        return self.seen


class ReaderStub:
    """A "model" whose greedy continuation is the pass key it reads in the prompt (optionally corrupted)."""

    def __init__(self, tok, corrupt: bool = False) -> None:
        self.tok, self.corrupt, self.calls = tok, corrupt, []

    def generate(self, input_ids, attention_mask=None, max_new_tokens=0, **kwargs):
        cache = pop_cache(kwargs)  # "cache" from transformers 5.24 on, "past_key_values" before
        self.calls.append(input_ids[0].tolist())
        text = "".join(self.tok.decode(input_ids[0]).split())
        key = re.search(r"passkeyis(\d+)", text).group(1)
        if self.corrupt:
            key = key[:-1] + str((int(key[-1]) + 1) % 10)
        new = self.tok(f"{key} . Remember", return_tensors="pt").input_ids[:, :max_new_tokens]
        if cache is not None:
            cache.seen = input_ids.shape[1] + new.shape[1] - 1
        return torch.cat([input_ids, new], dim=1)


def test_correct_answers_score_one_and_wrong_answers_zero(tok):
    prompts = make_prompts(tok, [96, 160], depths=3, digits=5, seed=2)
    right = passkey_accuracy(ReaderStub(tok), tok, prompts, FakeCache)
    assert right["accuracy"] == 1.0 and right["correct"] == right["total"] == 6
    assert all(v["accuracy"] == 1.0 for v in right["by_length"].values())
    assert right["kv_bytes_per_token"] == pytest.approx(100.0)
    assert all(p.key in "".join(a["answer"].split()) for p, a in zip(prompts, right["answers"], strict=True))
    wrong = passkey_accuracy(ReaderStub(tok, corrupt=True), tok, prompts, None)
    assert wrong["accuracy"] == 0.0 and wrong["correct"] == 0
    assert all(v["accuracy"] == 0.0 for v in wrong["by_length"].values())
    assert wrong["kv_bytes_per_token"] is None  # no cache handed in: nothing measured


def test_is_correct_ignores_spaces_only():
    assert is_correct("12345", " 1 2 3 4 5. Remember")
    assert is_correct("12345", "12345")
    assert not is_correct("12345", "1234")
    assert not is_correct("12345", "12 34 6")


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def lagkv_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Llama (max 256 positions) with the digit tokenizer, exported with LagKV eviction."""
    root = tmp_path_factory.mktemp("passkey")
    cfg = tiny_config("llama_gqa")
    cfg.max_position_embeddings = MAX_POS
    tiny = build_tiny("llama_gqa", root / "src", seed=5, config=cfg)
    digit_tokenizer().save_pretrained(str(tiny.path))  # replaces the word-level tokenizer
    rec = Recipe(name="lagkv-test")
    rec.lowrank.enabled = False
    rec.lagkv.enabled = True
    rec.lagkv.sink_size, rec.lagkv.lag_size, rec.lagkv.keep_ratio = 4, 16, 0.25
    rec.calibration.max_tokens, rec.calibration.seq_len = 256, 128
    out = root / "ckpt"
    export(open_source(tiny.path), out, rec, dtype="float32")
    return out


def test_eval_passkey_json_end_to_end(lagkv_checkpoint):
    args = ("eval", lagkv_checkpoint, "--passkey", "--lengths", "96,200", "--depths", "3", "--seed", "4",
            "--json")
    res = run_cli(*args)
    assert res.exit_code == 0, res.stderr + repr(res.exception)
    r = json.loads(res.stdout)
    assert r["lengths"] == [96, 200] and r["depths"] == [0.0, 0.5, 1.0]
    assert r["digits"] == 5 and r["seed"] == 4 and r["new_tokens"] == 9
    assert len(r["prompts"]) == 6
    for p in r["prompts"]:
        assert 0 <= p["length"] - p["tokens"] <= 3
    base, comp = r["baseline"], r["compressed"]
    for side in (base, comp):
        assert 0.0 <= side["accuracy"] <= 1.0
        assert set(side["by_length"]) == {"96", "200"}
        for v in side["by_length"].values():
            assert 0.0 <= v["accuracy"] <= 1.0 and v["total"] == 3 and v["kv_bytes_per_token"] > 0
        assert side["kv_bytes_per_token"] > 0
    # the very same prompts went to both models
    assert base["prompts_sha256"] == comp["prompts_sha256"]
    strip = [{k: a[k] for k in ("length", "depth", "key")} for a in base["answers"]]
    assert strip == [{k: a[k] for k in ("length", "depth", "key")} for a in comp["answers"]]
    assert [a["key"] for a in comp["answers"]] == [p["key"] for p in r["prompts"]]
    # LagKV evicts once a prompt spans several chunks
    assert comp["by_length"]["200"]["kv_bytes_per_token"] < base["by_length"]["200"]["kv_bytes_per_token"]
    assert r["ratios"]["by_length"]["200"] < 1.0
    again = run_cli(*args)
    assert json.loads(again.stdout) == r  # deterministic


def test_eval_passkey_with_text_and_table(lagkv_checkpoint, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(["the quick brown fox"] * 60))
    res = run_cli("eval", lagkv_checkpoint, "--passkey", "--lengths", "128", "--depths", "2", "--text", text,
                  "--context", "64", "--block", "16", "--json")
    assert res.exit_code == 0, res.stderr + repr(res.exception)
    r = json.loads(res.stdout)
    assert set(r) == {"perplexity", "passkey"}
    assert r["perplexity"]["baseline"]["ppl"] > 0 and r["passkey"]["lengths"] == [128]
    table = run_cli("eval", lagkv_checkpoint, "--passkey", "--lengths", "128", "--depths", "2")
    assert table.exit_code == 0, table.stderr + repr(table.exception)
    assert "passkey retrieval" in table.stdout and "accuracy: baseline" in table.stdout


@pytest.mark.parametrize(("args", "needles"), [
    ((), ("--text", "--passkey")),
    (("--passkey", "--digits", "4"), ("digits",)),
    (("--passkey", "--lengths", "128,300"), ("300", "max_position_embeddings")),
    (("--passkey", "--lengths", "abc"), ("lengths",)),
    (("--passkey", "--depths", "0"), ("depths",)),
])
def test_eval_passkey_errors_are_one_line(lagkv_checkpoint, args, needles):
    assert_one_line_error(run_cli("eval", lagkv_checkpoint, *args), *needles)
