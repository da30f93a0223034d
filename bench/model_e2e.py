"""End to end: a small Llama (transformers, random weights) with routed attention vs "sdpa", prefill and decode.

    python -m bench.model_e2e                      # contexts 4K, 16K, 32K on the present device (~4 min on 2 cores)
    python -m bench.model_e2e --contexts 1024 --decode-steps 4 --quick   # seconds: what the tests run

The model is the issue's: 4 layers, hidden 512, 8 heads of 64, 2 kv heads, MLP 1408, vocab 1024, fp32 (CPU) or
bf16 (GPU); routed with chunk 512, top_k 8 (so at 4K, 8 chunks, routing covers everything and the backend runs
dense SDPA). Providers, same weights, one process:
  routed          attn_implementation="routed", rkt.RoutedCache: decode gates over the kept chunk key sums and
                  reads the selected chunks only
  routed-dynamic  "routed" with transformers' DynamicCache: every decode step rebuilds the chunk means from the
                  cached keys (one read of the cache per layer): what a user pays without RoutedCache
  sdpa            transformers' own SDPA attention with DynamicCache: the dense baseline
Prefill: one forward over `context` tokens into an empty cache (logits of the last token only, as generate()
does); tokens/s = context / median time. Decode: `decode-steps` single-token steps after that prefill; tokens/s
= 1 / median step time. The layout section times what the backend's (B, H, N, D) -> (B, N, H, D) copies of
q, k, v cost against one routed attention call at each context (the CPU kernels read token-major rows).

Writes bench/results/model_e2e_<device>_<stamp>.{json,md} (or --out) and prints the markdown table.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from .runner import device_name, run_meta
from .report import file_stem

PROVIDERS = ("routed", "routed-dynamic", "sdpa")
CHUNK, TOP_K = 512, 8  # defaults of --chunk / --top-k


def build_models(device: str, dtype: torch.dtype, max_len: int, layers: int = 4, hidden: int = 512,
                 chunk: int = CHUNK, top_k: int = TOP_K) -> dict:
    """{provider: model}, one set of random weights under each attention implementation."""
    import transformers

    import routing_kernels.integrations.transformers as rkt

    rkt.register()
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=1408,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                                      head_dim=hidden // 8, max_position_embeddings=max_len)
    config.routed_attention = {"chunk_size": chunk, "top_k": top_k}
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    models = {}
    for name in PROVIDERS:
        model = copy.deepcopy(base)  # configs are shared objects: one per model, or the implementations mix
        model.set_attn_implementation("sdpa" if name == "sdpa" else "routed")
        models[name] = model
    return models


def new_cache(name: str, model, capacity: int):
    if name == "routed":
        import routing_kernels.integrations.transformers as rkt

        return rkt.RoutedCache(model.config, initial_capacity=capacity)
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def measure(name: str, model, context: int, steps: int, reps: int, device: str) -> dict:
    """Prefill `context` tokens `reps` times (fresh cache each), then `steps` decode steps on the last cache."""
    gen = torch.Generator().manual_seed(context)
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=gen).to(device)
    prefill_s, cache, logits = [], None, None
    for _ in range(reps):
        cache = new_cache(name, model, context + steps)

        def prefill():
            nonlocal logits
            logits = model(ids, cache=cache, use_cache=True, logits_to_keep=1).logits
        prefill_s.append(_timed(prefill, device))
    step_s, tokens = [], []
    token = logits[:, -1:].argmax(-1)
    for _ in range(steps):
        def step():
            nonlocal logits
            logits = model(token, cache=cache, use_cache=True, logits_to_keep=1).logits
        step_s.append(_timed(step, device))
        token = logits[:, -1:].argmax(-1)
        tokens.append(int(token))
    prefill_med, step_med = statistics.median(prefill_s), statistics.median(step_s)
    return {"provider": name, "context": context, "prefill_s": prefill_med, "prefill_tok_s": context / prefill_med,
            "decode_ms": step_med * 1e3, "decode_tok_s": 1.0 / step_med, "prefill_reps": prefill_s,
            "decode_steps": step_s, "tokens": tokens}


@torch.no_grad()
def layout_cost(context: int, device: str, dtype: torch.dtype, reps: int, chunk: int, top_k: int) -> dict:
    """One layer's attention inputs as transformers hands them over, (B, H, N, D): the copies into token-major
    rows vs the routed attention call that needs them (B=1, Hq=8, Hkv=2, D=64)."""
    import routing_kernels as rk

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, context, 64, generator=gen).to(device=device, dtype=dtype) for h in (8, 2, 2))

    def copies():
        return [t.transpose(1, 2).contiguous() for t in (q, k, v)]

    qt, kt, vt = copies()
    copy_s = statistics.median(_timed(copies, device) for _ in range(reps))
    attn_s = statistics.median(_timed(lambda: rk.routed_attention(qt, kt, vt, chunk, top_k), device)
                               for _ in range(reps))
    return {"context": context, "copy_ms": copy_s * 1e3, "attention_ms": attn_s * 1e3, "copy_fraction": copy_s / attn_s}


def markdown(results: list, layouts: list, header: str) -> str:
    lines = [header, "", "| context | provider | prefill tok/s | vs sdpa | decode ms/step | decode tok/s | vs sdpa |",
             "|---|---|---|---|---|---|---|"]
    sdpa = {r["context"]: r for r in results if r["provider"] == "sdpa"}
    for r in results:
        base = sdpa.get(r["context"])
        pre = f"{r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x" if base else "-"
        dec = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base else "-"
        lines.append(f"| {r['context']} | {r['provider']} | {r['prefill_tok_s']:.0f} | {pre} | {r['decode_ms']:.2f} | "
                     f"{r['decode_tok_s']:.1f} | {dec} |")
    if layouts:
        lines += ["", "Layout copies of one layer's q, k, v ((B, H, N, D) -> (B, N, H, D)) vs its routed attention:", "",
                  "| context | copies ms | attention ms | copies / attention |", "|---|---|---|---|"]
        lines += [f"| {x['context']} | {x['copy_ms']:.2f} | {x['attention_ms']:.1f} | {x['copy_fraction']:.1%} |"
                  for x in layouts]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.model_e2e", description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="4096,16384,32768", help="comma list of prompt lengths")
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--reps", type=int, default=2, help="prefill repetitions per context (median)")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--chunk", type=int, default=CHUNK)
    p.add_argument("--top-k", type=int, default=TOP_K)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="one prefill repetition, no layout section")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    contexts = [int(c) for c in args.contexts.split(",")]
    names = [n.strip() for n in args.providers.split(",")]
    unknown = sorted(set(names) - set(PROVIDERS))
    if unknown:
        sys.exit(f"--providers: unknown {unknown}; choose from {list(PROVIDERS)}")
    reps = 1 if args.quick else args.reps
    models = build_models(device, dtype, max(contexts) + args.decode_steps, args.layers, args.hidden,
                          args.chunk, args.top_k)
    meta = run_meta(device)
    t0 = time.perf_counter()
    results, layouts = [], []
    for context in contexts:  # short contexts first: a too-long run still reports those
        for name in names:
            r = measure(name, models[name], context, args.decode_steps, reps, device)
            results.append(r)
            print(f"{context:>7} {name:15s} prefill {r['prefill_tok_s']:9.0f} tok/s  decode {r['decode_ms']:8.2f} ms",
                  file=sys.stderr)
        if not args.quick:
            layouts.append(layout_cost(context, device, dtype, 3, args.chunk, args.top_k))
    meta.update(wall_s=round(time.perf_counter() - t0, 1), argv=sys.argv[1:], layers=args.layers, hidden=args.hidden,
                chunk=args.chunk, top_k=args.top_k, dtype=str(dtype))
    header = (f"# End-to-end Llama ({args.layers} layers, hidden {args.hidden}, 8 heads, 2 kv heads, {meta['dtype']}): "
              f"routed (C={args.chunk}, k={args.top_k}) vs sdpa\n\n{device_name(device)} | torch {meta['torch']} | "
              f"{meta['commit']} | {meta['timestamp']}; `python -m bench.model_e2e {' '.join(meta['argv'])}`: "
              f"{meta['wall_s']:.0f} s")
    table = markdown(results, layouts, header)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / file_stem(meta["device"], meta["timestamp"]).replace("bench_", "model_e2e_", 1)
    stem.with_suffix(".md").write_text(table)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results, "layout": layouts},
                                                    indent=1, default=str))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
