"""Clipped value (critic) loss over packed tokens: one Triton kernel forward, one backward, metrics in the same pass.

Spec: `ovr_kernels.reference.value_loss_ref` (computed in fp32). Per token t with mask weight m_t:
    err = (V - R)^2,  err_clip = (V_old + clip(V - V_old, +-clip) - R)^2,
    loss_t = 0.5 * (err_clip if err_clip > err else err)      (clip=None: 0.5 * err)
    loss = sum_t m_t w_t loss_t / normalizer (token mean, sequence mean or a caller-given count, as ppo_loss).
The forward writes one row of partial sums per program and reuses ppo_loss's deterministic finalize kernel (same
column layout: 0 loss, 1 mask count, 2 non-empty slices, then vf_clip_frac and vf_mse sums); no host sync.

Legend: T packed tokens, B sequences, P forward programs, C partial-sum columns.
"""

import torch
import triton
import triton.language as tl

from ovr_kernels import reference
from ovr_kernels._checks import check_scalar
from ovr_kernels._triton import use_triton
from ovr_kernels.ppo_loss import (
    LOSS_NUM_WARPS,
    _as_kernel_mask,
    _block_t,
    _num_programs,
    _slice_bounds,
    check_normalizer,
    check_token_inputs,
    masked_mean_finalize,
)

COL_CLIP, COL_MSE = 3, 4
NUM_COLS = 5
METRIC_COLS = {"vf_clip_frac": COL_CLIP, "vf_mse": COL_MSE}


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _value_token(v, v_old, ret, clip, HAS_CLIP: tl.constexpr):
    """Per-token (loss, d loss / d V, err, clipped) in fp32; the clamp passes the gradient at its bounds."""
    diff = v - ret
    err = diff * diff
    if HAS_CLIP:
        d = v - v_old
        v_clip = v_old + tl.minimum(tl.maximum(d, -clip), clip)
        diff_clip = v_clip - ret
        err_clip = diff_clip * diff_clip
        clipped = err_clip > err
        loss = 0.5 * tl.where(clipped, err_clip, err)
        dv = tl.where(clipped, diff_clip * ((d >= -clip) & (d <= clip)).to(tl.float32), diff)
    else:
        clipped = err < 0.0  # all False; unused without HAS_CLIP
        loss = 0.5 * err
        dv = diff
    return loss, dv, err, clipped


@triton.jit
def _value_loss_fwd_kernel(v_ptr, vold_ptr, ret_ptr, mask_ptr, cu_ptr, part_ptr, T, clip,
                           HAS_CLIP: tl.constexpr, SEQ_MEAN: tl.constexpr, BLOCK_T: tl.constexpr,
                           NUM_COLS: tl.constexpr):
    """One program: reduce its slice of tokens into row pid of part_PC."""
    pid = tl.program_id(0)
    start, end = _slice_bounds(cu_ptr, T, BLOCK_T, SEQ_MEAN)
    acc_loss = tl.zeros([BLOCK_T], tl.float32)
    acc_cnt = tl.zeros([BLOCK_T], tl.float32)
    acc_clip = tl.zeros([BLOCK_T], tl.float32)
    acc_mse = tl.zeros([BLOCK_T], tl.float32)
    for off in range(start, end, BLOCK_T):
        offs = off + tl.arange(0, BLOCK_T)
        inb = offs < end
        m = tl.load(mask_ptr + offs, mask=inb, other=0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=inb, other=0).to(tl.float32)
        v_old = tl.load(vold_ptr + offs, mask=inb, other=0).to(tl.float32)
        ret = tl.load(ret_ptr + offs, mask=inb, other=0).to(tl.float32)
        loss, _dv, err, clipped = _value_token(v, v_old, ret, clip, HAS_CLIP)
        on = m != 0
        acc_loss += tl.where(on, loss * m, 0.0)
        acc_cnt += m
        acc_mse += tl.where(on, err * m, 0.0)
        if HAS_CLIP:
            acc_clip += tl.where(clipped, m, 0.0)
    cnt = tl.sum(acc_cnt, axis=0)
    loss_sum = tl.sum(acc_loss, axis=0)
    if SEQ_MEAN:
        loss_sum = loss_sum / tl.maximum(cnt, 1.0)
    row = part_ptr + pid * NUM_COLS
    tl.store(row + 0, loss_sum)
    tl.store(row + 1, cnt)
    tl.store(row + 2, (cnt > 0).to(tl.float32))
    tl.store(row + 3, tl.sum(acc_clip, axis=0))
    tl.store(row + 4, tl.sum(acc_mse, axis=0))


@triton.jit
def _value_loss_bwd_kernel(v_ptr, vold_ptr, ret_ptr, mask_ptr, cu_ptr, part_ptr, out_ptr, gout_ptr, gv_ptr, T, clip,
                           HAS_CLIP: tl.constexpr, SEQ_MEAN: tl.constexpr, BLOCK_T: tl.constexpr,
                           NUM_COLS: tl.constexpr):
    """grad_V_t = grad_out * m_t * w_t * d loss_t / d V_t / denominator (w_t as in ppo_loss)."""
    pid = tl.program_id(0)
    start, end = _slice_bounds(cu_ptr, T, BLOCK_T, SEQ_MEAN)
    scale = tl.load(gout_ptr).to(tl.float32) / tl.load(out_ptr + 1)
    if SEQ_MEAN:
        scale = scale / tl.maximum(tl.load(part_ptr + pid * NUM_COLS + 1), 1.0)
    for off in range(start, end, BLOCK_T):
        offs = off + tl.arange(0, BLOCK_T)
        inb = offs < end
        m = tl.load(mask_ptr + offs, mask=inb, other=0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=inb, other=0).to(tl.float32)
        v_old = tl.load(vold_ptr + offs, mask=inb, other=0).to(tl.float32)
        ret = tl.load(ret_ptr + offs, mask=inb, other=0).to(tl.float32)
        _loss, dv, _err, _clipped = _value_token(v, v_old, ret, clip, HAS_CLIP)
        g = tl.where(m != 0, dv * m * scale, 0.0)
        tl.store(gv_ptr + offs, g.to(gv_ptr.dtype.element_ty), mask=inb)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def value_loss_fwd(values_T, old_values_T, returns_T, mask_T, cu_seqlens, normalizer, clip):
    """Forward launches (main + finalize); returns (loss 0-d fp32, out_C fp32, part_PC)."""
    T = values_T.numel()
    block_t = _block_t(T)
    P = _num_programs(T, cu_seqlens, block_t)
    part_PC = torch.empty((P, NUM_COLS), dtype=torch.float32, device=values_T.device)
    _value_loss_fwd_kernel[(P,)](values_T, old_values_T, returns_T, _as_kernel_mask(mask_T),
                                 cu_seqlens if cu_seqlens is not None else values_T, part_PC, T,
                                 float(clip or 0.0), HAS_CLIP=clip is not None, SEQ_MEAN=cu_seqlens is not None,
                                 BLOCK_T=block_t, NUM_COLS=NUM_COLS, num_warps=LOSS_NUM_WARPS)
    loss, out_C = masked_mean_finalize(part_PC, normalizer, cu_seqlens is not None, max_col=-1)
    return loss, out_C, part_PC


def value_loss_bwd(grad_out, values_T, old_values_T, returns_T, mask_T, cu_seqlens, part_PC, out_C, clip):
    """Backward launch; returns grad_values_T in values' dtype."""
    T = values_T.numel()
    grad_v_T = torch.empty_like(values_T)
    _value_loss_bwd_kernel[(part_PC.shape[0],)](values_T, old_values_T, returns_T, _as_kernel_mask(mask_T),
                                                cu_seqlens if cu_seqlens is not None else values_T, part_PC, out_C,
                                                grad_out.contiguous(), grad_v_T, T, float(clip or 0.0),
                                                HAS_CLIP=clip is not None, SEQ_MEAN=cu_seqlens is not None,
                                                BLOCK_T=_block_t(T), NUM_COLS=NUM_COLS, num_warps=LOSS_NUM_WARPS)
    return grad_v_T


# ----------------------------------------------------------------------------------------------------------------
# autograd.Function
# ----------------------------------------------------------------------------------------------------------------


class ValueLossFn(torch.autograd.Function):
    """Triton clipped value loss; gradient to values only. Returns (loss 0-d fp32, out_C fp32 metrics row)."""

    @staticmethod
    def forward(ctx, values_T, old_values_T, returns_T, mask_T, cu_seqlens, normalizer, clip):
        loss, out_C, part_PC = value_loss_fwd(values_T, old_values_T, returns_T, mask_T, cu_seqlens, normalizer, clip)
        ctx.save_for_backward(values_T, old_values_T, returns_T, mask_T, cu_seqlens, part_PC, out_C)
        ctx.clip = clip
        ctx.mark_non_differentiable(out_C)
        return loss, out_C

    @staticmethod
    def backward(ctx, grad_loss, grad_out_C):
        values_T, old_T, ret_T, mask_T, cu_seqlens, part_PC, out_C = ctx.saved_tensors
        grad_v_T = value_loss_bwd(grad_loss, values_T, old_T, ret_T, mask_T, cu_seqlens, part_PC, out_C, ctx.clip)
        return grad_v_T, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def value_loss(values, old_values, returns, mask, clip=0.2, normalizer=None, cu_seqlens=None):
    """Clipped value loss over packed tokens (spec: `reference.value_loss_ref`); returns (loss, metrics).

    Args:
        values: (T,) float critic values. Gets a gradient.
        old_values: (T,) float values at rollout time. No gradient.
        returns: (T,) float targets (GAE returns). No gradient.
        mask: (T,) bool or float; tokens with mask 0 contribute nothing.
        clip: None (plain 0.5 * MSE) or a number >= 0: V is clipped to old_values +- clip.
        normalizer, cu_seqlens: as `ppo_loss` (token mean by default; sequence mean with int32 (B+1,) cu_seqlens;
            a Python number > 0 or 0-d tensor overrides the denominator).
    Returns:
        loss: 0-d tensor (fp32 on the Triton path). metrics: dict of 0-d tensors (masked-token means, no grad):
        vf_clip_frac (tokens where the clipped error is the larger), vf_mse (mean (V - R)^2).
    """
    check_token_inputs([("values", values), ("old_values", old_values), ("returns", returns)], mask, cu_seqlens)
    if clip is not None:
        clip = check_scalar("clip", clip, low=0.0)
    normalizer = check_normalizer(normalizer, values.device)
    if not use_triton(values):
        return reference.value_loss_ref(values, old_values, returns, mask, clip, normalizer, cu_seqlens)
    loss, out_C = ValueLossFn.apply(values, old_values.detach(), returns.detach(), mask.detach(), cu_seqlens,
                                    normalizer, clip)
    return loss, {name: out_C[col] for name, col in METRIC_COLS.items()}
