"""Training with the routed layers at scale, on CPU: DDP and FSDP2 in 2 processes (gloo) give the parameters one
process gets on the combined batch; activation checkpointing over a routed layer gives the same gradients."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from routing_kernels.nn import ChunkRouter, RoutedAttention

DIM, STEPS, WORLD = 32, 3, 2


class TinyModel(nn.Module):
    """A ChunkRouter and a RoutedAttention layer with a linear head: every op of the package gets gradients."""

    def __init__(self):
        super().__init__()
        self.router = ChunkRouter(DIM, heads=4, chunk_size=4)
        self.attention = RoutedAttention(DIM, num_heads=4, num_kv_heads=2, chunk_size=4, top_k=2)
        self.head = nn.Linear(DIM, 1)

    def forward(self, x):
        y, _, summary = self.router(x)
        return self.head(self.attention(y)).mean(dim=(1, 2)) + summary.sum(-1)


def _data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2 * WORLD, 13, DIM, generator=g), torch.randn(2 * WORLD, generator=g)


def _train(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model


def _worker(rank, init_file, mode, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = TinyModel()
        x, y = _data()
        shard = slice(rank * 2, rank * 2 + 2)
        if mode == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
            _train(wrapped, x[shard], y[shard])
            state = model.state_dict()
        else:
            from torch.distributed.fsdp import fully_shard
            fully_shard(model.attention)
            fully_shard(model)
            _train(model, x[shard], y[shard])
            state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in state.items()}, os.path.join(out_dir, "state.pt"))
    finally:
        dist.destroy_process_group()


def _single_process_state():
    torch.manual_seed(0)
    model = TinyModel()
    return _train(model, *_data()).state_dict()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_match_one_process_on_the_combined_batch(mode):
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(os.path.join(tmp, "init"), mode, tmp), nprocs=WORLD, join=True,
                           start_method="spawn")
        got = torch.load(os.path.join(tmp, "state.pt"))
    want = _single_process_state()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_activation_checkpointing_over_a_routed_layer():
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    layer = RoutedAttention(DIM, num_heads=4, num_kv_heads=2, chunk_size=4, top_k=2)
    x = torch.randn(2, 13, DIM, requires_grad=True)
    plain = torch.autograd.grad(layer(x).square().sum(), [x, *layer.parameters()])
    ckpt = torch.autograd.grad(checkpoint(layer, x, use_reentrant=False).square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(ckpt, plain, rtol=0, atol=0)
