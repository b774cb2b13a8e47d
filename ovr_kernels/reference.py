"""Plain-PyTorch specification of every ovr op.

These functions are the contract: kernels only make them faster. They are also the CPU path and the benchmark
baseline, and, fed float64 inputs, the ground truth of the tests. They do no input validation (the public ops do)
and favour clarity over speed.

Legend: T packed tokens, B sequences, Hq/Hkv query/key-value heads, D head dim, H hidden size, V vocabulary,
G groups (prompts), n samples per group. Suffixes give shapes (q_THD = (T, Hq, D)).
"""

import math

import torch

# ----------------------------------------------------------------------------------------------------------------
# Packed variable-length attention
# ----------------------------------------------------------------------------------------------------------------


def varlen_attention_ref(q_THD, k_THD, v_THD, cu_seqlens_q, cu_seqlens_k, causal=False, softmax_scale=None,
                         return_lse=False):
    """Attention over packed segments, one segment at a time.

    q (Tq, Hq, D), k/v (Tk, Hkv, D) with Hq % Hkv == 0 (query head h reads kv head h // (Hq // Hkv));
    cu_seqlens_q/k int (B+1,). Causal masks are aligned bottom-right (query i of a segment with sq queries and sk keys
    sees keys j <= i + sk - sq), as flash-attn does. Zero-length segments produce nothing; a query row that sees no
    key gets output 0 and LSE -inf. Math in the input dtype except the softmax (fp32, or fp64 for fp64 inputs).
    Returns out (Tq, Hq, D) in q's dtype, and LSE (Hq, Tq) fp32/fp64 (natural log) when return_lse.
    """
    num_q_heads, head_dim = q_THD.shape[1], q_THD.shape[2]
    group = num_q_heads // k_THD.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    acc_dtype = torch.float64 if q_THD.dtype == torch.float64 else torch.float32
    out = torch.zeros_like(q_THD)
    lse = torch.full((num_q_heads, q_THD.shape[0]), float("-inf"), dtype=acc_dtype, device=q_THD.device)
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        sq, sk = q1 - q0, k1 - k0
        if sq == 0:
            continue
        q = q_THD[q0:q1].transpose(0, 1)  # (Hq, sq, D)
        k = k_THD[k0:k1].transpose(0, 1).repeat_interleave(group, dim=0)  # (Hq, sk, D)
        v = v_THD[k0:k1].transpose(0, 1).repeat_interleave(group, dim=0)
        s = (q @ k.transpose(1, 2)).to(acc_dtype) * scale  # (Hq, sq, sk)
        if causal:
            i = torch.arange(sq, device=q.device)[:, None]
            j = torch.arange(sk, device=q.device)[None, :]
            s = s.masked_fill(j > i + (sk - sq), float("-inf"))
        seg_lse = torch.logsumexp(s, dim=-1)  # (Hq, sq); -inf for rows that see no key
        p = torch.exp(s - seg_lse[..., None].clamp_min(torch.finfo(acc_dtype).min))
        p = torch.nan_to_num(p, nan=0.0)
        o = p.to(q.dtype) @ v if sk > 0 else torch.zeros_like(q)
        out[q0:q1] = o.transpose(0, 1).to(q_THD.dtype)
        lse[:, q0:q1] = seg_lse
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------------------------
# Linear -> log-prob + entropy
# ----------------------------------------------------------------------------------------------------------------


def linear_logprob_entropy_ref(hidden_TH, weight_VH, targets_T, temperature=1.0, ignore_index=-100):
    """logits = hidden @ weight^T / temperature (fp32, or fp64 for fp64 inputs); returns (logprob_T, entropy_T).

    logprob = log_softmax(logits)[target]; entropy = -sum_v p_v log p_v. Rows whose target == ignore_index give 0
    for both outputs and no gradient. Builds the full (T, V) logits: a spec, not a production path.
    """
    acc_dtype = torch.float64 if hidden_TH.dtype == torch.float64 else torch.float32
    logits_TV = (hidden_TH @ weight_VH.t()).to(acc_dtype) / temperature
    logp_TV = torch.log_softmax(logits_TV, dim=-1)
    valid_T = targets_T != ignore_index
    safe_T = torch.where(valid_T, targets_T, torch.zeros_like(targets_T)).long()
    logprob_T = logp_TV.gather(1, safe_T[:, None]).squeeze(1)
    entropy_T = -(logp_TV.exp() * logp_TV).sum(-1)
    zero = torch.zeros((), dtype=acc_dtype, device=hidden_TH.device)
    return torch.where(valid_T, logprob_T, zero), torch.where(valid_T, entropy_T, zero)


# ----------------------------------------------------------------------------------------------------------------
# PPO losses
# ----------------------------------------------------------------------------------------------------------------


def kl_penalty_ref(logprobs_T, ref_logprobs_T, kl_type="k3"):
    """Per-token KL estimate of KL(pi || ref) from log-probs of the sampled tokens.

    k1 = logp - ref_logp; k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1 (Schulman's unbiased, >= 0);
    low_var = min(k3, 10) (k3 with its rare huge values capped, as verl's low_var_kl).
    """
    if kl_type == "k1":
        return logprobs_T - ref_logprobs_T
    if kl_type in ("k3", "low_var"):
        d = (ref_logprobs_T - logprobs_T).clamp(-20.0, 20.0)
        k3 = torch.exp(d) - d - 1.0
        return k3.clamp(max=10.0) if kl_type == "low_var" else k3
    raise ValueError(f"kl_type must be 'k1', 'k3' or 'low_var', got {kl_type!r}")


def aggregate_ref(loss_T, mask_T, normalizer=None, cu_seqlens=None):
    """Reduce a per-token loss over the mask.

    token mean (cu_seqlens None): sum(loss * mask) / normalizer, normalizer defaulting to max(mask.sum(), 1).
    The trainer passes the global count of loss tokens so that micro-batches sum to the global token mean.
    sequence mean (cu_seqlens given): sum_s [sum_{t in s} loss*mask / max(mask_s, 1)] / normalizer, normalizer
    defaulting to the number of sequences with at least one masked token (min 1).
    """
    mask_T = mask_T.to(loss_T.dtype)
    if cu_seqlens is None:
        denom = mask_T.sum().clamp_min(1.0) if normalizer is None else normalizer
        return (loss_T * mask_T).sum() / denom
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=loss_T.device), lengths)
    num_B = torch.zeros(lengths.numel(), dtype=loss_T.dtype, device=loss_T.device).index_add(0, seg,
                                                                                                 loss_T * mask_T)
    cnt_B = torch.zeros_like(num_B).index_add(0, seg, mask_T)
    denom = (cnt_B > 0).sum().clamp_min(1).to(loss_T.dtype) if normalizer is None else normalizer
    return (num_B / cnt_B.clamp_min(1.0)).sum() / denom


def _with_kl_and_entropy(pg_T, logprobs_T, ref_logprobs_T, kl_coef, kl_type, entropy_T, entropy_coef):
    """Per-token loss pg + kl_coef * KL(ref) - entropy_coef * H, each term only where its input is given; returns
    (loss_T, kl_T or None)."""
    loss_T, kl_T = pg_T, None
    if ref_logprobs_T is not None:
        kl_T = kl_penalty_ref(logprobs_T, ref_logprobs_T, kl_type)
        loss_T = loss_T + kl_coef * kl_T
    if entropy_T is not None:
        loss_T = loss_T - entropy_coef * entropy_T
    return loss_T, kl_T


def _exact_exp(x):
    """exp(x) taken in float64 and rounded once to x's dtype: the correctly rounded ratio, as the kernels compute
    it. Whether a token sits on the clipped side of 1 -+ eps then depends on its inputs alone, not on the device
    (with a float32 exp, this reference clipped 0 of 512 tokens placed at the clip edges on an H200, where the
    correctly rounded ratio, and the kernel, clip 96)."""
    return torch.exp(x.double()).to(x.dtype)


def ppo_loss_ref(logprobs_T, old_logprobs_T, advantages_T, mask_T, clip_low=0.2, clip_high=0.2, dual_clip=None,
                 normalizer=None, ref_logprobs_T=None, kl_coef=0.0, kl_type="k3", entropy_T=None, entropy_coef=0.0,
                 cu_seqlens=None, log_ratio_clamp=20.0):
    """PPO clipped surrogate over packed tokens; returns (loss, metrics).

    ratio r = exp(clamp(logp - old_logp, +-log_ratio_clamp)), correctly rounded (`_exact_exp`); per token
      pg = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), and with dual_clip c (> 1) for A < 0: min(pg, -A c);
      loss_t = pg + kl_coef * KL_t(logp, ref_logp) - entropy_coef * entropy_t.
    The loss is `aggregate_ref(loss_t, mask, normalizer, cu_seqlens)`. Gradient flows to logprobs (and entropy);
    old_logprobs, advantages, ref_logprobs and mask get none. Metrics (0-d tensors, masked token means, no grad):
    pg_loss, clip_frac (tokens where the clipped branch is the active one), dual_clip_frac, approx_kl
    (mean 0.5 * (logp - old)^2), ratio_mean, ratio_max (max over masked tokens; 0 when none), kl, entropy.
    """
    log_ratio = (logprobs_T - old_logprobs_T).clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = _exact_exp(log_ratio)
    pg1 = -advantages_T * ratio
    pg2 = -advantages_T * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    # max(pg1, pg2) as a where: at a tie (rounding can make -A r == -A clip(r) with r outside the range) the
    # gradient is the unclipped branch's, not torch.maximum's half of each
    pg = torch.where(pg2 > pg1, pg2, pg1)
    dual_active = torch.zeros_like(pg, dtype=torch.bool)
    if dual_clip is not None:
        pg3 = -advantages_T * dual_clip
        dual_active = (advantages_T < 0) & (pg3 < pg)
        pg = torch.where(dual_active, pg3, pg)  # a where, not a minimum: at a tie the gradient is pg's, not half
    loss_T, kl_T = _with_kl_and_entropy(pg, logprobs_T, ref_logprobs_T, kl_coef, kl_type, entropy_T, entropy_coef)
    loss = aggregate_ref(loss_T, mask_T, normalizer, cu_seqlens)
    with torch.no_grad():
        m = mask_T.to(ratio.dtype)
        n = m.sum().clamp_min(1.0)
        metrics = {
            "pg_loss": (pg * m).sum() / n,
            "clip_frac": ((pg2 > pg1).to(m.dtype) * m).sum() / n,
            "dual_clip_frac": (dual_active.to(m.dtype) * m).sum() / n,
            "approx_kl": (0.5 * log_ratio.square() * m).sum() / n,
            "ratio_mean": (ratio * m).sum() / n,
            "ratio_max": torch.where(m > 0, ratio, torch.zeros_like(ratio)).max() if ratio.numel()
            else ratio.new_zeros(()),
        }
        metrics["kl"] = (kl_T * m).sum() / n if kl_T is not None else ratio.new_zeros(())
        metrics["entropy"] = (entropy_T * m).sum() / n if entropy_T is not None else ratio.new_zeros(())
    return loss, metrics


def gspo_loss_ref(logprobs_T, old_logprobs_T, advantages_T, mask_T, cu_seqlens, clip_low=3e-4, clip_high=4e-4,
                  normalizer=None, seq_mean=False, ref_logprobs_T=None, kl_coef=0.0, kl_type="k3", entropy_T=None,
                  entropy_coef=0.0, log_ratio_clamp=20.0):
    """GSPO (token form) over packed sequences; returns (loss, metrics).

    s_b = exp(clamp(mean over the tokens of sequence b with mask != 0 of (logp - old_logp), +-log_ratio_clamp))
    (1 for a sequence with no such token); per token r_t = sg[s_b] exp(logp_t - sg[logp_t]) (value s_b, gradient
    s_b), pg = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), loss_t = pg + kl_coef KL_t - entropy_coef H_t,
    reduced by `aggregate_ref` (token mean, or the sequence mean with seq_mean). Metrics as `ppo_loss_ref` (no dual
    clip): pg_loss, clip_frac, approx_kl (per-token 0.5 (logp - old)^2), ratio_mean, ratio_max (max s_b over
    sequences with a masked token; 0 when none), kl, entropy.
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=logprobs_T.device), lengths)
    on = mask_T != 0
    with torch.no_grad():
        diff = torch.where(on, logprobs_T - old_logprobs_T, torch.zeros_like(logprobs_T))
        sum_B = torch.zeros(lengths.numel(), dtype=logprobs_T.dtype, device=logprobs_T.device).index_add(0, seg, diff)
        n_B = torch.zeros_like(sum_B).index_add(0, seg, on.to(sum_B.dtype))
        seq_lr_B = (sum_B / n_B.clamp_min(1.0)).clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = _exact_exp(logprobs_T - logprobs_T.detach() + seq_lr_B[seg])
    pg1 = -advantages_T * ratio
    pg2 = -advantages_T * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.where(pg2 > pg1, pg2, pg1)  # a where: at a tie the gradient is the unclipped branch's
    loss_T, kl_T = _with_kl_and_entropy(pg, logprobs_T, ref_logprobs_T, kl_coef, kl_type, entropy_T, entropy_coef)
    loss = aggregate_ref(loss_T, mask_T, normalizer, cu_seqlens if seq_mean else None)
    with torch.no_grad():
        m = mask_T.to(ratio.dtype)
        n = m.sum().clamp_min(1.0)
        log_ratio = (logprobs_T - old_logprobs_T).clamp(-log_ratio_clamp, log_ratio_clamp)
        metrics = {
            "pg_loss": (pg * m).sum() / n,
            "clip_frac": ((pg2 > pg1).to(m.dtype) * m).sum() / n,
            "approx_kl": (0.5 * log_ratio.square() * m).sum() / n,
            "ratio_mean": (ratio * m).sum() / n,
            "ratio_max": torch.where(n_B > 0, _exact_exp(seq_lr_B), torch.zeros_like(seq_lr_B)).max(),
            "kl": (kl_T * m).sum() / n if kl_T is not None else ratio.new_zeros(()),
            "entropy": (entropy_T * m).sum() / n if entropy_T is not None else ratio.new_zeros(()),
        }
    return loss, metrics


def value_loss_ref(values_T, old_values_T, returns_T, mask_T, clip=0.2, normalizer=None, cu_seqlens=None):
    """Clipped value loss (ORZ / PPO2): 0.5 * max((V - R)^2, (V_old + clip(V - V_old, +-clip) - R)^2).

    clip=None disables clipping. Aggregated like `aggregate_ref`. Returns (loss, metrics) with vf_clip_frac
    (tokens where the clipped term is larger) and vf_mse (masked mean of (V - R)^2). Gradient flows to values only.
    """
    err = (values_T - returns_T).square()
    if clip is None:
        loss_T = 0.5 * err
        clipped = torch.zeros_like(err, dtype=torch.bool)
    else:
        v_clip = old_values_T + (values_T - old_values_T).clamp(-clip, clip)
        err_clip = (v_clip - returns_T).square()
        clipped = err_clip > err
        loss_T = 0.5 * torch.where(clipped, err_clip, err)  # a where, not a maximum: at a tie the gradient is err's
    loss = aggregate_ref(loss_T, mask_T, normalizer, cu_seqlens)
    with torch.no_grad():
        m = mask_T.to(err.dtype)
        n = m.sum().clamp_min(1.0)
        metrics = {"vf_clip_frac": (clipped.to(m.dtype) * m).sum() / n, "vf_mse": (err * m).sum() / n}
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------------------------


def gae_ref(rewards_T, values_T, cu_seqlens, gamma=1.0, lam=1.0):
    """GAE over packed sequences (reverse loop per sequence, accumulated in float64).

    delta_t = r_t + gamma * V_{t+1} - V_t with V = 0 past a sequence's end; A_t = delta_t + gamma * lam * A_{t+1}
    within the sequence; returns = A + V. Returns (advantages_T, returns_T) in values' dtype; no autograd.
    """
    r = rewards_T.detach().double().cpu()
    v = values_T.detach().double().cpu()
    adv = torch.zeros_like(v)
    cu = cu_seqlens.tolist()
    for b in range(len(cu) - 1):
        next_v, next_a = 0.0, 0.0
        for t in range(cu[b + 1] - 1, cu[b] - 1, -1):
            delta = r[t].item() + gamma * next_v - v[t].item()
            next_a = delta + gamma * lam * next_a
            adv[t] = next_a
            next_v = v[t].item()
    ret = adv + v
    return adv.to(values_T.dtype).to(values_T.device), ret.to(values_T.dtype).to(values_T.device)


def _shift_by_first(scores_B, group_size):
    """(G, N) scores minus each group's first score. The advantages do not change, but a constant group (all
    right or all wrong, common in RL) becomes exact zeros: its mean, rounded an ulp away from the scores, would
    otherwise leave a residue that GRPO divides by a std of the same size plus eps (0.24 for 100 fp32 scores of
    0.7)."""
    s = scores_B.reshape(-1, group_size)
    return s - s[:, :1]


def grpo_advantages_ref(scores_B, group_size, eps=1e-6):
    """GRPO: (score - group mean) / (group std + eps), std unbiased, over contiguous groups of `group_size`."""
    s = _shift_by_first(scores_B, group_size)
    std = s.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(s[:, :1])
    return ((s - s.mean(dim=1, keepdim=True)) / (std + eps)).reshape(-1)


def drgrpo_advantages_ref(scores_B, group_size):
    """Dr.GRPO: score - group mean (no std division)."""
    s = _shift_by_first(scores_B, group_size)
    return (s - s.mean(dim=1, keepdim=True)).reshape(-1)


def rloo_advantages_ref(scores_B, group_size):
    """RLOO: score - mean of the other samples of its group (0 for groups of one)."""
    s = _shift_by_first(scores_B, group_size)
    if group_size == 1:
        return torch.zeros_like(scores_B)
    return (s - (s.sum(dim=1, keepdim=True) - s) / (group_size - 1)).reshape(-1)


def masked_whiten_ref(x_T, mask_T, shift_mean=True, eps=1e-8):
    """(x - mean) / sqrt(var + eps) over masked entries (unbiased variance); unmasked entries are returned as 0.

    shift_mean=False rescales without centring (adds the mean back). Batch-level advantage normalisation.
    """
    m = mask_T.to(x_T.dtype)
    n = m.sum()
    mean = (x_T * m).sum() / n.clamp_min(1.0)
    var = ((x_T - mean).square() * m).sum() / (n - 1.0).clamp_min(1.0)
    out = (x_T - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


# ----------------------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------------------


def cu_seqlens_ref(lengths):
    """Sequence lengths -> int32 cu_seqlens (B+1,) starting at 0."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)


def position_ids_ref(cu_seqlens):
    """Per-token position within its own sequence: 0..len-1 for each packed sequence (T,) int64."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
    return torch.arange(int(cu_seqlens[-1]), dtype=torch.int64) - starts
