"""GAE over packed sequences: C++ loop on CPU, one CUDA launch on GPU, a vectorised torch fallback.

CPU tensors -> `ovr_kernels._C.gae_cpu` (the reference's loop in C++, float64 accumulation: bit-identical to
`reference.gae_ref` for fp32/fp64). CUDA tensors -> `ovr_kernels._C.gae_cuda` (csrc/gae.cu: a warp per sequence
scanning 32 tokens at a time, fp32 accumulation, on the current stream) when the module was built with nvcc.
Otherwise, or with `use_ext=False`, `_gae_torch` (float64, a reverse sweep over all sequences at once: identical to
the reference). `OVR_BACKEND=reference` forces `reference.gae_ref`.

Legend: T packed tokens, B sequences, L longest sequence.
"""

import torch

from ovr_kernels import _ext
from ovr_kernels._checks import FLOAT_DTYPES, check_cu_seqlens, check_scalar, check_tensor
from ovr_kernels._triton import backend
from ovr_kernels.reference import gae_ref

_DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}  # csrc/checks.h DType

# ----------------------------------------------------------------------------------------------------------------
# Launchers (the kernels live in csrc/gae.cpp and csrc/gae.cu)
# ----------------------------------------------------------------------------------------------------------------


def _gae_cpu_ext(rewards_T, values_T, cu_seqlens, gamma, lam):
    """C++ loop; fp16/bf16 or mixed dtypes go through float64 buffers (exact), so results match the reference."""
    same = rewards_T.dtype == values_T.dtype
    work = values_T.dtype if same and values_T.dtype in (torch.float32, torch.float64) else torch.float64
    r = rewards_T.to(work).contiguous()
    v = values_T.to(work).contiguous()
    cu = cu_seqlens.contiguous()
    adv_T, ret_T = torch.empty_like(v), torch.empty_like(v)
    _ext._C.gae_cpu(r.data_ptr(), v.data_ptr(), cu.data_ptr(), cu.numel() - 1, adv_T.data_ptr(), ret_T.data_ptr(),
                    gamma, lam, _DTYPE_CODE[work])
    return adv_T.to(values_T.dtype), ret_T.to(values_T.dtype)


def _gae_cuda_ext(rewards_T, values_T, cu_seqlens, gamma, lam):
    """One asynchronous launch on the current stream; outputs in values' dtype.

    Mixed input dtypes run in the wider of fp32 and both inputs (fp64 when either is fp64)."""
    if rewards_T.dtype == values_T.dtype:
        work = values_T.dtype
    else:
        work = torch.float64 if torch.float64 in (rewards_T.dtype, values_T.dtype) else torch.float32
    r = rewards_T.to(work).contiguous()
    v = values_T.to(work).contiguous()
    cu = cu_seqlens.contiguous()
    adv_T, ret_T = torch.empty_like(v), torch.empty_like(v)
    stream = torch.cuda.current_stream(v.device).cuda_stream
    _ext._C.gae_cuda(r.data_ptr(), v.data_ptr(), cu.data_ptr(), cu.numel() - 1, adv_T.data_ptr(), ret_T.data_ptr(),
                     gamma, lam, _DTYPE_CODE[work], v.device.index, stream)
    return adv_T.to(values_T.dtype), ret_T.to(values_T.dtype)


def _gae_torch(rewards_T, values_T, cu_seqlens, gamma, lam):
    """Vectorised fallback on any device: step s updates the s-th token from the end of every sequence at once.

    Float64 and the reference's operation order (no fused multiply-adds), so results equal gae_ref exactly.
    L iterations of a few tensor ops over at most B tokens each.
    """
    device = values_T.device
    r = rewards_T.detach().double()
    v = values_T.detach().double()
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    start_B, end_B = cu[:-1], cu[1:]
    lengths_B = end_B - start_B
    num_steps = int(lengths_B.max()) if lengths_B.numel() else 0
    adv = torch.zeros_like(v)
    next_v = torch.zeros(lengths_B.numel(), dtype=torch.float64, device=device)
    next_a = torch.zeros_like(next_v)
    gamma_lam = gamma * lam  # the reference evaluates gamma * lam * A left to right
    for s in range(num_steps):
        live = torch.nonzero(lengths_B > s).squeeze(1)  # sequences still running at this step (shrinks over s)
        t = end_B[live] - 1 - s
        v_t = v[t]
        delta = torch.sub(torch.add(r[t], torch.mul(next_v[live], gamma)), v_t)
        a_t = torch.add(delta, torch.mul(next_a[live], gamma_lam))
        adv[t] = a_t
        next_a[live] = a_t
        next_v[live] = v_t
    ret = adv + v
    return adv.to(values_T.dtype), ret.to(values_T.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def gae(rewards, values, cu_seqlens, gamma=1.0, lam=1.0, use_ext=None):
    """Generalised advantage estimation over packed sequences; returns (advantages_T, returns_T).

    rewards, values: (T,) float tensors (fp16/bf16/fp32/fp64) on one device; cu_seqlens: int32 (B+1,) from 0 to T
    (repeated entries = empty sequences). Per sequence: delta_t = r_t + gamma * V_{t+1} - V_t with V = 0 past the
    sequence's end, A_t = delta_t + gamma * lam * A_{t+1}; returns = A + V. gamma, lam in [0, 1].
    Outputs are (T,) in values' dtype on values' device. No autograd: the inputs are read detached (advantages
    and returns are regression / policy-gradient targets, never differentiated through).
    use_ext: None picks the compiled op when built (C++ on CPU, CUDA on GPU), False forces the torch fallback,
    True requires the compiled op. CPU results equal `reference.gae_ref` exactly; the CUDA op accumulates in fp32.
    """
    check_tensor("values", values, ndim=1, dtypes=FLOAT_DTYPES)
    check_tensor("rewards", rewards, ndim=1, dtypes=FLOAT_DTYPES, device=values.device, shape=(values.shape[0],))
    check_cu_seqlens("cu_seqlens", cu_seqlens, values.shape[0], device=values.device)
    gamma = check_scalar("gamma", gamma, low=0.0, high=1.0)
    lam = check_scalar("lam", lam, low=0.0, high=1.0)
    if backend() == "reference":
        return gae_ref(rewards, values, cu_seqlens, gamma, lam)
    rewards, values = rewards.detach(), values.detach()
    if use_ext is None:
        use_ext = _ext.HAS_CUDA_EXT if values.is_cuda else _ext.HAS_EXT
    elif use_ext and not (_ext.HAS_CUDA_EXT if values.is_cuda else _ext.HAS_EXT):
        raise ValueError(f"use_ext=True but ovr_kernels._C {'has no CUDA op' if _ext.HAS_EXT else 'is not built'} "
                         f"for {values.device.type} tensors")
    if not use_ext:
        return _gae_torch(rewards, values, cu_seqlens, gamma, lam)
    if values.is_cuda:
        return _gae_cuda_ext(rewards, values, cu_seqlens, gamma, lam)
    return _gae_cpu_ext(rewards, values, cu_seqlens, gamma, lam)
