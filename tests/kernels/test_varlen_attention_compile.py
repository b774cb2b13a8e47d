"""Compile the varlen attention kernels for sm_80 and sm_90 (no GPU needed) at the configs the benchmarks launch:
bf16, D = 128 causal GQA 7:1 (text) and D = 80 non-causal (ViT full attention, and <= 64-token windows). Every
config must compile without register spills and the matrix kernels must use tensor cores (wgmma / mma.sync)."""

import importlib

import pytest
import torch
from sm_compile import compile_many, job, uses_tensor_cores

va = importlib.import_module("ovr_kernels.varlen_attention")

_PTRS = {"cu_q_ptr": "*i32", "cu_k_ptr": "*i32", "seg_order_ptr": "*i32"}


def _signature(names_bf16, names_fp32, strides, scalars, constexprs):
    sig = {n: "*bf16" for n in names_bf16}
    sig.update({n: "*fp32" for n in names_fp32})
    sig.update(_PTRS)
    sig.update({n: "i32" for n in strides})
    sig.update({n: "fp32" for n in scalars})
    sig.update({n: "constexpr" for n in constexprs})
    return sig


def _strides(*tensors):
    return [f"stride_{t}_{d}" for t in tensors for d in ("t", "h")]


def _jobs():
    jobs, names = [], []
    # (label, head_dim, causal, group, max_seqlen): the benchmark shapes (a), (c) and (b)
    shapes = [("d128-causal-gqa7", 128, True, 7, 8192), ("d80-full", 80, False, 1, 4096),
              ("d80-windows", 80, False, 1, 64)]
    for arch in (80, 90):
        for label, d, causal, group, max_seqlen in shapes:
            d0, d1 = va.split_head_dim(d)
            common = {"CAUSAL": causal, "HEAD_D0": d0, "HEAD_D1": d1, "BLOCK_D1": max(d1, 16), "UPCAST": False,
                      "DOT_PRECISION": "tf32", "GROUP": group}
            bm, bn, warps, stages = va.block_config("fwd", d, max_seqlen, arch)
            sig = _signature(["q_ptr", "k_ptr", "v_ptr", "o_ptr"], ["lse_ptr"], _strides("q", "k", "v", "o"),
                             ["qk_scale"], list(common) + ["BLOCK_M", "BLOCK_N"])
            sig["stride_lse_h"] = "i32"
            jobs.append(job(va._varlen_attn_fwd_kernel, sig, dict(common, BLOCK_M=bm, BLOCK_N=bn), arch, warps,
                            stages))
            names.append(f"fwd {label} sm_{arch} {bm}x{bn} w{warps} s{stages}")
            if max_seqlen <= 64:
                continue  # the backward tiles do not depend on segment length
            atomic_modes = (False, True) if va.use_atomic_dkdv(False, 7, 1, d, 1, 64, torch.device("cpu")) else (False,)
            for atomic in atomic_modes:
                bm, bn, warps, stages = va.block_config("dkdv", d, max_seqlen, arch)
                sig = _signature(["q_ptr", "k_ptr", "v_ptr", "do_ptr"] + ([] if atomic else ["dk_ptr", "dv_ptr"]),
                                 ["lse_ptr", "delta_ptr"] + (["dk_ptr", "dv_ptr"] if atomic else []),
                                 _strides("q", "k", "v", "do", "dk", "dv") + ["stride_lse_h"],
                                 ["qk_scale", "sm_scale"], list(common) + ["ATOMIC", "BLOCK_M", "BLOCK_N"])
                jobs.append(job(va._varlen_attn_bwd_dkdv_kernel, sig,
                                dict(common, ATOMIC=atomic, BLOCK_M=bm, BLOCK_N=bn), arch, warps, stages))
                names.append(f"dkdv{'-atomic' if atomic else ''} {label} sm_{arch} {bm}x{bn} w{warps} s{stages}")
            bm, bn, warps, stages = va.block_config("dq", d, max_seqlen, arch)
            sig = _signature(["q_ptr", "k_ptr", "v_ptr", "do_ptr", "dq_ptr"], ["lse_ptr", "delta_ptr"],
                             _strides("q", "k", "v", "do", "dq") + ["stride_lse_h"], ["qk_scale", "sm_scale"],
                             list(common) + ["BLOCK_M", "BLOCK_N"])
            jobs.append(job(va._varlen_attn_bwd_dq_kernel, sig, dict(common, BLOCK_M=bm, BLOCK_N=bn), arch, warps,
                            stages))
            names.append(f"dq {label} sm_{arch} {bm}x{bn} w{warps} s{stages}")
            sig = {"o_ptr": "*bf16", "do_ptr": "*bf16", "delta_ptr": "*fp32", "num_tokens": "i32",
                   "stride_o_t": "i32", "stride_o_h": "i32", "stride_do_t": "i32", "stride_do_h": "i32",
                   "stride_delta_h": "i32", "HEAD_DIM": "constexpr", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"}
            jobs.append(job(va._varlen_attn_bwd_preprocess_kernel, sig,
                            {"HEAD_DIM": d, "BLOCK_T": va._PREPROCESS_BLOCK_T, "BLOCK_D": 1 << (d - 1).bit_length()},
                            arch, va._PREPROCESS_WARPS, 1))
            names.append(f"preprocess {label} sm_{arch}")
    return names, jobs


@pytest.fixture(scope="module")
def compiled():
    names, jobs = _jobs()
    return list(zip(names, compile_many(jobs)))


def test_kernels_compile_without_spills_and_use_tensor_cores(compiled):
    for name, info in compiled:
        print(f"{name}: {info.n_regs} regs, {info.shared} B shared, {info.n_spills} B spills")
    spills = [f"{name}: {info.n_spills} B" for name, info in compiled if info.n_spills]
    assert not spills, f"register spills: {spills}"
    no_tc = [name for name, info in compiled if not name.startswith("preprocess") and not uses_tensor_cores(info)]
    assert not no_tc, f"no tensor-core instructions in {no_tc}"
    assert any("dkdv-atomic" in name for name, _ in compiled)
