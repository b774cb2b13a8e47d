"""Clipped value (critic) loss over packed tokens: one Triton kernel forward, one backward, metrics in the same pass.

Spec: `ovr_kernels.reference.value_loss_ref` (computed in fp32). Per token t with mask weight m_t:
    err = (V - R)^2,  err_clip = (V_old + clip(V - V_old, +-clip) - R)^2,
    loss_t = 0.5 * (err_clip if err_clip > err else err)      (clip=None: 0.5 * err)
    loss = sum_t m_t w_t loss_t / normalizer (token mean, sequence mean or a caller-given count, as ppo_loss).
The forward writes one row of partial sums per program and reuses ppo_loss's slicing, partial-row layout and
deterministic finalize kernel (columns: 0 loss, 1 mask count, 2 non-empty slices, then vf_clip_frac and vf_mse
sums); no host sync. The backward reuses ppo_loss's gradient scale.

Legend: T packed tokens, B sequences, P forward programs, C partial-sum columns.
"""

import torch
import triton
import triton.language as tl

from ovr_kernels import reference
from ovr_kernels._checks import check_normalizer, check_scalar, check_token_inputs
from ovr_kernels._triton import use_triton
from ovr_kernels.ppo_loss import (
    LOSS_NUM_WARPS,
    _as_kernel_mask,
    _grad_scale,
    _slice_bounds,
    _store_partial_head,
    fake_loss_outputs,
    masked_mean_finalize,
    partial_grid,
    split_normalizer,
)

COL_CLIP, COL_MSE = 3, 4
NUM_COLS = 5
METRIC_COLS = {"vf_clip_frac": COL_CLIP, "vf_mse": COL_MSE}


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _value_token(offs, inb, v_ptr, vold_ptr, ret_ptr, mask_ptr, clip, HAS_CLIP: tl.constexpr):
    """Load one tile of tokens and return (mask weight, loss, d loss / d V, err, clipped) in fp32; the clamp passes
    the gradient at its bounds. Shared by the forward and the backward kernel."""
    m = tl.load(mask_ptr + offs, mask=inb, other=0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=inb, other=0).to(tl.float32)
    v_old = tl.load(vold_ptr + offs, mask=inb, other=0).to(tl.float32)
    ret = tl.load(ret_ptr + offs, mask=inb, other=0).to(tl.float32)
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
    return m, loss, dv, err, clipped


@triton.jit
def _value_loss_fwd_kernel(v_ptr, vold_ptr, ret_ptr, mask_ptr, cu_ptr, part_ptr, T, clip,
                           HAS_CLIP: tl.constexpr, SEQ_MEAN: tl.constexpr, BLOCK_T: tl.constexpr,
                           NUM_COLS: tl.constexpr):
    """One program: reduce its slice of tokens into row pid of part_PC."""
    start, end = _slice_bounds(cu_ptr, T, BLOCK_T, SEQ_MEAN)
    acc_loss = tl.zeros([BLOCK_T], tl.float32)
    acc_cnt = tl.zeros([BLOCK_T], tl.float32)
    acc_clip = tl.zeros([BLOCK_T], tl.float32)
    acc_mse = tl.zeros([BLOCK_T], tl.float32)
    for off in range(start, end, BLOCK_T):
        offs = off + tl.arange(0, BLOCK_T)
        inb = offs < end
        m, loss, _dv, err, clipped = _value_token(offs, inb, v_ptr, vold_ptr, ret_ptr, mask_ptr, clip, HAS_CLIP)
        on = m != 0
        acc_loss += tl.where(on, loss * m, 0.0)
        acc_cnt += m
        acc_mse += tl.where(on, err * m, 0.0)
        if HAS_CLIP:
            acc_clip += tl.where(clipped, m, 0.0)
    row = _store_partial_head(part_ptr, acc_loss, acc_cnt, SEQ_MEAN, NUM_COLS)
    tl.store(row + 3, tl.sum(acc_clip, axis=0))
    tl.store(row + 4, tl.sum(acc_mse, axis=0))


@triton.jit
def _value_loss_bwd_kernel(v_ptr, vold_ptr, ret_ptr, mask_ptr, cu_ptr, part_ptr, out_ptr, gout_ptr, gv_ptr, T, clip,
                           HAS_CLIP: tl.constexpr, SEQ_MEAN: tl.constexpr, BLOCK_T: tl.constexpr,
                           NUM_COLS: tl.constexpr):
    """grad_V_t = grad_out * m_t * w_t * d loss_t / d V_t / denominator (w_t as in ppo_loss)."""
    start, end = _slice_bounds(cu_ptr, T, BLOCK_T, SEQ_MEAN)
    scale = _grad_scale(gout_ptr, out_ptr, part_ptr, SEQ_MEAN, NUM_COLS)
    for off in range(start, end, BLOCK_T):
        offs = off + tl.arange(0, BLOCK_T)
        inb = offs < end
        m, _loss, dv, _err, _clipped = _value_token(offs, inb, v_ptr, vold_ptr, ret_ptr, mask_ptr, clip, HAS_CLIP)
        g = tl.where(m != 0, dv * m * scale, 0.0)
        tl.store(gv_ptr + offs, g.to(gv_ptr.dtype.element_ty), mask=inb)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def value_loss_fwd(values_T, old_values_T, returns_T, mask_T, cu_seqlens, normalizer, clip):
    """Forward launches (main + finalize); returns (loss 0-d fp32, out_C fp32, part_PC)."""
    T = values_T.numel()
    block_t, P = partial_grid(T, cu_seqlens)
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
    block_t, P = partial_grid(T, cu_seqlens)
    grad_v_T = torch.empty_like(values_T)
    _value_loss_bwd_kernel[(P,)](values_T, old_values_T, returns_T, _as_kernel_mask(mask_T),
                                 cu_seqlens if cu_seqlens is not None else values_T, part_PC, out_C,
                                 grad_out.contiguous(), grad_v_T, T, float(clip or 0.0), HAS_CLIP=clip is not None,
                                 SEQ_MEAN=cu_seqlens is not None, BLOCK_T=block_t, NUM_COLS=NUM_COLS,
                                 num_warps=LOSS_NUM_WARPS)
    return grad_v_T


# ----------------------------------------------------------------------------------------------------------------
# Autograd: torch.library custom ops (eager and under torch.compile)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("ovr::value_loss_fwd", mutates_args=())
def _value_loss_op(values_T: torch.Tensor, old_values_T: torch.Tensor, returns_T: torch.Tensor, mask_T: torch.Tensor,
                   cu_seqlens: torch.Tensor | None, normalizer_tensor: torch.Tensor | None,
                   normalizer_value: float | None, clip: float | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss 0-d fp32, out_C fp32 metrics row, part_PC partial sums: saved for the backward)."""
    normalizer = normalizer_tensor if normalizer_tensor is not None else normalizer_value
    return value_loss_fwd(values_T, old_values_T, returns_T, mask_T, cu_seqlens, normalizer, clip)


@_value_loss_op.register_fake
def _(values_T, old_values_T, returns_T, mask_T, cu_seqlens, normalizer_tensor, normalizer_value, clip):
    return fake_loss_outputs(values_T, cu_seqlens, NUM_COLS)


@torch.library.custom_op("ovr::value_loss_bwd", mutates_args=())
def _value_loss_bwd_op(grad_loss: torch.Tensor, values_T: torch.Tensor, old_values_T: torch.Tensor,
                       returns_T: torch.Tensor, mask_T: torch.Tensor, cu_seqlens: torch.Tensor | None,
                       part_PC: torch.Tensor, out_C: torch.Tensor, clip: float | None) -> torch.Tensor:
    return value_loss_bwd(grad_loss, values_T, old_values_T, returns_T, mask_T, cu_seqlens, part_PC, out_C, clip)


@_value_loss_bwd_op.register_fake
def _(grad_loss, values_T, old_values_T, returns_T, mask_T, cu_seqlens, part_PC, out_C, clip):
    return torch.empty_like(values_T)


def _setup_context(ctx, inputs, output):
    values_T, old_T, ret_T, mask_T, cu_seqlens, _norm_tensor, _norm_value, clip = inputs
    _, out_C, part_PC = output
    ctx.save_for_backward(values_T, old_T, ret_T, mask_T, cu_seqlens, part_PC, out_C)
    ctx.clip = clip
    ctx.mark_non_differentiable(out_C, part_PC)


def _backward(ctx, grad_loss, _grad_out_C, _grad_part_PC):
    """Gradient to values only."""
    values_T, old_T, ret_T, mask_T, cu_seqlens, part_PC, out_C = ctx.saved_tensors
    grad_v_T = _value_loss_bwd_op(grad_loss, values_T, old_T, ret_T, mask_T, cu_seqlens, part_PC, out_C, ctx.clip)
    return grad_v_T, None, None, None, None, None, None, None


_value_loss_op.register_autograd(_backward, setup_context=_setup_context)


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
    Works under torch.compile(fullgraph=True): the Triton path is one custom op (`ovr::value_loss_fwd`).
    """
    check_token_inputs([("values", values), ("old_values", old_values), ("returns", returns)], mask, cu_seqlens)
    if clip is not None:
        clip = check_scalar("clip", clip, low=0.0)
    normalizer = check_normalizer(normalizer, values.device)
    if not use_triton(values):
        return reference.value_loss_ref(values, old_values, returns, mask, clip, normalizer, cu_seqlens)
    loss, out_C, _ = _value_loss_op(values, old_values.detach(), returns.detach(), mask.detach(), cu_seqlens,
                                    *split_normalizer(normalizer), clip)
    return loss, {name: out_C[col] for name, col in METRIC_COLS.items()}
