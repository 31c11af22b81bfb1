"""Bad input on the command line: one line on stderr naming the problem, a non-zero exit, no traceback, and
nothing new left on disk beside the output or the checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import assert_one_line_error, build_tiny, copy_checkpoint, python_env, run_cli, tiny_config

from kvcompress.checkpoint.export import export
from kvcompress.checkpoint.manifest import MANIFEST_NAME, SELF_CHECKSUM, _self_digest
from kvcompress.recipe import Recipe
from kvcompress.sources import open_source

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Env:
    """What a case may use: a source model, an export of it, and a scratch folder to damage copies in."""

    source: Path
    checkpoint: Path
    work: Path

    def recipe(self, text: str) -> Path:
        path = self.work / "r.toml"
        path.write_text(textwrap.dedent(text))
        return path

    def edited(self, edit: Callable[[dict], None], resign: bool = False) -> Path:
        """A copy of the checkpoint whose manifest ``edit`` changed (its own checksum recomputed if ``resign``,
        as a careless tool would, so that only the shape check can catch it)."""
        ckpt = copy_checkpoint(self.checkpoint, self.work / "edited")
        manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
        edit(manifest)
        if resign:
            manifest[SELF_CHECKSUM] = _self_digest(manifest)
        (ckpt / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        return ckpt


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli-errors")
    tiny = build_tiny("llama_gqa", root / "src", seed=11)
    rec = Recipe(name="quick")
    rec.lowrank.target_ratio = 0.5
    rec.quant.enabled, rec.quant.avg_bits, rec.quant.group_size, rec.quant.residual_length = True, 4.0, 8, 16
    rec.calibration.max_tokens, rec.calibration.seq_len = 128, 64
    ckpt = root / "ckpt"
    export(open_source(tiny.path), ckpt, rec, dtype="float32")
    return tiny.path, ckpt


@pytest.fixture
def env(setup, tmp_path) -> Env:
    return Env(source=setup[0], checkpoint=setup[1], work=tmp_path)


def _short_text(env: Env) -> Path:
    path = env.work / "short.txt"
    path.write_text("the cat")
    return path


def _moved_source(env: Env) -> Path:
    """A checkpoint exported from a copy of the source that was then deleted."""
    copy = copy_checkpoint(env.source, env.work / "moved-src")
    out = env.work / "from-moved"
    assert run_cli("export", copy, "-o", out, "--recipe", "kivi-4bit").exit_code == 0
    for p in copy.iterdir():
        p.unlink()
    copy.rmdir()
    return out


def _drop_layer(m: dict) -> None:
    del m["layers"][1]


def _edit_rank(m: dict) -> None:
    m["layers"][0]["rank_k"] += 8


# (id, args from env, words the one-line error must contain)
CASES: list[tuple[str, Callable[[Env], list], tuple[str, ...]]] = [
    ("generate-zero-tokens", lambda e: ["generate", e.checkpoint, "--prompt", "hi", "--max-new-tokens", "0"],
     ("--max-new-tokens", ">= 1")),
    ("generate-negative-tokens", lambda e: ["generate", e.checkpoint, "--prompt", "hi", "--max-new-tokens", "-3"],
     ("--max-new-tokens", "-3")),
    ("generate-negative-temperature", lambda e: ["generate", e.checkpoint, "--prompt", "hi", "--temperature", "-1"],
     ("--temperature", ">= 0")),
    ("generate-chat-without-template", lambda e: ["generate", e.checkpoint, "--prompt", "hi", "--chat"],
     ("no chat template", "--chat")),
    ("generate-prompt-too-long", lambda e: ["generate", e.checkpoint, "--prompt", "the " * 300],
     ("exceed", "256 positions")),
    ("generate-no-prompt", lambda e: ["generate", e.checkpoint], ("exactly one of --prompt",)),
    ("generate-missing-prompt-file", lambda e: ["generate", e.checkpoint, "--prompt-file", e.work / "p.txt"],
     ("prompt file not found",)),
    ("generate-not-a-checkpoint", lambda e: ["generate", e.source, "--prompt", "hi"],
     ("not a kvcompress checkpoint",)),
    ("generate-bad-integer", lambda e: ["generate", e.checkpoint, "--prompt", "hi", "--max-new-tokens", "many"],
     ("--max-new-tokens", "integer", "kvcompress generate --help")),
    ("unknown-option", lambda e: ["inspect", e.checkpoint, "--colour"], ("no such option", "--colour")),
    ("unknown-command", lambda e: ["compress", e.source], ("no such command", "compress")),
    ("recipe-value-of-wrong-type",
     lambda e: ["export", e.source, "-o", e.work / "out", "--recipe", e.recipe('[quant]\navg_bits = "three"\n')],
     ("[quant] avg_bits must be a number", "three")),
    ("recipe-unknown-setting",
     lambda e: ["export", e.source, "-o", e.work / "out", "--recipe", e.recipe("[lowrank]\ntarget_ratoi = 0.5\n")],
     ("unknown setting", "[lowrank]", "target_ratoi")),
    ("recipe-layer-without-index",
     lambda e: ["export", e.source, "-o", e.work / "out",
                "--recipe", e.recipe("[[layers]]\nrank_k = 8\nrank_v = 8\n")],
     ("[[layers]] entry 1", "missing layer")),
    ("recipe-not-found", lambda e: ["export", e.source, "-o", e.work / "out", "--recipe", "kivi4bit"],
     ("recipe not found: kivi4bit", "kivi-4bit", "minikv-2bit")),
    ("recipe-bad-toml", lambda e: ["export", e.source, "-o", e.work / "out", "--recipe", e.recipe("[quant\n")],
     ("cannot read recipe",)),
    ("export-ratio-without-lowrank",
     lambda e: ["export", e.source, "-o", e.work / "out", "--recipe", "kivi-4bit", "--target-ratio", "0.5"],
     ("--target-ratio", "kivi-4bit", "[lowrank] off")),
    ("export-ratio-out-of-range", lambda e: ["export", e.source, "-o", e.work / "out", "--recipe", "greedy-50",
                                             "--target-ratio", "1.5"], ("target_ratio must be in (0, 1]",)),
    ("export-onto-a-file", lambda e: ["export", e.source, "-o", _a_file(e), "--force"], ("is a file", "folder")),
    ("export-existing-without-force", lambda e: ["export", e.source, "-o", _a_folder(e)], ("exists", "--force")),
    ("export-bad-dtype", lambda e: ["export", e.source, "-o", e.work / "out", "--dtype", "float64"],
     ("dtype must be one of",)),
    ("export-missing-model", lambda e: ["export", e.work / "nope", "-o", e.work / "out"], ("model path not found",)),
    ("manifest-rank-edited", lambda e: ["inspect", e.edited(_edit_rank)], ("checksum mismatch", MANIFEST_NAME)),
    ("manifest-layer-deleted", lambda e: ["inspect", e.edited(_drop_layer)], ("checksum mismatch", MANIFEST_NAME)),
    ("manifest-rank-edited-and-resigned", lambda e: ["generate", e.edited(_edit_rank, resign=True), "--prompt", "hi"],
     ("layer 0", "k_down.weight", "rank_k")),
    ("manifest-layer-deleted-and-resigned", lambda e: ["inspect", e.edited(_drop_layer, resign=True)],
     ("manifest lists 2 layers (0, 2)", "the model has 3")),
    ("manifest-resigned-no-verify", lambda e: ["inspect", e.edited(_edit_rank, resign=True), "--no-verify"],
     ("layer 0", "rank_k")),
    ("eval-context-beyond-positions",
     lambda e: ["eval", e.checkpoint, "--text", _long_text(e), "--context", "4096"], ("--context 4096", "256")),
    ("eval-text-too-short", lambda e: ["eval", e.checkpoint, "--text", _short_text(e), "--block", "16",
                                       "--context", "64"], ("gives 2 tokens", "more than one block")),
    ("eval-zero-max-tokens", lambda e: ["eval", e.checkpoint, "--text", _long_text(e), "--max-tokens", "0"],
     ("--max-tokens (0)", "larger than --block")),
    ("eval-zero-block", lambda e: ["eval", e.checkpoint, "--text", _long_text(e), "--block", "0"],
     ("--block must be >= 1",)),
    ("eval-nothing-to-do", lambda e: ["eval", e.checkpoint], ("--text", "--passkey")),
    ("eval-missing-text", lambda e: ["eval", e.checkpoint, "--text", e.work / "none.txt"], ("text file not found",)),
    ("eval-source-moved", lambda e: ["eval", _moved_source(e), "--text", _long_text(e), "--context", "128",
                                     "--block", "32"], ("no longer at", "--source")),
    ("analyze-bad-head-group", lambda e: ["analyze", e.source, "--head-group", "3"], ("head_group 3",)),
    ("analyze-avg-bits-out-of-range", lambda e: ["analyze", e.source, "--avg-bits", "9"], ("avg_bits must be in",)),
    ("bench-bad-contexts", lambda e: ["bench", e.source, "--contexts", "abc"], ("abc",)),
]


def _a_file(env: Env) -> Path:
    path = env.work / "out"
    path.write_text("not a folder")
    return path


def _a_folder(env: Env) -> Path:
    path = env.work / "out"
    path.mkdir()
    (path / "keep.txt").write_text("mine")
    return path


def _long_text(env: Env) -> Path:
    path = env.work / "long.txt"
    path.write_text("the cat sat on the mat and the dog ran in the park " * 40)
    return path


def _listing(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize(("args", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(env, args, needles, monkeypatch):
    argv = args(env)  # builds the inputs (damaged copies, files) first
    monkeypatch.chdir(env.work)
    before = {p: _listing(p) for p in (env.work, env.checkpoint.parent)}
    result = run_cli(*argv)
    assert_one_line_error(result, *needles)
    assert result.stdout == ""  # nothing printed before the refusal (e.g. the prompt echo)
    for folder, listing in before.items():
        assert _listing(folder) == listing, f"{folder} changed"


def test_enough_cases():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


def test_version_prints_and_exits_zero():
    from kvcompress import __version__

    result = run_cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"kvcompress {__version__}"


# --------------------------------------------------------------------------- signals

_SLOW_EXPORT = """
import sys, time
import kvcompress.checkpoint.export as e
real = e._write
def slow(*args, **kwargs):
    n = real(*args, **kwargs)
    print("written", flush=True)
    time.sleep(60)
    return n
e._write = slow
from kvcompress.cli import app
sys.argv = ["kvcompress", *sys.argv[1:]]
app()
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_during_export_leaves_nothing(setup, tmp_path, sig):
    out = tmp_path / "out"
    env = python_env(TRITON_INTERPRET="1")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_EXPORT, "export", str(setup[0]), "-o", str(out),
                             "--recipe", "kivi-4bit", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "written"  # weights are on disk in the temporary folder
        assert any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig
    assert stderr.strip().splitlines() == [f"interrupted ({signal.Signals(sig).name})"]
    assert list(tmp_path.iterdir()) == []


def test_tiny_model_has_256_positions():
    # the "prompt too long" and "context beyond positions" cases rely on the tiny model's 256 positions
    assert tiny_config("llama_gqa").max_position_embeddings == 256
