"""bench/resources.py without compiling anything: the occupancy arithmetic against cuda_occupancy.h's rules, the
parsers of ptxas -v / cuobjdump output (samples taken from this tree's kernels), and the violation rules. The
compile-backed report itself is tested in test_triton_sm90_compile.py."""
import pytest

from bench import resources as res

SM90, SM80, SM86 = res.ARCHS[90], res.ARCHS[80], res.ARCHS[86]
KB = 1024


@pytest.mark.parametrize("arch, regs, smem, threads, blocks, limiter", [
    # 255 regs: 8160 -> 8192 per warp, 2 warps per 16K sub-partition, 8 per SM: two 4-warp blocks
    (SM90, 255, 0, 128, 2, "regs"),
    (SM90, 64, 0, 256, 4, "regs"),  # 2048 per warp, 8 per sub-partition, 32 warps
    (SM90, 16, 0, 128, 16, "warps"),  # 64 warps / 4
    (SM90, 16, 0, 32, 32, "blocks"),  # the 32-block limit
    (SM86, 16, 0, 32, 16, "blocks"),  # sm_86: 16 blocks, 48 warps
    (SM86, 16, 0, 512, 3, "warps"),
    # 100 KB + the 1 KB reservation: two fit sm_90's 228 KB, one sm_80's 164 KB, none sm_86's 99 KB per block
    (SM90, 32, 100 * KB, 128, 2, "smem"),
    (SM80, 32, 100 * KB, 128, 1, "smem"),
    (SM86, 32, 100 * KB, 128, 0, "smem"),
    (SM86, 32, 99 * KB, 128, 1, "smem"),
    (SM90, 32, 227 * KB, 128, 1, "smem"),
    (SM90, 32, 227 * KB + 1, 128, 0, "smem"),
    (SM90, 256, 0, 128, 0, "regs"),  # past 255 registers per thread
    (SM90, 128, 0, 1024, 0, "regs"),  # 128 regs x 1024 threads > 64K registers per block
])
def test_occupancy(arch, regs, smem, threads, blocks, limiter):
    occ = res.occupancy(arch, regs, smem, threads)
    assert occ["blocks_per_sm"] == blocks
    assert occ["limiter"] == limiter
    assert occ["warps_per_sm"] == blocks * (threads // 32)


PTXAS_SPILL = """ptxas info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized due to \
insufficient register resources for the wgmma pipeline in the function 'k'
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : Function properties for k
    4184 bytes stack frame, 8804 bytes spill stores, 10672 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4184 bytes cumulative stack size
"""


def test_parse_ptxas_log():
    info = res.parse_ptxas_log(PTXAS_SPILL)
    assert info == {"stack_frame": 4184, "spill_stores": 8804, "spill_loads": 10672, "ptxas_regs": 255,
                    "wgmma_serialized": "insufficient register resources for the wgmma pipeline"}
    assert res.parse_ptxas_log("ptxas info    : 0 bytes gmem\n") is None


FATBIN_USAGE = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function _ZN15routing_kernels17chunk_mean_kernelIfLb0EEEvPKT_:
  REG:30 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN15routing_kernels19scale_chunks_kernelIN3c104HalfELi8ELb0ELb0EEEvPKT_:
  REG:48 STACK:8 SHARED:9216 LOCAL:0 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_resource_usage():
    usage = res.parse_resource_usage(FATBIN_USAGE)
    assert [(u["arch"], u["regs"], u["stack"], u["static_smem"]) for u in usage] == [
        ("sm_90", 30, 0, 0), ("sm_90", 48, 8, 9216)]


def test_local_memory_ops():
    sass = """arch = sm_90
\t\tFunction : f
        /*0010*/                   STL [R1], R27 ;
        /*0020*/                   LDL.LU R32, [R1] ;
        /*0030*/                   STL.64 [R1+0x10], R12 ;
\t\tFunction : g
        /*0010*/                   LDG.E.128.CONSTANT R16, desc[UR8][R12.64] ;
"""
    assert res.local_memory_ops(sass) == {("sm_90", "f"): 3, ("sm_90", "g"): 0}


def test_short_cuda_name():
    name = ("void routing_kernels::(anonymous namespace)::reduce_chunks_kernel<c10::BFloat16, 8, true, false>"
            "(c10::BFloat16 const*, routing_kernels::(anonymous namespace)::Geometry)")
    assert res._short_cuda_name(name) == ("reduce_chunks_kernel", "BFloat16, 8, true, false")


def _record(**kw):
    rec = {"kind": "triton", "arch": "sm_86", "kernel": "k", "inputs": "bf16", "constexprs": "BLOCK=64",
           "default": True, "num_warps": 4, "threads": 128, "regs": 128, "stack": 0, "local": 0,
           "spill_stores": 0, "spill_loads": 0, "smem": 32 * KB, "wgmma_serialized": None}
    rec.update(kw)
    rec.update(res.occupancy(res.ARCHS[int(rec["arch"][3:])], rec["regs"], rec["smem"], rec["threads"]))
    return rec


def test_violations_and_warnings():
    assert res.violations([_record()]) == []
    spill = res.violations([_record(spill_stores=8, spill_loads=4)])
    assert len(spill) == 1 and "spills" in spill[0]["message"]
    # a stack frame without spill bytes (ptxas keeps one for a CALL) moves no data
    assert res.violations([_record(stack=8)]) == []
    # 104 KB fits sm_80's block, not sm_86's (dq at D = 128 with 64-key blocks did this)
    assert res.violations([_record(arch="sm_80", smem=104 * KB)]) == []
    assert "99 KB" in res.violations([_record(smem=104 * KB)])[0]["message"]
    # the other variants: spills are a warning, shared memory overflow still fails
    assert res.violations([_record(default=False, spill_stores=8)]) == []
    assert any("not a default" in w for w in res.warnings([_record(default=False, spill_stores=8)]))
    assert res.violations([_record(default=False, smem=104 * KB)])
    low = res.warnings([_record(regs=255)])  # 8 of 48 warps on sm_86
    assert low and "17%" in low[0]
    # CUDA C++: static shared memory is checked against all three archs, spills by SASS local-memory ops
    cuda = _record(kind="cuda", arch="sm_90", spill_stores=None, spill_loads=None, local_ops=0, stack=8,
                   smem=120 * KB)
    assert [v["message"].split(": ")[-1] for v in res.violations([cuda])] == [
        "120.0 KB shared memory per block > sm_86's 99 KB"]
    assert res.violations([dict(cuda, smem=0, local_ops=3)])[0]["message"].endswith("stack frame 8 bytes)")
