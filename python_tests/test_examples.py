"""The examples run (tiny sizes): CI executes every code path the README points users to."""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

pytest.importorskip("transformers")
EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_finetune_example_runs_and_reports_both_losses(capsys):
    module = _load("finetune_tiny_llama")
    assert module.main(["--steps", "3", "--seq-len", "96", "--batch", "2", "--chunk-size", "16", "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "language-model loss" in out and "needle-token loss" in out and "nan" not in out


def test_finetune_example_filler_is_the_markov_chain():
    import torch
    module = _load("finetune_tiny_llama")
    ids = module.batch(4, 50, torch.Generator().manual_seed(0))
    assert (ids[:, -2] == module.MARKER).all() and (ids[:, -1] >= module.NEEDLES.start).all()
    filler = ids[:, :-2]
    pairs = [(a, b) for row in filler.tolist() for a, b in zip(row, row[1:]) if a in module.FILLER and b in module.FILLER]
    assert all(b in module._CHAIN[a].tolist() for a, b in pairs)  # every filler step follows the chain


def test_generate_example_runs(capsys):
    module = _load("generate_routed")
    assert module.main(["--prompt-len", "300", "--new-tokens", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split("first new tokens")[1] == lines[1].split("first new tokens")[1]
