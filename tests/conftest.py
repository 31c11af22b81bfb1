"""Shared fixtures: tiny random causal LMs saved as safetensors checkpoints, and CLI helpers.

Every model is built from a config, re-initialized with weights large enough that low-rank truncation
visibly changes the logits (HF's default init zeroes biases and sets norms to one, which would hide
bias folding and q/k norm bugs), saved with ``save_pretrained`` (safetensors) beside a word-level
tokenizer whose vocabulary covers kvcompress' built-in calibration text.
"""

from __future__ import annotations

import os

# Triton kernels are tested on the CPU through Triton's interpreter, which must be chosen before triton
# is imported (transformers imports it while this module loads).
os.environ.setdefault("TRITON_INTERPRET", "1")

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)
from typer.testing import CliRunner

# read-only models and text beside the project (../shared); tests that need them skip when absent
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SMOLLM = SHARED / "models" / "smollm2-135m-instruct-q4_1"

VOCAB = 512
# the test tokenizer's words: the built-in calibration text of kvcompress 0.1.0 (its first part today), frozen,
# so that tiny models, their checkpoints and the pinned results do not move when the built-in text grows
VOCAB_TEXT = Path(__file__).parent / "data" / "calibration-0.1.0.txt"
SPECIALS = ("[UNK]", "[PAD]", "[BOS]", "[EOS]")
PAD_ID = 1

# name -> (config class, extra config fields)
TINY_MODELS: dict[str, tuple[type[PretrainedConfig], dict]] = {
    "llama_gqa": (LlamaConfig, {"num_attention_heads": 8, "num_key_value_heads": 2}),
    "llama_mha": (LlamaConfig, {"num_attention_heads": 4, "num_key_value_heads": 4}),
    # tied embeddings: the checkpoint has no lm_head.weight
    "mistral": (MistralConfig, {"num_attention_heads": 8, "num_key_value_heads": 2, "tie_word_embeddings": True}),
    "qwen2": (Qwen2Config, {"num_attention_heads": 8, "num_key_value_heads": 2, "attention_bias": True}),
    "qwen3": (Qwen3Config, {"num_attention_heads": 8, "num_key_value_heads": 2}),
}


@dataclass
class TinyModel:
    """A saved tiny checkpoint and the in-memory reference model it was saved from."""

    name: str
    path: Path
    model: torch.nn.Module  # float32, eval, SDPA attention
    config: PretrainedConfig

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size


def vocabulary() -> dict[str, int]:
    """Special tokens, then the calibration text's words by frequency, then filler words."""
    words = [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(VOCAB_TEXT.read_text())]
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word, _ in Counter(words).most_common():
        if len(vocab) == VOCAB:
            break
        vocab.setdefault(word, len(vocab))
    i = 0
    while len(vocab) < VOCAB:
        vocab.setdefault(f"filler{i}", len(vocab))
        i += 1
    return vocab


def save_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer (unknown words -> [UNK]) saved to ``folder``."""
    tok = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token="[BOS]", eos_token="[EOS]")
    fast.save_pretrained(str(folder))
    return fast


def tiny_config(name: str) -> PretrainedConfig:
    cls, extra = TINY_MODELS[name]
    fields = {
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "head_dim": 8, "max_position_embeddings": 256,
        # no EOS: generation always runs max_new_tokens, so sequences stay comparable
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": PAD_ID,
        **extra,
    }
    cfg = cls(**fields)
    cfg._attn_implementation = "sdpa"
    return cfg


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights with std 0.1, norms 1 ± 0.2, non-zero biases (HF init would zero them)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if "norm" in name:
            p.copy_(1.0 + 0.2 * noise)
        elif name.endswith("bias"):
            p.copy_(0.3 * noise)
        else:
            p.copy_(0.1 * noise)


def build_tiny(name: str, folder: Path, seed: int = 0, config: PretrainedConfig | None = None) -> TinyModel:
    """Build, randomize and save ``name`` (a key of :data:`TINY_MODELS`, or any label with ``config``)."""
    cfg = config if config is not None else tiny_config(name)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    randomize(model, seed)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))  # safetensors
    save_tokenizer(folder)
    assert (folder / "model.safetensors").is_file()
    return TinyModel(name=name, path=folder, model=model, config=cfg)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: tiny tensors gain nothing from threads, and on a shared 2-core box
    two spinning OpenMP threads per process slow these tests down by 10-100x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    """``get(name)`` -> :class:`TinyModel`, built once per session."""
    cache: dict[str, TinyModel] = {}
    root = tmp_path_factory.mktemp("tiny")

    def get(name: str) -> TinyModel:
        if name not in cache:
            cache[name] = build_tiny(name, root / name, seed=len(cache) + 1)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def llama_gqa(tiny_factory) -> TinyModel:
    return tiny_factory("llama_gqa")


@pytest.fixture(scope="session")
def llama_mha(tiny_factory) -> TinyModel:
    return tiny_factory("llama_mha")


@pytest.fixture(scope="session")
def mistral(tiny_factory) -> TinyModel:
    return tiny_factory("mistral")


@pytest.fixture(scope="session")
def qwen2(tiny_factory) -> TinyModel:
    return tiny_factory("qwen2")


@pytest.fixture(scope="session")
def qwen3(tiny_factory) -> TinyModel:
    return tiny_factory("qwen3")


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A private copy of a checkpoint folder (for tests that damage it)."""
    shutil.copytree(src, dst)
    return dst


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2))


# --------------------------------------------------------------------------- CLI


@dataclass
class CLIResult:
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None


def python_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment for a ``python -c`` or ``python -m`` child of a test: ``base`` (default: this process's)
    with ``PYTHONSAFEPATH=1``, so the child does not put the working directory (the checkout) on its path,
    where the source folder ``kernels/`` would shadow Hugging Face's ``kernels`` package, which transformers
    imports when installed (5.25 and newer)."""
    return {**(os.environ if base is None else base), "PYTHONSAFEPATH": "1", **extra}


def run_cli(*args: str) -> CLIResult:
    """Run ``kvcompress ARGS`` in-process with typer's CliRunner (stdout and stderr kept apart)."""
    from kvcompress.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    exc = result.exception if not isinstance(result.exception, SystemExit) else None
    return CLIResult(result.exit_code, result.stdout, result.stderr, exc)


def assert_one_line_error(result: CLIResult, *needles: str) -> None:
    """Non-zero exit, no Python exception escaped, one line on stderr containing every needle."""
    assert result.exit_code != 0, result.stdout
    assert result.exception is None, repr(result.exception)
    text = result.stderr.strip()
    assert "Traceback" not in result.stderr
    assert text, "no error message on stderr"
    assert len(text.splitlines()) == 1, text
    for needle in needles:
        assert needle.lower() in text.lower(), text
