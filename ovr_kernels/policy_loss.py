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
from ovr_kernels._checks import check_normalizer, check_scalar, check_tensor, check_token_inputs
from ovr_kernels._triton import use_triton
from ovr_kernels.linear_logprob import linear_logprob_entropy, linear_logprob_fwd
from ovr_kernels.ppo_loss import (
    LOG_RATIO_CLAMP,
    METRIC_COLS,
    NUM_COLS,
    check_ppo_options,
    fake_loss_outputs,
    ppo_loss_fwd,
    split_normalizer,
)

# ----------------------------------------------------------------------------------------------------------------
# Autograd: one torch.library custom op (eager and under torch.compile); the kernels and launchers live in
# linear_logprob.py and ppo_loss.py; the backward formula calls their backward ops (ovr::ppo_loss_bwd,
# ovr::linear_logprob_bwd).
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("ovr::ppo_policy_loss_fwd", mutates_args=())
def _ppo_policy_loss_op(hidden_TH: torch.Tensor, weight_VH: torch.Tensor, targets_T: torch.Tensor,
                        old_logprobs_T: torch.Tensor, advantages_T: torch.Tensor, mask_T: torch.Tensor,
                        ref_logprobs_T: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                        normalizer_tensor: torch.Tensor | None, normalizer_value: float | None, temperature: float,
                        ignore_index: int, with_entropy: bool, clip_low: float, clip_high: float,
                        dual_clip: float | None, kl_coef: float, kl_type: str, entropy_coef: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor]:
    """(loss 0-d fp32, out_C metrics row, then what the backward needs: part_PC, logprob_T, max_T, logsum_T,
    entropy_T (empty when not with_entropy))."""
    logprob_T, entropy_T, (max_T, logsum_T, _) = linear_logprob_fwd(hidden_TH, weight_VH, targets_T, temperature,
                                                                    ignore_index, with_entropy)
    normalizer = normalizer_tensor if normalizer_tensor is not None else normalizer_value
    loss, out_C, part_PC = ppo_loss_fwd(logprob_T, old_logprobs_T, advantages_T, mask_T, ref_logprobs_T, entropy_T,
                                        cu_seqlens, normalizer, clip_low, clip_high, dual_clip, kl_coef, kl_type,
                                        entropy_coef)
    return (loss, out_C, part_PC, logprob_T, max_T, logsum_T,
            entropy_T if entropy_T is not None else logprob_T.new_empty(0))


@_ppo_policy_loss_op.register_fake
def _(hidden_TH, weight_VH, targets_T, old_logprobs_T, advantages_T, mask_T, ref_logprobs_T, cu_seqlens,
      normalizer_tensor, normalizer_value, temperature, ignore_index, with_entropy, clip_low, clip_high, dual_clip,
      kl_coef, kl_type, entropy_coef):
    num_tokens = hidden_TH.shape[0]
    per_token = [hidden_TH.new_empty(n, dtype=torch.float32)
                 for n in (num_tokens, num_tokens, num_tokens, num_tokens if with_entropy else 0)]
    return (*fake_loss_outputs(old_logprobs_T, cu_seqlens, NUM_COLS), *per_token)


def _setup_context(ctx, inputs, output):
    (hidden_TH, weight_VH, targets_T, old_T, adv_T, mask_T, ref_T, cu_seqlens, _norm_tensor, _norm_value,
     temperature, ignore_index, with_entropy, *ppo_opts) = inputs
    _, out_C, part_PC, logprob_T, max_T, logsum_T, entropy_T = output
    # Only save_for_backward references: with FSDP2 `weight` is the gathered lm_head weight, freed after use.
    ctx.save_for_backward(hidden_TH, weight_VH, targets_T, logprob_T, old_T, adv_T, mask_T, ref_T, cu_seqlens,
                          part_PC, out_C, max_T, logsum_T, entropy_T)
    ctx.lin_opts = (temperature, ignore_index)
    ctx.ppo_opts = tuple(ppo_opts)  # clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef
    ctx.entropy_grad = with_entropy and ppo_opts[-1] != 0.0  # a zero entropy gradient is skipped, not computed
    ctx.mark_non_differentiable(out_C, part_PC, logprob_T, max_T, logsum_T, entropy_T)


def _backward(ctx, grad_loss, *_grad_saved):
    """Gradients to hidden and weight only: PPO backward (per-token d loss / d logp, d loss / d entropy, already
    times grad_out and over the normaliser) straight into the linear log-prob backward."""
    (hidden_TH, weight_VH, targets_T, logprob_T, old_T, adv_T, mask_T, ref_T, cu_seqlens, part_PC, out_C, max_T,
     logsum_T, entropy_T) = ctx.saved_tensors
    grad_logp_T, grad_ent_T = torch.ops.ovr.ppo_loss_bwd(grad_loss, logprob_T, old_T, adv_T, mask_T, ref_T,
                                                         cu_seqlens, part_PC, out_C, *ctx.ppo_opts,
                                                         torch.float32 if ctx.entropy_grad else None)
    grad_hidden, grad_weight = torch.ops.ovr.linear_logprob_bwd(hidden_TH, weight_VH, targets_T, *ctx.lin_opts,
                                                                max_T, logsum_T, entropy_T, grad_logp_T,
                                                                grad_ent_T if ctx.entropy_grad else None)
    return ((grad_hidden if ctx.needs_input_grad[0] else None, grad_weight if ctx.needs_input_grad[1] else None)
            + (None,) * 17)


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

    if not use_triton(hidden):
        logprob_T, entropy_T = linear_logprob_entropy(hidden, lm_head_weight, targets, temperature, ignore_index)
        return reference.ppo_loss_ref(logprob_T, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip,
                                      normalizer, ref_logprobs, kl_coef, kl_type,
                                      entropy_T if with_entropy else None, entropy_coef, cu_seqlens, LOG_RATIO_CLAMP)
    loss, out_C, *_ = _ppo_policy_loss_op(hidden, lm_head_weight, targets, old_logprobs.detach(),
                                          advantages.detach(), mask.detach(),
                                          ref_logprobs.detach() if ref_logprobs is not None else None, cu_seqlens,
                                          *split_normalizer(normalizer), temperature, int(ignore_index),
                                          bool(with_entropy), clip_low, clip_high, dual_clip, kl_coef, kl_type,
                                          entropy_coef)
    return loss, {name: out_C[col] for name, col in METRIC_COLS.items()}
