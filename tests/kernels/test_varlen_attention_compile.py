"""Compile the varlen attention kernels for sm_80 and sm_90 (no GPU needed) as they launch at the benchmark shapes:
bf16, D = 128 causal GQA 28/4 (text, 16k tokens) and D = 80 non-causal 16 heads (whole-image ViT, and <= 64-token
windows), with the block configs the launchers read from the tuning table, every int argument that is a multiple of
16 at those shapes marked as triton's launcher marks it, on this environment's triton and on the GPU image's 3.6.0.
Every config must compile without register spills and the matrix kernels must use tensor cores (wgmma / mma.sync).
fp32 inputs take their own table entries on CUDA: those must not spill either."""

import importlib

import pytest
import torch
from sm_compile import compile_many, job, triton_versions, uses_tensor_cores

va = importlib.import_module("ovr_kernels.varlen_attention")

TOTAL = 16384  # packed tokens of every benchmark shape
# (label, q heads, kv heads, head_dim, causal, max_seqlen): the benchmark shapes (a), (c) and (b)
SHAPES = [("d128-causal-gqa7", 28, 4, 128, True, 8192), ("d80-full", 16, 16, 80, False, 4096),
          ("d80-windows", 16, 16, 80, False, 64)]
TL_DTYPE = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def _strides(name, x):
    return {f"stride_{name}_t": x.stride(0), f"stride_{name}_h": x.stride(1)}


def _shape_jobs(arch, dtype, label, hq, hkv, d, causal, max_seqlen, atomic_gqa=True):
    """(names, jobs) for every kernel one benchmark shape launches; int values from meta tensors of that shape."""
    dt = TL_DTYPE[dtype]
    q = torch.empty(TOTAL, hq, d, dtype=dtype, device="meta")
    k = torch.empty(TOTAL, hkv, d, dtype=dtype, device="meta")
    lse = torch.empty(hq, TOTAL, dtype=torch.float32, device="meta")
    d0, d1 = va.split_head_dim(d)
    common = {"CAUSAL": causal, "HEAD_D0": d0, "HEAD_D1": d1, "BLOCK_D1": max(d1, 16), "UPCAST": False,
              "DOT_PRECISION": va._dot_precision(dtype), "GROUP": hq // hkv}
    segs = {"cu_q_ptr": "*i32", "cu_k_ptr": "*i32", "seg_order_ptr": "*i32"}
    names, jobs = [], []

    def add(name, kernel, sig, values, constexprs, config):
        bm, bn, warps, stages = config
        names.append(f"{name} {label} {dt} sm_{arch} {bm}x{bn} w{warps} s{stages}")
        jobs.append(job(kernel, sig, dict(constexprs, BLOCK_M=bm, BLOCK_N=bn), arch, warps, stages, values=values))

    def sig_of(ptrs, strides, scalars, constexprs):
        sig = {**ptrs, **segs}
        sig.update({n: "i32" for n in strides})
        sig.update({n: "fp32" for n in scalars})
        sig.update({n: "constexpr" for n in constexprs})
        return sig

    fwd_vals = {**_strides("q", q), **_strides("k", k), **_strides("v", k), **_strides("o", q),
                "stride_lse_h": lse.stride(0)}
    cfg = va.block_config("fwd", d, max_seqlen, arch, dtype, causal)
    add("fwd", va._varlen_attn_fwd_kernel,
        sig_of({"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "o_ptr": f"*{dt}", "lse_ptr": "*fp32"},
               fwd_vals, ["qk_scale"], list(common) + ["BLOCK_M", "BLOCK_N"]), fwd_vals, common, cfg)
    if max_seqlen <= 64:
        return names, jobs  # the backward tiles do not depend on segment length
    cfg = va.block_config("dkdv", d, max_seqlen, arch, dtype, causal)
    # the atomic variant launches for GQA with few kv blocks; check it wherever it can launch at this head dim
    atomic_modes = (False, True) if atomic_gqa and va.use_atomic_dkdv(False, 7, 1, d, 1, 64, torch.device("cpu")) \
        else (False,)
    for atomic in atomic_modes:
        acc = "fp32" if atomic else dt
        vals = {**_strides("q", q), **_strides("k", k), **_strides("v", k), **_strides("do", q), **_strides("dk", k),
                **_strides("dv", k), "stride_lse_h": lse.stride(0)}
        sig = sig_of({"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "do_ptr": f"*{dt}", "lse_ptr": "*fp32",
                      "delta_ptr": "*fp32", "dk_ptr": f"*{acc}", "dv_ptr": f"*{acc}"}, vals, ["qk_scale", "sm_scale"],
                     list(common) + ["ATOMIC", "BLOCK_M", "BLOCK_N"])
        add(f"dkdv{'-atomic' if atomic else ''}", va._varlen_attn_bwd_dkdv_kernel, sig, vals,
            dict(common, ATOMIC=atomic), cfg)
    cfg = va.block_config("dq", d, max_seqlen, arch, dtype, causal)
    vals = {**_strides("q", q), **_strides("k", k), **_strides("v", k), **_strides("do", q), **_strides("dq", q),
            "stride_lse_h": lse.stride(0)}
    add("dq", va._varlen_attn_bwd_dq_kernel,
        sig_of({"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "do_ptr": f"*{dt}", "lse_ptr": "*fp32",
                "delta_ptr": "*fp32", "dq_ptr": f"*{dt}"}, vals, ["qk_scale", "sm_scale"],
               list(common) + ["BLOCK_M", "BLOCK_N"]), vals, common, cfg)
    pre_sig = {"o_ptr": f"*{dt}", "do_ptr": f"*{dt}", "delta_ptr": "*fp32", "num_tokens": "i32", "stride_o_t": "i32",
               "stride_o_h": "i32", "stride_do_t": "i32", "stride_do_h": "i32", "stride_delta_h": "i32",
               "HEAD_DIM": "constexpr", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"}
    pre_vals = {"num_tokens": TOTAL, **_strides("o", q), **_strides("do", q), "stride_delta_h": lse.stride(0)}
    names.append(f"preprocess {label} {dt} sm_{arch}")
    jobs.append(job(va._varlen_attn_bwd_preprocess_kernel, pre_sig,
                    {"HEAD_DIM": d, "BLOCK_T": va._PREPROCESS_BLOCK_T, "BLOCK_D": 1 << (d - 1).bit_length()},
                    arch, va._PREPROCESS_WARPS, 1, values=pre_vals))
    return names, jobs


def all_jobs(dtype=torch.bfloat16, archs=(80, 90), shapes=SHAPES):
    names, jobs = [], []
    for arch in archs:
        for shape in shapes:
            n, j = _shape_jobs(arch, dtype, *shape)
            names += n
            jobs += j
    return names, jobs


def _check(compiled, tensor_cores=True):
    for name, info in compiled:
        print(f"{name} (triton {info.triton_version}): {info.n_regs} regs, {info.shared} B shared, "
              f"{info.n_spills} B spills")
    spills = [f"{name}: {info.n_spills} B" for name, info in compiled if info.n_spills]
    assert not spills, f"register spills: {spills}"
    if tensor_cores:
        no_tc = [name for name, info in compiled if not name.startswith("preprocess") and not uses_tensor_cores(info)]
        assert not no_tc, f"no tensor-core instructions in {no_tc}"


@pytest.mark.parametrize("triton_dir", triton_versions())
def test_launched_bf16_kernels_compile_without_spills_on_tensor_cores(triton_dir):
    names, jobs = all_jobs()
    compiled = list(zip(names, compile_many(jobs, triton_dir)))
    if triton_dir is not None:
        assert all(info.triton_version == "3.6.0" for _, info in compiled)
    _check(compiled)
    assert any("dkdv-atomic" in name for name, _ in compiled)
    # every stride and token count at these shapes is a multiple of 16: the launch marks them all
    assert all(j["divisible"] and "stride_q_t" in j["divisible"] for j in jobs if "stride_q_t" in j["signature"])


@pytest.mark.parametrize("triton_dir", triton_versions())
def test_launched_fp32_kernels_compile_without_spills(triton_dir):
    """fp32 inputs on CUDA (full-precision ieee dots: no tensor cores) take the table's fp32 entries up to
    FP32_MAX_HEAD_DIM (larger head dims are rejected: tests/kernels/test_gpu_varlen_attention.py)."""
    shapes = [s for s in SHAPES if s[3] <= va.FP32_MAX_HEAD_DIM]
    assert shapes
    names, jobs = all_jobs(torch.float32, shapes=shapes)
    _check(list(zip(names, compile_many(jobs, triton_dir))), tensor_cores=False)
