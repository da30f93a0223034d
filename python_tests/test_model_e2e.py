"""The end-to-end model benchmark (bench/model_e2e.py) at a seconds-long size: every provider measures, and the
routed model decodes the same tokens with RoutedCache as with transformers' DynamicCache."""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformers", minversion="5.0")

from bench import model_e2e  # noqa: E402


def test_quick_run_measures_every_provider_and_the_caches_agree(tmp_path):
    # chunk 64, top_k 2 over 300 tokens: 5 chunks, so routing skips chunks (no dense dispatch)
    code = model_e2e.main(["--contexts", "300", "--decode-steps", "6", "--quick", "--layers", "1", "--hidden", "128",
                           "--chunk", "64", "--top-k", "2", "--device", "cpu", "--out", str(tmp_path)])
    assert code == 0
    (json_path,) = tmp_path.glob("model_e2e_*.json")
    (md_path,) = tmp_path.glob("model_e2e_*.md")
    results = {r["provider"]: r for r in json.loads(json_path.read_text())["results"]}
    assert set(results) == set(model_e2e.PROVIDERS)
    for r in results.values():
        for key in ("prefill_tok_s", "decode_tok_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["provider"], key, r[key])
        assert len(r["tokens"]) == 6
    # the kept chunk sums and the means rebuilt from DynamicCache select the same chunks: the same greedy tokens
    assert results["routed"]["tokens"] == results["routed-dynamic"]["tokens"]
    assert "| 300 | routed |" in md_path.read_text()
