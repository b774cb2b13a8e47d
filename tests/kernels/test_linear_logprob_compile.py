"""Compile the linear_logprob kernels for sm_80 and sm_90 at the benchmark configs (bf16, H = 3584, V = 152,064) with
the GPU launch options the launchers use: no register spills, matrix products on tensor cores (wgmma on sm_90,
mma.sync on sm_80). Prints registers and shared memory per config. No GPU needed (sm_compile.py)."""

import pytest
from sm_compile import compile_many, job, uses_tensor_cores

import ovr_kernels.linear_logprob as ll

HIDDEN = 3584

FWD_SIGNATURE = {
    "hidden_ptr": "*bf16", "weight_ptr": "*bf16", "targets_ptr": "*i64", "part_ptr": "*fp32",
    "T": "i32", "V": "i32", "H": "i32", "stride_h_t": "i32", "stride_w_v": "i32", "scale2": "fp32",
    "vocab_per_split": "i32", "num_splits": "i32",
    "BLOCK_T": "constexpr", "BLOCK_V": "constexpr", "BLOCK_K": "constexpr", "EVEN_K": "constexpr",
    "WITH_ENTROPY": "constexpr", "UPCAST": "constexpr", "INPUT_PRECISION": "constexpr", "ALIGNED": "constexpr",
}
BWD_SIGNATURE = {
    "hidden_ptr": "*bf16", "weight_ptr": "*bf16", "targets_ptr": "*i64", "max2_ptr": "*fp32", "log2sum_ptr": "*fp32",
    "entropy_ptr": "*fp32", "grad_logprob_ptr": "*fp32", "grad_entropy_ptr": "*fp32", "dz_ptr": "*bf16",
    "T": "i32", "V": "i32", "H": "i32", "stride_h_t": "i32", "stride_w_v": "i32", "stride_dz_t": "i32",
    "v_offset": "i32", "scale2": "fp32", "inv_temperature": "fp32", "ignore_index": "i32",
    "BLOCK_T": "constexpr", "BLOCK_V": "constexpr", "BLOCK_K": "constexpr", "EVEN_K": "constexpr",
    "GROUP_T": "constexpr", "HAS_GRAD_ENTROPY": "constexpr", "UPCAST": "constexpr", "INPUT_PRECISION": "constexpr",
    "ALIGNED": "constexpr",
}


def _gpu_configs():
    """The launchers' bf16 GPU configs, read from the module (INTERPRET is on in tests, so ask as on a GPU)."""
    interpret, ll.INTERPRET = ll.INTERPRET, False
    try:
        import torch

        probe = torch.empty(0, dtype=torch.bfloat16)
        return ll._fwd_config(probe), ll._bwd_config(probe)
    finally:
        ll.INTERPRET = interpret


def _jobs(arch):
    (fbt, fbv, fbk, fwarps, fstages), (bbt, bbv, bbk, group, bwarps, bstages) = _gpu_configs()
    # ALIGNED: bf16 rows of 3584 elements from fresh allocations start on 16-byte boundaries.
    common = {"EVEN_K": HIDDEN % fbk == 0, "UPCAST": False, "INPUT_PRECISION": "tf32", "ALIGNED": True}
    jobs = []
    for with_entropy in (True, False):
        jobs.append((f"fwd entropy={with_entropy}", job(
            ll._linear_logprob_fwd_kernel, FWD_SIGNATURE,
            {"BLOCK_T": fbt, "BLOCK_V": fbv, "BLOCK_K": fbk, "WITH_ENTROPY": with_entropy, **common},
            arch=arch, num_warps=fwarps, num_stages=fstages)))
    for has_grad_entropy in (True, False):
        jobs.append((f"bwd grad_entropy={has_grad_entropy}", job(
            ll._linear_logprob_bwd_kernel, BWD_SIGNATURE,
            {"BLOCK_T": bbt, "BLOCK_V": bbv, "BLOCK_K": bbk, "GROUP_T": group, "HAS_GRAD_ENTROPY": has_grad_entropy,
             **common},
            arch=arch, num_warps=bwarps, num_stages=bstages)))
    return jobs


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_without_spills_on_tensor_cores(arch):
    names, jobs = zip(*_jobs(arch))
    infos = compile_many(list(jobs))
    for name, info in zip(names, infos):
        print(f"linear_logprob {name}: {info.summary()}")
    for name, info in zip(names, infos):
        assert info.n_spills == 0, f"{name} sm_{arch}: {info.n_spills} B of spills\n{info.ptxas_log}"
        assert uses_tensor_cores(info, arch), f"{name} sm_{arch}: no {'wgmma' if arch >= 90 else 'mma.sync'}"
        assert info.shared <= (232_448 if arch >= 90 else 166_912), f"{name} sm_{arch}: {info.shared} B shared"
