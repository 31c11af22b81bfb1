"""Run a prompt on a compressed model and account for the KV memory it really held."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from transformers import TextStreamer

from kvcompress.compat import CACHE_ARG
from kvcompress.loading import make_cache
from kvcompress.memory import baseline_bytes_per_token
from kvcompress.sources import ModelSpec


@dataclass
class GenerationReport:
    """What ``kvcompress generate`` prints."""

    text: str
    prompt_tokens: int
    generated_tokens: int
    seconds: float
    tokens_per_second: float
    kv_bytes: int
    kv_bytes_uncompressed: int

    def to_json(self) -> dict:
        """Plain dict, with the compression ratio."""
        return {**asdict(self), "kv_ratio": self.kv_bytes_uncompressed / max(self.kv_bytes, 1)}


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0, chat: bool = False, stream: bool = False) -> GenerationReport:
    """Generate from ``prompt`` with a kvcompress cache.

    Parameters
    ----------
    model, tokenizer
        From :func:`kvcompress.load`.
    prompt : str
        The prompt (wrapped in the chat template when ``chat``).
    max_new_tokens : int
        Tokens to generate.
    temperature : float
        0 means greedy decoding.
    seed : int
        Sampling seed.
    stream : bool
        Print tokens to stdout as they are generated.
    """
    if chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=not chat).to(device)
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
    held_tokens = cache.get_seq_length()
    spec = ModelSpec.from_config(model.config.to_dict())
    return GenerationReport(
        text=tokenizer.decode(new, skip_special_tokens=True),
        prompt_tokens=ids.input_ids.shape[1],
        generated_tokens=new.numel(),
        seconds=seconds,
        tokens_per_second=new.numel() / seconds,
        kv_bytes=cache.kv_bytes(),
        kv_bytes_uncompressed=held_tokens * baseline_bytes_per_token(spec, model.dtype.itemsize),
    )
