"""Providers: name -> builder(case) -> callable(*inputs).

Baselines come from the package's own eager references, never re-implemented here.
Adding a provider is one function and one line in PROVIDERS, e.g. SDPA later:

    def _sdpa(case):
        return lambda q, k, v: ...
    PROVIDERS["sdpa"] = Provider(_sdpa, applies=lambda c: c.op == "routed_attention")
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import torch


@dataclasses.dataclass(frozen=True)
class Provider:
    build: Callable  # (case) -> callable(*inputs) -> outputs
    applies: Callable = lambda case: True  # False: no row at all (by design, not a failure)


def _reference(op: str) -> Callable:
    module = importlib.import_module(f"routing_kernels.ops.{op}.reference")
    return getattr(module, f"{op}_ref")


def _eager(case):
    ref, kwargs = _reference(case.op), case.call_kwargs()
    return lambda *inputs: ref(*inputs, **kwargs)


def _compiled(case):
    # A fresh compile per case: reset so that earlier cases' guards neither count against the
    # recompile limit nor fall back to eager silently. Static shapes: one graph per case.
    torch._dynamo.reset()
    # The bwd mode replays one backward with retain_graph=True, which AOTAutograd refuses for
    # graphs compiled with donated buffers (a memory-only optimisation): turn donation off.
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    return torch.compile(_eager(case), dynamic=False)


def _public(backend):
    def build(case):
        import routing_kernels

        fn, kwargs = getattr(routing_kernels, case.op), case.call_kwargs()
        return lambda *inputs: fn(*inputs, backend=backend, **kwargs)
    return build


def _reference_fits(case) -> bool:
    return case.ref_ok


PROVIDERS = {
    "eager": Provider(_eager, _reference_fits),
    "compile": Provider(_compiled, _reference_fits),
    "ours": Provider(_public(None)),
    # explicit backends, not in the default set: compare kernels of the same op side by side
    "triton": Provider(_public("triton")),
    "cuda": Provider(_public("cuda")),
    "cpu": Provider(_public("cpu")),
}


def default_providers(device: str, quick: bool) -> list:
    # torch.compile of four ops (forward and training graphs) takes minutes on a 2-core CPU,
    # which does not fit a seconds-long smoke run: quick mode leaves it out unless asked for.
    if quick:
        return ["eager", "ours"]
    return ["eager", "compile", "ours"]
