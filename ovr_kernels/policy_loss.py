"""PPO policy loss straight from the last hidden states: linear log-prob (+ entropy) and the PPO loss in ONE
autograd node, never materialising (T, V) logits of more than one token chunk.

d loss / d logp_t depends only on token t's log-prob and on denominators fixed by the mask (and the sequences), so
the gradients are computed in the forward pass, from the same logits that give the log-probs: no recompute.
Per token chunk (Tc rows, bounded by POLICY_SCRATCH_BYTES):
  1. logits = hidden[chunk] @ weight^T by cuBLAS with an fp32 output (Tc x V fp32 scratch);
  2. one Triton kernel per block of rows: a sweep over V for the softmax statistics (max, log-sum, entropy,
     target logit: the linear log-prob's online update), the per-token PPO derivative (the PPO loss's own
     `_ppo_token`), then a second sweep writing dz = (g_logp ([v == target] - p) - g_ent p (log p + entropy)) / temp
     in the input dtype;
  3. dweight += dz^T @ hidden[chunk] and dhidden[chunk] = dz @ weight (cuBLAS; dweight summed over chunks in fp32).
Three GEMMs per token and exact gradients (same formulas as the backward of `linear_logprob_entropy` -> `ppo_loss`),
where the unfused composition needs four (its backward recomputes the logits). The loss and the metrics then come
from the PPO forward launches on the per-token log-probs, as in the unfused composition. The gradients are those
for grad_out = 1; the backward multiplies them by grad_out. Cost of not recomputing: they are held from forward to
backward (T x H and V x H in the input dtype), and the forward does the work even if no backward follows, so the
op computes them only when hidden or weight requires grad under grad mode.
CPU / OVR_BACKEND=reference: the unfused composition (chunked PyTorch log-prob + reference PPO loss).

Legend: T tokens, H hidden size, V vocabulary, Tc token chunk, P PPO programs, C metric columns.
"""

import torch
import triton
import triton.language as tl

from ovr_kernels import reference
from ovr_kernels._checks import check_normalizer, check_scalar, check_tensor, check_token_inputs
from ovr_kernels._triton import INTERPRET, use_triton
from ovr_kernels.linear_logprob import (
    LOG2E,
    _check_inputs,
    _mm_fp32,
    _online_softmax_step,
    _softmax_results,
    _sync_checks,
    check_targets,
    linear_logprob_entropy,
    linear_logprob_nograd,
)
from ovr_kernels.ppo_loss import (
    KL_TYPES,
    LOG_RATIO_CLAMP,
    METRIC_COLS,
    NUM_COLS,
    _as_kernel_mask,
    _ppo_token,
    _scalars,
    check_ppo_options,
    fake_loss_outputs,
    ppo_loss,
    ppo_loss_fwd,
    split_normalizer,
)

# fp32 logits + dz (input dtype) of one token chunk; Tc = this / (V * (4 + element size)), a multiple of BLOCK_T.
# Every chunk after the first adds its dweight into the fp32 (V, H) accumulator, ~12 V H bytes of memory traffic
# against its 6 Tc V H GEMM flops: on an H100 (~700 TFLOP/s, ~3 TB/s, estimates) that costs ~470 / Tc of the
# GEMM time, so chunks are big: 4 GiB holds Tc = 4704 tokens at V = 152,064 (T = 4096 in one chunk, ~10% at most
# beyond). The unfused `linear_logprob_entropy` -> `ppo_loss` needs 256 MiB but recomputes the logits.
POLICY_SCRATCH_BYTES = 4 * 2**30
POLICY_BLOCK_V = 1024  # vocabulary tile of the softmax/dz sweeps
POLICY_BLOCK_T = 4  # rows per program: Tc / 4 programs fill the SMs; the sweeps are memory-bound


@triton.jit
def _policy_dz_kernel(
    logits_ptr, dz_ptr, targets_ptr, logp_ptr, ent_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, scale_ptr,
    T, V, stride_l, stride_dz, scale2, inv_temperature, ignore_index, lo, hi, dual_c, kl_coef, ent_coef, lr_clamp,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
    HAS_KL: tl.constexpr, KL_TYPE: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr,
):
    """Rows [pid * BLOCK_T, +BLOCK_T) of one token chunk (every per-token pointer points at the chunk's first
    token): softmax statistics from the fp32 logits, log p(target) and entropy stored, the PPO derivative of those
    rows, then dz for every vocabulary entry."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    target = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (target != ignore_index)
    row_ptrs = logits_ptr + rows[:, None].to(tl.int64) * stride_l
    m = tl.full((BLOCK_T,), -1.0e30, dtype=tl.float32)
    s = tl.zeros((BLOCK_T,), dtype=tl.float32)
    a = tl.zeros((BLOCK_T,), dtype=tl.float32)
    z_target = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols < V)[None, :]
        z2 = tl.load(row_ptrs + cols[None, :], mask=ok, other=0.0) * scale2
        m, s, a, z_target = _online_softmax_step(z2, (cols < V)[None, :], cols, target, m, s, a, z_target,
                                                 WITH_ENTROPY)
    s = tl.where(row_ok, s, 1.0)  # padding rows: no log2(0)
    log2s, logprob, entropy = _softmax_results(m, s, a, z_target, target, V)
    entropy = tl.where(valid, entropy, 0.0)
    tl.store(logp_ptr + rows, tl.where(valid, logprob, 0.0), mask=row_ok)
    if WITH_ENTROPY:
        tl.store(ent_ptr + rows, entropy, mask=row_ok)
    tl.debug_barrier()  # the stores above are read back by _ppo_token's loads (other threads of this program)
    w, _pg, dpg, _r, _lr, _clipped, _dual, _kl = _ppo_token(rows, row_ok, logp_ptr, old_ptr, adv_ptr, mask_ptr,
                                                           ref_ptr, lo, hi, dual_c, kl_coef, lr_clamp, HAS_KL,
                                                           KL_TYPE, HAS_DUAL_CLIP)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    on = valid & (w != 0)  # where, not a product: padding may hold inf/NaN and must still give an exact 0
    g_logp = tl.where(on, dpg * w * scale, 0.0)
    g_ent = tl.where(on, -ent_coef * w * scale, 0.0)
    dz_rows = dz_ptr + rows[:, None].to(tl.int64) * stride_dz
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols < V)[None, :]
        z2 = tl.load(row_ptrs + cols[None, :], mask=ok, other=0.0) * scale2
        log2p = (z2 - m[:, None]) - log2s[:, None]  # as the linear log-prob backward: exact near the max
        p = tl.exp2(log2p)
        dz = g_logp[:, None] * (tl.where(cols[None, :] == target[:, None], 1.0, 0.0) - p)
        if HAS_ENTROPY_GRAD:
            dz -= (g_ent[:, None] * p) * (log2p * 0.6931471805599453 + entropy[:, None])
        tl.store(dz_rows + cols[None, :], (dz * inv_temperature).to(dz_ptr.dtype.element_ty), mask=ok)


def _token_scale(mask_T, old_T, adv_T, cu_seqlens, normalizer):
    """Per-token factor of d loss / d (m_t term): 1 / denominator, and / max(masked tokens of the sequence, 1)
    under the sequence mean. The denominators depend on the mask only: the PPO forward launches on any finite
    log-probs (old_T) give them exactly as the loss will use them."""
    _, out_C, part_PC = ppo_loss_fwd(old_T, old_T, adv_T, mask_T, None, None, cu_seqlens, normalizer, 0.2, 0.2,
                                     None, 0.0, "k3", 0.0)
    scale_T = (1.0 / out_C[1]).expand(mask_T.shape[0])
    if cu_seqlens is None:
        return scale_T.contiguous()
    per_seq = 1.0 / out_C[1] / part_PC[:, 1].clamp_min(1.0)
    return torch.repeat_interleave(per_seq, (cu_seqlens[1:] - cu_seqlens[:-1]).long(), output_size=mask_T.shape[0])


def _fused_fwd(hidden_TH, weight_VH, targets_T, old_T, adv_T, mask_T, ref_T, cu_seqlens, normalizer, temperature,
               ignore_index, with_entropy, clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef):
    """Loss, metrics and the gradients for grad_out = 1 in one pass over token chunks (module docstring)."""
    if _sync_checks(targets_T):  # as linear_logprob_fwd: no host sync on CUDA tensors
        check_targets(targets_T, weight_VH.shape[0], ignore_index)
    num_tokens, vocab_size = hidden_TH.shape[0], weight_VH.shape[0]
    hidden_TH, weight_VH, targets_T = hidden_TH.contiguous(), weight_VH.contiguous(), targets_T.contiguous()
    block_t = POLICY_BLOCK_T
    block_v = POLICY_BLOCK_V if not INTERPRET else 128
    chunk_t = POLICY_SCRATCH_BYTES // (vocab_size * (4 + hidden_TH.element_size())) // block_t * block_t
    chunk_t = min(max(block_t, chunk_t), max(num_tokens, 1))
    logits_TV = torch.empty((chunk_t, vocab_size), dtype=torch.float32, device=hidden_TH.device)
    dz_TV = torch.empty((chunk_t, vocab_size), dtype=hidden_TH.dtype, device=hidden_TH.device)
    logp_T = torch.empty(num_tokens, dtype=torch.float32, device=hidden_TH.device)
    ent_T = torch.empty_like(logp_T) if with_entropy else None
    scale_T = _token_scale(mask_T, old_T, adv_T, cu_seqlens, normalizer)
    mask_k = _as_kernel_mask(mask_T)
    one_pass = chunk_t >= num_tokens
    grad_hidden_TH = torch.empty_like(hidden_TH)
    grad_weight_VH = torch.empty_like(weight_VH, dtype=weight_VH.dtype if one_pass else torch.float32)
    if num_tokens == 0:  # no chunk runs: no token, no gradient
        grad_weight_VH.zero_()
    scalars = _scalars(clip_low, clip_high, dual_clip, kl_coef, entropy_coef)
    for t0 in range(0, num_tokens, chunk_t):
        t1 = min(t0 + chunk_t, num_tokens)
        h_TH = hidden_TH[t0:t1]
        z_TV, d_TV = logits_TV[: t1 - t0], dz_TV[: t1 - t0]
        _mm_fp32(h_TH, weight_VH.t(), out=z_TV)
        _policy_dz_kernel[(triton.cdiv(t1 - t0, block_t),)](
            z_TV, d_TV, targets_T[t0:], logp_T[t0:], (ent_T if with_entropy else logp_T)[t0:], old_T[t0:],
            adv_T[t0:], mask_k[t0:], (ref_T if ref_T is not None else old_T)[t0:], scale_T[t0:],
            t1 - t0, vocab_size, z_TV.stride(0), d_TV.stride(0), LOG2E / temperature, 1.0 / temperature,
            ignore_index, **scalars,
            BLOCK_T=block_t, BLOCK_V=block_v, WITH_ENTROPY=with_entropy, HAS_ENTROPY_GRAD=entropy_coef != 0.0,
            HAS_KL=ref_T is not None, KL_TYPE=KL_TYPES[kl_type], HAS_DUAL_CLIP=dual_clip is not None,
            num_warps=8 if not INTERPRET else 1, num_stages=2,
        )
        if one_pass:
            torch.mm(d_TV.t(), h_TH, out=grad_weight_VH)
        elif t0 == 0:
            _mm_fp32(d_TV.t(), h_TH, out=grad_weight_VH)
        else:
            grad_weight_VH += _mm_fp32(d_TV.t(), h_TH)
        torch.mm(d_TV, weight_VH, out=grad_hidden_TH[t0:t1])
    loss, out_C, _ = ppo_loss_fwd(logp_T, old_T, adv_T, mask_T, ref_T, ent_T, cu_seqlens, normalizer, clip_low,
                                  clip_high, dual_clip, kl_coef, kl_type, entropy_coef)
    return loss, out_C, grad_hidden_TH, grad_weight_VH.to(weight_VH.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Autograd: one torch.library custom op (eager and under torch.compile) whose forward already holds the gradients
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("ovr::ppo_policy_loss_fwd", mutates_args=())
def _ppo_policy_loss_op(hidden_TH: torch.Tensor, weight_VH: torch.Tensor, targets_T: torch.Tensor,
                        old_logprobs_T: torch.Tensor, advantages_T: torch.Tensor, mask_T: torch.Tensor,
                        ref_logprobs_T: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                        normalizer_tensor: torch.Tensor | None, normalizer_value: float | None, temperature: float,
                        ignore_index: int, with_entropy: bool, clip_low: float, clip_high: float,
                        dual_clip: float | None, kl_coef: float, kl_type: str, entropy_coef: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss 0-d fp32, out_C metrics row, d loss / d hidden and d loss / d weight for grad_out = 1)."""
    normalizer = normalizer_tensor if normalizer_tensor is not None else normalizer_value
    return _fused_fwd(hidden_TH, weight_VH, targets_T, old_logprobs_T, advantages_T, mask_T, ref_logprobs_T,
                      cu_seqlens, normalizer, temperature, ignore_index, with_entropy, clip_low, clip_high, dual_clip,
                      kl_coef, kl_type, entropy_coef)


@_ppo_policy_loss_op.register_fake
def _(hidden_TH, weight_VH, targets_T, old_logprobs_T, advantages_T, mask_T, ref_logprobs_T, cu_seqlens,
      normalizer_tensor, normalizer_value, temperature, ignore_index, with_entropy, clip_low, clip_high, dual_clip,
      kl_coef, kl_type, entropy_coef):
    loss, out_C, _ = fake_loss_outputs(old_logprobs_T, cu_seqlens, NUM_COLS)
    return loss, out_C, torch.empty_like(hidden_TH), torch.empty_like(weight_VH)


def _setup_context(ctx, inputs, output):
    _, out_C, grad_hidden_TH, grad_weight_VH = output
    ctx.save_for_backward(grad_hidden_TH, grad_weight_VH)
    ctx.mark_non_differentiable(out_C, grad_hidden_TH, grad_weight_VH)


def _backward(ctx, grad_loss, *_grad_saved):
    """The forward's gradients times grad_out (a 0-d tensor, read on device: no sync)."""
    grad_hidden_TH, grad_weight_VH = ctx.saved_tensors
    return ((grad_hidden_TH * grad_loss if ctx.needs_input_grad[0] else None,
             grad_weight_VH * grad_loss if ctx.needs_input_grad[1] else None) + (None,) * 17)


_ppo_policy_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def ppo_policy_loss_from_hidden(hidden, lm_head_weight, targets, old_logprobs, advantages, mask, *, temperature=1.0,
                                ignore_index=-100, clip_low=0.2, clip_high=0.2, dual_clip=None, normalizer=None,
                                ref_logprobs=None, kl_coef=0.0, kl_type="k3", entropy_coef=0.0, with_entropy=True,
                                cu_seqlens=None):
    """PPO loss of the policy whose per-token log-probs are log_softmax(hidden @ lm_head_weight^T / temperature)
    at `targets`, with no (T, V) logits in memory; returns (loss, metrics).

    Args:
        hidden: (T, H) bf16/fp16/fp32 last hidden states of the packed tokens. Gets a gradient.
        lm_head_weight: (V, H) same dtype and device (e.g. the FSDP2-gathered lm_head weight). Gets a gradient.
        targets: (T,) int64/int32 next-token ids in [0, V) or ignore_index (those rows give logprob 0 and entropy
            0; keep them out of `mask`). No gradient.
        old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, normalizer, ref_logprobs, kl_coef, kl_type,
            entropy_coef, cu_seqlens: as `ovr_kernels.ppo_loss` (mask (T,) bool/float; no gradients).
        with_entropy: compute the per-token entropy (needed when entropy_coef != 0; also reported as the
            "entropy" metric). Its cost is a few extra flops per logit in the forward.
    Returns:
        loss: 0-d fp32 tensor (the inputs' accumulation dtype on the PyTorch path).
        metrics: dict of 0-d tensors (no grad): pg_loss, clip_frac, dual_clip_frac, approx_kl, ratio_mean,
            ratio_max, kl, entropy (masked-token mean entropy; 0 when with_entropy is False).
    Numbers equal `ppo_loss(*linear_logprob_entropy(hidden, lm_head_weight, targets, temperature, ignore_index)...)`.
    """
    check_tensor("hidden", hidden, ndim=2)
    check_token_inputs([("old_logprobs", old_logprobs), ("advantages", advantages), ("ref_logprobs", ref_logprobs)],
                       mask, cu_seqlens)
    if old_logprobs.shape[0] != hidden.shape[0] or old_logprobs.device != hidden.device:
        raise ValueError(f"old_logprobs has shape {tuple(old_logprobs.shape)} on {old_logprobs.device}; hidden has "
                         f"{hidden.shape[0]} tokens on {hidden.device}")
    clip_low, clip_high, dual_clip, kl_coef = check_ppo_options(clip_low, clip_high, dual_clip, kl_coef, kl_type,
                                                                ref_logprobs is not None)
    normalizer = check_normalizer(normalizer, hidden.device)
    entropy_coef = check_scalar("entropy_coef", entropy_coef)
    if entropy_coef != 0.0 and not with_entropy:
        raise ValueError(f"entropy_coef={entropy_coef} needs with_entropy=True")
    temperature = check_scalar("temperature", temperature, low=0.0, low_open=True)
    _check_inputs(hidden, lm_head_weight, targets, temperature)

    if not use_triton(hidden):
        logprob_T, entropy_T = linear_logprob_entropy(hidden, lm_head_weight, targets, temperature, ignore_index)
        return reference.ppo_loss_ref(logprob_T, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip,
                                      normalizer, ref_logprobs, kl_coef, kl_type,
                                      entropy_T if with_entropy else None, entropy_coef, cu_seqlens, LOG_RATIO_CLAMP)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad)):
        # no backward can follow: the log-prob forward and the PPO loss alone, no gradient work
        logprob_T, entropy_T = linear_logprob_nograd(hidden, lm_head_weight, targets, temperature, ignore_index,
                                                     with_entropy)
        with torch.no_grad():
            return ppo_loss(logprob_T, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, normalizer,
                            ref_logprobs, kl_coef, kl_type, entropy_T, entropy_coef, cu_seqlens)
    loss, out_C, *_ = _ppo_policy_loss_op(hidden, lm_head_weight, targets, old_logprobs.detach(),
                                          advantages.detach(), mask.detach(),
                                          ref_logprobs.detach() if ref_logprobs is not None else None, cu_seqlens,
                                          *split_normalizer(normalizer), temperature, int(ignore_index),
                                          bool(with_entropy), clip_low, clip_high, dual_clip, kl_coef, kl_type,
                                          entropy_coef)
    return loss, {name: out_C[col] for name, col in METRIC_COLS.items()}
