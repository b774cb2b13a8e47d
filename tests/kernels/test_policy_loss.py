"""ppo_policy_loss_from_hidden: the fused node (gradients formed in its forward from the same logits) equals the
unfused composition linear_logprob_entropy -> ppo_loss (loss, metrics, d(hidden), d(weight)) and matches the
float64 reference composition, on the Triton path (OVR_BACKEND=triton; the interpreter on CPU) and the PyTorch path.
"""

import pytest
import torch
from conftest import assert_close, assert_close_3way

from ovr_kernels.linear_logprob import linear_logprob_entropy
from ovr_kernels.policy_loss import ppo_policy_loss_from_hidden
from ovr_kernels.ppo_loss import ppo_loss
from ovr_kernels.reference import linear_logprob_entropy_ref, ppo_loss_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
METRICS = ("pg_loss", "clip_frac", "dual_clip_frac", "approx_kl", "ratio_mean", "ratio_max", "kl", "entropy")


def make_inputs(T, H, V, dtype, temperature=1.0):
    """Hidden states, lm-head weight and targets (two ignored), plus rollout-time log-probs near the current ones."""
    hidden = (torch.randn(T, H) * 0.5).to(dtype).to(DEVICE)
    weight = (torch.randn(V, H) / H**0.5 * 2.0).to(dtype).to(DEVICE)
    targets = torch.randint(0, V, (T,))
    targets[torch.randperm(T)[:2]] = -100
    targets = targets.to(DEVICE)
    with torch.no_grad():
        logp, _ = linear_logprob_entropy_ref(hidden.float(), weight.float(), targets, temperature)
    mask = (targets != -100) & (torch.rand(T, device=DEVICE) > 0.1)
    return {"hidden": hidden, "weight": weight, "targets": targets, "mask": mask,
            "old_logprobs": logp + 0.3 * torch.randn(T, device=DEVICE),
            "advantages": torch.randn(T, device=DEVICE), "ref_logprobs": logp + 0.1 * torch.randn(T, device=DEVICE)}


def _ppo_kwargs(x, kwargs):
    out = dict(kwargs)
    out.pop("temperature", None)
    if "kl_coef" in out:
        out["ref_logprobs"] = x["ref_logprobs"]
    return out


def run_fused(x, cast=None, **kwargs):
    h = x["hidden"].to(cast or x["hidden"].dtype).detach().clone().requires_grad_()
    w = x["weight"].to(cast or x["weight"].dtype).detach().clone().requires_grad_()
    ppo_kw = _ppo_kwargs(x, kwargs)
    loss, metrics = ppo_policy_loss_from_hidden(h, w, x["targets"], x["old_logprobs"], x["advantages"], x["mask"],
                                                temperature=kwargs.get("temperature", 1.0), **ppo_kw)
    gh, gw = torch.autograd.grad(loss, [h, w])
    return loss.detach(), metrics, gh, gw


def run_unfused(x, logprob_fn, ppo_fn, cast=None, **kwargs):
    """linear log-prob (+ entropy) then the PPO loss, as two autograd nodes (entropy always passed: the metric)."""
    h = x["hidden"].to(cast or x["hidden"].dtype).detach().clone().requires_grad_()
    w = x["weight"].to(cast or x["weight"].dtype).detach().clone().requires_grad_()
    ppo_kw = _ppo_kwargs(x, kwargs)
    logp, ent = logprob_fn(h, w, x["targets"], kwargs.get("temperature", 1.0))
    per_token = {k: (v.to(cast) if cast is not None else v) for k, v in x.items()
                 if k in ("old_logprobs", "advantages", "ref_logprobs")}
    if "ref_logprobs" in ppo_kw:
        ppo_kw["ref_logprobs"] = per_token["ref_logprobs"]
    if ppo_fn is ppo_loss_ref:
        ppo_kw = {(k + "_T" if k == "ref_logprobs" else k): v for k, v in ppo_kw.items()}
        loss, metrics = ppo_fn(logp, per_token["old_logprobs"], per_token["advantages"], x["mask"], entropy_T=ent,
                               **ppo_kw)
    else:
        loss, metrics = ppo_fn(logp, per_token["old_logprobs"], per_token["advantages"], x["mask"], entropy=ent,
                               **ppo_kw)
    gh, gw = torch.autograd.grad(loss, [h, w])
    return loss.detach(), metrics, gh, gw


CASES = {
    "defaults": ({"T": 150, "H": 64, "V": 300, "dtype": torch.float32}, {}),
    "all_options": ({"T": 97, "H": 48, "V": 211, "dtype": torch.float32},
                    {"temperature": 0.7, "clip_high": 0.28, "dual_clip": 2.0, "entropy_coef": 0.01,
                     "kl_coef": 0.05, "cu_seqlens": [0, 1, 40, 40, 97]}),
    "bf16_global": ({"T": 80, "H": 64, "V": 256, "dtype": torch.bfloat16}, {"normalizer": 1000.0, "entropy_coef": 0.02}),
}


def _case(name):
    shape, kwargs = CASES[name]
    x = make_inputs(shape["T"], shape["H"], shape["V"], shape["dtype"], kwargs.get("temperature", 1.0))
    kwargs = dict(kwargs)
    if "cu_seqlens" in kwargs:
        kwargs["cu_seqlens"] = torch.tensor(kwargs["cu_seqlens"], dtype=torch.int32, device=DEVICE)
    return x, kwargs


@pytest.mark.parametrize("case", list(CASES))
def test_fused_equals_unfused(backend, case):
    """Same formulas, logits formed once instead of twice: the numbers agree to fp32 rounding."""
    x, kwargs = _case(case)
    fused = run_fused(x, **kwargs)
    unfused = run_unfused(x, lambda h, w, t, temp: linear_logprob_entropy(h, w, t, temp), ppo_loss, **kwargs)
    assert_close("loss", fused[0], unfused[0], atol=1e-7, rtol=1e-6)
    for name in METRICS:
        assert_close(name, fused[1][name], unfused[1][name], atol=1e-7, rtol=1e-6)
    assert fused[2].dtype == x["hidden"].dtype and fused[3].dtype == x["weight"].dtype
    assert_close("grad_hidden", fused[2], unfused[2], atol=1e-6, rtol=1e-5)
    assert_close("grad_weight", fused[3], unfused[3], atol=1e-6, rtol=1e-5)
    assert float(fused[1]["entropy"]) > 0.0, "the entropy metric is computed"


@pytest.mark.parametrize("case", ["defaults", "all_options"])
def test_fused_matches_float64_reference(backend, case):
    x, kwargs = _case(case)
    got = run_fused(x, **kwargs)
    ref = run_unfused(x, linear_logprob_entropy_ref, ppo_loss_ref, **kwargs)
    truth = run_unfused(x, linear_logprob_entropy_ref, ppo_loss_ref, cast=torch.float64, **kwargs)
    assert_close_3way("loss", got[0], ref[0], truth[0], atol=1e-6)
    for name in METRICS:
        assert_close_3way(name, got[1][name], ref[1][name], truth[1][name], atol=1e-6)
    assert_close_3way("grad_hidden", got[2], ref[2], truth[2], factor=3.0, atol=1e-6)
    assert_close_3way("grad_weight", got[3], ref[3], truth[3], factor=3.0, atol=1e-6)
    ignored = x["targets"] == -100
    assert bool((got[2][ignored] == 0).all()), "ignored rows get no gradient"


def test_without_entropy(backend):
    x, _ = _case("defaults")
    loss, metrics, gh, _ = run_fused(x, with_entropy=False)
    ref = run_unfused(x, linear_logprob_entropy_ref, ppo_loss_ref)
    assert float(metrics["entropy"]) == 0.0
    assert_close("loss", loss, ref[0], atol=1e-6)
    assert_close("grad_hidden", gh, ref[2], atol=1e-6, rtol=1e-4)



@pytest.mark.parametrize("case", ["defaults", "all_options"])
def test_torch_compile(backend, case):
    """The fused policy loss traces with fullgraph=True (Triton path: the ovr::ppo_policy_loss_fwd custom op,
    whose backward scales the gradients its forward formed) and equals eager bit for bit."""
    torch._dynamo.reset()
    x, kwargs = _case(case)
    ppo_kw = _ppo_kwargs(x, kwargs)
    results = []
    for fn in (ppo_policy_loss_from_hidden,
               torch.compile(ppo_policy_loss_from_hidden, fullgraph=True, backend="aot_eager")):
        h, w = x["hidden"].clone().requires_grad_(), x["weight"].clone().requires_grad_()
        loss, metrics = fn(h, w, x["targets"], x["old_logprobs"], x["advantages"], x["mask"],
                           temperature=kwargs.get("temperature", 1.0), **ppo_kw)
        results.append((loss, metrics, *torch.autograd.grad(loss, [h, w])))
    (loss_e, metrics_e, gh_e, gw_e), (loss_c, metrics_c, gh_c, gw_c) = results
    assert torch.equal(loss_e, loss_c) and torch.equal(gh_e, gh_c) and torch.equal(gw_e, gw_c)
    for name in METRICS:
        assert torch.equal(metrics_e[name], metrics_c[name]), name


def test_opcheck(monkeypatch):
    """torch.library.opcheck: schema, fake and autograd registrations of ovr::ppo_policy_loss_fwd (the Triton path's
    op) are consistent."""
    monkeypatch.setenv("OVR_BACKEND", "triton")
    x, _ = _case("all_options")
    h, w = x["hidden"].requires_grad_(), x["weight"].requires_grad_()
    cu_seqlens = torch.tensor([0, 1, 40, 40, 97], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(torch.ops.ovr.ppo_policy_loss_fwd.default,
                          (h, w, x["targets"], x["old_logprobs"], x["advantages"], x["mask"], x["ref_logprobs"],
                           cu_seqlens, None, 50.0, 0.7, -100, True, 0.2, 0.28, 2.0, 0.05, "k3", 0.01))
    torch.library.opcheck(torch.ops.ovr.ppo_policy_loss_fwd.default,
                          (h, w, x["targets"], x["old_logprobs"], x["advantages"], x["mask"], None, None,
                           torch.tensor(9.0, device=DEVICE), None, 1.0, -100, False, 0.2, 0.2, None, 0.0, "k3", 0.0))

def _bad_call(name, requires_grad):
    T, H, V = 6, 8, 10
    h, w = torch.randn(T, H, requires_grad=requires_grad), torch.randn(V, H, requires_grad=requires_grad)
    t, old, adv, m = torch.randint(0, V, (T,)), torch.randn(T), torch.randn(T), torch.ones(T, dtype=torch.bool)
    kw = {}
    if name == "hidden_1d":
        h = torch.randn(T * H)
    elif name == "old_length":
        old = torch.randn(T + 1)
        adv = torch.randn(T + 1)
        m = torch.ones(T + 1, dtype=torch.bool)
    elif name == "target_range":
        t[2] = V
    elif name == "weight_dtype":
        w = w.double()
    else:
        kw = {"entropy_no_entropy": {"entropy_coef": 0.1, "with_entropy": False},
              "temperature": {"temperature": 0.0}, "clip": {"clip_low": 1.5},
              "kl_no_ref": {"kl_coef": 0.1}}[name]
    h, w, t, old, adv, m = (v.detach().to(DEVICE).requires_grad_(requires_grad and v.is_floating_point()
                                                                 and v.dim() == 2) for v in (h, w, t, old, adv, m))
    return lambda: ppo_policy_loss_from_hidden(h, w, t, old, adv, m, **kw)


@pytest.mark.parametrize("name, match", [
    ("hidden_1d", "hidden must have 2 dims"), ("old_length", "old_logprobs has shape"),
    ("target_range", r"targets\[2\]=10 is outside \[0, 10\)"), ("weight_dtype", "weight must have dtype"),
    ("entropy_no_entropy", "entropy_coef=0.1 needs with_entropy=True"), ("temperature", "temperature must be > 0"),
    ("clip", r"clip_low must be in \[0, 1\)"), ("kl_no_ref", "kl_coef=0.1 needs ref_logprobs"),
])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
def test_bad_inputs_raise(backend, monkeypatch, name, match, requires_grad):
    """Both the gradient path and the no-gradient path validate their inputs. Target values are read on CPU
    tensors only, or on CUDA under the OVR_CHECK_TARGETS=1 debug switch (the check is a host sync)."""
    if name == "target_range" and DEVICE == "cuda":
        monkeypatch.setenv("OVR_CHECK_TARGETS", "1")
    with pytest.raises(ValueError, match=match):
        _bad_call(name, requires_grad)()


@pytest.mark.parametrize("case", ["all_options", "bf16_global"])
def test_fused_token_chunks(triton_backend, monkeypatch, case):
    """The Triton path over 8-token chunks (dweight summed over 13 / 10 chunks in fp32, chunk edges inside the
    sequences of the sequence mean) equals the unfused composition and the float64 reference."""
    import ovr_kernels.policy_loss as pl

    x, kwargs = _case(case)
    elt = x["hidden"].element_size()
    monkeypatch.setattr(pl, "POLICY_SCRATCH_BYTES", 8 * x["weight"].shape[0] * (4 + elt))
    got = run_fused(x, **kwargs)
    unfused = run_unfused(x, lambda h, w, t, temp: linear_logprob_entropy(h, w, t, temp), ppo_loss, **kwargs)
    truth = run_unfused(x, linear_logprob_entropy_ref, ppo_loss_ref, cast=torch.float64, **kwargs)
    tol = {"atol": 1e-6, "rtol": 1e-5} if x["hidden"].dtype == torch.float32 else {"atol": 2e-3, "rtol": 1e-2}
    assert_close("loss", got[0], unfused[0], atol=1e-6, rtol=1e-5)
    assert_close("grad_hidden", got[2], unfused[2], **tol)
    assert_close("grad_weight", got[3], unfused[3], **tol)
    assert_close_3way("grad_weight (vs float64)", got[3], unfused[3], truth[3], factor=3.0, atol=1e-6)


def test_fused_scales_by_grad_out_and_skips_gradients_without_grad(triton_backend):
    """The forward's gradients are for grad_out = 1: a loss scaled by 3 gets 3x the gradients. Without grad mode
    (or with no input requiring grad) the loss and metrics are the same and no gradient is formed."""
    x, kwargs = _case("all_options")
    ppo_kw = _ppo_kwargs(x, kwargs)
    h, w = x["hidden"].clone().requires_grad_(), x["weight"].clone().requires_grad_()
    loss, metrics = ppo_policy_loss_from_hidden(h, w, x["targets"], x["old_logprobs"], x["advantages"], x["mask"],
                                                temperature=0.7, **ppo_kw)
    gh, gw = torch.autograd.grad(loss, [h, w])
    loss3, _ = ppo_policy_loss_from_hidden(h, w, x["targets"], x["old_logprobs"], x["advantages"], x["mask"],
                                           temperature=0.7, **ppo_kw)
    gh3, gw3 = torch.autograd.grad(3.0 * loss3, [h, w])
    assert_close("grad_hidden x3", gh3, 3.0 * gh, atol=1e-7, rtol=1e-6)
    assert_close("grad_weight x3", gw3, 3.0 * gw, atol=1e-7, rtol=1e-6)
    with torch.no_grad():
        loss_ng, metrics_ng = ppo_policy_loss_from_hidden(h, w, x["targets"], x["old_logprobs"], x["advantages"],
                                                          x["mask"], temperature=0.7, **ppo_kw)
    assert not loss_ng.requires_grad
    assert_close("loss (no grad)", loss_ng, loss.detach(), atol=1e-6, rtol=1e-6)
    for name in METRICS:
        assert_close(name, metrics_ng[name], metrics[name], atol=1e-6, rtol=1e-6)


def test_empty_tokens(backend):
    h = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(31, 16, device=DEVICE, requires_grad=True)
    empty = torch.zeros(0, device=DEVICE)
    loss, _ = ppo_policy_loss_from_hidden(h, w, torch.zeros(0, dtype=torch.int64, device=DEVICE), empty, empty,
                                          torch.zeros(0, dtype=torch.bool, device=DEVICE))
    gh, gw = torch.autograd.grad(loss, [h, w])
    assert float(loss.detach()) == 0.0 and gh.shape == (0, 16) and bool((gw == 0).all())
