"""PPO clipped surrogate over packed tokens: one Triton kernel forward, one backward, metrics in the same pass.

Spec: `ovr_kernels.reference.ppo_loss_ref` (same numbers, computed in fp32). Per token t with mask weight m_t:
    r_t = exp(clamp(logp_t - old_t, +-20)),  pg_t = max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high)),
    dual clip c (A_t < 0): pg_t = -A_t c where that is smaller;  loss_t = pg_t + kl_coef KL_t - entropy_coef H_t,
    loss = sum_t m_t w_t loss_t / normalizer, w_t = 1 (token mean) or 1 / (masked tokens of t's sequence).
Each forward program reduces one slice of tokens (a fixed tile for the token mean, one sequence for the sequence
mean) into a row of per-program partial sums; a one-program finalize kernel sums the rows in a fixed order
(deterministic, no atomics), divides, and writes the loss and the metrics as device tensors: two launches, no
host sync. The backward recomputes the per-token derivative from the inputs (one launch) and reads grad_out and
the denominator from device memory.

Shared with `ovr_kernels.value_loss` (and the fused `ovr_kernels.policy_loss`): the slicing (`_slice_bounds`,
`partial_grid`), the partial-sum layout (`_store_partial_head`: column 0 the loss sum, 1 the mask count, 2 the
number of non-empty slices, 3.. the op's metric sums, one column may be a max), the finalize kernel, the backward's
gradient scale (`_grad_scale`) and the custom-op plumbing (`split_normalizer`, `fake_loss_outputs`).

Legend: T packed tokens, B sequences, P forward programs, C partial-sum columns.
"""

import torch
import triton
import triton.language as tl

from ovr_kernels import reference
from ovr_kernels._checks import check_normalizer, check_scalar, check_token_inputs
from ovr_kernels._triton import INTERPRET, use_triton

LOG_RATIO_CLAMP = 20.0  # |logp - old_logp| clamp before exp (as the reference): no inf ratio from a stale token
MAX_BLOCK_T = 1024  # tokens per tile; 1M tokens -> 1024 programs, enough to fill 132 SMs several times over
KL_TYPES = {"k1": 0, "k3": 1, "low_var": 2}  # kl_type -> the kernels' KL_TYPE
LOSS_NUM_WARPS = 8  # 4 tokens per thread: the forward's ten per-token accumulators stay well inside the registers

# Partial-sum columns (shared with value_loss: 0..2 are fixed by the finalize kernel).
COL_LOSS, COL_COUNT, COL_NONEMPTY = 0, 1, 2
COL_PG, COL_CLIP, COL_DUAL, COL_APPROX_KL, COL_RATIO, COL_RATIO_MAX, COL_KL, COL_ENTROPY = range(3, 11)
NUM_COLS = 11
METRIC_COLS = {"pg_loss": COL_PG, "clip_frac": COL_CLIP, "dual_clip_frac": COL_DUAL, "approx_kl": COL_APPROX_KL,
               "ratio_mean": COL_RATIO, "ratio_max": COL_RATIO_MAX, "kl": COL_KL, "entropy": COL_ENTROPY}


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _slice_bounds(cu_ptr, T, BLOCK_T: tl.constexpr, SEQ_MEAN: tl.constexpr):
    """[start, end) of this program's tokens: one sequence (SEQ_MEAN) or one tile of BLOCK_T tokens."""
    pid = tl.program_id(0)
    if SEQ_MEAN:
        start = tl.load(cu_ptr + pid)
        end = tl.load(cu_ptr + pid + 1)
    else:
        start = pid * BLOCK_T
        end = tl.minimum(start + BLOCK_T, T)
    return start, end


@triton.jit
def _store_partial_head(part_ptr, acc_loss, acc_cnt, SEQ_MEAN: tl.constexpr, NUM_COLS: tl.constexpr):
    """Write columns 0..2 of this program's partial row (loss sum, mask count, non-empty flag); returns the row
    pointer for the op's metric columns. Under SEQ_MEAN the loss sum is already the sequence's masked mean."""
    cnt = tl.sum(acc_cnt, axis=0)
    loss_sum = tl.sum(acc_loss, axis=0)
    if SEQ_MEAN:
        loss_sum = loss_sum / tl.maximum(cnt, 1.0)
    row = part_ptr + tl.program_id(0) * NUM_COLS
    tl.store(row + 0, loss_sum)
    tl.store(row + 1, cnt)
    tl.store(row + 2, (cnt > 0).to(tl.float32))
    return row


@triton.jit
def _grad_scale(gout_ptr, out_ptr, part_ptr, SEQ_MEAN: tl.constexpr, NUM_COLS: tl.constexpr):
    """grad_out / denominator (out_C[1]), and / max(masked tokens of this program's sequence, 1) under SEQ_MEAN:
    the factor every per-token derivative of this program is multiplied by, read on device (no sync)."""
    scale = tl.load(gout_ptr).to(tl.float32) / tl.load(out_ptr + 1)
    if SEQ_MEAN:
        scale = scale / tl.maximum(tl.load(part_ptr + tl.program_id(0) * NUM_COLS + 1), 1.0)
    return scale


@triton.jit
def _kl_token(offs, inb, logp, ref_ptr, kl_coef, KL_TYPE: tl.constexpr):
    """(KL_t, d kl_coef KL_t / d logp_t) of one tile, fp32, as `reference.kl_penalty_ref`: KL_TYPE 0 k1 = logp - ref;
    1 k3 = exp(ref - logp) - (ref - logp) - 1 with the difference clamped to +-20; 2 low_var = min(k3, 10). Clamps
    pass the gradient at their bounds (torch.clamp). Shared with gspo_loss."""
    ref = tl.load(ref_ptr + offs, mask=inb, other=0).to(tl.float32)
    if KL_TYPE == 0:
        kl = logp - ref
        dkl = kl_coef + tl.zeros_like(logp)
    else:
        d_raw = ref - logp
        d = tl.minimum(tl.maximum(d_raw, -20.0), 20.0)
        ed = tl.exp(d)
        kl = ed - d - 1.0
        dkl = kl_coef * (1.0 - ed) * ((d_raw >= -20.0) & (d_raw <= 20.0)).to(tl.float32)
        if KL_TYPE == 2:
            dkl = tl.where(kl <= 10.0, dkl, 0.0)
            kl = tl.minimum(kl, 10.0)
    return kl, dkl


@triton.jit
def _ppo_token(offs, inb, logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, lo, hi, dual_c, kl_coef, lr_clamp,
               HAS_KL: tl.constexpr, KL_TYPE: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr):
    """Load one tile of tokens and return its PPO terms (fp32): (mask weight, pg, d loss/d logp without the entropy
    term, ratio, log-ratio, clipped, dual active, kl). The derivative takes the reference's subgradients: clamps pass
    the gradient at their bounds (torch.clamp), the clipped branch only when strictly larger, the dual clip only when
    strictly smaller. Shared by the forward and the backward kernel, which recomputes rather than stores."""
    # every load is cast to fp32 at once (the interpreter computes bf16 arithmetic on raw bits: wrong values)
    m = tl.load(mask_ptr + offs, mask=inb, other=0).to(tl.float32)
    logp = tl.load(logp_ptr + offs, mask=inb, other=0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=inb, other=0).to(tl.float32)
    adv = tl.load(adv_ptr + offs, mask=inb, other=0).to(tl.float32)
    lr_raw = logp - old
    lr = tl.minimum(tl.maximum(lr_raw, -lr_clamp), lr_clamp)
    dlr = ((lr_raw >= -lr_clamp) & (lr_raw <= lr_clamp)).to(tl.float32)
    # exp in fp64, rounded once to fp32: the correctly rounded ratio, so that the clip decision at 1 -+ eps is the
    # same on every platform (fp32 exp is ex2.approx on GPU and off by up to ~1.4 ulp in numpy under the
    # interpreter). A few fp64 flops per token cost nothing in this memory-bound kernel.
    ratio = tl.exp(lr.to(tl.float64)).to(tl.float32)
    pg1 = -adv * ratio
    pg2 = -adv * tl.minimum(tl.maximum(ratio, lo), hi)
    # pg2 > pg1 only when the ratio lies strictly outside [lo, hi], where clip() has zero slope
    clipped = pg2 > pg1
    pg = tl.where(clipped, pg2, pg1)
    dpg = tl.where(clipped, 0.0, -adv * ratio * dlr)
    if HAS_DUAL_CLIP:
        pg3 = -adv * dual_c
        dual = (adv < 0) & (pg3 < pg)
        pg = tl.where(dual, pg3, pg)
        dpg = tl.where(dual, 0.0, dpg)
    else:
        dual = clipped  # unused without HAS_DUAL_CLIP
    kl = tl.zeros_like(pg)
    if HAS_KL:
        kl, dkl = _kl_token(offs, inb, logp, ref_ptr, kl_coef, KL_TYPE)
        dpg += dkl
    return m, pg, dpg, ratio, lr, clipped, dual, kl


@triton.jit
def _ppo_loss_fwd_kernel(logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ent_ptr, cu_ptr, part_ptr,
                         T, lo, hi, dual_c, kl_coef, ent_coef, lr_clamp,
                         HAS_KL: tl.constexpr, KL_TYPE: tl.constexpr, HAS_ENTROPY: tl.constexpr,
                         HAS_DUAL_CLIP: tl.constexpr, SEQ_MEAN: tl.constexpr, BLOCK_T: tl.constexpr,
                         NUM_COLS: tl.constexpr):
    """One program: reduce its slice of tokens into row pid of part_PC (see the module docstring)."""
    start, end = _slice_bounds(cu_ptr, T, BLOCK_T, SEQ_MEAN)
    acc_loss = tl.zeros([BLOCK_T], tl.float32)
    acc_cnt = tl.zeros([BLOCK_T], tl.float32)
    acc_pg = tl.zeros([BLOCK_T], tl.float32)
    acc_clip = tl.zeros([BLOCK_T], tl.float32)
    acc_dual = tl.zeros([BLOCK_T], tl.float32)
    acc_akl = tl.zeros([BLOCK_T], tl.float32)
    acc_ratio = tl.zeros([BLOCK_T], tl.float32)
    acc_rmax = tl.zeros([BLOCK_T], tl.float32)  # ratios are > 0, so 0 is the max over no tokens
    acc_kl = tl.zeros([BLOCK_T], tl.float32)
    acc_ent = tl.zeros([BLOCK_T], tl.float32)
    for off in range(start, end, BLOCK_T):
        offs = off + tl.arange(0, BLOCK_T)
        inb = offs < end
        m, pg, _dpg, ratio, lr, clipped, dual, kl = _ppo_token(offs, inb, logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr,
                                                               lo, hi, dual_c, kl_coef, lr_clamp, HAS_KL, KL_TYPE,
                                                               HAS_DUAL_CLIP)
        loss = pg + kl_coef * kl
        if HAS_ENTROPY:
            ent = tl.load(ent_ptr + offs, mask=inb, other=0).to(tl.float32)
            loss -= ent_coef * ent
            acc_ent += tl.where(m != 0, ent * m, 0.0)
        # where(m != 0) rather than a product: padding may hold inf/NaN log-probs
        on = m != 0
        acc_loss += tl.where(on, loss * m, 0.0)
        acc_cnt += m
        acc_pg += tl.where(on, pg * m, 0.0)
        acc_clip += tl.where(clipped, m, 0.0)
        if HAS_DUAL_CLIP:
            acc_dual += tl.where(dual, m, 0.0)
        acc_akl += tl.where(on, 0.5 * lr * lr * m, 0.0)
        acc_ratio += tl.where(on, ratio * m, 0.0)
        acc_rmax = tl.maximum(acc_rmax, tl.where(m > 0, ratio, 0.0))
        acc_kl += tl.where(on, kl * m, 0.0)
    row = _store_partial_head(part_ptr, acc_loss, acc_cnt, SEQ_MEAN, NUM_COLS)
    tl.store(row + 3, tl.sum(acc_pg, axis=0))
    tl.store(row + 4, tl.sum(acc_clip, axis=0))
    tl.store(row + 5, tl.sum(acc_dual, axis=0))
    tl.store(row + 6, tl.sum(acc_akl, axis=0))
    tl.store(row + 7, tl.sum(acc_ratio, axis=0))
    tl.store(row + 8, tl.max(acc_rmax, axis=0))
    tl.store(row + 9, tl.sum(acc_kl, axis=0))
    tl.store(row + 10, tl.sum(acc_ent, axis=0))


@triton.jit
def _masked_mean_finalize_kernel(part_ptr, norm_ptr, loss_ptr, out_ptr, P, norm_value,
                                 NUM_COLS: tl.constexpr, MAX_COL: tl.constexpr, NORM_MODE: tl.constexpr,
                                 SEQ_MEAN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program: sum the P partial rows in a fixed order, write loss = col0 / denominator to loss_ptr and
    out_C = [_, denominator, mask count, metric sums / max(mask count, 1) (col MAX_COL: max)].

    NORM_MODE 0: denominator = mask count (token mean) or non-empty sequences (SEQ_MEAN), at least 1;
    1: the float norm_value; 2: the 0-d tensor at norm_ptr (read on device, no sync)."""
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < NUM_COLS
    acc = tl.zeros([BLOCK_C], tl.float32)
    mx = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        ok = (rows < P)[:, None] & col_ok[None, :]
        tile = tl.load(part_ptr + rows[:, None] * NUM_COLS + cols[None, :], mask=ok, other=0.0)
        acc += tl.sum(tile, axis=0)
        mx = tl.maximum(mx, tl.max(tile, axis=0))
    loss_sum = tl.sum(tl.where(cols == 0, acc, 0.0), axis=0)
    cnt = tl.sum(tl.where(cols == 1, acc, 0.0), axis=0)
    nonempty = tl.sum(tl.where(cols == 2, acc, 0.0), axis=0)
    if NORM_MODE == 0:
        if SEQ_MEAN:
            denom = tl.maximum(nonempty, 1.0)
        else:
            denom = tl.maximum(cnt, 1.0)
    elif NORM_MODE == 1:
        denom = norm_value + tl.zeros_like(cnt)
    else:
        denom = tl.load(norm_ptr).to(tl.float32)
    res = acc / tl.maximum(cnt, 1.0)
    res = tl.where(cols == MAX_COL, mx, res)
    res = tl.where(cols == 0, loss_sum / denom, res)
    res = tl.where(cols == 1, denom, res)
    res = tl.where(cols == 2, cnt, res)
    tl.store(loss_ptr, loss_sum / denom)
    tl.store(out_ptr + cols, res, mask=col_ok)


@triton.jit
def _ppo_loss_bwd_kernel(logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, cu_ptr, part_ptr, out_ptr, gout_ptr,
                         glogp_ptr, gent_ptr, T, lo, hi, dual_c, kl_coef, ent_coef, lr_clamp,
                         HAS_KL: tl.constexpr, KL_TYPE: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
                         HAS_DUAL_CLIP: tl.constexpr, SEQ_MEAN: tl.constexpr, BLOCK_T: tl.constexpr,
                         NUM_COLS: tl.constexpr):
    """grad_logp_t = grad_out * m_t * w_t * d loss_t / d logp_t / denominator (and grad_entropy_t likewise with
    -entropy_coef); w_t = 1 / max(masked tokens of the sequence, 1) under SEQ_MEAN, read from the forward's row."""
    start, end = _slice_bounds(cu_ptr, T, BLOCK_T, SEQ_MEAN)
    scale = _grad_scale(gout_ptr, out_ptr, part_ptr, SEQ_MEAN, NUM_COLS)
    for off in range(start, end, BLOCK_T):
        offs = off + tl.arange(0, BLOCK_T)
        inb = offs < end
        m, _pg, dpg, _r, _lr, _clipped, _dual, _kl = _ppo_token(offs, inb, logp_ptr, old_ptr, adv_ptr, mask_ptr,
                                                                ref_ptr, lo, hi, dual_c, kl_coef, lr_clamp, HAS_KL,
                                                                KL_TYPE, HAS_DUAL_CLIP)
        # where, not a product with the mask: padding may hold inf/NaN and must still get an exact 0
        on = m != 0
        tl.store(glogp_ptr + offs, tl.where(on, dpg * m * scale, 0.0).to(glogp_ptr.dtype.element_ty), mask=inb)
        if HAS_ENTROPY_GRAD:
            g_ent = tl.where(on, -ent_coef * m * scale, 0.0)
            tl.store(gent_ptr + offs, g_ent.to(gent_ptr.dtype.element_ty), mask=inb)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def partial_grid(T: int, cu_seqlens) -> tuple[int, int]:
    """(BLOCK_T, P) of the forward and backward launches: one program per sequence (sequence mean) or per tile of
    BLOCK_T tokens, at least one so that the partial row exists. BLOCK_T is MAX_BLOCK_T on GPU; under the
    interpreter no bigger than the input (numpy works per tile). Shape-only: also sizes the fake outputs."""
    block_t = MAX_BLOCK_T if not INTERPRET else min(MAX_BLOCK_T, triton.next_power_of_2(max(T, 16)))
    return block_t, (cu_seqlens.numel() - 1 if cu_seqlens is not None else max(1, triton.cdiv(T, block_t)))


def _as_kernel_mask(mask_T):
    """bool masks are passed as uint8 (a free view) so that every kernel sees a plain integer or float load."""
    return mask_T.view(torch.uint8) if mask_T.dtype == torch.bool else mask_T


def masked_mean_finalize(part_PC, normalizer, seq_mean: bool, max_col: int):
    """Launch the finalize kernel on per-program partials; returns (loss 0-d fp32, out_C fp32).

    normalizer: None (count / non-empty sequences), a Python float, or a 0-d tensor read on device."""
    P, C = part_PC.shape
    loss = torch.empty((), dtype=torch.float32, device=part_PC.device)
    out_C = torch.empty(C, dtype=torch.float32, device=part_PC.device)
    if normalizer is None:
        norm_mode, norm_ptr, norm_value = 0, part_PC, 1.0
    elif isinstance(normalizer, torch.Tensor):
        norm_mode, norm_ptr, norm_value = 2, normalizer, 1.0
    else:
        norm_mode, norm_ptr, norm_value = 1, part_PC, float(normalizer)
    block_p = min(256, triton.next_power_of_2(max(P, 1)))
    _masked_mean_finalize_kernel[(1,)](part_PC, norm_ptr, loss, out_C, P, norm_value, NUM_COLS=C, MAX_COL=max_col,
                                       NORM_MODE=norm_mode, SEQ_MEAN=seq_mean, BLOCK_P=block_p,
                                       BLOCK_C=triton.next_power_of_2(C), num_warps=4)
    return loss, out_C


def _scalars(clip_low, clip_high, dual_clip, kl_coef, entropy_coef):
    """Kernel scalar arguments; the clip bounds are formed in Python as the reference does."""
    return {"lo": 1.0 - clip_low, "hi": 1.0 + clip_high, "dual_c": float(dual_clip or 0.0),
            "kl_coef": float(kl_coef), "ent_coef": float(entropy_coef), "lr_clamp": LOG_RATIO_CLAMP}


def ppo_loss_fwd(logprobs_T, old_logprobs_T, advantages_T, mask_T, ref_logprobs_T, entropy_T, cu_seqlens,
                 normalizer, clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef):
    """Forward launches (main + finalize); returns (loss 0-d fp32, out_C fp32 metrics row, part_PC partials)."""
    T = logprobs_T.numel()
    block_t, P = partial_grid(T, cu_seqlens)
    part_PC = torch.empty((P, NUM_COLS), dtype=torch.float32, device=logprobs_T.device)
    dummy = logprobs_T
    _ppo_loss_fwd_kernel[(P,)](
        logprobs_T, old_logprobs_T, advantages_T, _as_kernel_mask(mask_T),
        ref_logprobs_T if ref_logprobs_T is not None else dummy, entropy_T if entropy_T is not None else dummy,
        cu_seqlens if cu_seqlens is not None else dummy, part_PC, T,
        **_scalars(clip_low, clip_high, dual_clip, kl_coef, entropy_coef),
        HAS_KL=ref_logprobs_T is not None, KL_TYPE=KL_TYPES[kl_type], HAS_ENTROPY=entropy_T is not None,
        HAS_DUAL_CLIP=dual_clip is not None, SEQ_MEAN=cu_seqlens is not None, BLOCK_T=block_t, NUM_COLS=NUM_COLS,
        num_warps=LOSS_NUM_WARPS)
    loss, out_C = masked_mean_finalize(part_PC, normalizer, cu_seqlens is not None, COL_RATIO_MAX)
    return loss, out_C, part_PC


def ppo_loss_bwd(grad_out, logprobs_T, old_logprobs_T, advantages_T, mask_T, ref_logprobs_T, cu_seqlens, part_PC,
                 out_C, clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef, entropy_dtype=None):
    """Backward launch; returns (grad_logprobs_T in logprobs' dtype, grad_entropy_T or None).

    grad_out: 0-d tensor (read on device). entropy_dtype: the entropy's dtype when it needs a gradient, else None."""
    T = logprobs_T.numel()
    block_t, P = partial_grid(T, cu_seqlens)
    grad_logp_T = torch.empty_like(logprobs_T)
    grad_ent_T = torch.empty(T, dtype=entropy_dtype, device=logprobs_T.device) if entropy_dtype is not None else None
    _ppo_loss_bwd_kernel[(P,)](
        logprobs_T, old_logprobs_T, advantages_T, _as_kernel_mask(mask_T),
        ref_logprobs_T if ref_logprobs_T is not None else logprobs_T,
        cu_seqlens if cu_seqlens is not None else logprobs_T, part_PC, out_C, grad_out.contiguous(),
        grad_logp_T, grad_ent_T if grad_ent_T is not None else grad_logp_T, T,
        **_scalars(clip_low, clip_high, dual_clip, kl_coef, entropy_coef),
        HAS_KL=ref_logprobs_T is not None, KL_TYPE=KL_TYPES[kl_type], HAS_ENTROPY_GRAD=grad_ent_T is not None,
        HAS_DUAL_CLIP=dual_clip is not None, SEQ_MEAN=cu_seqlens is not None, BLOCK_T=block_t, NUM_COLS=NUM_COLS,
        num_warps=LOSS_NUM_WARPS)
    return grad_logp_T, grad_ent_T


# ----------------------------------------------------------------------------------------------------------------
# Autograd: torch.library custom ops (eager and under torch.compile)
# ----------------------------------------------------------------------------------------------------------------


def split_normalizer(normalizer):
    """A checked normalizer as the custom ops take it: (0-d tensor or None, Python float or None)."""
    if isinstance(normalizer, torch.Tensor):
        return normalizer, None
    return None, normalizer


def fake_loss_outputs(x_T, cu_seqlens, num_cols: int):
    """Shape-only (loss 0-d, out_C (C,), part_PC (P, C)), all fp32, of a masked-mean loss forward (register_fake)."""
    _, P = partial_grid(x_T.shape[0], cu_seqlens)
    return (x_T.new_empty((), dtype=torch.float32), x_T.new_empty(num_cols, dtype=torch.float32),
            x_T.new_empty((P, num_cols), dtype=torch.float32))


@torch.library.custom_op("ovr::ppo_loss_fwd", mutates_args=())
def _ppo_loss_op(logprobs_T: torch.Tensor, old_logprobs_T: torch.Tensor, advantages_T: torch.Tensor,
                 mask_T: torch.Tensor, ref_logprobs_T: torch.Tensor | None, entropy_T: torch.Tensor | None,
                 cu_seqlens: torch.Tensor | None, normalizer_tensor: torch.Tensor | None,
                 normalizer_value: float | None, clip_low: float, clip_high: float, dual_clip: float | None,
                 kl_coef: float, kl_type: str, entropy_coef: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss 0-d fp32, out_C fp32 metrics row, part_PC partial sums: saved for the backward)."""
    normalizer = normalizer_tensor if normalizer_tensor is not None else normalizer_value
    return ppo_loss_fwd(logprobs_T, old_logprobs_T, advantages_T, mask_T, ref_logprobs_T, entropy_T, cu_seqlens,
                        normalizer, clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef)


@_ppo_loss_op.register_fake
def _(logprobs_T, old_logprobs_T, advantages_T, mask_T, ref_logprobs_T, entropy_T, cu_seqlens, normalizer_tensor,
      normalizer_value, clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef):
    return fake_loss_outputs(logprobs_T, cu_seqlens, NUM_COLS)


@torch.library.custom_op("ovr::ppo_loss_bwd", mutates_args=())
def _ppo_loss_bwd_op(grad_loss: torch.Tensor, logprobs_T: torch.Tensor, old_logprobs_T: torch.Tensor,
                     advantages_T: torch.Tensor, mask_T: torch.Tensor, ref_logprobs_T: torch.Tensor | None,
                     cu_seqlens: torch.Tensor | None, part_PC: torch.Tensor, out_C: torch.Tensor, clip_low: float,
                     clip_high: float, dual_clip: float | None, kl_coef: float, kl_type: str, entropy_coef: float,
                     entropy_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_logprobs_T, grad_entropy_T: (T,) in entropy_dtype, or empty when entropy_dtype is None)."""
    grad_logp_T, grad_ent_T = ppo_loss_bwd(grad_loss, logprobs_T, old_logprobs_T, advantages_T, mask_T,
                                           ref_logprobs_T, cu_seqlens, part_PC, out_C, clip_low, clip_high, dual_clip,
                                           kl_coef, kl_type, entropy_coef, entropy_dtype=entropy_dtype)
    return grad_logp_T, (grad_ent_T if grad_ent_T is not None else logprobs_T.new_empty(0))


@_ppo_loss_bwd_op.register_fake
def _(grad_loss, logprobs_T, old_logprobs_T, advantages_T, mask_T, ref_logprobs_T, cu_seqlens, part_PC, out_C,
      clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef, entropy_dtype):
    num_ent = logprobs_T.shape[0] if entropy_dtype is not None else 0
    return torch.empty_like(logprobs_T), logprobs_T.new_empty(num_ent, dtype=entropy_dtype or logprobs_T.dtype)


def register_loss_autograd(loss_op, bwd_op):
    """Autograd of a token-loss custom op (this one and its siblings, e.g. gspo_loss): inputs (logprobs, old, adv,
    mask, ref, entropy, cu_seqlens, normalizer tensor, normalizer value, *options), outputs (loss, out_C, part_PC);
    `bwd_op(grad_loss, logprobs, old, adv, mask, ref, cu_seqlens, part_PC, out_C, *options, entropy_dtype)` returns
    the gradients to logprobs and entropy, the only differentiable inputs."""

    def setup_context(ctx, inputs, output):
        logprobs_T, old_T, adv_T, mask_T, ref_T, entropy_T, cu_seqlens, _norm_tensor, _norm_value, *opts = inputs
        _, out_C, part_PC = output
        ctx.save_for_backward(logprobs_T, old_T, adv_T, mask_T, ref_T, cu_seqlens, part_PC, out_C)
        ctx.opts, ctx.num_inputs = tuple(opts), len(inputs)
        ctx.entropy_dtype = entropy_T.dtype if entropy_T is not None else None
        ctx.mark_non_differentiable(out_C, part_PC)

    def backward(ctx, grad_loss, _grad_out_C, _grad_part_PC):
        logprobs_T, old_T, adv_T, mask_T, ref_T, cu_seqlens, part_PC, out_C = ctx.saved_tensors
        ent_dtype = ctx.entropy_dtype if ctx.needs_input_grad[5] else None
        grad_logp_T, grad_ent_T = bwd_op(grad_loss, logprobs_T, old_T, adv_T, mask_T, ref_T, cu_seqlens, part_PC,
                                         out_C, *ctx.opts, ent_dtype)
        return ((grad_logp_T if ctx.needs_input_grad[0] else None, None, None, None, None,
                 grad_ent_T if ent_dtype is not None else None) + (None,) * (ctx.num_inputs - 6))

    loss_op.register_autograd(backward, setup_context=setup_context)


register_loss_autograd(_ppo_loss_op, _ppo_loss_bwd_op)


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------


def check_ppo_options(clip_low, clip_high, dual_clip, kl_coef, kl_type, has_ref_logprobs: bool):
    """Validate the PPO options shared by `ppo_loss` and the fused policy loss; returns (clip_low, clip_high,
    dual_clip, kl_coef) as floats (dual_clip None stays None)."""
    for name, value in (("clip_low", clip_low), ("clip_high", clip_high)):
        if not 0.0 <= check_scalar(name, value) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if dual_clip is not None:
        dual_clip = check_scalar("dual_clip", dual_clip, low=1.0, low_open=True)
    kl_coef = check_scalar("kl_coef", kl_coef, low=0.0)
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type must be 'k1', 'k3' or 'low_var', got {kl_type!r}")
    if kl_coef != 0.0 and not has_ref_logprobs:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs")
    return float(clip_low), float(clip_high), dual_clip, kl_coef


def ppo_loss(logprobs, old_logprobs, advantages, mask, clip_low=0.2, clip_high=0.2, dual_clip=None, normalizer=None,
             ref_logprobs=None, kl_coef=0.0, kl_type="k3", entropy=None, entropy_coef=0.0, cu_seqlens=None):
    """PPO clipped surrogate over packed tokens (spec: `reference.ppo_loss_ref`); returns (loss, metrics).

    Args:
        logprobs: (T,) float, log-probs of the sampled tokens under the current policy. Gets a gradient.
        old_logprobs: (T,) float, behaviour-policy log-probs. No gradient.
        advantages: (T,) float. No gradient.
        mask: (T,) bool or float; tokens with mask 0 contribute nothing (float masks weight tokens).
        clip_low, clip_high: ratio clipped to [1 - clip_low, 1 + clip_high], each in [0, 1).
        dual_clip: None or c > 1: for A < 0 the per-token loss is capped at -A c.
        normalizer: None, a Python number > 0 or a 0-d tensor: the loss denominator. Default: the mask sum (token
            mean) or the number of sequences with a masked token (sequence mean). The trainer passes the global
            count so that micro-batch losses sum to the global mean.
        ref_logprobs: None or (T,) float reference-policy log-probs for a KL penalty kl_coef * KL (kl_type "k1",
            "k3" or "low_var"). No gradient.
        entropy: None or (T,) float per-token entropy; adds -entropy_coef * entropy. Gets a gradient.
        cu_seqlens: None (token mean) or int32 (B+1,) sequence boundaries (sequence mean: each sequence's masked
            mean, summed, over the normalizer).
    Returns:
        loss: 0-d tensor (fp32 on the Triton path, the inputs' dtype on the reference path).
        metrics: dict of 0-d tensors on the input device, no grad, masked-token means: pg_loss, clip_frac,
            dual_clip_frac, approx_kl, ratio_mean, ratio_max (max), kl, entropy (0 when not given).
    Works under torch.compile(fullgraph=True): the Triton path is one custom op (`ovr::ppo_loss_fwd`).
    """
    check_token_inputs([("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages),
                        ("ref_logprobs", ref_logprobs), ("entropy", entropy)], mask, cu_seqlens)
    clip_low, clip_high, dual_clip, kl_coef = check_ppo_options(clip_low, clip_high, dual_clip, kl_coef, kl_type,
                                                                ref_logprobs is not None)
    normalizer = check_normalizer(normalizer, logprobs.device)
    entropy_coef = check_scalar("entropy_coef", entropy_coef)
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} needs entropy")

    if not use_triton(logprobs):
        return reference.ppo_loss_ref(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip,
                                      normalizer, ref_logprobs, kl_coef, kl_type, entropy, entropy_coef, cu_seqlens,
                                      LOG_RATIO_CLAMP)
    loss, out_C, _ = _ppo_loss_op(logprobs, old_logprobs.detach(), advantages.detach(), mask.detach(),
                                  ref_logprobs.detach() if ref_logprobs is not None else None, entropy, cu_seqlens,
                                  *split_normalizer(normalizer), clip_low, clip_high, dual_clip, kl_coef, kl_type,
                                  entropy_coef)
    return loss, {name: out_C[col] for name, col in METRIC_COLS.items()}
