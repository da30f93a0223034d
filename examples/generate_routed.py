"""Generate with routed attention and the routed cache (chunk key sums kept, decode reads selected chunks only).

    python examples/generate_routed.py --prompt-len 2000 --new-tokens 64
"""
from __future__ import annotations

import argparse
import time

import torch

import routing_kernels.integrations.transformers as rkt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=2000)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    from transformers import LlamaConfig, LlamaForCausalLM
    rkt.register()
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=args.prompt_len * 2)
    config.routed_attention = {"chunk_size": 256, "top_k": 4}
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("routed")
    ids = torch.randint(0, 1000, (1, args.prompt_len))
    kw = dict(max_new_tokens=args.new_tokens, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    for name, cache in (("RoutedCache", rkt.RoutedCache(config)), ("DynamicCache", None)):
        t0 = time.perf_counter()
        out = model.generate(ids, cache=cache, **kw) if cache is not None else model.generate(ids, **kw)
        print(f"{name:12s}: {args.new_tokens} tokens after a {args.prompt_len}-token prompt in "
              f"{time.perf_counter() - t0:.2f} s; first new tokens {out[0, args.prompt_len:][:8].tolist()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
