"""Compile the varlen attention kernels for sm_80 and sm_90 (no GPU needed) exactly as they launch at the benchmark
shapes: each launch is captured from the real launchers on meta tensors (block configs from the tuning table,
launch options, the dQ path the backward picks, every int argument marked divisible by 16 where its value is, as
triton's launcher marks it), then compiled on this environment's triton and on the GPU image's 3.6.0.
Shapes: bf16, D = 128 causal GQA 28/4 (text, 16k tokens), D = 80 non-causal 16 heads (whole-image ViT, and
<= 64-token windows), and D = 80 causal GQA 28/4 on 2k tokens (where the dK/dV kernel sums a group with atomics).
Every launch, forward and both backward modes (default: fused dQ; deterministic: separate dQ kernel), must compile
without register spills, the matrix kernels must use tensor cores (wgmma on sm_90, mma.sync on sm_80) and the sm_90
forward TMA (its tiles through tensor descriptors).
fp32 inputs take their own table entries on CUDA: those must not spill either."""

import importlib
import inspect
import json
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import triton.language as tl
from sm_compile import capture_launches, compile_many, job_from_launch, triton_versions, uses_tensor_cores

va = importlib.import_module("ovr_kernels.varlen_attention")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
bva = importlib.import_module("bench_varlen_attention")

KERNELS = ["_varlen_attn_fwd_kernel", "_varlen_attn_bwd_preprocess_kernel", "_varlen_attn_bwd_dkdv_kernel",
           "_varlen_attn_bwd_dq_kernel"]
# (label, q heads, kv heads, head_dim, causal, segment lengths): the benchmark shapes, and one the GPU test runs
SHAPES = [("d128-causal-gqa7", 28, 4, 128, True, bva._lengths("text")),
          ("d80-full", 16, 16, 80, False, bva._lengths("vit_full")),
          ("d80-windows", 16, 16, 80, False, bva._lengths("windows")),
          ("d80-causal-gqa7-2k", 28, 4, 80, True, [700, 1, 0, 1347])]
TL_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32"}


def _signature(kernel, launch):
    """Triton signature of a captured launch: tensors as typed pointers, tl.constexpr parameters as constexpr,
    Python floats as fp32, ints as i32."""
    params = inspect.signature(getattr(kernel, "fn", kernel)).parameters
    sig = {}
    for name in kernel.arg_names:
        value = launch[name]
        if params[name].annotation is tl.constexpr:
            sig[name] = "constexpr"
        elif isinstance(value, torch.Tensor):
            sig[name] = "*" + TL_DTYPE[value.dtype]
        else:
            sig[name] = "fp32" if isinstance(value, float) else "i32"
    return sig


def _describe(kernel_name, launch):
    short = kernel_name[len("_varlen_attn_"):-len("_kernel")]
    if short == "bwd_dkdv":
        short += {va.DQ_SEPARATE: "", va.DQ_ATOMIC: "+dq-atomic", va.DQ_STORE: "+dq-store"}[launch["DQ"]]
        short += "-atomic-group" if launch["ATOMIC"] else ""
    cfg = f"{launch.get('BLOCK_M', '')}x{launch.get('BLOCK_N', '')}" if "BLOCK_M" in launch else ""
    return f"{short} {cfg} w{launch['num_warps']} s{launch.get('num_stages', 3)}"


def launched_jobs(dtype=torch.bfloat16, archs=(80, 90), shapes=SHAPES):
    """(names, jobs): one per distinct launch of the forward and of both backward modes at each shape."""
    names, jobs, seen = [], [], set()
    for arch in archs:
        for label, hq, hkv, d, causal, lengths in shapes:
            total = sum(lengths)
            q = torch.empty(total, hq, d, dtype=dtype, device="meta")
            k = torch.empty(total, hkv, d, dtype=dtype, device="meta")
            cu = torch.empty(len(lengths) + 1, dtype=torch.int32, device="meta")
            max_len = max(lengths)

            def run(q=q, k=k, cu=cu, max_len=max_len, causal=causal, d=d):
                out, lse = va.varlen_attention_fwd(q, k, k, cu, cu, max_len, max_len, causal, d ** -0.5)
                for deterministic in (False, True):
                    va.varlen_attention_bwd(out, q, k, k, out, lse, cu, cu, max_len, max_len, causal, d ** -0.5,
                                            deterministic)

            with mock.patch.object(va, "INTERPRET", False), \
                    mock.patch.object(torch.cuda, "get_device_capability", lambda device=None, a=arch: divmod(a, 10)):
                calls = capture_launches(va, KERNELS, run)
            for kernel_name in KERNELS:
                kernel = getattr(va, kernel_name)
                for launch in calls[kernel_name]:
                    j = job_from_launch(kernel, _signature(kernel, launch), launch, arch)
                    key = json.dumps([j["name"], j["arch"], j["constexprs"], sorted(j["divisible"]), j["num_warps"],
                                      j["num_stages"]], sort_keys=True)
                    if key not in seen:
                        seen.add(key)
                        names.append(f"{_describe(kernel_name, launch)} {label} {TL_DTYPE[dtype]} sm_{arch}")
                        jobs.append(j)
    return names, jobs


def _check(compiled, tensor_cores=True):
    for name, info in compiled:
        print(f"{name} (triton {info.triton_version}): {info.n_regs} regs, {info.shared} B shared, "
              f"{info.n_spills} B spills")
    spills = [f"{name}: {info.n_spills} B" for name, info in compiled if info.n_spills]
    assert not spills, f"register spills: {spills}"
    if tensor_cores:
        no_tc = [name for name, info in compiled if not name.startswith("bwd_preprocess")
                 and not uses_tensor_cores(info)]
        assert not no_tc, f"no tensor-core instructions in {no_tc}"


@pytest.mark.parametrize("triton_dir", triton_versions())
def test_launched_bf16_kernels_compile_without_spills_on_tensor_cores(triton_dir):
    names, jobs = launched_jobs()
    # every backward path launches somewhere: fused dQ with atomics (long segments) and with stores (windows),
    # the separate dQ kernel (deterministic), and the group-atomic dK/dV variant (GQA with few kv blocks)
    for kind in ("bwd_dkdv+dq-atomic ", "bwd_dkdv+dq-store ", "bwd_dkdv ", "bwd_dq ", "-atomic-group"):
        assert any(kind in name for name in names), kind
    compiled = list(zip(names, compile_many(jobs, triton_dir)))
    if triton_dir is not None:
        assert all(info.triton_version == "3.6.0" for _, info in compiled)
    _check(compiled)
    # every stride and token count at these shapes is a multiple of 16: the launch marks them all
    assert all("stride_q_t" in j["divisible"] for j in jobs if "stride_q_t" in j["signature"])
    # fp32 atomics without a fence per add (relaxed)
    fused = [info for name, info in compiled if "+dq-atomic" in name]
    assert fused and all("atom.global.acq_rel" not in info.asm["ptx"] for info in fused)
    _check_tma(compiled)


def _check_tma(compiled, sm90=True):
    """The sm_90 forward moves its tiles with TMA (cp.async.bulk.tensor) where `sm90`; sm_80 has none and uses
    pointer loads, as does fp32 everywhere (`_tma_ok`)."""
    fwd = [(name, info) for name, info in compiled if name.startswith("fwd ")]
    assert fwd
    for name, info in fwd:
        expected = sm90 and info.arch >= 90
        assert ("cp.async.bulk.tensor" in info.asm["ptx"]) == expected, f"{name}: TMA expected {expected}"


@pytest.mark.parametrize("triton_dir", triton_versions())
def test_launched_fp32_kernels_compile_without_spills(triton_dir):
    """fp32 inputs on CUDA (full-precision ieee dots: no tensor cores) take the table's fp32 entries up to
    FP32_MAX_HEAD_DIM (larger head dims are rejected: tests/kernels/test_gpu_varlen_attention.py)."""
    shapes = [s for s in SHAPES if s[3] <= va.FP32_MAX_HEAD_DIM]
    assert shapes
    names, jobs = launched_jobs(torch.float32, shapes=shapes)
    compiled = list(zip(names, compile_many(jobs, triton_dir)))
    _check(compiled, tensor_cores=False)
    _check_tma(compiled, sm90=False)


EDGE_SHAPES = [("one-token", 2, 1, 64, True, [1]), ("d80-short-gqa3", 3, 1, 80, False, [1, 0, 5]),
               ("d128-one-segment", 4, 4, 128, True, [37]), ("d128-long-gqa2", 4, 2, 128, True, [700, 1])]


@pytest.mark.parametrize("triton_dir", triton_versions()[1:])  # the GPU image's triton: what launches there
def test_edge_shapes_compile(triton_dir):
    """One token, one segment, a one-head K/V, lengths that are no multiple of 16: triton's launcher passes an int
    argument equal to 1 as the constant 1 (a Python int inside the kernel), a variant the benchmark shapes never
    compile; a kernel that treats such an argument as a tensor fails only here (the fused log-prob's split merge
    did, on an H200, at one vocabulary split). Every kernel of the forward and of both backward modes compiles for
    sm_90."""
    names, jobs = launched_jobs(archs=(90,), shapes=EDGE_SHAPES)
    assert any(1 in j["constexprs"].values() for j in jobs), "no launch passes an int equal to 1"
    assert {j["name"] for j in jobs} == set(KERNELS)
    for name, info in zip(names, compile_many(jobs, triton_dir)):
        print(f"{name} (triton {info.triton_version}): {info.n_regs} regs, {info.n_spills} B spills")
