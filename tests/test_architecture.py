"""The layout's promises: dependencies point down, one registry of quantizers, one LagKV settings class."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import python_env

from kvcompress.methods import QUANTIZERS, make_store, quantizer
from kvcompress.recipe import QUANT_METHODS

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_kernels_import_nothing_from_kvcompress():
    for path in (ROOT / "kernels").glob("*.py"):
        bad = {m for m in _imports(path) if m == "kvcompress" or m.startswith("kvcompress.")}
        assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize(("module", "forbidden"), [
    ("kvcompress.checkpoint.loading", ("kvcompress.checkpoint.export", "kvcompress.analysis")),
    ("kvcompress.recipe", ("torch", "kvcompress.methods", "kvcompress.analysis", "kvcompress.runtime")),
    ("kvcompress.cli", ("torch",)),
    ("kvcompress.methods", ("kvcompress.runtime", "kvcompress.checkpoint", "kvcompress.analysis")),
])
def test_imports_point_down(module, forbidden):
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env=python_env()).stdout.split()
    pulled = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert not pulled, f"importing {module} loads {pulled[:5]}"


def test_every_recipe_method_is_a_registered_quantizer():
    assert set(QUANT_METHODS) == set(QUANTIZERS)
    for name in QUANTIZERS:
        store = make_store(4, 8, "tokens", 16, name)
        assert type(store) is quantizer(name)
    with pytest.raises(ValueError, match="unknown quant method 'gptq'"):
        quantizer("gptq")


def test_one_lagkv_settings_class():
    classes = [(path.name, node.name) for path in (ROOT / "kvcompress").rglob("*.py")
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.ClassDef) and "lagkv" in node.name.lower()]
    assert classes == [("recipe.py", "LagKV")]
