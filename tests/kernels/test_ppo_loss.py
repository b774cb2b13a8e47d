"""ppo_loss: loss, metrics and gradients (logprobs, entropy) of the Triton kernels (OVR_BACKEND=triton; the
interpreter on CPU) vs the same-dtype reference vs the float64 reference (S1); clip edges, masks, normalisers.
"""

import math

import pytest
import torch
from conftest import assert_close, assert_close_3way

from ovr_kernels.ppo_loss import ppo_loss
from ovr_kernels.reference import ppo_loss_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
METRICS = ("pg_loss", "clip_frac", "dual_clip_frac", "approx_kl", "ratio_mean", "ratio_max", "kl", "entropy")


def make_inputs(T, dtype, mask_kind="bool", masked_frac=0.3):
    """Random per-token inputs; old log-probs spread so that a good share of ratios fall outside the clip range."""
    logp = -(torch.randn(T).abs() * 1.5)
    inputs = {
        "logprobs": logp,
        # 5% far-off tokens so that ratios beyond the dual clip occur
        "old_logprobs": logp + torch.randn(T) * 0.3 - 1.5 * (torch.rand(T) < 0.05),
        "advantages": torch.randn(T),
        "ref_logprobs": logp + torch.randn(T) * 0.2,
        "entropy": torch.rand(T) * 3.0,
    }
    inputs = {k: v.to(dtype).to(DEVICE) for k, v in inputs.items()}
    keep = torch.rand(T) >= masked_frac
    if mask_kind == "bool":
        inputs["mask"] = keep.to(DEVICE)
    else:  # float weights in (0, 1], zeros where dropped
        inputs["mask"] = (keep * (0.25 + 0.75 * torch.rand(T))).to(dtype).to(DEVICE)
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
    if fn is ppo_loss_ref:  # the reference names its per-token arguments with the _T suffix
        extra = {k + "_T": v for k, v in extra.items()}
    loss, metrics = fn(x["logprobs"], x["old_logprobs"], x["advantages"], x["mask"], **extra, **kwargs)
    wrt = [x["logprobs"]] + ([x["entropy"]] if use_entropy else [])
    assert loss.dim() == 0 and loss.requires_grad
    grads = torch.autograd.grad(loss, wrt)
    return loss.detach(), metrics, grads[0], grads[1] if use_entropy else None


def check_3way(inputs, fwd_atol, bwd_atol, **kwargs):
    got = run(ppo_loss, inputs, **kwargs)
    ref = run(ppo_loss_ref, inputs, **kwargs)
    truth = run(ppo_loss_ref, inputs, cast=torch.float64, **kwargs)
    assert_close_3way("loss", got[0], ref[0], truth[0], atol=fwd_atol)
    for name in METRICS:
        assert got[1][name].dim() == 0 and got[1][name].device == got[0].device
        assert not got[1][name].requires_grad
        assert_close_3way(name, got[1][name], ref[1][name], truth[1][name], atol=fwd_atol)
    assert got[2].dtype == inputs["logprobs"].dtype
    assert_close_3way("grad_logprobs", got[2], ref[2], truth[2], factor=3.0, atol=bwd_atol)
    if got[3] is not None:
        assert_close_3way("grad_entropy", got[3], ref[3], truth[3], factor=3.0, atol=bwd_atol)
    return got


def cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=DEVICE)


# one aligned row, one odd row, one all-options row, one more for the other KL / normaliser kinds (S2)
@pytest.mark.parametrize("case", ["aligned", "odd", "all_options", "k1_global", "low_var"])
def test_matches_reference(triton_backend, case):
    if case == "aligned":
        inputs = make_inputs(1024, torch.float32)
        got = check_3way(inputs, 1e-6, 1e-8)
        assert float(got[1]["clip_frac"]) > 0.05, "inputs should exercise the clipped branch"
    elif case == "odd":  # three programs, bf16 inputs, float mask, asymmetric clip, dual clip
        inputs = make_inputs(2503, torch.bfloat16, mask_kind="float")
        got = check_3way(inputs, 1e-5, 1e-7, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
        assert float(got[1]["dual_clip_frac"]) > 0.0, "inputs should exercise the dual clip"
    elif case == "all_options":  # KL k3 + entropy + dual clip + sequence mean (empty, one-token, all-masked seqs)
        lengths = [5, 0, 1, 300, 2, 60, 409]
        inputs = make_inputs(sum(lengths), torch.float32)
        inputs["mask"][6:7] = True
        inputs["mask"][307:309] = False  # the two-token sequence is fully masked out
        check_3way(inputs, 1e-6, 1e-7, clip_low=0.1, clip_high=0.3, dual_clip=2.5, kl_coef=0.05, kl_type="k3",
                   entropy_coef=0.01, cu_seqlens=cu(lengths), normalizer=torch.tensor(5.0, device=DEVICE))
    elif case == "k1_global":
        inputs = make_inputs(301, torch.float16)
        check_3way(inputs, 1e-5, 1e-7, kl_coef=0.2, kl_type="k1", normalizer=1234.0)
    else:  # every 7th token's reference far above the policy: k3 > 10 there, capped (and no gradient) by low_var
        inputs = make_inputs(301, torch.float32)
        inputs["ref_logprobs"][::7] += 4.0
        got = check_3way(inputs, 1e-6, 1e-8, kl_coef=0.2, kl_type="low_var")
        k3 = run(ppo_loss, inputs, kl_coef=0.2, kl_type="k3")
        assert float(got[1]["kl"]) < float(k3[1]["kl"]), "the cap should bind on some tokens"


def test_clip_edges_exact(triton_backend):
    """Ratios exactly at 1 -+ eps count as unclipped and keep their gradient -A r; one float32 step beyond the
    binding edge the clipped branch takes over (gradient 0). eps = 0.25 makes 0.75 / 1.25 exact in binary and
    old_logprobs = 0 makes logp - old exact, so the ratio lands exactly on (or one step from) the bound."""
    f32, inf = torch.float32, torch.tensor(math.inf)
    hi, lo = torch.tensor(1.25, dtype=f32), torch.tensor(0.75, dtype=f32)
    # each bound and its float32 neighbours; log taken in float64, so exp(logp) rounds back to the ratio exactly
    ratios = torch.stack([hi, torch.nextafter(hi, inf), torch.nextafter(hi, -inf),
                          lo, torch.nextafter(lo, -inf), torch.nextafter(lo, inf)])
    points = ratios.double().log().to(f32)
    assert torch.equal(torch.exp(points), ratios)  # the construction is exact
    logp = points.repeat(2)
    adv = torch.cat([torch.full((6,), 0.7), torch.full((6,), -1.3)])
    inputs = {"logprobs": logp, "old_logprobs": torch.zeros(12), "advantages": adv,
              "mask": torch.ones(12, dtype=torch.bool), "ref_logprobs": logp, "entropy": logp}
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    got = run(ppo_loss, inputs, clip_low=0.25, clip_high=0.25)
    ref = run(ppo_loss_ref, inputs, clip_low=0.25, clip_high=0.25)
    ratio = torch.exp(logp)
    # the clip binds above 1 + eps for A > 0 and below 1 - eps for A < 0
    clipped = ((adv > 0) & (ratio > 1.25)) | ((adv < 0) & (ratio < 0.75))
    assert int(clipped.sum()) == 2
    expected_grad = torch.where(clipped, 0.0, -adv * ratio) / 12
    assert_close("grad at the edges", got[2], expected_grad.to(DEVICE), atol=1e-7, rtol=1e-6)
    assert_close("grad vs reference", got[2], ref[2], atol=1e-7, rtol=1e-6)
    assert float(got[1]["clip_frac"]) == pytest.approx(2 / 12)
    assert float(got[1]["clip_frac"]) == float(ref[1]["clip_frac"])
    assert_close("loss", got[0], ref[0], atol=1e-7)


@pytest.mark.parametrize("eps", [0.2, 0.28])
def test_clip_edges_default_eps(triton_backend, eps):
    """logp = old + log(1 +- eps) with random old log-probs: the kernel takes the same branch as the same-dtype
    reference on every token (loss, clip fraction and gradient agree to rounding)."""
    T = 512
    old = -(torch.rand(T) * 4.0)
    step = torch.where(torch.arange(T) % 2 == 0, math.log(1.0 + eps), math.log(1.0 - eps))
    inputs = {"logprobs": old + step, "old_logprobs": old, "advantages": torch.randn(T),
              "mask": torch.ones(T, dtype=torch.bool), "ref_logprobs": old, "entropy": old}
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    got = run(ppo_loss, inputs, clip_low=eps, clip_high=eps)
    ref = run(ppo_loss_ref, inputs, clip_low=eps, clip_high=eps)
    assert float(got[1]["clip_frac"]) == float(ref[1]["clip_frac"])
    assert_close("grad", got[2], ref[2], atol=1e-9, rtol=1e-5)
    assert_close("loss", got[0], ref[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("seq_mean", [False, True])
def test_all_masked_is_zero_and_finite(triton_backend, seq_mean):
    """No masked token: loss 0, metrics 0, zero gradients, no NaN, even with inf / NaN log-probs in the padding."""
    inputs = make_inputs(50, torch.float32)
    inputs["mask"] = torch.zeros(50, dtype=torch.bool, device=DEVICE)
    inputs["logprobs"][3] = -math.inf
    inputs["old_logprobs"][4] = math.nan
    kwargs = {"cu_seqlens": cu([20, 0, 30])} if seq_mean else {}
    loss, metrics, grad, grad_ent = run(ppo_loss, inputs, dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01, **kwargs)
    assert float(loss) == 0.0
    assert all(float(metrics[k]) == 0.0 for k in METRICS)
    assert bool((grad == 0).all()) and bool((grad_ent == 0).all())


def test_masked_padding_does_not_leak(triton_backend):
    """inf / NaN in masked positions change nothing: equal to the reference on sanitised inputs."""
    inputs = make_inputs(200, torch.float32)
    inputs["mask"][:10] = False
    clean = {k: v.clone() for k, v in inputs.items()}
    inputs["logprobs"][0], inputs["old_logprobs"][1], inputs["advantages"][2] = -math.inf, math.nan, math.inf
    for k in ("logprobs", "old_logprobs", "advantages"):
        clean[k][:10] = 0.0
    got = run(ppo_loss, inputs, dual_clip=2.0)
    ref = run(ppo_loss_ref, clean, dual_clip=2.0)
    assert_close("loss", got[0], ref[0], atol=1e-6)
    assert_close("grad", got[2], ref[2], atol=1e-8)
    for name in METRICS:
        assert_close(name, got[1][name], ref[1][name], atol=1e-6)


def test_one_token_sequences(triton_backend):
    """Sequences of one token: the sequence mean over the non-empty sequences equals the token mean."""
    T = 37
    inputs = make_inputs(T, torch.float32)
    seq = run(ppo_loss, inputs, cu_seqlens=cu([1] * T), dual_clip=2.0)
    tok = run(ppo_loss, inputs, dual_clip=2.0)
    ref = run(ppo_loss_ref, inputs, cu_seqlens=cu([1] * T), dual_clip=2.0)
    assert_close("seq vs token loss", seq[0], tok[0], atol=1e-6)
    assert_close("seq vs token grad", seq[2], tok[2], atol=1e-8)
    assert_close("seq vs reference", seq[0], ref[0], atol=1e-6)
    assert_close("seq grad vs reference", seq[2], ref[2], atol=1e-8)


def test_sequence_mean_weights_sequences_equally(triton_backend):
    """Fully masked sequences of one length: sequence mean == token mean; with unequal lengths it differs and
    matches the reference."""
    inputs = make_inputs(300, torch.float32)
    inputs["mask"] = torch.ones(300, dtype=torch.bool, device=DEVICE)
    equal = run(ppo_loss, inputs, cu_seqlens=cu([100, 100, 100]))
    tok = run(ppo_loss, inputs)
    assert_close("equal lengths", equal[0], tok[0], atol=1e-6)
    unequal = run(ppo_loss, inputs, cu_seqlens=cu([10, 250, 40]))
    ref = run(ppo_loss_ref, inputs, cu_seqlens=cu([10, 250, 40]))
    assert abs(float(unequal[0]) - float(tok[0])) > 1e-4
    assert_close("unequal lengths", unequal[0], ref[0], atol=1e-6)


@pytest.mark.parametrize("kind", ["float", "tensor"])
def test_global_normalizer_micro_batches_sum_to_full_batch(triton_backend, kind):
    """Two micro-batches normalised by the global token count add up to the full batch's token mean (loss and
    gradients): what the trainer relies on when it accumulates micro-batches."""
    T, split = 600, 251
    inputs = make_inputs(T, torch.float32)
    count = inputs["mask"].sum()
    normalizer = float(count) if kind == "float" else count.to(torch.float32)
    full = run(ppo_loss, inputs, kl_coef=0.1, entropy_coef=0.02)
    parts = [run(ppo_loss, {k: v[sl] for k, v in inputs.items()}, normalizer=normalizer, kl_coef=0.1,
                 entropy_coef=0.02) for sl in (slice(0, split), slice(split, T))]
    assert_close("loss", parts[0][0] + parts[1][0], full[0], atol=1e-6)
    assert_close("grad logprobs", torch.cat([parts[0][2], parts[1][2]]), full[2], atol=1e-9)
    assert_close("grad entropy", torch.cat([parts[0][3], parts[1][3]]), full[3], atol=1e-9)


def test_deterministic(triton_backend):
    inputs = make_inputs(3000, torch.float32)
    a = run(ppo_loss, inputs, kl_coef=0.1, entropy_coef=0.01)
    b = run(ppo_loss, inputs, kl_coef=0.1, entropy_coef=0.01)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert all(torch.equal(a[1][k], b[1][k]) for k in METRICS)


def test_empty_input(triton_backend):
    x = torch.zeros(0, device=DEVICE, requires_grad=True)
    loss, metrics = ppo_loss(x, x.detach(), x.detach(), torch.zeros(0, dtype=torch.bool, device=DEVICE))
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(metrics["ratio_max"]) == 0.0 and x.grad.shape == (0,)



@pytest.mark.parametrize("all_options", [False, True], ids=["default", "all_options"])
def test_torch_compile(triton_backend, all_options):
    """ppo_loss traces with fullgraph=True (its Triton path is the ovr::ppo_loss_fwd / _bwd custom ops) and the
    compiled loss, metrics and gradients equal eager bit for bit (same deterministic kernels)."""
    torch._dynamo.reset()
    lengths = [5, 0, 1, 300, 2, 60]
    inputs = make_inputs(sum(lengths), torch.float32)
    kwargs = {}
    if all_options:
        kwargs = {"clip_low": 0.1, "clip_high": 0.3, "dual_clip": 2.5, "kl_coef": 0.05, "kl_type": "k3",
                  "entropy_coef": 0.01, "cu_seqlens": cu(lengths), "normalizer": torch.tensor(5.0, device=DEVICE)}
    eager = run(ppo_loss, inputs, **kwargs)
    compiled = run(torch.compile(ppo_loss, fullgraph=True, backend="aot_eager"), inputs, **kwargs)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[2], compiled[2])
    assert (eager[3] is None) == (not all_options)
    if all_options:
        assert torch.equal(eager[3], compiled[3])
    for name in METRICS:
        assert torch.equal(eager[1][name], compiled[1][name]), name


def test_opcheck(triton_backend):
    """torch.library.opcheck: schema, fake and autograd registrations of ovr::ppo_loss_fwd are consistent."""
    lengths = [7, 0, 40, 1]
    x = make_inputs(sum(lengths), torch.float32)
    logp, ent = x["logprobs"].requires_grad_(), x["entropy"].requires_grad_()
    torch.library.opcheck(torch.ops.ovr.ppo_loss_fwd.default,
                          (logp, x["old_logprobs"], x["advantages"], x["mask"], x["ref_logprobs"], ent, cu(lengths),
                           torch.tensor(3.0, device=DEVICE), None, 0.2, 0.28, 3.0, 0.05, "k3", 0.01))
    torch.library.opcheck(torch.ops.ovr.ppo_loss_fwd.default,
                          (logp, x["old_logprobs"], x["advantages"], x["mask"], None, None, None, None, 17.0, 0.2,
                           0.2, None, 0.0, "k1", 0.0))

def _bad(name):
    """Inputs plus one broken argument, by name."""
    T = 8
    x = {"logprobs": torch.randn(T), "old_logprobs": torch.randn(T), "advantages": torch.randn(T),
         "mask": torch.ones(T, dtype=torch.bool)}
    kw = {}
    if name == "logprobs_2d":
        x["logprobs"] = torch.randn(T, 1)
    elif name == "old_length":
        x["old_logprobs"] = torch.randn(T + 1)
    elif name == "adv_int":
        x["advantages"] = torch.ones(T, dtype=torch.int64)
    elif name == "mask_int":
        x["mask"] = torch.ones(T, dtype=torch.int64)
    elif name == "mask_length":
        x["mask"] = torch.ones(T - 1, dtype=torch.bool)
    elif name == "noncontiguous":
        x["logprobs"] = torch.randn(2 * T, device=DEVICE)[::2]  # sliced where it runs: .to(cuda) would copy it dense
    elif name == "not_tensor":
        x["advantages"] = [0.0] * T
    else:
        kw = {"clip_low_1": {"clip_low": 1.0}, "clip_high_neg": {"clip_high": -0.1},
              "dual_le_1": {"dual_clip": 1.0}, "normalizer_0": {"normalizer": 0.0},
              "normalizer_1d": {"normalizer": torch.ones(1)}, "normalizer_bool": {"normalizer": torch.tensor(True)},
              "kl_type": {"kl_type": "k2", "ref_logprobs": torch.randn(T)},
              "kl_no_ref": {"kl_coef": 0.1}, "kl_neg": {"kl_coef": -1.0, "ref_logprobs": torch.randn(T)},
              "ent_no_entropy": {"entropy_coef": 0.1},
              "ent_inf": {"entropy_coef": math.inf, "entropy": torch.rand(T)},
              "ref_length": {"ref_logprobs": torch.randn(T + 2), "kl_coef": 0.1},
              "cu_int64": {"cu_seqlens": torch.tensor([0, T])},
              "cu_end": {"cu_seqlens": torch.tensor([0, 3, T - 1], dtype=torch.int32)},
              "cu_decreasing": {"cu_seqlens": torch.tensor([0, 5, 3, T], dtype=torch.int32)},
              "cu_start": {"cu_seqlens": torch.tensor([1, T], dtype=torch.int32)}}[name]
    x = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    kw = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    return x, kw


@pytest.mark.parametrize("name, match", [
    ("logprobs_2d", "logprobs must have 1 dims"), ("old_length", r"old_logprobs must have shape \(8,\)"),
    ("adv_int", "advantages must have dtype"), ("mask_int", "mask must have dtype"),
    ("mask_length", r"mask must have shape \(8,\)"), ("noncontiguous", "logprobs must be contiguous"),
    ("not_tensor", "advantages must be a torch.Tensor"), ("clip_low_1", r"clip_low must be in \[0, 1\), got 1.0"),
    ("clip_high_neg", r"clip_high must be in \[0, 1\), got -0.1"), ("dual_le_1", "dual_clip must be > 1.0"),
    ("normalizer_0", "normalizer must be > 0.0"), ("normalizer_1d", "normalizer must have 0 dims"),
    ("normalizer_bool", "normalizer must be a float or integer tensor"), ("kl_type", "kl_type must be 'k1', 'k3' or 'low_var'"),
    ("kl_no_ref", "kl_coef=0.1 needs ref_logprobs"), ("kl_neg", "kl_coef must be >= 0.0"),
    ("ent_no_entropy", "entropy_coef=0.1 needs entropy"), ("ent_inf", "entropy_coef must be finite"),
    ("ref_length", r"ref_logprobs must have shape \(8,\)"), ("cu_int64", "cu_seqlens must have dtype"),
    ("cu_end", r"cu_seqlens\[-1\]=7 must equal the number of packed tokens 8"),
    ("cu_decreasing", "cu_seqlens must be non-decreasing"), ("cu_start", r"cu_seqlens\[0\] must be 0, got 1"),
])
def test_bad_inputs_raise(triton_backend, name, match):
    x, kw = _bad(name)
    with pytest.raises(ValueError, match=match):
        ppo_loss(x["logprobs"], x["old_logprobs"], x["advantages"], x["mask"], **kw)
