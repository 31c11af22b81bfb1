"""Model sources and the CLI on bad input: a KVCompressError with a one-line message, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_cli, write_json

from kvcompress.errors import KVCompressError
from kvcompress.sources import SUPPORTED_MODEL_TYPES, ModelSpec, open_source

pytestmark = pytest.mark.usefixtures("one_thread")


def _error(model) -> str:
    with pytest.raises(KVCompressError) as e:
        open_source(model)
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def _config_folder(tmp_path: Path, config: dict, weights: bytes | None = b"") -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    write_json(folder / "config.json", config)
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


LLAMA_FIELDS = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2}


def test_missing_path(tmp_path):
    assert "not found" in _error(tmp_path / "no" / "such" / "model")
    assert "not found" in _error("./relative/missing")


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 8)
    assert "not a .gguf" in _error(f)


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _error(tmp_path / "empty")


def test_not_a_causal_lm(tmp_path):
    folder = _config_folder(tmp_path, {"model_type": "bert", "architectures": ["BertModel"], **LLAMA_FIELDS})
    msg = _error(folder)
    assert "not a causal" in msg or "unsupported" in msg
    assert "bert" in msg.lower()


@pytest.mark.parametrize(("model_type", "arch"), [("phi3", "Phi3ForCausalLM"), ("gpt2", "GPT2LMHeadModel")])
def test_unsupported_model_type_lists_supported_ones(tmp_path, model_type, arch):
    """GPT-2 *is* a causal LM (its head class is ``GPT2LMHeadModel``): the user must hear it is unsupported
    and what is supported, not that it is not a causal model."""
    folder = _config_folder(tmp_path, {"model_type": model_type, "architectures": [arch], **LLAMA_FIELDS})
    msg = _error(folder)
    assert "unsupported" in msg and model_type in msg, msg
    assert all(t in msg for t in SUPPORTED_MODEL_TYPES), msg


def test_config_missing_a_field(tmp_path):
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2}
    msg = _error(_config_folder(tmp_path, cfg))
    assert "config.json" in msg and ("num_attention_heads" in msg or "hidden_size" in msg), msg


def test_unreadable_config(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    (folder / "model.safetensors").write_bytes(b"")
    assert "cannot read" in _error(folder)


def test_corrupt_safetensors(tmp_path):
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **LLAMA_FIELDS}
    folder = _config_folder(tmp_path, cfg, weights=os.urandom(64) + b"garbage" * 100)
    msg = _error(folder)
    assert "corrupt safetensors" in msg and "model.safetensors" in msg


def test_truncated_safetensors_tensor(llama_gqa, tmp_path):
    """A valid header but cut-off data: reading the tensor fails cleanly."""
    folder = tmp_path / "cut"
    shutil.copytree(llama_gqa.path, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(KVCompressError, match="safetensors"):
        src = open_source(folder)
        for name in src.names():
            src.tensor(name)


def test_garbage_gguf(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + os.urandom(200))
    assert "GGUF" in _error(f)


def test_several_ggufs_in_a_folder(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"")
    assert "several GGUF" in _error(tmp_path)


def test_safetensors_source_reads_the_checkpoint(llama_gqa):
    src = open_source(llama_gqa.path)
    assert src.spec == ModelSpec(model_type="llama", num_layers=3, hidden_size=64, num_heads=8, num_kv_heads=2,
                                 head_dim=8, rope_theta=10000.0, attention_bias=False, qk_norm=False)
    assert src.spec.kv_width == 16
    state = llama_gqa.model.state_dict()
    assert set(src.names()) == set(state)
    name = "model.layers.1.self_attn.k_proj.weight"
    assert torch.equal(src.tensor(name), state[name])
    with pytest.raises(KVCompressError, match="not found"):
        src.tensor("model.layers.9.self_attn.k_proj.weight")


def test_spec_of_qwen_models(qwen2, qwen3):
    s2, s3 = open_source(qwen2.path).spec, open_source(qwen3.path).spec
    assert (s2.model_type, s2.attention_bias, s2.qk_norm) == ("qwen2", True, False)
    assert (s3.model_type, s3.attention_bias, s3.qk_norm) == ("qwen3", False, True)
    w = open_source(qwen3.path).attn_weights(0)
    assert w["k_norm"] is not None and w["k_norm"].shape == (8,) and w["k_bias"] is None
    assert open_source(qwen2.path).attn_weights(0)["v_bias"].shape == (16,)


# --------------------------------------------------------------------------- CLI


def test_cli_missing_model_is_one_line(tmp_path):
    assert_one_line_error(run_cli("analyze", tmp_path / "MISSING"), "error", "not found", "MISSING")


@pytest.mark.parametrize("ratio", ["0", "1.5"])
def test_cli_bad_target_ratio_is_one_line(llama_gqa, ratio):
    assert_one_line_error(run_cli("analyze", llama_gqa.path, "--target-ratio", ratio), "target_ratio", ratio)


def test_cli_unsupported_model_is_one_line(tmp_path):
    folder = _config_folder(tmp_path, {"model_type": "bert", "architectures": ["BertModel"], **LLAMA_FIELDS})
    assert_one_line_error(run_cli("analyze", folder), "bert")


def test_cli_missing_recipe_is_one_line(llama_gqa, tmp_path):
    assert_one_line_error(run_cli("analyze", llama_gqa.path, "--recipe", tmp_path / "nope.toml"), "recipe not found")


def _console_script() -> Path:
    script = Path(sys.executable).parent / "kvcompress"
    if not script.is_file():
        found = shutil.which("kvcompress")
        assert found, "the kvcompress console script is not installed in this environment"
        script = Path(found)
    return script


def test_console_script_prints_one_line_without_traceback(tmp_path):
    argv = [str(_console_script()), "analyze", str(tmp_path / "MISSING")]
    env = {**os.environ, "COLUMNS": "40", "TERM": "dumb"}  # narrow terminal: a long message must not wrap
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and "MISSING" in lines[0] and len(lines[0]) > 40, lines
    assert proc.stdout.strip() == ""
    assert json.dumps(lines[0])  # plain text
