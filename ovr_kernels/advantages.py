"""Outcome-reward advantages: GRPO / RLOO / Dr.GRPO group baselines and batch-level masked whitening.

Specs: `reference.grpo_advantages_ref`, `rloo_advantages_ref`, `drgrpo_advantages_ref`, `masked_whiten_ref`
(computed in fp32 here, written back in the input dtype). On the Triton path:
  - group advantages: each program owns BLOCK_G contiguous groups as a (BLOCK_G, BLOCK_N) tile; the estimator is a
    constexpr (one kernel, three public functions);
  - masked whitening needs the global mean and variance before any output is written: two launches over all SMs
    (the PPO loss's partial-sum pattern). The first writes per-program (count, sum, M2 about the tile's mean); in
    the second every program combines those P rows in one fixed order (Chan's parallel variance: exact, no
    cancellation) and writes its tokens, so no one-program finalize pass sits between them. Why not the others:
    the torch reference is ~18 small launches (reductions and elementwise ops), launch-bound at 1M tokens (an
    estimated ~90 us against ~10-15 us for these two); a single program streaming the tokens three times reads at
    one SM's bandwidth (estimated ~250 us). Estimates until bench_ppo_loss.py's masked_whiten row, timed against
    the reference in the same run, has run on a GPU.
No autograd: advantages are targets, not functions of trainable parameters.

Legend: B sequences (= groups x group size), G groups, N samples per group, T packed tokens.
"""

import torch
import triton
import triton.language as tl

from ovr_kernels import reference
from ovr_kernels._checks import FLOAT_DTYPES, check_cu_seqlens, check_scalar, check_tensor
from ovr_kernels._triton import INTERPRET, use_triton

GRPO, RLOO, DRGRPO = 0, 1, 2  # values of the ESTIMATOR constexpr
GROUP_TILE = 2048  # groups x samples per program
WHITEN_BLOCK = 2048  # tokens per whitening program: 1M tokens -> 512 programs, ~4 per SM
WHITEN_PARTIALS = 1024  # partial rows each whitening program combines per step


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _group_advantages_kernel(scores_ptr, out_ptr, num_groups, group_size, eps, ESTIMATOR: tl.constexpr,
                             BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[g, i] from the scores of group g (row-major (G, N) layout of the flat (B,) scores)."""
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    i = tl.arange(0, BLOCK_N)
    ok = (g < num_groups)[:, None] & (i < group_size)[None, :]
    offs = g[:, None] * group_size + i[None, :]
    s = tl.load(scores_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    n = tl.cast(group_size, tl.float32)
    # Work on scores minus the group's first score: a constant group (all right, all wrong: common in RL) is then
    # exactly 0 everywhere. Without the shift the compiled mean (a rounded sum, an approximate division) can miss
    # the score by an ulp, and GRPO divides that residue by a std of the same size plus eps: about -0.015 per
    # token in bf16 (seen on an H200), a bias on every token of every solved or failed group.
    first = tl.sum(tl.where(i[None, :] == 0, s, 0.0), axis=1)[:, None]
    s = tl.where(ok, s - first, 0.0)
    total = tl.sum(s, axis=1)[:, None]
    if ESTIMATOR == 1:  # RLOO: baseline = mean of the other samples; 0 for groups of one
        adv = tl.where(n > 1.0, s - (total - s) / tl.maximum(n - 1.0, 1.0), 0.0)
    else:
        centred = tl.where(ok, s - total / n, 0.0)  # 0 in the padding lanes, which then drop out of the std
        if ESTIMATOR == 0:  # GRPO: unbiased std (0 for groups of one, as the reference), eps keeps std 0 finite
            std = tl.sqrt(tl.sum(centred * centred, axis=1)[:, None] / tl.maximum(n - 1.0, 1.0))
            adv = centred / (std + eps)
        else:  # Dr.GRPO: no std division
            adv = centred
    tl.store(out_ptr + offs, adv.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _whiten_partial_kernel(x_ptr, mask_ptr, part_ptr, T, BLOCK: tl.constexpr):
    """part[p] = (n, sum m x, M2 = sum m (x - tile mean)^2) of this program's BLOCK tokens (two-pass inside the
    tile, which is in registers), for the finalize's exact (Chan) combination."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < T
    m = tl.load(mask_ptr + offs, mask=ok, other=0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    n = tl.sum(m, axis=0)
    total = tl.sum(tl.where(m != 0, x * m, 0.0), axis=0)
    d = x - total / tl.maximum(n, 1.0)
    m2 = tl.sum(tl.where(m != 0, d * d * m, 0.0), axis=0)
    tl.store(part_ptr + pid * 3, n)
    tl.store(part_ptr + pid * 3 + 1, total)
    tl.store(part_ptr + pid * 3 + 2, m2)


@triton.jit
def _whiten_apply_kernel(x_ptr, mask_ptr, part_ptr, out_ptr, T, P, eps, SHIFT_MEAN: tl.constexpr,
                         BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    """Every program combines all P partial rows in the same fixed order (so all agree on mean and variance, and
    the result is deterministic), then writes (x - mean) * rsqrt(var + eps) (+ mean without SHIFT_MEAN) times the
    mask for its BLOCK tokens."""
    acc_n = tl.zeros([BLOCK_P], tl.float32)
    acc_s = tl.zeros([BLOCK_P], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        acc_n += tl.load(part_ptr + rows * 3, mask=rows < P, other=0.0)
        acc_s += tl.load(part_ptr + rows * 3 + 1, mask=rows < P, other=0.0)
    n = tl.sum(acc_n, axis=0)
    mean = tl.sum(acc_s, axis=0) / tl.maximum(n, 1.0)
    acc_m2 = tl.zeros([BLOCK_P], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        n_p = tl.load(part_ptr + rows * 3, mask=rows < P, other=0.0)
        mean_p = tl.load(part_ptr + rows * 3 + 1, mask=rows < P, other=0.0) / tl.maximum(n_p, 1.0)
        d = mean_p - mean
        acc_m2 += tl.load(part_ptr + rows * 3 + 2, mask=rows < P, other=0.0) + n_p * d * d
    var = tl.sum(acc_m2, axis=0) / tl.maximum(n - 1.0, 1.0)
    inv_std = 1.0 / tl.sqrt(var + eps)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < T
    m = tl.load(mask_ptr + offs, mask=ok, other=0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    y = (x - mean) * inv_std
    if not SHIFT_MEAN:
        y += mean
    tl.store(out_ptr + offs, tl.where(m != 0, y * m, 0.0).to(out_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def group_advantages_fwd(scores_B, group_size: int, estimator: int, eps: float = 0.0):
    """One launch of the group kernel; returns advantages_B in scores' dtype."""
    out_B = torch.empty_like(scores_B)
    num_groups = scores_B.numel() // group_size
    block_n = triton.next_power_of_2(group_size)
    block_g = max(1, min(GROUP_TILE // block_n, triton.next_power_of_2(max(num_groups, 1))))
    grid = (max(1, triton.cdiv(num_groups, block_g)),)
    _group_advantages_kernel[grid](scores_B, out_B, num_groups, group_size, eps, ESTIMATOR=estimator,
                                   BLOCK_G=block_g, BLOCK_N=block_n, num_warps=4)
    return out_B


def masked_whiten_fwd(x_T, mask_T, shift_mean: bool, eps: float):
    """Two launches (partials, then combine-and-write); returns the whitened (T,) tensor in x's dtype."""
    T = x_T.numel()
    out_T = torch.empty_like(x_T)
    if T == 0:
        return out_T
    block = WHITEN_BLOCK if not INTERPRET else min(WHITEN_BLOCK, triton.next_power_of_2(max(T, 16)))
    num_programs = triton.cdiv(T, block)
    mask_k = mask_T.view(torch.uint8) if mask_T.dtype == torch.bool else mask_T
    part_P3 = torch.empty((num_programs, 3), dtype=torch.float32, device=x_T.device)
    _whiten_partial_kernel[(num_programs,)](x_T, mask_k, part_P3, T, BLOCK=block, num_warps=4)
    block_p = min(WHITEN_PARTIALS, triton.next_power_of_2(num_programs))
    _whiten_apply_kernel[(num_programs,)](x_T, mask_k, part_P3, out_T, T, num_programs, eps, SHIFT_MEAN=shift_mean,
                                         BLOCK=block, BLOCK_P=block_p, num_warps=4)
    return out_T


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------


def _check_groups(scores, group_size):
    check_tensor("scores", scores, ndim=1, dtypes=FLOAT_DTYPES, contiguous=True)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if scores.numel() % group_size != 0:
        raise ValueError(f"scores has {scores.numel()} entries, not a multiple of group_size={group_size}")


def grpo_advantages(scores, group_size, eps=1e-6):
    """GRPO: (score - group mean) / (unbiased group std + eps) over contiguous groups of `group_size`.

    scores: (B,) float, B a multiple of group_size (group g = scores[g*n:(g+1)*n]). Returns (B,) in scores' dtype.
    Groups of one and constant groups give 0 (std 0, finite thanks to eps). No autograd.
    """
    _check_groups(scores, group_size)
    eps = check_scalar("eps", eps, low=0.0, low_open=True)
    if not use_triton(scores):
        return reference.grpo_advantages_ref(scores.detach(), group_size, eps)
    return group_advantages_fwd(scores.detach(), group_size, GRPO, eps)


def rloo_advantages(scores, group_size):
    """RLOO: score - mean of the other samples of its group (0 for groups of one). Shapes as `grpo_advantages`."""
    _check_groups(scores, group_size)
    if not use_triton(scores):
        return reference.rloo_advantages_ref(scores.detach(), group_size)
    return group_advantages_fwd(scores.detach(), group_size, RLOO)


def drgrpo_advantages(scores, group_size):
    """Dr.GRPO: score - group mean (no std division). Shapes as `grpo_advantages`."""
    _check_groups(scores, group_size)
    if not use_triton(scores):
        return reference.drgrpo_advantages_ref(scores.detach(), group_size)
    return group_advantages_fwd(scores.detach(), group_size, DRGRPO)


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    """Batch advantage normalisation: (x - mean) / sqrt(var + eps) over masked entries (unbiased variance).

    x: (T,) float; mask: (T,) bool or float of the same length. shift_mean=False adds the mean back (rescale only).
    Returns (T,) in x's dtype with unmasked entries 0. Two launches on the Triton path, no host sync. No autograd.
    """
    check_tensor("x", x, ndim=1, dtypes=FLOAT_DTYPES, contiguous=True)
    check_tensor("mask", mask, dtypes=(torch.bool,) + FLOAT_DTYPES, device=x.device, shape=(x.shape[0],),
                 contiguous=True)
    eps = check_scalar("eps", eps, low=0.0)
    if not use_triton(x):
        return reference.masked_whiten_ref(x.detach(), mask, shift_mean, eps)
    return masked_whiten_fwd(x.detach(), mask, bool(shift_mean), eps)


def broadcast_to_tokens(values_B, cu_seqlens):
    """Per-sequence scalars -> per-token values: out[t] = values_B[b] for t in [cu_seqlens[b], cu_seqlens[b+1]).

    values_B: (B,) tensor; cu_seqlens: int32 (B+1,) on the same device (empty sequences allowed). Returns (T,).
    One host read of cu_seqlens (validation and the output size); meant for once-per-step use by the trainer.
    """
    check_tensor("values_B", values_B, ndim=1)
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=values_B.device,
                 shape=(values_B.shape[0] + 1,))
    total = int(cu_seqlens[-1])
    check_cu_seqlens("cu_seqlens", cu_seqlens, total, device=values_B.device)
    return torch.repeat_interleave(values_B, (cu_seqlens[1:] - cu_seqlens[:-1]).long(), output_size=total)
