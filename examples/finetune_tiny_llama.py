"""Fine-tune a tiny random-initialised Llama with routed attention on synthetic long sequences, on CPU.

The task needs long-range routing: every sequence is random tokens in which a "key" token at a random early
position is copied to the end after a marker, so predicting the last token means attending to a chunk far
back. The loss on that token falls only if the gate learns to pick the right chunk.

    python examples/finetune_tiny_llama.py --steps 300 --seq-len 512
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import routing_kernels.integrations.transformers as rkt

MARKER, VOCAB = 1, 64


def batch(size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    ids = torch.randint(2, VOCAB, (size, seq_len), generator=generator)
    where = torch.randint(0, seq_len // 2, (size,), generator=generator)
    ids[:, -2] = MARKER
    ids[:, -1] = ids[torch.arange(size), where]
    return ids


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    args = parser.parse_args(argv)

    from transformers import LlamaConfig, LlamaForCausalLM
    rkt.register()
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=args.seq_len)
    config.routed_attention = {"chunk_size": args.chunk_size, "top_k": args.top_k}
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation("routed")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    t0, history = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        ids = batch(args.batch, args.seq_len, g)
        logits = model(ids).logits
        lm = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        copy = torch.nn.functional.cross_entropy(logits[:, -2], ids[:, -1])  # the long-range token
        opt.zero_grad()
        (lm + copy).backward()
        opt.step()
        history.append(copy.item())
        done = step * 30 // args.steps
        sys.stderr.write(f"\r[{'#' * done}{'-' * (30 - done)}] step {step}/{args.steps}  lm {lm.item():.3f}  "
                         f"copy {copy.item():.3f}  {time.perf_counter() - t0:.0f}s")
    sys.stderr.write("\n")
    first, last = sum(history[:20]) / 20, sum(history[-20:]) / 20
    print(f"copy-token loss: first 20 steps {first:.3f}, last 20 steps {last:.3f} (chance: {torch.log(torch.tensor(VOCAB - 2.)):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
