"""Passkey retrieval: can a model still find a number hidden in long filler text through its cache?

Each prompt is an instruction, repetitive neutral filler sentences with one "pass key" sentence
inserted at a chosen depth, and a question whose answer is the key. The model decodes greedily and
is right when the key's digits appear in its continuation. Prompts are built by token counts, so a
prompt's length is at most its target and within about one filler word of it; the key sits at a
sentence boundary as close as possible to the requested depth, and every prompt records the length
and depth it really has. Everything is deterministic given the seed; the filler never contains any
evaluation text.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from kvcompress.compat import CACHE_ARG
from kvcompress.errors import KVCompressError
from kvcompress.evaluate.perplexity import cache_bytes

INSTRUCTION = ("A pass key is hidden somewhere in the text below. Find it and remember it: "
               "you will be asked for it at the end.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"

MIN_DIGITS, MAX_DIGITS = 5, 64
EXTRA_NEW_TOKENS = 4  # decode digits + 4 tokens: room for a leading space, punctuation, split digits

_WORDS = FILLER.split()


@dataclass
class PasskeyPrompt:
    """One passkey prompt.

    Attributes
    ----------
    length : int
        Target length in tokens.
    depth : float
        Target depth of the key sentence in the filler, 0 (right after the instruction) to 1 (right
        before the question).
    key : str
        The pass key (``digits`` decimal digits).
    text : str
        The prompt text.
    input_ids : list of int
        The prompt's token ids (special tokens included, as the tokenizer adds them).
    needle_at : int
        Index in ``input_ids`` where the key sentence starts.
    depth_actual : float
        Measured depth: filler tokens before the key sentence over all filler tokens.
    """

    length: int
    depth: float
    key: str
    text: str
    input_ids: list[int]
    needle_at: int
    depth_actual: float

    @property
    def tokens(self) -> int:
        """The prompt's real length in tokens."""
        return len(self.input_ids)

    def to_json(self) -> dict:
        """Everything but the text and ids, plus a fingerprint of the ids."""
        return {"length": self.length, "tokens": self.tokens, "depth": self.depth,
                "depth_actual": round(self.depth_actual, 4), "needle_at": self.needle_at, "key": self.key,
                "sha256": _fingerprint([self.input_ids])}


def _fingerprint(id_lists: Sequence[Sequence[int]]) -> str:
    h = hashlib.sha256()
    for ids in id_lists:
        h.update((",".join(map(str, ids)) + "|").encode())
    return h.hexdigest()[:16]


def check_digits(digits: int) -> int:
    """Validate a key length.

    Raises
    ------
    KVCompressError
        Unless ``5 <= digits <= 64``.
    """
    if not isinstance(digits, int) or isinstance(digits, bool) or not MIN_DIGITS <= digits <= MAX_DIGITS:
        raise KVCompressError(f"digits must be an integer from {MIN_DIGITS} to {MAX_DIGITS}, got {digits!r}")
    return digits


def depth_fractions(depths: int) -> list[float]:
    """``depths`` evenly spaced depths from 0 to 1 (a single depth is 0.5).

    Raises
    ------
    KVCompressError
        If ``depths < 1``.
    """
    if not isinstance(depths, int) or depths < 1:
        raise KVCompressError(f"depths must be a positive number of depths, got {depths!r}")
    if depths == 1:
        return [0.5]
    return [round(i / (depths - 1), 6) for i in range(depths)]


def parse_lengths(spec: str | Sequence[int]) -> list[int]:
    """Target lengths from ``"1024,2048"`` (or a sequence of ints), duplicates dropped, order kept.

    Raises
    ------
    KVCompressError
        On anything but positive integers.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    lengths: list[int] = []
    for item in items:
        try:
            value = int(str(item).strip())
        except ValueError:
            raise KVCompressError(f"lengths must be comma-separated token counts, got {spec!r}") from None
        if value < 1:
            raise KVCompressError(f"lengths must be positive, got {value}")
        if value not in lengths:
            lengths.append(value)
    if not lengths:
        raise KVCompressError("give at least one length")
    return lengths


def _filler_words(n: int) -> list[str]:
    """The last ``n`` words of the endlessly repeated filler: the filler always ends on a full sentence."""
    k = len(_WORDS)
    return [_WORDS[(i - n) % k] for i in range(n)]


def _split_at(words: list[str], depth: float) -> int:
    """The sentence boundary in ``words`` closest to ``depth`` (ties go to the earlier boundary)."""
    n = len(words)
    bounds = [0] + [i for i in range(1, n) if words[i - 1].endswith(".")] + [n]
    return min(bounds, key=lambda b: (abs(b - depth * n), b))


class _Builder:
    """Assembles prompt text for a number of filler words and counts its tokens."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def count(self, text: str) -> int:
        return len(self.ids(text))

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, verbose=False).input_ids)

    def text(self, n: int, depth: float, key: str) -> tuple[str, tuple[int, int, int, int]]:
        """Prompt text and character spans: (end of instruction, needle start, needle end, filler end)."""
        words = _filler_words(n)
        cut = _split_at(words, depth)
        before, after = " ".join(words[:cut]), " ".join(words[cut:])
        parts = [INSTRUCTION] + ([before] if before else [])
        head = " ".join(parts)
        needle_start = len(head) + 1
        needle_end = needle_start + len(NEEDLE.format(key=key))
        text = head + " " + NEEDLE.format(key=key)
        if after:
            text += " " + after
        filler_end = len(text)
        return text + " " + QUESTION, (len(INSTRUCTION), needle_start, needle_end, filler_end)


def make_prompts(tokenizer, lengths: Sequence[int] | str = (1024, 2048, 4096), depths: int = 10, digits: int = 5,
                 seed: int = 0, max_length: int | None = None) -> list[PasskeyPrompt]:
    """Passkey prompts: for each target length, one prompt per depth, each with its own key.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
        The model's tokenizer; lengths are counted in its tokens, special tokens included.
    lengths : sequence of int or str
        Target prompt lengths in tokens (``"1024,2048"`` also accepted).
    depths : int
        Number of evenly spaced depths from 0% to 100% of the filler.
    digits : int
        Key length, 5 to 64 digits.
    seed : int
        Seeds a ``random.Random`` that draws one key per prompt, in order (lengths outer, depths inner).
    max_length : int, optional
        Refuse targets above this (the model's ``max_position_embeddings``).

    Returns
    -------
    list of PasskeyPrompt
        ``len(lengths) * depths`` prompts; each has at most its target length, within one filler word.

    Raises
    ------
    KVCompressError
        Bad digits/depths/lengths, a target above ``max_length`` or too short to hold the instruction,
        key and question, or a tokenizer that cannot spell the key's digits.
    """
    check_digits(digits)
    fractions = depth_fractions(depths)
    targets = parse_lengths(lengths)
    if max_length is not None:
        too_long = [t for t in targets if t > max_length]
        if too_long:
            raise KVCompressError(f"passkey length {too_long[0]} exceeds the model's max_position_embeddings "
                                  f"({max_length})")
    rng = random.Random(seed)
    build = _Builder(tokenizer)
    probe = "1" * digits
    needle_ids = build.ids(NEEDLE.format(key=probe))
    spelled = "".join(tokenizer.decode(needle_ids, skip_special_tokens=True).split())
    if probe not in spelled:
        raise KVCompressError("the tokenizer cannot spell a pass key (its digits decode to unknown tokens)")
    base = build.count(build.text(0, 0.0, probe)[0])
    too_short = [t for t in targets if t < base]
    if too_short:
        raise KVCompressError(f"passkey length {too_short[0]} is too short: the instruction, key and question "
                              f"alone take {base} tokens")
    cycles = 4
    per_word = max((build.count(build.text(cycles * len(_WORDS), 0.5, probe)[0]) - base) / (cycles * len(_WORDS)),
                   0.25)
    prompts = []
    for target in targets:
        for depth in fractions:
            key = str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(digits - 1))
            prompts.append(_fit(build, target, depth, key, base, per_word))
    return prompts


def _fit(build: _Builder, target: int, depth: float, key: str, base: int, per_word: float) -> PasskeyPrompt:
    """The prompt with the most filler words whose length does not exceed ``target``."""
    sizes: dict[int, int] = {}

    def size(n: int) -> int:
        if n not in sizes:
            sizes[n] = build.count(build.text(n, depth, key)[0])
        return sizes[n]

    n = max(0, round((target - base) / per_word))
    for _ in range(16):  # Newton-like steps on the (nearly linear) token count
        gap = target - size(n)
        if gap == 0:
            break
        step = round(gap / per_word) or (1 if gap > 0 else -1)
        n = max(0, n + step)
    while n > 0 and size(n) > target:
        n -= 1
    while size(n + 1) <= target:
        n += 1
    text, (intro_end, needle_start, needle_end, filler_end) = build.text(n, depth, key)
    ids = build.ids(text)
    # prefixes end right before the joining space so no token straddles the cut
    intro_tokens = build.count(text[:intro_end])
    needle_at = build.count(text[:needle_start - 1])
    after_needle = build.count(text[:needle_end])
    filler_tokens = build.count(text[:filler_end])
    before = needle_at - intro_tokens
    total = before + (filler_tokens - after_needle)
    actual = before / total if total > 0 else depth
    return PasskeyPrompt(length=target, depth=depth, key=key, text=text, input_ids=ids, needle_at=needle_at,
                         depth_actual=actual)


def is_correct(key: str, continuation: str) -> bool:
    """Whether the key's digits appear in ``continuation`` once all whitespace is removed."""
    return key in "".join(continuation.split())


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


@torch.no_grad()
def passkey_accuracy(model, tokenizer, prompts: Sequence[PasskeyPrompt], new_cache: Callable[[], object] | None,
                     progress: Callable[[int, int], None] | None = None) -> dict:
    """Greedy passkey retrieval accuracy of ``model`` on ``prompts``.

    Parameters
    ----------
    model : PreTrainedModel
        Anything with a transformers-style ``generate``.
    tokenizer : PreTrainedTokenizerBase
        Decodes the continuation.
    prompts : sequence of PasskeyPrompt
        From :func:`make_prompts`.
    new_cache : callable or None
        Returns a fresh cache per prompt (e.g. ``lambda: kvcompress.make_cache(model)`` or
        ``DynamicCache``); its bytes per token are measured at the end of each prompt. ``None`` lets
        ``generate`` pick its own cache and skips the measurement.
    progress : callable, optional
        ``(done_prompts, total_prompts)``.

    Returns
    -------
    dict
        ``{"accuracy", "correct", "total", "kv_bytes_per_token", "by_length": {str(length): {"accuracy",
        "correct", "total", "tokens", "kv_bytes_per_token"}}, "prompts_sha256", "answers": [{"length",
        "depth", "key", "answer", "correct"}]}``; ``kv_bytes_per_token`` (``cache_bytes / seq_length``
        at the end of each prompt, averaged) is ``None`` without ``new_cache``.
    """
    if not prompts:
        raise KVCompressError("no passkey prompts")
    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers, per_token = [], []
    for i, p in enumerate(prompts):
        ids = torch.tensor([p.input_ids], dtype=torch.long, device=device)
        cache = new_cache() if new_cache is not None else None
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{CACHE_ARG: cache},
                             max_new_tokens=len(p.key) + EXTRA_NEW_TOKENS, do_sample=False, pad_token_id=pad)
        new = out[0, ids.shape[1]:]
        answer = tokenizer.decode(new, skip_special_tokens=True)
        answers.append({"length": p.length, "depth": p.depth, "key": p.key, "answer": answer,
                        "correct": is_correct(p.key, answer)})
        if cache is not None and cache.get_seq_length() > 0:
            per_token.append(cache_bytes(cache) / cache.get_seq_length())
        if progress:
            progress(i + 1, len(prompts))

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    by_length: dict[str, dict] = {}
    for target in dict.fromkeys(p.length for p in prompts):
        idx = [i for i, p in enumerate(prompts) if p.length == target]
        correct = sum(answers[i]["correct"] for i in idx)
        by_length[str(target)] = {
            "accuracy": correct / len(idx), "correct": correct, "total": len(idx),
            "tokens": [prompts[i].tokens for i in idx],
            "kv_bytes_per_token": mean([per_token[i] for i in idx]) if per_token else None,
        }
    correct = sum(a["correct"] for a in answers)
    return {"accuracy": correct / len(prompts), "correct": correct, "total": len(prompts),
            "kv_bytes_per_token": mean(per_token), "by_length": by_length,
            "prompts_sha256": _fingerprint([p.input_ids for p in prompts]), "answers": answers}


def compare_passkey(checkpoint: str | Path, lengths: Sequence[int] | str = (1024, 2048, 4096), depths: int = 10,
                    digits: int = 5, seed: int = 0, source: str | None = None,
                    progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Passkey accuracy of a compressed checkpoint and of its source model on the same prompts, same run.

    The compressed model decodes through its kvcompress cache (evicting, with a LagKV recipe); the
    source model, rebuilt from the manifest's source in the checkpoint's dtype, through a ``DynamicCache``.

    Parameters
    ----------
    checkpoint : str or Path
        Folder written by ``kvcompress export``.
    lengths, depths, digits, seed
        See :func:`make_prompts`; lengths may not exceed the model's ``max_position_embeddings``.
    source : str, optional
        Source model (default: the manifest's).
    progress : callable, optional
        ``(phase, done, total)`` with phases ``"compressed"`` and ``"baseline"``.

    Returns
    -------
    dict
        ``{"lengths", "depths", "digits", "seed", "new_tokens", "source", "prompts": [PasskeyPrompt.to_json()],
        "baseline": passkey_accuracy(...), "compressed": passkey_accuracy(...), "ratios": {"kv_bytes",
        "by_length"}, "fp16_kv_bytes_per_token", "x_smaller_than_fp16": {length: ...}}``; ratios are
        compressed over baseline KV bytes per token (the baseline holds the run's dtype), ``x_smaller_than_fp16``
        an fp16 cache of the same model over the compressed one.
    """
    from transformers import DynamicCache

    from kvcompress.checkpoint.loading import load, load_source, make_cache
    from kvcompress.memory import baseline_bytes_per_token
    from kvcompress.sources import ModelSpec

    tick = progress or (lambda *_: None)
    check_digits(digits)
    model, tokenizer = load(checkpoint)
    max_length = getattr(model.config, "max_position_embeddings", None)
    prompts = make_prompts(tokenizer, lengths, depths, digits, seed, max_length=max_length)
    manifest = model.kvcompress_manifest
    fp16 = baseline_bytes_per_token(ModelSpec.from_config(model.config.to_dict()))
    comp = passkey_accuracy(model, tokenizer, prompts, partial(make_cache, model),
                            lambda d, n: tick("compressed", d, n))
    dtype = model.dtype
    del model  # free the compressed model before building the source model
    src_name = source or manifest["source"]["model"]
    base_model = load_source(manifest, source, dtype)
    base = passkey_accuracy(base_model, tokenizer, prompts, lambda: DynamicCache(config=base_model.config),
                            lambda d, n: tick("baseline", d, n))

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return {
        "lengths": [int(t) for t in dict.fromkeys(p.length for p in prompts)],
        "depths": depth_fractions(depths),
        "digits": digits,
        "seed": seed,
        "new_tokens": digits + EXTRA_NEW_TOKENS,
        "source": str(src_name),
        "prompts": [p.to_json() for p in prompts],
        "baseline": base,
        "compressed": comp,
        "ratios": {
            "kv_bytes": ratio(comp["kv_bytes_per_token"], base["kv_bytes_per_token"]),
            "by_length": {k: ratio(v["kv_bytes_per_token"], base["by_length"][k]["kv_bytes_per_token"])
                          for k, v in comp["by_length"].items()},
        },
        "fp16_kv_bytes_per_token": fp16,
        "x_smaller_than_fp16": {k: ratio(fp16, v["kv_bytes_per_token"]) for k, v in comp["by_length"].items()},
    }
