"""Run a prompt on a compressed model and account for the KV memory it really held."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from transformers import TextStreamer

from kvcompress.checkpoint.loading import make_cache
from kvcompress.compat import CACHE_ARG
from kvcompress.errors import KVCompressError
from kvcompress.memory import baseline_bytes_per_token
from kvcompress.sources import ModelSpec


@dataclass
class GenerationReport:
    """What ``kvcompress generate`` prints. ``kv_bytes_fp16`` is what an fp16 cache of the same model would
    hold for the same tokens; ``window_tokens`` how many of the held tokens are still in a quantized layer's
    16-bit residual window (0 without quantization)."""

    text: str
    prompt_tokens: int
    generated_tokens: int
    seconds: float
    tokens_per_second: float
    held_tokens: int
    window_tokens: int
    kv_bytes: int
    kv_bytes_fp16: int

    def to_json(self) -> dict:
        """Plain dict, with ``x_smaller_than_fp16`` = ``kv_bytes_fp16 / kv_bytes``."""
        return {**asdict(self), "x_smaller_than_fp16": self.kv_bytes_fp16 / max(self.kv_bytes, 1)}


def check_settings(max_new_tokens: int, temperature: float) -> None:
    """Refuse settings no generation can use (cheap: call it before loading a model).

    Raises
    ------
    KVCompressError
        ``max_new_tokens`` below 1 or a negative ``temperature``.
    """
    if max_new_tokens < 1:
        raise KVCompressError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise KVCompressError(f"--temperature must be >= 0 (0 = greedy), got {temperature:g}")


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0, chat: bool = False, stream: bool = False,
             echo: Callable[[str], None] | None = None) -> GenerationReport:
    """Generate from ``prompt`` with a kvcompress cache.

    Parameters
    ----------
    model, tokenizer
        From :func:`kvcompress.load`.
    prompt : str
        The prompt (wrapped in the chat template when ``chat``).
    max_new_tokens : int
        Tokens to generate (>= 1).
    temperature : float
        0 means greedy decoding; must not be negative.
    seed : int
        Sampling seed.
    stream : bool
        Print tokens to stdout as they are generated.
    echo : callable, optional
        Called with the prompt once it is checked, just before generation starts.

    Raises
    ------
    KVCompressError
        Bad settings (see :func:`check_settings`), ``chat`` without a chat template, or a prompt that
        with ``max_new_tokens`` does not fit in the model's positions.
    """
    check_settings(max_new_tokens, temperature)
    user_prompt = prompt
    if chat:
        if not tokenizer.chat_template:
            raise KVCompressError("this model's tokenizer has no chat template; drop --chat")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=not chat).to(device)
    positions = model.config.max_position_embeddings
    if ids.input_ids.shape[1] + max_new_tokens > positions:
        raise KVCompressError(f"the prompt ({ids.input_ids.shape[1]} tokens) and --max-new-tokens "
                              f"{max_new_tokens} exceed the model's {positions} positions")
    if echo is not None:
        echo(user_prompt)
    cache = make_cache(model)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    start = time.perf_counter()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(**ids, **{CACHE_ARG: cache}, max_new_tokens=max_new_tokens, streamer=streamer,
                         pad_token_id=pad, **sampling)
    seconds = time.perf_counter() - start
    new = out[0, ids.input_ids.shape[1]:]
    held = max(layer.stored_length for layer in cache.layers)
    spec = ModelSpec.from_config(model.config.to_dict())
    return GenerationReport(
        text=tokenizer.decode(new, skip_special_tokens=True),
        prompt_tokens=ids.input_ids.shape[1],
        generated_tokens=new.numel(),
        seconds=seconds,
        tokens_per_second=new.numel() / seconds,
        held_tokens=held,
        window_tokens=max(layer.window_length for layer in cache.layers),
        kv_bytes=cache.kv_bytes(),
        kv_bytes_fp16=cache.get_seq_length() * baseline_bytes_per_token(spec),
    )
