"""Fine-tune a tiny random-initialised Llama with routed attention on synthetic long sequences, on CPU.

Every sequence is "filler" from a fixed Markov chain (each filler token has two possible successors, so the
language-model loss can fall from ln 32 = 3.47 to ln 2 = 0.69 as the model learns the chain through its own
chunk), with one "needle" token (drawn from ids the filler never uses) at a random position in its first half;
the sequence ends with a marker and then the needle again. Predicting that last token means finding the one
chunk far back that holds the needle: its loss falls below chance (ln of the number of needle ids) only once
the gate learns to pick that chunk.

    python examples/finetune_tiny_llama.py --steps 300 --seq-len 256
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

import routing_kernels.integrations.transformers as rkt

MARKER, VOCAB = 1, 64
FILLER, NEEDLES = range(2, 34), range(34, VOCAB)  # filler ids 2..33; needle ids 34..63 appear once per sequence


SUCCESSORS = 2  # filler successors per filler token: the entropy rate of the filler is ln 2
_CHAIN = torch.randint(FILLER.start, FILLER.stop, (VOCAB, SUCCESSORS), generator=torch.Generator().manual_seed(7))


def batch(size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    ids = torch.empty(size, seq_len, dtype=torch.int64)
    ids[:, 0] = torch.randint(FILLER.start, FILLER.stop, (size,), generator=generator)
    pick = torch.randint(0, SUCCESSORS, (size, seq_len), generator=generator)
    for t in range(1, seq_len):
        ids[:, t] = _CHAIN[ids[:, t - 1], pick[:, t]]
    needle = torch.randint(NEEDLES.start, NEEDLES.stop, (size,), generator=generator)
    where = torch.randint(0, seq_len // 2, (size,), generator=generator)
    ids[torch.arange(size), where] = needle
    ids[:, -2] = MARKER
    ids[:, -1] = needle
    return ids


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=256)
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
    t0, history, lm_history = time.perf_counter(), [], []
    for step in range(1, args.steps + 1):
        ids = batch(args.batch, args.seq_len, g)
        logits = model(ids).logits
        lm = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        copy = torch.nn.functional.cross_entropy(logits[:, -2], ids[:, -1])  # the long-range token
        opt.zero_grad()
        (lm + copy).backward()
        opt.step()
        history.append(copy.item())
        lm_history.append(lm.item())
        done = step * 30 // args.steps
        sys.stderr.write(f"\r[{'#' * done}{'-' * (30 - done)}] step {step}/{args.steps}  lm {lm.item():.3f}  "
                         f"copy {copy.item():.3f}  {time.perf_counter() - t0:.0f}s")
    sys.stderr.write("\n")
    def mean(xs):
        return sum(xs) / max(len(xs), 1)

    print(f"language-model loss: first 20 steps {mean(lm_history[:20]):.3f}, last 20 steps "
          f"{mean(lm_history[-20:]):.3f} (uniform filler: ln {len(FILLER)} = {math.log(len(FILLER)):.3f}; "
          f"the chain's floor: ln {SUCCESSORS} = {math.log(SUCCESSORS):.3f})")
    print(f"needle-token loss: first 20 steps {mean(history[:20]):.3f}, last 20 steps {mean(history[-20:]):.3f} "
          f"(chance: ln {len(NEEDLES)} = {math.log(len(NEEDLES)):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
