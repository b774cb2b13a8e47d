"""GSPO clipped surrogate over packed sequences: one Triton program per sequence, one forward and one backward launch
(+ the shared finalize), metrics in the same pass.

Spec: `ovr_kernels.reference.gspo_loss_ref` (same numbers, computed in fp32). The importance ratio is the
sequence's, s_b = exp(clamp(mean over the masked tokens of b of (logp_t - old_t), +-20)), in the token form
(GSPO-token): per token t of sequence b with mask weight m_t,
    r_t = sg[s_b] * exp(logp_t - sg[logp_t])  (value s_b, d r_t / d logp_t = s_b),
    pg_t = max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high)),  loss_t = pg_t + kl_coef KL_t - entropy_coef H_t,
    loss = sum_t m_t w_t loss_t / normalizer, w_t = 1 (token mean) or 1 / (masked tokens of t's sequence).
With one advantage per sequence and the sequence mean this is GSPO's sequence objective exactly (its gradient
s_b A_b / |b| per token); the token form also takes per-token advantages (GAE). The "masked tokens" of the mean are
those with m_t != 0, unweighted: float mask weights scale a token's loss, not the sequence ratio.
Each program reads its sequence twice (the mean log-ratio, then the per-token terms); the backward recomputes
both from the inputs. Slicing, partial rows, finalize and gradient scale are ppo_loss's.

Legend: T packed tokens, B sequences, P forward programs (= B), C partial-sum columns.
"""

import torch
import triton
import triton.language as tl

from ovr_kernels import reference
from ovr_kernels._checks import check_normalizer, check_scalar, check_token_inputs
from ovr_kernels._triton import use_triton
from ovr_kernels.ppo_loss import (
    KL_TYPES,
    LOG_RATIO_CLAMP,
    LOSS_NUM_WARPS,
    _as_kernel_mask,
    _grad_scale,
    _kl_token,
    _store_partial_head,
    check_ppo_options,
    fake_loss_outputs,
    masked_mean_finalize,
    partial_grid,
    register_loss_autograd,
    split_normalizer,
)

COL_PG, COL_CLIP, COL_APPROX_KL, COL_RATIO, COL_RATIO_MAX, COL_KL, COL_ENTROPY = range(3, 10)
NUM_COLS = 10
METRIC_COLS = {"pg_loss": COL_PG, "clip_frac": COL_CLIP, "approx_kl": COL_APPROX_KL, "ratio_mean": COL_RATIO,
               "ratio_max": COL_RATIO_MAX, "kl": COL_KL, "entropy": COL_ENTROPY}


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _sequence_ratio(logp_ptr, old_ptr, mask_ptr, start, end, lr_clamp, BLOCK_T: tl.constexpr):
    """s_b of the sequence [start, end) in fp32 (exp taken in fp64 and rounded once, as ppo_loss, so that the clip
    decision is the same on every platform); 1 for a sequence without a masked token."""
    acc_lr = tl.zeros([BLOCK_T], tl.float32)
    acc_n = tl.zeros([BLOCK_T], tl.float32)
    for off in range(start, end, BLOCK_T):
        offs = off + tl.arange(0, BLOCK_T)
        inb = offs < end
        on = tl.load(mask_ptr + offs, mask=inb, other=0).to(tl.float32) != 0
        logp = tl.load(logp_ptr + offs, mask=inb, other=0).to(tl.float32)
        old = tl.load(old_ptr + offs, mask=inb, other=0).to(tl.float32)
        # where, not a product with the mask: padding may hold inf/NaN log-probs
        acc_lr += tl.where(on, logp - old, 0.0)
        acc_n += on.to(tl.float32)
    mean = tl.sum(acc_lr, axis=0) / tl.maximum(tl.sum(acc_n, axis=0), 1.0)
    mean = tl.minimum(tl.maximum(mean, -lr_clamp), lr_clamp)
    return tl.exp(mean.to(tl.float64)).to(tl.float32)


@triton.jit
def _gspo_token(offs, inb, logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ratio, lo, hi, kl_coef, lr_clamp,
                HAS_KL: tl.constexpr, KL_TYPE: tl.constexpr):
    """One tile of sequence b's tokens -> (mask weight, pg, d loss/d logp without the entropy term, token log-ratio,
    clipped, kl) in fp32; `ratio` is s_b. The clipped branch takes over only when strictly larger (zero slope);
    shared by the forward and the backward kernel."""
    m = tl.load(mask_ptr + offs, mask=inb, other=0).to(tl.float32)
    logp = tl.load(logp_ptr + offs, mask=inb, other=0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=inb, other=0).to(tl.float32)
    adv = tl.load(adv_ptr + offs, mask=inb, other=0).to(tl.float32)
    lr = tl.minimum(tl.maximum(logp - old, -lr_clamp), lr_clamp)
    pg1 = -adv * ratio
    pg2 = -adv * tl.minimum(tl.maximum(ratio, lo), hi)
    clipped = pg2 > pg1
    pg = tl.where(clipped, pg2, pg1)
    dpg = tl.where(clipped, 0.0, -adv * ratio)
    kl = tl.zeros_like(pg)
    if HAS_KL:
        kl, dkl = _kl_token(offs, inb, logp, ref_ptr, kl_coef, KL_TYPE)
        dpg += dkl
    return m, pg, dpg, lr, clipped, kl


@triton.jit
def _gspo_loss_fwd_kernel(logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ent_ptr, cu_ptr, part_ptr,
                          lo, hi, kl_coef, ent_coef, lr_clamp,
                          HAS_KL: tl.constexpr, KL_TYPE: tl.constexpr, HAS_ENTROPY: tl.constexpr,
                          SEQ_MEAN: tl.constexpr, BLOCK_T: tl.constexpr, NUM_COLS: tl.constexpr):
    """One program: reduce sequence pid into row pid of part_PC."""
    start = tl.load(cu_ptr + tl.program_id(0))
    end = tl.load(cu_ptr + tl.program_id(0) + 1)
    ratio = _sequence_ratio(logp_ptr, old_ptr, mask_ptr, start, end, lr_clamp, BLOCK_T)
    acc_loss = tl.zeros([BLOCK_T], tl.float32)
    acc_cnt = tl.zeros([BLOCK_T], tl.float32)
    acc_pg = tl.zeros([BLOCK_T], tl.float32)
    acc_clip = tl.zeros([BLOCK_T], tl.float32)
    acc_akl = tl.zeros([BLOCK_T], tl.float32)
    acc_kl = tl.zeros([BLOCK_T], tl.float32)
    acc_ent = tl.zeros([BLOCK_T], tl.float32)
    for off in range(start, end, BLOCK_T):
        offs = off + tl.arange(0, BLOCK_T)
        inb = offs < end
        m, pg, _dpg, lr, clipped, kl = _gspo_token(offs, inb, logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ratio,
                                                   lo, hi, kl_coef, lr_clamp, HAS_KL, KL_TYPE)
        loss = pg + kl_coef * kl
        on = m != 0
        if HAS_ENTROPY:
            ent = tl.load(ent_ptr + offs, mask=inb, other=0).to(tl.float32)
            loss -= ent_coef * ent
            acc_ent += tl.where(on, ent * m, 0.0)
        acc_loss += tl.where(on, loss * m, 0.0)
        acc_cnt += m
        acc_pg += tl.where(on, pg * m, 0.0)
        acc_clip += tl.where(clipped, m, 0.0)
        acc_akl += tl.where(on, 0.5 * lr * lr * m, 0.0)
        acc_kl += tl.where(on, kl * m, 0.0)
    row = _store_partial_head(part_ptr, acc_loss, acc_cnt, SEQ_MEAN, NUM_COLS)
    cnt = tl.sum(acc_cnt, axis=0)
    tl.store(row + 3, tl.sum(acc_pg, axis=0))
    tl.store(row + 4, tl.sum(acc_clip, axis=0))
    tl.store(row + 5, tl.sum(acc_akl, axis=0))
    tl.store(row + 6, ratio * cnt)  # every token of b has ratio s_b
    tl.store(row + 7, tl.where(cnt > 0, ratio, 0.0))  # ratios are > 0: 0 is the max over no tokens
    tl.store(row + 8, tl.sum(acc_kl, axis=0))
    tl.store(row + 9, tl.sum(acc_ent, axis=0))


@triton.jit
def _gspo_loss_bwd_kernel(logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, cu_ptr, part_ptr, out_ptr, gout_ptr,
                          glogp_ptr, gent_ptr, lo, hi, kl_coef, ent_coef, lr_clamp,
                          HAS_KL: tl.constexpr, KL_TYPE: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
                          SEQ_MEAN: tl.constexpr, BLOCK_T: tl.constexpr, NUM_COLS: tl.constexpr):
    """grad_logp_t = grad_out * m_t * w_t * d loss_t / d logp_t / denominator (grad_entropy_t likewise with
    -entropy_coef), s_b recomputed from the inputs."""
    start = tl.load(cu_ptr + tl.program_id(0))
    end = tl.load(cu_ptr + tl.program_id(0) + 1)
    ratio = _sequence_ratio(logp_ptr, old_ptr, mask_ptr, start, end, lr_clamp, BLOCK_T)
    scale = _grad_scale(gout_ptr, out_ptr, part_ptr, SEQ_MEAN, NUM_COLS)
    for off in range(start, end, BLOCK_T):
        offs = off + tl.arange(0, BLOCK_T)
        inb = offs < end
        m, _pg, dpg, _lr, _clipped, _kl = _gspo_token(offs, inb, logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr,
                                                      ratio, lo, hi, kl_coef, lr_clamp, HAS_KL, KL_TYPE)
        on = m != 0
        tl.store(glogp_ptr + offs, tl.where(on, dpg * m * scale, 0.0).to(glogp_ptr.dtype.element_ty), mask=inb)
        if HAS_ENTROPY_GRAD:
            g_ent = tl.where(on, -ent_coef * m * scale, 0.0)
            tl.store(gent_ptr + offs, g_ent.to(gent_ptr.dtype.element_ty), mask=inb)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _scalars(clip_low, clip_high, kl_coef, entropy_coef):
    """Kernel scalar arguments; the clip bounds are formed in Python as the reference does."""
    return {"lo": 1.0 - clip_low, "hi": 1.0 + clip_high, "kl_coef": float(kl_coef), "ent_coef": float(entropy_coef),
            "lr_clamp": LOG_RATIO_CLAMP}


def gspo_loss_fwd(logprobs_T, old_logprobs_T, advantages_T, mask_T, ref_logprobs_T, entropy_T, cu_seqlens,
                  normalizer, seq_mean, clip_low, clip_high, kl_coef, kl_type, entropy_coef):
    """Forward launches (main + finalize); returns (loss 0-d fp32, out_C fp32 metrics row, part_PC partials)."""
    block_t, P = partial_grid(logprobs_T.numel(), cu_seqlens)
    part_PC = torch.empty((P, NUM_COLS), dtype=torch.float32, device=logprobs_T.device)
    _gspo_loss_fwd_kernel[(P,)](
        logprobs_T, old_logprobs_T, advantages_T, _as_kernel_mask(mask_T),
        ref_logprobs_T if ref_logprobs_T is not None else logprobs_T,
        entropy_T if entropy_T is not None else logprobs_T, cu_seqlens, part_PC,
        **_scalars(clip_low, clip_high, kl_coef, entropy_coef), HAS_KL=ref_logprobs_T is not None,
        KL_TYPE=KL_TYPES[kl_type], HAS_ENTROPY=entropy_T is not None, SEQ_MEAN=seq_mean, BLOCK_T=block_t,
        NUM_COLS=NUM_COLS, num_warps=LOSS_NUM_WARPS)
    loss, out_C = masked_mean_finalize(part_PC, normalizer, seq_mean, COL_RATIO_MAX)
    return loss, out_C, part_PC


def gspo_loss_bwd(grad_out, logprobs_T, old_logprobs_T, advantages_T, mask_T, ref_logprobs_T, cu_seqlens, part_PC,
                  out_C, seq_mean, clip_low, clip_high, kl_coef, kl_type, entropy_coef, entropy_dtype=None):
    """Backward launch; returns (grad_logprobs_T in logprobs' dtype, grad_entropy_T or None)."""
    block_t, P = partial_grid(logprobs_T.numel(), cu_seqlens)
    grad_logp_T = torch.empty_like(logprobs_T)
    grad_ent_T = (torch.empty(logprobs_T.numel(), dtype=entropy_dtype, device=logprobs_T.device)
                  if entropy_dtype is not None else None)
    _gspo_loss_bwd_kernel[(P,)](
        logprobs_T, old_logprobs_T, advantages_T, _as_kernel_mask(mask_T),
        ref_logprobs_T if ref_logprobs_T is not None else logprobs_T, cu_seqlens, part_PC, out_C,
        grad_out.contiguous(), grad_logp_T, grad_ent_T if grad_ent_T is not None else grad_logp_T,
        **_scalars(clip_low, clip_high, kl_coef, entropy_coef), HAS_KL=ref_logprobs_T is not None,
        KL_TYPE=KL_TYPES[kl_type], HAS_ENTROPY_GRAD=grad_ent_T is not None, SEQ_MEAN=seq_mean, BLOCK_T=block_t,
        NUM_COLS=NUM_COLS, num_warps=LOSS_NUM_WARPS)
    return grad_logp_T, grad_ent_T


# ----------------------------------------------------------------------------------------------------------------
# Autograd: torch.library custom ops (eager and under torch.compile)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("ovr::gspo_loss_fwd", mutates_args=())
def _gspo_loss_op(logprobs_T: torch.Tensor, old_logprobs_T: torch.Tensor, advantages_T: torch.Tensor,
                  mask_T: torch.Tensor, ref_logprobs_T: torch.Tensor | None, entropy_T: torch.Tensor | None,
                  cu_seqlens: torch.Tensor, normalizer_tensor: torch.Tensor | None, normalizer_value: float | None,
                  seq_mean: bool, clip_low: float, clip_high: float, kl_coef: float, kl_type: str,
                  entropy_coef: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss 0-d fp32, out_C fp32 metrics row, part_PC partial sums: saved for the backward)."""
    normalizer = normalizer_tensor if normalizer_tensor is not None else normalizer_value
    return gspo_loss_fwd(logprobs_T, old_logprobs_T, advantages_T, mask_T, ref_logprobs_T, entropy_T, cu_seqlens,
                         normalizer, seq_mean, clip_low, clip_high, kl_coef, kl_type, entropy_coef)


@_gspo_loss_op.register_fake
def _(logprobs_T, old_logprobs_T, advantages_T, mask_T, ref_logprobs_T, entropy_T, cu_seqlens, normalizer_tensor,
      normalizer_value, seq_mean, clip_low, clip_high, kl_coef, kl_type, entropy_coef):
    return fake_loss_outputs(logprobs_T, cu_seqlens, NUM_COLS)


@torch.library.custom_op("ovr::gspo_loss_bwd", mutates_args=())
def _gspo_loss_bwd_op(grad_loss: torch.Tensor, logprobs_T: torch.Tensor, old_logprobs_T: torch.Tensor,
                      advantages_T: torch.Tensor, mask_T: torch.Tensor, ref_logprobs_T: torch.Tensor | None,
                      cu_seqlens: torch.Tensor, part_PC: torch.Tensor, out_C: torch.Tensor, seq_mean: bool,
                      clip_low: float, clip_high: float, kl_coef: float, kl_type: str, entropy_coef: float,
                      entropy_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_logprobs_T, grad_entropy_T: (T,) in entropy_dtype, or empty when entropy_dtype is None)."""
    grad_logp_T, grad_ent_T = gspo_loss_bwd(grad_loss, logprobs_T, old_logprobs_T, advantages_T, mask_T,
                                            ref_logprobs_T, cu_seqlens, part_PC, out_C, seq_mean, clip_low,
                                            clip_high, kl_coef, kl_type, entropy_coef, entropy_dtype=entropy_dtype)
    return grad_logp_T, (grad_ent_T if grad_ent_T is not None else logprobs_T.new_empty(0))


@_gspo_loss_bwd_op.register_fake
def _(grad_loss, logprobs_T, old_logprobs_T, advantages_T, mask_T, ref_logprobs_T, cu_seqlens, part_PC, out_C,
      seq_mean, clip_low, clip_high, kl_coef, kl_type, entropy_coef, entropy_dtype):
    num_ent = logprobs_T.shape[0] if entropy_dtype is not None else 0
    return torch.empty_like(logprobs_T), logprobs_T.new_empty(num_ent, dtype=entropy_dtype or logprobs_T.dtype)


register_loss_autograd(_gspo_loss_op, _gspo_loss_bwd_op)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def gspo_loss(logprobs, old_logprobs, advantages, mask, cu_seqlens, clip_low=3e-4, clip_high=4e-4, normalizer=None,
              seq_mean=False, ref_logprobs=None, kl_coef=0.0, kl_type="k3", entropy=None, entropy_coef=0.0):
    """GSPO clipped surrogate with the sequence-level ratio (spec: `reference.gspo_loss_ref`); returns (loss, metrics).

    Args:
        logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, kl_coef, kl_type, entropy_coef, normalizer:
            as `ppo_loss`.
        cu_seqlens: int32 (B+1,) sequence boundaries (required: the ratio is per sequence).
        clip_low, clip_high: the sequence ratio is clipped to [1 - clip_low, 1 + clip_high], each in [0, 1) (GSPO's
            paper: 3e-4 / 4e-4, far tighter than PPO's per-token 0.2: a mean log-ratio moves far less).
        seq_mean: False: token mean (normalizer default: the mask sum); True: each sequence's masked mean, summed
            (default: over the sequences with a masked token).
    Returns:
        loss: 0-d tensor (fp32 on the Triton path). metrics: dict of 0-d tensors, no grad, masked-token means:
        pg_loss, clip_frac, approx_kl (0.5 (logp - old)^2 per token), ratio_mean (of s_b), ratio_max (max s_b over
        sequences with a masked token; 0 when none), kl, entropy (0 when not given).
    Works under torch.compile(fullgraph=True): the Triton path is one custom op (`ovr::gspo_loss_fwd`).
    """
    if cu_seqlens is None:
        raise ValueError("gspo_loss needs cu_seqlens: its importance ratio is one per sequence")
    check_token_inputs([("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages),
                        ("ref_logprobs", ref_logprobs), ("entropy", entropy)], mask, cu_seqlens)
    clip_low, clip_high, _, kl_coef = check_ppo_options(clip_low, clip_high, None, kl_coef, kl_type,
                                                        ref_logprobs is not None)
    normalizer = check_normalizer(normalizer, logprobs.device)
    entropy_coef = check_scalar("entropy_coef", entropy_coef)
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} needs entropy")
    if not isinstance(seq_mean, bool):
        raise ValueError(f"seq_mean must be a bool, got {seq_mean!r}")  # noqa: TRY004 (one error type)

    if not use_triton(logprobs):
        return reference.gspo_loss_ref(logprobs, old_logprobs, advantages, mask, cu_seqlens, clip_low, clip_high,
                                       normalizer, seq_mean, ref_logprobs, kl_coef, kl_type, entropy, entropy_coef,
                                       LOG_RATIO_CLAMP)
    loss, out_C, _ = _gspo_loss_op(logprobs, old_logprobs.detach(), advantages.detach(), mask.detach(),
                                   ref_logprobs.detach() if ref_logprobs is not None else None, entropy, cu_seqlens,
                                   *split_normalizer(normalizer), seq_mean, clip_low, clip_high, kl_coef, kl_type,
                                   entropy_coef)
    return loss, {name: out_C[col] for name, col in METRIC_COLS.items()}
