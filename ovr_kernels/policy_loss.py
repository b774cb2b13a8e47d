"""PPO policy loss straight from the last hidden states: linear log-prob (+ entropy) and the PPO loss in ONE
autograd node, never materialising (T, V) logits.

Forward: `linear_logprob_fwd` (per-token log p(target), entropy and the softmax statistics it saves), then the PPO
forward launches of `ovr_kernels.ppo_loss` on those per-token values (loss and metrics on device).
Backward: the PPO backward kernel writes d loss / d logp_t (and d loss / d entropy_t) already multiplied by
grad_out and the normaliser, and those per-token vectors go straight into `linear_logprob_bwd`, which recomputes
the logit tiles from the saved statistics. The per-token coefficients are computed in the backward rather than
stored by the forward because the sequence-mean weights 1 / (masked tokens of the sequence) are only known once a
sequence has been fully reduced; recomputing them is one elementwise launch over T floats.
The numbers are those of the unfused composition `linear_logprob_entropy` -> `ppo_loss` (same launchers); what the
fusion saves is the autograd bookkeeping between the two and the intermediate gradient round trip.
CPU / OVR_BACKEND=reference: exactly that unfused composition (chunked PyTorch log-prob + reference PPO loss).

Legend: T tokens, H hidden size, V vocabulary, P PPO programs, C metric columns.
"""

import torch

from ovr_kernels import reference
from ovr_kernels._checks import check_scalar, check_tensor
from ovr_kernels._triton import use_triton
from ovr_kernels.linear_logprob import linear_logprob_bwd, linear_logprob_entropy, linear_logprob_fwd
from ovr_kernels.ppo_loss import (
    LOG_RATIO_CLAMP,
    METRIC_COLS,
    check_normalizer,
    check_token_inputs,
    ppo_loss_bwd,
    ppo_loss_fwd,
)

# ----------------------------------------------------------------------------------------------------------------
# autograd.Function (the kernels and launchers live in linear_logprob.py and ppo_loss.py)
# ----------------------------------------------------------------------------------------------------------------


class PPOPolicyLossFn(torch.autograd.Function):
    """Fused linear log-prob + PPO loss; gradients to hidden and weight. Returns (loss 0-d fp32, out_C metrics)."""

    @staticmethod
    def forward(ctx, hidden_TH, weight_VH, targets_T, old_logprobs_T, advantages_T, mask_T, ref_logprobs_T,
                cu_seqlens, normalizer, temperature, ignore_index, with_entropy, clip_low, clip_high, dual_clip,
                kl_coef, kl_type, entropy_coef):
        logprob_T, entropy_T, stats = linear_logprob_fwd(hidden_TH, weight_VH, targets_T, temperature, ignore_index,
                                                         with_entropy)
        loss, out_C, part_PC = ppo_loss_fwd(logprob_T, old_logprobs_T, advantages_T, mask_T, ref_logprobs_T,
                                            entropy_T, cu_seqlens, normalizer, clip_low, clip_high, dual_clip,
                                            kl_coef, kl_type, entropy_coef)
        # `stats` is linear_logprob's opaque tuple of tensors (or None): saved flat, rebuilt in backward
        ctx.save_for_backward(hidden_TH, weight_VH, targets_T, logprob_T, old_logprobs_T, advantages_T, mask_T,
                              ref_logprobs_T, cu_seqlens, part_PC, out_C, *stats)
        ctx.lin_opts = (temperature, ignore_index)
        ctx.ppo_opts = (clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef)
        ctx.entropy_grad = with_entropy and entropy_coef != 0.0  # a zero entropy gradient is skipped, not computed
        ctx.mark_non_differentiable(out_C)
        return loss, out_C

    @staticmethod
    def backward(ctx, grad_loss, grad_out_C):
        (hidden_TH, weight_VH, targets_T, logprob_T, old_T, adv_T, mask_T, ref_T, cu_seqlens, part_PC, out_C,
         *stats) = ctx.saved_tensors
        grad_logp_T, grad_ent_T = ppo_loss_bwd(grad_loss, logprob_T, old_T, adv_T, mask_T, ref_T, cu_seqlens,
                                               part_PC, out_C, *ctx.ppo_opts,
                                               entropy_dtype=torch.float32 if ctx.entropy_grad else None)
        grad_hidden, grad_weight = linear_logprob_bwd(hidden_TH, weight_VH, targets_T, *ctx.lin_opts,
                                                      tuple(stats), grad_logp_T, grad_ent_T)
        return ((grad_hidden if ctx.needs_input_grad[0] else None, grad_weight if ctx.needs_input_grad[1] else None)
                + (None,) * 16)


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
    for name, value in (("clip_low", clip_low), ("clip_high", clip_high)):
        if not 0.0 <= check_scalar(name, value) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if dual_clip is not None:
        dual_clip = check_scalar("dual_clip", dual_clip, low=1.0, low_open=True)
    normalizer = check_normalizer(normalizer, hidden.device)
    kl_coef = check_scalar("kl_coef", kl_coef, low=0.0)
    entropy_coef = check_scalar("entropy_coef", entropy_coef)
    if kl_type not in ("k1", "k3"):
        raise ValueError(f"kl_type must be 'k1' or 'k3', got {kl_type!r}")
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs")
    if entropy_coef != 0.0 and not with_entropy:
        raise ValueError(f"entropy_coef={entropy_coef} needs with_entropy=True")
    temperature = check_scalar("temperature", temperature, low=0.0, low_open=True)

    if not use_triton(hidden):
        logprob_T, entropy_T = linear_logprob_entropy(hidden, lm_head_weight, targets, temperature, ignore_index)
        return reference.ppo_loss_ref(logprob_T, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip,
                                      normalizer, ref_logprobs, kl_coef, kl_type,
                                      entropy_T if with_entropy else None, entropy_coef, cu_seqlens, LOG_RATIO_CLAMP)
    loss, out_C = PPOPolicyLossFn.apply(hidden, lm_head_weight, targets, old_logprobs.detach(), advantages.detach(),
                                        mask.detach(), ref_logprobs.detach() if ref_logprobs is not None else None,
                                        cu_seqlens, normalizer, temperature, int(ignore_index), bool(with_entropy),
                                        float(clip_low), float(clip_high), dual_clip, kl_coef, kl_type, entropy_coef)
    return loss, {name: out_C[col] for name, col in METRIC_COLS.items()}
