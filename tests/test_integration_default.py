"""The default export (no recipe) of the shared SmolLM2 keeps its perplexity through the cache within 2%.

Skipped when ``../shared`` does not hold the model or the WikiText text. Runs on both cores: the model
has 135M parameters.
"""

from __future__ import annotations

import pytest
from conftest import SHARED, SMOLLM, run_cli

from kvcompress.evaluate.perplexity import compare
from kvcompress.recipe import DEFAULT_RECIPE

WIKITEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"

pytestmark = pytest.mark.integration


@pytest.mark.skipif(not (SMOLLM.is_dir() and WIKITEXT.is_file()), reason="shared SmolLM2 or WikiText absent")
def test_default_export_of_smollm2_is_within_two_percent(tmp_path):
    out = tmp_path / "smol-kvc"
    result = run_cli("export", SMOLLM, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert f'"recipe": "{DEFAULT_RECIPE}"' in result.stdout and '"dtype": "float16"' in result.stdout
    ppl = compare(out, WIKITEXT, context=1024, block=128, max_tokens=2048)
    assert ppl["tokens"] == 2046
    assert ppl["ratios"]["ppl"] <= 1.02, ppl
    assert ppl["x_smaller_than_fp16"] > 3.0, ppl
