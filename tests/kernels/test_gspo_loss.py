"""gspo_loss: loss, metrics and gradients (logprobs, entropy) of the Triton kernels (OVR_BACKEND=triton; the
interpreter on CPU) vs the same-dtype reference vs the float64 reference; GSPO's sequence objective, clip edges of
the sequence ratio, one-token sequences (= ppo_loss), masks, normalisers, bad inputs.
"""

import math

import pytest
import torch
from conftest import assert_close, assert_close_3way

from ovr_kernels.gspo_loss import gspo_loss
from ovr_kernels.ppo_loss import ppo_loss
from ovr_kernels.reference import gspo_loss_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
METRICS = ("pg_loss", "clip_frac", "approx_kl", "ratio_mean", "ratio_max", "kl", "entropy")


def cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=DEVICE)


def make_inputs(lengths, dtype, mask_kind="bool", masked_frac=0.3):
    """Random per-token inputs; a per-sequence shift of the old log-probs puts some sequence ratios inside the clip
    range [0.8, 1.2] and some outside, on either side."""
    T = sum(lengths)
    logp = -(torch.randn(T).abs() * 1.5)
    shift = torch.repeat_interleave(torch.linspace(-0.4, 0.4, len(lengths))[torch.randperm(len(lengths))],
                                    torch.tensor(lengths))
    inputs = {"logprobs": logp, "old_logprobs": logp + torch.randn(T) * 0.3 + shift, "advantages": torch.randn(T),
              "ref_logprobs": logp + torch.randn(T) * 0.2, "entropy": torch.rand(T) * 3.0}
    inputs = {k: v.to(dtype).to(DEVICE) for k, v in inputs.items()}
    keep = torch.rand(T) >= masked_frac
    if mask_kind == "bool":
        inputs["mask"] = keep.to(DEVICE)
    else:
        inputs["mask"] = (keep * (0.25 + 0.75 * torch.rand(T))).to(dtype).to(DEVICE)
    inputs["cu_seqlens"] = cu(lengths)
    return inputs


def run(fn, inputs, cast=None, **kwargs):
    """(loss, metrics, grad_logprobs, grad_entropy or None) of fn on (optionally cast) copies of the inputs."""
    x = {k: (v.to(cast) if cast is not None and v.is_floating_point() else v).detach().clone()
         for k, v in inputs.items()}
    x["logprobs"].requires_grad_()
    use_entropy = "entropy_coef" in kwargs
    if use_entropy:
        x["entropy"].requires_grad_()
    extra = {"ref_logprobs": x["ref_logprobs"] if "kl_coef" in kwargs else None,
             "entropy": x["entropy"] if use_entropy else None}
    if fn is gspo_loss_ref:
        extra = {k + "_T": v for k, v in extra.items()}
    loss, metrics = fn(x["logprobs"], x["old_logprobs"], x["advantages"], x["mask"], x["cu_seqlens"], **extra,
                       **kwargs)
    wrt = [x["logprobs"]] + ([x["entropy"]] if use_entropy else [])
    assert loss.dim() == 0 and loss.requires_grad
    grads = torch.autograd.grad(loss, wrt)
    return loss.detach(), metrics, grads[0], grads[1] if use_entropy else None


def check_3way(inputs, fwd_atol, bwd_atol, **kwargs):
    got = run(gspo_loss, inputs, **kwargs)
    ref = run(gspo_loss_ref, inputs, **kwargs)
    truth = run(gspo_loss_ref, inputs, cast=torch.float64, **kwargs)
    assert_close_3way("loss", got[0], ref[0], truth[0], atol=fwd_atol)
    for name in METRICS:
        assert got[1][name].dim() == 0 and not got[1][name].requires_grad
        assert_close_3way(name, got[1][name], ref[1][name], truth[1][name], atol=fwd_atol)
    assert got[2].dtype == inputs["logprobs"].dtype
    assert_close_3way("grad_logprobs", got[2], ref[2], truth[2], factor=3.0, atol=bwd_atol)
    if got[3] is not None:
        assert_close_3way("grad_entropy", got[3], ref[3], truth[3], factor=3.0, atol=bwd_atol)
    return got


@pytest.mark.parametrize("case", ["token_mean", "odd_bf16_seq_mean", "all_options", "k1_fp16"])
def test_matches_reference(triton_backend, case):
    if case == "token_mean":
        got = check_3way(make_inputs([40, 7, 100, 13, 64, 29, 3, 50], torch.float32), 1e-6, 1e-8,
                         clip_low=0.2, clip_high=0.2)
        assert 0.05 < float(got[1]["clip_frac"]) < 0.95, "inputs should exercise both branches"
    elif case == "odd_bf16_seq_mean":  # a sequence longer than one tile under the interpreter's block
        check_3way(make_inputs([1500, 3, 200, 800], torch.bfloat16, mask_kind="float"), 1e-5, 1e-7,
                   clip_low=0.2, clip_high=0.28, seq_mean=True)
    elif case == "all_options":  # KL + entropy + sequence mean; empty, one-token and all-masked sequences
        lengths = [5, 0, 1, 300, 2, 60, 409]
        inputs = make_inputs(lengths, torch.float32)
        inputs["mask"][5:6] = True
        inputs["mask"][306:308] = False
        inputs["ref_logprobs"][::7] += 4.0  # k3 > 10 on these tokens: low_var's cap binds
        for kl_type in ("k3", "low_var"):
            check_3way(inputs, 1e-6, 1e-7, clip_low=0.1, clip_high=0.3, kl_coef=0.05, kl_type=kl_type,
                       entropy_coef=0.01, seq_mean=True, normalizer=torch.tensor(5.0, device=DEVICE))
    else:
        check_3way(make_inputs([101, 200], torch.float16), 1e-5, 1e-7, kl_coef=0.2, kl_type="k1", normalizer=1234.0)


def test_sequence_objective(triton_backend):
    """One advantage per sequence and the sequence mean: the loss and gradient are those of GSPO's sequence
    objective mean_b max(-A_b s_b, -A_b clip(s_b)) with s_b = exp(mean_t (logp - old)), differentiated through the
    mean (written out here in float64, independently of the reference)."""
    lengths = [30, 5, 64, 17, 1, 40]
    inputs = make_inputs(lengths, torch.float32, masked_frac=0.0)
    adv_B = torch.tensor([1.0, -0.5, 2.0, -1.5, 0.7, -0.3])
    inputs["advantages"] = torch.repeat_interleave(adv_B, torch.tensor(lengths)).to(DEVICE)
    got = run(gspo_loss, inputs, clip_low=0.2, clip_high=0.2, seq_mean=True)
    logp = inputs["logprobs"].double().cpu().requires_grad_()
    old = inputs["old_logprobs"].double().cpu()
    terms = []
    for b, (s, e) in enumerate(zip(cu(lengths).tolist()[:-1], cu(lengths).tolist()[1:])):
        ratio = torch.exp((logp[s:e] - old[s:e]).mean())
        terms.append(torch.maximum(-adv_B[b].double() * ratio, -adv_B[b].double() * ratio.clamp(0.8, 1.2)))
    want = torch.stack(terms).mean()
    (want_grad,) = torch.autograd.grad(want, [logp])
    assert_close("loss", got[0], want, atol=1e-6)
    assert_close("grad", got[2], want_grad, atol=1e-7)
    assert 0 < float(got[1]["clip_frac"]) < 1, "some sequences should be clipped, some not"


def test_one_token_sequences_equal_ppo(triton_backend):
    """Sequences of one token: the sequence ratio is the token ratio, so GSPO is PPO (loss, gradient, metrics)."""
    inputs = make_inputs([1] * 37, torch.float32)
    got = run(gspo_loss, inputs, clip_low=0.2, clip_high=0.25)
    x = {k: v.detach().clone() for k, v in inputs.items()}
    logp = x["logprobs"].requires_grad_()
    ppo, ppo_met = ppo_loss(logp, x["old_logprobs"], x["advantages"], x["mask"], clip_low=0.2, clip_high=0.25)
    (ppo_grad,) = torch.autograd.grad(ppo, [logp])
    assert_close("loss", got[0], ppo, atol=1e-6)
    assert_close("grad", got[2], ppo_grad, atol=1e-8)
    for name in ("clip_frac", "ratio_mean", "ratio_max", "approx_kl", "pg_loss"):
        assert_close(name, got[1][name], ppo_met[name], atol=1e-6)


def test_clip_edges_exact(triton_backend):
    """Sequence ratios exactly at 1 -+ eps count as unclipped (gradient -A s per token); one float32 step beyond
    the binding edge the clipped branch takes over (gradient 0). Each sequence has 4 tokens of the same log-ratio
    and old_logprobs = 0, so the mean is exact and s_b lands exactly on (or one step from) the bound."""
    f32, inf = torch.float32, torch.tensor(math.inf)
    hi, lo = torch.tensor(1.25, dtype=f32), torch.tensor(0.75, dtype=f32)
    ratios = torch.stack([hi, torch.nextafter(hi, inf), torch.nextafter(hi, -inf),
                          lo, torch.nextafter(lo, -inf), torch.nextafter(lo, inf)]).repeat(2)
    points = ratios.double().log().to(f32)
    assert torch.equal(torch.exp(points), ratios)
    logp = points.repeat_interleave(4)
    adv = torch.cat([torch.full((24,), 0.7), torch.full((24,), -1.3)])
    inputs = {"logprobs": logp, "old_logprobs": torch.zeros(48), "advantages": adv,
              "mask": torch.ones(48, dtype=torch.bool), "ref_logprobs": logp, "entropy": logp}
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    inputs["cu_seqlens"] = cu([4] * 12)
    got = run(gspo_loss, inputs, clip_low=0.25, clip_high=0.25)
    ref = run(gspo_loss_ref, inputs, clip_low=0.25, clip_high=0.25)
    ratio = torch.exp(logp)
    clipped = ((adv > 0) & (ratio > 1.25)) | ((adv < 0) & (ratio < 0.75))
    assert int(clipped.sum()) == 8
    expected_grad = torch.where(clipped, 0.0, -adv * ratio) / 48
    assert_close("grad at the edges", got[2], expected_grad.to(DEVICE), atol=1e-7, rtol=1e-6)
    assert_close("grad vs reference", got[2], ref[2], atol=1e-7, rtol=1e-6)
    assert float(got[1]["clip_frac"]) == pytest.approx(8 / 48) == float(ref[1]["clip_frac"])


@pytest.mark.parametrize("seq_mean", [False, True])
def test_all_masked_is_zero_and_finite(triton_backend, seq_mean):
    """No masked token: loss 0, metrics 0, zero gradients, no NaN, even with inf / NaN log-probs in the padding."""
    inputs = make_inputs([20, 0, 30], torch.float32)
    inputs["mask"] = torch.zeros(50, dtype=torch.bool, device=DEVICE)
    inputs["logprobs"][3] = -math.inf
    inputs["old_logprobs"][4] = math.nan
    loss, metrics, grad, grad_ent = run(gspo_loss, inputs, kl_coef=0.1, entropy_coef=0.01, seq_mean=seq_mean)
    assert float(loss) == 0.0
    assert all(float(metrics[k]) == 0.0 for k in METRICS)
    assert bool((grad == 0).all()) and bool((grad_ent == 0).all())


def test_masked_padding_does_not_leak(triton_backend):
    """inf / NaN in masked positions change neither the sequence ratio nor anything else."""
    inputs = make_inputs([60, 140], torch.float32)
    inputs["mask"][:10] = False
    clean = {k: v.clone() for k, v in inputs.items()}
    inputs["logprobs"][0], inputs["old_logprobs"][1], inputs["advantages"][2] = -math.inf, math.nan, math.inf
    for k in ("logprobs", "old_logprobs", "advantages"):
        clean[k][:10] = 0.0
    got = run(gspo_loss, inputs, clip_low=0.2, clip_high=0.2)
    ref = run(gspo_loss_ref, clean, clip_low=0.2, clip_high=0.2)
    assert_close("loss", got[0], ref[0], atol=1e-6)
    assert_close("grad", got[2], ref[2], atol=1e-8)
    for name in METRICS:
        assert_close(name, got[1][name], ref[1][name], atol=1e-6)


def test_global_normalizer_micro_batches_sum_to_full_batch(triton_backend):
    """Micro-batches of whole sequences normalised by the global token count add up to the full batch."""
    lengths = [50, 30, 71, 9, 100]
    inputs = make_inputs(lengths, torch.float32)
    count = float(inputs["mask"].sum())
    full = run(gspo_loss, inputs, clip_low=0.2, clip_high=0.2, kl_coef=0.1)
    parts = []
    for ls, sl in (([50, 30], slice(0, 80)), ([71, 9, 100], slice(80, 260))):
        part = {k: v[sl] for k, v in inputs.items() if k != "cu_seqlens"}
        part["cu_seqlens"] = cu(ls)
        parts.append(run(gspo_loss, part, normalizer=count, clip_low=0.2, clip_high=0.2, kl_coef=0.1))
    assert_close("loss", parts[0][0] + parts[1][0], full[0], atol=1e-6)
    assert_close("grad", torch.cat([parts[0][2], parts[1][2]]), full[2], atol=1e-9)


def test_torch_compile_and_opcheck(triton_backend):
    """fullgraph=True traces (one custom op) and equals eager bit for bit; the op's registrations are consistent."""
    torch._dynamo.reset()
    inputs = make_inputs([5, 0, 1, 60], torch.float32)
    kwargs = {"clip_low": 0.1, "clip_high": 0.3, "kl_coef": 0.05, "entropy_coef": 0.01, "seq_mean": True}
    eager = run(gspo_loss, inputs, **kwargs)
    compiled = run(torch.compile(gspo_loss, fullgraph=True, backend="aot_eager"), inputs, **kwargs)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[2], compiled[2])
    assert torch.equal(eager[3], compiled[3])
    x = {k: v.clone() for k, v in inputs.items()}
    torch.library.opcheck(torch.ops.ovr.gspo_loss_fwd.default,
                          (x["logprobs"].requires_grad_(), x["old_logprobs"], x["advantages"], x["mask"],
                           x["ref_logprobs"], x["entropy"].requires_grad_(), x["cu_seqlens"],
                           torch.tensor(3.0, device=DEVICE), None, True, 0.2, 0.28, 0.05, "k3", 0.01))


@pytest.mark.parametrize("kw, match", [
    ({"cu_seqlens": None}, "gspo_loss needs cu_seqlens"),
    ({"cu_seqlens": torch.tensor([0, 3, 7], dtype=torch.int32)}, r"cu_seqlens\[-1\]=7 must equal"),
    ({"clip_low": 1.0}, r"clip_low must be in \[0, 1\)"), ({"clip_high": -0.1}, r"clip_high must be in \[0, 1\)"),
    ({"seq_mean": 1}, "seq_mean must be a bool"), ({"kl_coef": 0.1}, "kl_coef=0.1 needs ref_logprobs"),
    ({"kl_type": "k2"}, "kl_type must be 'k1', 'k3' or 'low_var'"),
    ({"entropy_coef": 0.1}, "entropy_coef=0.1 needs entropy"), ({"normalizer": 0.0}, "normalizer must be > 0.0"),
    ({"advantages": torch.ones(8, dtype=torch.int64)}, "advantages must have dtype"),
])
def test_bad_inputs_raise(triton_backend, kw, match):
    x = {"logprobs": torch.randn(8), "old_logprobs": torch.randn(8), "advantages": torch.randn(8),
         "mask": torch.ones(8, dtype=torch.bool), "cu_seqlens": torch.tensor([0, 3, 8], dtype=torch.int32)}
    x.update(kw)
    x = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    args = [x.pop(k) for k in ("logprobs", "old_logprobs", "advantages", "mask", "cu_seqlens")]
    with pytest.raises(ValueError, match=match):
        gspo_loss(*args, **x)
