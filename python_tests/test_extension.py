"""The compiled extension routing_kernels._C: build report, and the C++ op chunk_mean_fwd against a float64 loop."""
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import routing_kernels
from routing_kernels._ext import HAS_C, HAS_CUDA_KERNELS, has_kernel

needs_c = pytest.mark.skipif(not HAS_C, reason="routing_kernels._C is not built")

# Output vs the float64 loop over the same (rounded) inputs: the error is the output's rounding plus fp32 sums.
TOLERANCES = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPES = list(TOLERANCES)


def chunk_mean_loop(x, chunk_size, cu_seqlens=None, max_seqlen=None):
    """Naive float64 loop: dense x (B, N, H, D) or packed x (T, H, D) with cu_seqlens -> (B or S, M, H, D)."""
    x = x.double()
    if cu_seqlens is None:
        seqs, max_len = list(x), x.shape[1]
    else:
        bounds = cu_seqlens.tolist()
        seqs, max_len = [x[bos:eos] for bos, eos in zip(bounds[:-1], bounds[1:])], max_seqlen
    num_chunks = -(-max_len // chunk_size)
    out = torch.zeros(len(seqs), num_chunks, *x.shape[-2:], dtype=torch.float64)
    for s, seq in enumerate(seqs):
        for i in range(num_chunks):
            tokens = seq[i * chunk_size:(i + 1) * chunk_size]
            if len(tokens):
                total = torch.zeros(x.shape[-2:], dtype=torch.float64)
                for token in tokens:
                    total += token
                out[s, i] = total / len(tokens)
    return out


def chunk_mean_fwd(x, chunk_size, cu_seqlens=None, max_seqlen=None):
    n = max_seqlen if cu_seqlens is not None else x.shape[1]
    return torch.ops.routing_kernels.chunk_mean_fwd(x, chunk_size, cu_seqlens, n)


def check_close(out, x, chunk_size, cu_seqlens=None, max_seqlen=None):
    expected = chunk_mean_loop(x, chunk_size, cu_seqlens, max_seqlen)
    assert out.dtype == x.dtype and out.shape == expected.shape
    tol = TOLERANCES[x.dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


# (B, N, H, D, chunk_size), each with the awkward case it covers.
DENSE_CASES = {
    "multiple": (2, 12, 3, 8, 4),
    "ragged_last_chunk": (2, 10, 2, 5, 4),  # N not a multiple of chunk_size
    "chunk_gt_n": (1, 3, 2, 4, 8),  # one partial chunk
    "chunk_1": (1, 5, 1, 3, 1),
    "n_0": (2, 0, 2, 4, 4),  # M = 0: empty output
}
# (cu_seqlens, max_seqlen, chunk_size)
VARLEN_CASES = {
    "empty_seq": ([0, 7, 7, 12], 7, 3),  # sequence 1 has no token: its rows must be zero
    "max_seqlen_above_lengths": ([0, 2, 5], 9, 2),  # rows beyond each sequence's chunks are zero
    "t_0": ([0, 0, 0], 4, 2),  # no tokens at all
    "no_seq": ([0], 4, 2),  # S = 0
}


@needs_c
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DENSE_CASES.values(), ids=DENSE_CASES.keys())
def test_chunk_mean_fwd_dense(case, dtype, poison):
    batch, seqlen, heads, dim, chunk_size = case
    x = torch.randn(batch, seqlen, heads, dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    check_close(chunk_mean_fwd(x, chunk_size), x, chunk_size)


@needs_c
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", VARLEN_CASES.values(), ids=VARLEN_CASES.keys())
def test_chunk_mean_fwd_varlen(case, dtype, poison):
    offsets, max_seqlen, chunk_size = case
    cu_seqlens = torch.tensor(offsets, dtype=torch.int32)
    x = torch.randn(offsets[-1], 3, 5, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = chunk_mean_fwd(x, chunk_size, cu_seqlens, max_seqlen)
    check_close(out, x, chunk_size, cu_seqlens, max_seqlen)


@needs_c
@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
def test_chunk_mean_fwd_non_contiguous(layout, poison):
    base = torch.randn(2, 9, 4, 3)
    x = {"transposed": base.transpose(2, 3),  # (2, 9, 3, 4) with D not innermost
         "strided": base[:, ::2],  # every other token
         "expanded": base[:, :1].expand(2, 9, 4, 3)}[layout]  # stride 0 over tokens, as a .sum() backward gives
    assert not x.is_contiguous()
    check_close(chunk_mean_fwd(x, 4), x, 4)


@needs_c
def test_chunk_mean_fwd_large_row_parallel(poison):
    # Enough work for several at::parallel_for tasks.
    x = torch.randn(3, 100, 4, 64)
    check_close(chunk_mean_fwd(x, 7), x, 7)


@needs_c
@pytest.mark.parametrize("call, argument", [
    (lambda x, cu: chunk_mean_fwd(x, 0, cu, 7), "chunk_size"),
    (lambda x, cu: chunk_mean_fwd(x[None], 2, cu, 7), "x"),  # rank 4 with cu_seqlens
    (lambda x, cu: chunk_mean_fwd(x, 2), "x"),  # rank 3 without cu_seqlens
    (lambda x, cu: chunk_mean_fwd(x, 2, cu.long(), 7), "cu_seqlens"),
    (lambda x, cu: chunk_mean_fwd(x, 2, cu[None], 7), "cu_seqlens"),
    (lambda x, cu: chunk_mean_fwd(x, 2, cu.flip(0), 7), "cu_seqlens"),
    (lambda x, cu: chunk_mean_fwd(x, 2, cu, 6), "max_seqlen"),
    (lambda x, cu: chunk_mean_fwd(x.int(), 2, cu, 7), "x"),
], ids=["chunk_size_0", "rank_4_varlen", "rank_3_dense", "cu_int64", "cu_2d", "cu_decreasing",
        "max_seqlen_small", "x_int32"])
def test_chunk_mean_fwd_bad_inputs(call, argument):
    x, cu_seqlens = torch.randn(12, 2, 4), torch.tensor([0, 7, 7, 12], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=rf"\b{argument}\b"):
        call(x, cu_seqlens)


def test_build_info_keys():
    info = routing_kernels.build_info()
    expected = {"version", "extension", "cuda_built", "cuda_archs", "torch_version", "cuda_version",
                "torch_runtime", "triton_runtime", "import_error"}
    assert expected <= set(info)
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert info["version"] == re.search(r'^version\s*=\s*"([^"]+)"', pyproject, re.MULTILINE).group(1)
    assert info["extension"] == ("loaded" if HAS_C else "not built")
    assert info["cuda_built"] is HAS_CUDA_KERNELS
    if HAS_CUDA_KERNELS:
        assert info["cuda_archs"] and info["cuda_version"]


def test_has_kernel():
    assert has_kernel("chunk_mean_fwd", "cpu") is HAS_C
    assert has_kernel("chunk_mean_fwd", "cuda") is HAS_CUDA_KERNELS
    assert not has_kernel("no_such_op", "cpu")


def test_import_without_extension_warns_once():
    # A fresh interpreter where routing_kernels._C cannot be imported: the package imports, warns once.
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["routing_kernels._C"] = None  # makes `from routing_kernels import _C` fail
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import routing_kernels, routing_kernels._ext
            import importlib; importlib.import_module("routing_kernels._ext")
        messages = [str(w.message) for w in caught if "routing_kernels._C" in str(w.message)]
        assert len(messages) == 1, messages
        assert "setup.py build_ext --inplace" in messages[0]
        info = routing_kernels.build_info()
        assert info["extension"] == "not built" and info["import_error"], info
        assert not routing_kernels._ext.has_kernel("chunk_mean_fwd", "cpu")
    """)
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="built without CUDA kernels")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunk_mean_fwd_cuda_matches_cpu(dtype):
    gen = torch.Generator().manual_seed(2)
    cases = [
        (torch.randn(2, 37, 3, 40, generator=gen), 8, None, None),
        (torch.randn(2, 37, 3, 40, generator=gen).transpose(2, 3), 64, None, None),  # non-contiguous, chunk > N
        (torch.randn(1, 70000, 1, 1, generator=gen), 1, None, None),  # M above 65535
        (torch.randn(30, 2, 300, generator=gen), 4, torch.tensor([0, 11, 11, 30], dtype=torch.int32), 19),
        (torch.randn(0, 2, 8, generator=gen), 4, torch.tensor([0, 0], dtype=torch.int32), 5),
    ]
    for x, chunk_size, cu_seqlens, max_seqlen in cases:
        x = x.to(dtype)
        expected = chunk_mean_fwd(x, chunk_size, cu_seqlens, max_seqlen)
        out = chunk_mean_fwd(x.cuda(), chunk_size, None if cu_seqlens is None else cu_seqlens.cuda(), max_seqlen)
        assert out.device.type == "cuda"
        tol = TOLERANCES[dtype]
        torch.testing.assert_close(out.cpu(), expected, rtol=tol, atol=tol)
