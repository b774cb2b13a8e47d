"""The references (ovr_kernels/reference.py) against independent computations: torch SDPA with dense masks,
torch.distributions.Categorical, hand-worked PPO / value-loss tables (incl. exact clip edges), statistics-module
group advantages and whitening. The kernels are tested against these references, so the references are tested here.

Legend: T tokens, B sequences, Hq/Hkv heads, D head dim, H hidden, V vocabulary.
"""

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from ovr_kernels.reference import (
    aggregate_ref,
    drgrpo_advantages_ref,
    grpo_advantages_ref,
    kl_penalty_ref,
    linear_logprob_entropy_ref,
    masked_whiten_ref,
    ppo_loss_ref,
    rloo_advantages_ref,
    value_loss_ref,
    varlen_attention_ref,
)


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


# ---------------------------------------------------------------- varlen attention


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2)])
def test_varlen_attention_vs_sdpa_per_segment(causal, hq, hkv):
    # sq != sk exercises the bottom-right causal alignment; (3, 0) an empty key set; (0, 2) no queries;
    # (4, 2) causal: the first two queries see no key (output 0, LSE -inf)
    lens_q, lens_k = [5, 1, 3, 0, 4, 7], [5, 1, 0, 2, 2, 9]
    d = 8
    q = torch.randn(sum(lens_q), hq, d, dtype=torch.float64)
    k = torch.randn(sum(lens_k), hkv, d, dtype=torch.float64)
    v = torch.randn(sum(lens_k), hkv, d, dtype=torch.float64)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    out, lse = varlen_attention_ref(q, k, v, cu_q, cu_k, causal=causal, softmax_scale=0.3, return_lse=True)
    for b, (sq, sk) in enumerate(zip(lens_q, lens_k)):
        q0, k0 = int(cu_q[b]), int(cu_k[b])
        if sq == 0:
            continue
        qb = q[q0:q0 + sq].transpose(0, 1)  # (Hq, sq, D)
        kb = k[k0:k0 + sk].transpose(0, 1).repeat_interleave(hq // hkv, 0)
        vb = v[k0:k0 + sk].transpose(0, 1).repeat_interleave(hq // hkv, 0)
        allowed = torch.ones(sq, sk, dtype=torch.bool)
        if causal:
            allowed = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
        sees = allowed.any(-1)  # SDPA gives NaN for rows with no key: compare those to 0 / -inf separately
        if sk > 0 and bool(sees.any()):
            want = F.scaled_dot_product_attention(qb[:, sees], kb, vb, attn_mask=allowed[sees], scale=0.3)
            assert_close(f"seg {b} out", out[q0:q0 + sq][sees].transpose(0, 1), want, atol=1e-12)
            scores = (qb[:, sees] @ kb.transpose(1, 2) * 0.3).masked_fill(~allowed[sees], float("-inf"))
            assert_close(f"seg {b} lse", lse[:, q0:q0 + sq][:, sees], torch.logsumexp(scores, -1), atol=1e-12)
        blind = ~sees if sk > 0 else torch.ones(sq, dtype=torch.bool)
        assert bool((out[q0:q0 + sq][blind] == 0).all())
        assert bool(torch.isneginf(lse[:, q0:q0 + sq][:, blind]).all())


def test_varlen_attention_default_scale_and_dtype():
    q, k, v = (torch.randn(6, 2, 16, dtype=torch.bfloat16) for _ in range(3))
    cu = _cu([6])
    out = varlen_attention_ref(q, k, v, cu, cu, causal=True)
    assert out.dtype == torch.bfloat16
    want = F.scaled_dot_product_attention(*(t.float().transpose(0, 1) for t in (q, k, v)), is_causal=True)
    assert_close("bf16 vs fp32 sdpa", out.float(), want.transpose(0, 1), atol=3e-2, rtol=3e-2)


# ---------------------------------------------------------------- linear log-prob + entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_logprob_entropy_vs_categorical(temperature):
    T, H, V = 9, 5, 13
    hidden = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (T,))
    targets[[2, 7]] = -100
    logprob, entropy = linear_logprob_entropy_ref(hidden, weight, targets, temperature=temperature)
    dist = torch.distributions.Categorical(logits=hidden @ weight.t() / temperature)
    valid = targets != -100
    assert_close("logprob", logprob[valid], dist.log_prob(targets.clamp_min(0))[valid], atol=1e-12)
    assert_close("entropy", entropy[valid], dist.entropy()[valid], atol=1e-12)
    assert bool((logprob[~valid] == 0).all() and (entropy[~valid] == 0).all())
    (logprob.sum() + entropy.sum()).backward()
    assert bool((hidden.grad[~valid] == 0).all())  # ignored rows get no gradient
    assert bool((hidden.grad[valid] != 0).any())


# ---------------------------------------------------------------- PPO / value losses


def test_ppo_loss_hand_table():
    # (A, ratio): pg = max(-A r, -A clip(r, 0.8, 1.2)); hand-worked per row
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0, 3.0], dtype=torch.float64)
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.0, 9.0], dtype=torch.float64)
    mask = torch.tensor([1, 1, 1, 1, 1, 0])
    old = torch.zeros(6, dtype=torch.float64)
    logp = ratio.log().requires_grad_()
    loss, m = ppo_loss_ref(logp, old, adv, mask)
    pg = [-1.2, 1.5, -0.5, 0.8, -2.0]  # clipped, unclipped, unclipped, clipped, ratio 1; last row masked out
    assert float(loss.detach()) == pytest.approx(sum(pg) / 5, rel=1e-12)
    assert float(m["clip_frac"]) == pytest.approx(2 / 5)
    assert float(m["ratio_max"]) == pytest.approx(1.5)
    assert float(m["ratio_mean"]) == pytest.approx((1.5 + 1.5 + 0.5 + 0.5 + 1.0) / 5)
    assert float(m["approx_kl"]) == pytest.approx(sum(0.5 * math.log(r) ** 2 for r in [1.5, 1.5, 0.5, 0.5, 1]) / 5)
    loss.backward()
    # d pg / d logp = -A r on the unclipped rows, 0 where the clipped branch is active or masked
    want = torch.tensor([0.0, 1.5, -0.5, 0.0, -2.0, 0.0], dtype=torch.float64) / 5
    assert_close("ppo grad", logp.grad, want, atol=1e-12)


def test_ppo_loss_exact_clip_edge_and_dual_clip():
    r = math.exp(0.15)  # clip_high = r - 1 is exact (Sterbenz), so 1 + clip_high == r: the edge itself
    # rows: on the edge with A > 0 and A < 0 (both branches equal: not clipped), just past the edge with A > 0
    # (clipped), ratio 5 with A < 0 (unclipped branch 5 is larger; the dual clip caps it at 3)
    logp = torch.tensor([0.15, 0.15, 0.15 + 1e-9, math.log(5.0)], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    loss, m = ppo_loss_ref(logp, torch.zeros(4, dtype=torch.float64), adv, torch.ones(4), clip_high=r - 1.0,
                           dual_clip=3.0)
    assert 1.0 + (r - 1.0) == r
    assert float(m["clip_frac"]) == pytest.approx(1 / 4)
    assert float(m["dual_clip_frac"]) == pytest.approx(1 / 4)
    assert float(loss) == pytest.approx((-r + r - r + 3.0) / 4, rel=1e-12)


def test_ppo_loss_kl_entropy_and_normalizer():
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    ent = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    adv = torch.zeros(3, dtype=torch.float64)
    loss, m = ppo_loss_ref(logp, logp, adv, torch.ones(3), ref_logprobs_T=ref, kl_coef=0.1, entropy_T=ent,
                           entropy_coef=0.01, normalizer=10.0)
    k3 = [math.exp(b - a) - (b - a) - 1 for a, b in zip(logp.tolist(), ref.tolist())]
    assert float(loss) == pytest.approx((0.1 * sum(k3) - 0.01 * sum(ent.tolist())) / 10.0, rel=1e-12)
    assert float(m["kl"]) == pytest.approx(sum(k3) / 3)
    assert_close("k1", kl_penalty_ref(logp, ref, "k1"), logp - ref, atol=0)
    assert bool((kl_penalty_ref(torch.randn(50), torch.randn(50)) >= 0).all())


def test_value_loss_hand_table():
    # rows (V, V_old, R): (1, 0, 0) unclipped err 1; (1, 0, 1) clipped: V_clip = 0.2, err 0.64; (0, 1, 2) err 4
    values = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    ret = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    loss, m = value_loss_ref(values, old, ret, torch.ones(3), clip=0.2)
    assert float(loss.detach()) == pytest.approx(0.5 * (1.0 + 0.64 + 4.0) / 3, rel=1e-12)
    assert float(m["vf_clip_frac"]) == pytest.approx(1 / 3)
    assert float(m["vf_mse"]) == pytest.approx((1.0 + 0.0 + 4.0) / 3)
    loss.backward()
    assert_close("value grad", values.grad, torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64) / 3, atol=1e-12)
    loss_nc, _ = value_loss_ref(values, old, ret, torch.ones(3), clip=None)
    assert float(loss_nc.detach()) == pytest.approx(0.5 * (1.0 + 0.0 + 4.0) / 3, rel=1e-12)


def test_aggregate_sequence_mean_vs_loop():
    loss = torch.randn(10, dtype=torch.float64)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0])
    lengths = [3, 2, 0, 5]
    got = aggregate_ref(loss, mask, cu_seqlens=_cu(lengths))
    per_seq, start = [], 0
    for n in lengths:
        mk = mask[start:start + n].tolist()
        if sum(mk):
            per_seq.append(sum(x * w for x, w in zip(loss[start:start + n].tolist(), mk)) / sum(mk))
        start += n
    assert float(got) == pytest.approx(sum(per_seq) / len(per_seq), rel=1e-12)


# ---------------------------------------------------------------- group advantages, whitening


def test_group_advantages_vs_statistics():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.0, 0.25], dtype=torch.float64)
    g = 3
    grpo = grpo_advantages_ref(scores, g)
    dr = drgrpo_advantages_ref(scores, g)
    rloo = rloo_advantages_ref(scores, g)
    for i in range(0, 9, g):
        grp = scores[i:i + g].tolist()
        mean, std = statistics.mean(grp), statistics.stdev(grp)
        for j, s in enumerate(grp):
            assert float(grpo[i + j]) == pytest.approx((s - mean) / (std + 1e-6), abs=1e-9)
            assert float(dr[i + j]) == pytest.approx(s - mean, abs=1e-12)
            others = grp[:j] + grp[j + 1:]
            assert float(rloo[i + j]) == pytest.approx(s - statistics.mean(others), abs=1e-12)
    assert bool((grpo_advantages_ref(scores, 1) == 0).all()) and bool((rloo_advantages_ref(scores, 1) == 0).all())


def test_masked_whiten_vs_statistics():
    x = torch.randn(12, dtype=torch.float64)
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 0, 1, 1, 1])
    kept = [v for v, mk in zip(x.tolist(), mask.tolist()) if mk]
    mean, var = statistics.mean(kept), statistics.variance(kept)
    out = masked_whiten_ref(x, mask, eps=0.0)
    want = torch.tensor([(v - mean) / math.sqrt(var) if mk else 0.0 for v, mk in zip(x.tolist(), mask.tolist())],
                        dtype=torch.float64)
    assert_close("whiten", out, want, atol=1e-12)
    out_ns = masked_whiten_ref(x, mask, shift_mean=False, eps=0.0)
    assert_close("whiten no shift", out_ns, (want + mean) * mask, atol=1e-12)
