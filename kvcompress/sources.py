"""Model sources: read a checkpoint's config and one tensor at a time, never the whole model.

A source is a local Hugging Face folder (safetensors, sharded or not), a hub id (resolved by
``huggingface_hub`` the way transformers does it; offline works from the local cache), or a GGUF file
(or a folder holding one). Every source answers the same questions: its :class:`ModelSpec`, and
``tensor(name)`` for Hugging Face tensor names, de-quantized on the fly for GGUF.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from kvcompress.errors import KVCompressError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "added_tokens.json",
)


@dataclass(frozen=True)
class ModelSpec:
    """What compression needs to know about a decoder-only model.

    Attributes
    ----------
    model_type : str
        One of :data:`SUPPORTED_MODEL_TYPES`.
    num_layers, hidden_size, num_heads, num_kv_heads, head_dim : int
        Shapes; ``num_heads`` is a multiple of ``num_kv_heads`` (GQA).
    rope_theta : float
        RoPE base.
    attention_bias : bool
        Whether q/k/v projections carry biases (Qwen2).
    qk_norm : bool
        Whether q and k are RMS-normalized per head before RoPE (Qwen3).
    """

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    attention_bias: bool
    qk_norm: bool

    @classmethod
    def from_config(cls, config: dict) -> ModelSpec:
        """Build a spec from a ``config.json`` dict, with one-line errors for what is unsupported."""
        model_type = config.get("model_type")
        archs = config.get("architectures") or []
        causal = ("ForCausalLM", "LMHeadModel")
        if model_type is None or (archs and not any(a.endswith(causal) for a in archs)):
            raise KVCompressError(
                f"not a causal language model config (model_type={model_type!r}, architectures={archs})"
            )
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise KVCompressError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            rope = config.get("rope_parameters") or {}
            return cls(
                model_type=model_type,
                num_layers=int(config["num_hidden_layers"]),
                hidden_size=hidden,
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
                attention_bias=bool(config.get("attention_bias", model_type == "qwen2")),
                qk_norm=model_type == "qwen3",
            )
        except (KeyError, TypeError, ValueError) as e:
            raise KVCompressError(f"config.json is missing or has a bad field: {e}") from None

    @property
    def kv_width(self) -> int:
        """Width of one layer's K (or V) projection output: ``num_kv_heads * head_dim``."""
        return self.num_kv_heads * self.head_dim


def attn_prefix(layer: int) -> str:
    """Hugging Face name prefix of a decoder layer's attention module."""
    return f"model.layers.{layer}.self_attn."


class Source:
    """Base class: a config, a spec, and tensors by Hugging Face name."""

    path: Path
    config: dict
    spec: ModelSpec
    origin: str

    def tensor(self, name: str) -> torch.Tensor:
        """Return one tensor by its Hugging Face name, as float32 on the CPU."""
        raise NotImplementedError

    def has(self, name: str) -> bool:
        """Whether the checkpoint holds ``name``."""
        raise NotImplementedError

    def names(self) -> list[str]:
        """All tensor names (Hugging Face naming)."""
        raise NotImplementedError

    def files(self) -> list[Path]:
        """The files this source reads (for checksums in the manifest)."""
        raise NotImplementedError

    def default_dtype(self) -> tuple[str, str]:
        """``(dtype, why)``: the dtype an export writes by default, and where it comes from."""
        dtype = self.config.get("dtype") or self.config.get("torch_dtype")
        return (str(dtype), "the source's") if dtype else ("float16", "no dtype in the source's config")

    def folder(self) -> Path:
        """Folder holding config and tokenizer files."""
        return self.path if self.path.is_dir() else self.path.parent

    def tokenizer_files(self) -> list[Path]:
        """Tokenizer files found beside the checkpoint."""
        return [self.folder() / f for f in TOKENIZER_FILES if (self.folder() / f).is_file()]

    def tokenizer(self):
        """The model's tokenizer, loaded from the checkpoint folder (never from a hub)."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.folder()))
        except Exception as e:
            raise KVCompressError(f"cannot load the tokenizer from {self.folder()}: {e}") from None

    def attn_weights(self, layer: int) -> dict[str, torch.Tensor | None]:
        """One layer's attention tensors: q/k/v/o weights, biases (or None) and q/k norms (or None)."""
        p = attn_prefix(layer)
        out: dict[str, torch.Tensor | None] = {}
        for proj in ("q", "k", "v", "o"):
            out[f"{proj}_weight"] = self.tensor(f"{p}{proj}_proj.weight")
            out[f"{proj}_bias"] = self.tensor(f"{p}{proj}_proj.bias") if self.has(f"{p}{proj}_proj.bias") else None
        for n in ("q_norm", "k_norm"):
            out[n] = self.tensor(f"{p}{n}.weight") if self.has(f"{p}{n}.weight") else None
        return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise KVCompressError(f"cannot read {path}: {e}") from None


class SafetensorsSource(Source):
    """A Hugging Face folder with ``config.json`` and safetensors weights (sharded or not)."""

    def __init__(self, path: Path, origin: str | None = None):
        from safetensors import safe_open

        self.path = path
        self.origin = origin or str(path.resolve())
        self.config = _read_json(path / "config.json")
        self.spec = ModelSpec.from_config(self.config)
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = _read_json(index).get("weight_map", {})
        else:
            shards = sorted(path.glob("*.safetensors"))
            if not shards:
                if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
                    raise KVCompressError(f"{path} holds only pickle weights; only safetensors are loaded")
                raise KVCompressError(f"no safetensors weights in {path}")
            weight_map = {}
            for shard in shards:
                with _open_safetensors(safe_open, shard) as f:
                    weight_map.update(dict.fromkeys(f.keys(), shard.name))
        self._map = weight_map
        self._handles: dict[str, object] = {}
        self._safe_open = safe_open

    def _handle(self, shard: str):
        if shard not in self._handles:
            self._handles[shard] = _open_safetensors(self._safe_open, self.path / shard)
        return self._handles[shard]

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._map:
            raise KVCompressError(f"tensor {name} not found in {self.path}")
        try:
            return self._handle(self._map[name]).get_tensor(name).float()
        except Exception as e:  # safetensors raises several types for damaged data
            raise KVCompressError(f"corrupt safetensors file {self._map[name]}: {e}") from None

    def has(self, name: str) -> bool:
        return name in self._map

    def names(self) -> list[str]:
        return list(self._map)

    def files(self) -> list[Path]:
        return [self.path / s for s in sorted(set(self._map.values()))]


def _open_safetensors(safe_open, path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:
        raise KVCompressError(f"corrupt safetensors file {path.name}: {e}") from None


# GGUF stores Llama-family tensors under its own names; q/k rows were permuted by llama.cpp's converter
# for its RoPE layout (pairs interleaved), which we undo so that tensors match Hugging Face's.
_GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GGUF_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _hf_to_gguf(name: str) -> str:
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    parts = name.split(".")  # model.layers.{i}.{module...}.{weight|bias}
    if len(parts) < 5 or parts[:2] != ["model", "layers"]:
        return name
    module = ".".join(parts[3:-1])
    if module not in _GGUF_LAYER_NAMES:
        return name
    return f"blk.{parts[2]}.{_GGUF_LAYER_NAMES[module]}.{parts[-1]}"


class GGUFSource(Source):
    """A GGUF file of a Llama-family model; tensors are de-quantized one at a time."""

    def __init__(self, file: Path, origin: str | None = None):
        import gguf

        self.path = file
        self.origin = origin or str(file.resolve())
        try:
            self._reader = gguf.GGUFReader(str(file))
        except Exception as e:
            raise KVCompressError(f"cannot read GGUF file {file}: {e}") from None
        self._tensors = {t.name: t for t in self._reader.tensors}
        cfg_path = file.parent / "config.json"
        self.config = _read_json(cfg_path) if cfg_path.is_file() else self._config_from_metadata()
        self.spec = ModelSpec.from_config(self.config)
        self._names = list(self._hf_names())

    def _field(self, key: str):
        field = self._reader.fields.get(key)
        if field is None:
            return None
        return field.contents()

    def _config_from_metadata(self) -> dict:
        arch = self._field("general.architecture")
        if arch not in ("llama", "qwen2", "qwen3"):
            raise KVCompressError(
                f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        heads = int(self._field(f"{arch}.attention.head_count"))
        hidden = int(self._field(f"{arch}.embedding_length"))
        return {
            "model_type": arch,
            "architectures": [f"{arch.capitalize()}ForCausalLM"],
            "num_hidden_layers": int(self._field(f"{arch}.block_count")),
            "hidden_size": hidden,
            "intermediate_size": int(self._field(f"{arch}.feed_forward_length")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._field(f"{arch}.attention.head_count_kv") or heads),
            "rms_norm_eps": float(self._field(f"{arch}.attention.layer_norm_rms_epsilon")),
            "rope_parameters": {"rope_theta": float(self._field(f"{arch}.rope.freq_base") or 10000.0),
                                "rope_type": "default"},
            "max_position_embeddings": int(self._field(f"{arch}.context_length")),
            "vocab_size": len(self._reader.fields["tokenizer.ggml.tokens"].data),
            "tie_word_embeddings": "output.weight" not in self._tensors,
        }

    def _hf_names(self) -> Iterator[str]:
        reverse = {v: k for k, v in _GGUF_GLOBAL_NAMES.items()}
        layer_rev = {v: k for k, v in _GGUF_LAYER_NAMES.items()}
        for name in self._tensors:
            if name in reverse:
                yield reverse[name]
            elif name.startswith("blk."):
                _, i, module, kind = name.split(".", 3)
                if module in layer_rev:
                    yield f"model.layers.{i}.{layer_rev[module]}.{kind}"

    def tensor(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        gname = _hf_to_gguf(name)
        if gname not in self._tensors:
            raise KVCompressError(f"tensor {name} not found in {self.path.name}")
        t = self._tensors[gname]
        data = dequantize(t.data, t.tensor_type)
        out = torch.from_numpy(data.copy()).float().reshape([int(d) for d in reversed(t.shape)])
        if self.spec.model_type == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            heads = self.spec.num_heads if "attn_q" in gname else self.spec.num_kv_heads
            out = _unpermute_rope_rows(out, heads)
        return out

    def has(self, name: str) -> bool:
        return _hf_to_gguf(name) in self._tensors

    def default_dtype(self) -> tuple[str, str]:
        """16 bits for a quantized GGUF: its weights are low-bit codes with fp16 scales, which float16 holds to
        within its rounding (float32 would double the checkpoint for nothing)."""
        from gguf import GGMLQuantizationType as T

        if any(t.tensor_type not in (T.F32, T.F16, T.BF16) for t in self._tensors.values()):
            return "float16", "the source is GGUF-quantized"
        return super().default_dtype()

    def names(self) -> list[str]:
        return list(self._names)

    def files(self) -> list[Path]:
        return [self.path]


def _unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of q/k: within a head, rows go (pairs interleaved) -> (halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def open_source(model: str | Path) -> Source:
    """Open a model for tensor-by-tensor reading.

    Parameters
    ----------
    model : str or Path
        A local Hugging Face folder, a GGUF file or a folder holding exactly one, or a hub id.

    Returns
    -------
    Source
        A :class:`SafetensorsSource` or :class:`GGUFSource`.

    Raises
    ------
    KVCompressError
        Missing path, unsupported architecture, not a causal LM, unreadable weights.
    """
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return GGUFSource(path)
        raise KVCompressError(f"{path} is a file but not a .gguf; pass a model folder, a GGUF file or a hub id")
    if path.is_dir():
        if (path / "config.json").is_file() and (
            any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
        ):
            return SafetensorsSource(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return GGUFSource(ggufs[0])
        if len(ggufs) > 1:
            raise KVCompressError(f"{path} holds several GGUF files; pass one of them")
        if not (path / "config.json").is_file():
            raise KVCompressError(f"{path} has no config.json; not a Hugging Face model folder")
        return SafetensorsSource(path)
    if str(model).count("/") == 1 and not str(model).startswith((".", "/", "~")):
        return SafetensorsSource(_resolve_hub(str(model)), origin=str(model))
    raise KVCompressError(f"model path not found: {model}")


def _resolve_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        )
    except Exception as e:
        raise KVCompressError(f"model path not found and hub id {repo_id!r} could not be resolved: {e}") from None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
