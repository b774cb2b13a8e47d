"""linear_logprob_entropy and the fused policy loss on a GPU at the Qwen2.5-VL-7B head (H = 3584, V = 152,064), bf16,
vs a float32 reference computed over token chunks (checkpointed: one chunk's (1024, V) logits live at a time).
Skips without CUDA.

T = 16384 puts T * V past 2^31, so rows near the end index the flat logit space above int32 range: the forward is
checked on every row and against a same-dtype (bf16 logits) reference on a row subset that includes the last rows.
"""


import bench_linear_logprob as bll  # benchmarks/ is on pytest's pythonpath (pyproject.toml)
import bench_ppo_loss as bppo  # benchmarks/ is on pytest's pythonpath (pyproject.toml)
import pytest
import torch
from conftest import assert_close_3way, max_err
from torch.utils.checkpoint import checkpoint

from ovr_kernels import linear_logprob_entropy, linear_logprob_nograd, ppo_loss, ppo_policy_loss_from_hidden
from ovr_kernels.ppo_loss import LOG_RATIO_CLAMP
from ovr_kernels.reference import linear_logprob_entropy_ref, ppo_loss_ref

pytestmark = pytest.mark.gpu

CHUNK = 1024
BIG_T = 16384
SUBSET = 256  # rows at each end of the batch for the same-dtype comparison


@pytest.fixture(autouse=True)
def _no_tf32():
    """The float32 reference must be float32: no TF32 matmuls."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def chunked_fp32_logprob_entropy(hidden, weight, targets, temperature=1.0):
    """(logprob, entropy) of `linear_logprob_entropy_ref` on float32 copies, differentiable, in bounded memory."""
    outs = [checkpoint(linear_logprob_entropy_ref, hidden[i:i + CHUNK], weight, targets[i:i + CHUNK], temperature,
                       use_reentrant=False) for i in range(0, hidden.shape[0], CHUNK)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def _grad_close(name, got, truth, rel=1e-2):
    """bf16 gradients (rounded dz tiles, bf16 output): max error within 1% of the tensor's largest entry."""
    scale = float(truth.abs().max())
    err = max_err(got, truth)
    assert scale > 0 and err <= rel * scale, f"{name}: max abs err {err:.3e} > {rel} * max |truth| {scale:.3e}"


def test_linear_logprob_16k_tokens_qwen_head():
    hidden, weight, targets = bll.make_inputs(BIG_T, bll.HIDDEN, bll.VOCAB, "cuda", torch.bfloat16)
    assert (BIG_T - SUBSET) * bll.VOCAB > 2**31
    g_lp = torch.randn(BIG_T, device="cuda")
    g_ent = torch.randn(BIG_T, device="cuda")
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logprob, entropy = linear_logprob_entropy(h, w, targets)
    gh, gw = torch.autograd.grad((logprob * g_lp).sum() + (entropy * g_ent).sum(), (h, w))
    assert logprob.dtype == entropy.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16

    h32, w32 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    t_lp, t_ent = chunked_fp32_logprob_entropy(h32, w32, targets)
    t_gh, t_gw = torch.autograd.grad((t_lp * g_lp).sum() + (t_ent * g_ent).sum(), (h32, w32))

    rows = torch.cat([torch.arange(SUBSET), torch.arange(BIG_T - SUBSET, BIG_T)]).cuda()
    r_lp, r_ent = linear_logprob_entropy_ref(hidden[rows], weight, targets[rows])  # bf16 logits
    for name, got, ref, truth in (("logprob", logprob, r_lp, t_lp), ("entropy", entropy, r_ent, t_ent)):
        assert_close_3way(f"{name} (row subset)", got[rows], ref, truth[rows], factor=2.0, atol=1e-3)
        # every row: within the bound the subset's same-dtype reference sets
        bound = 2.0 * max_err(ref, truth[rows]) + 1e-3
        assert max_err(got, truth) <= bound, f"{name}: err {max_err(got, truth):.3e} over all rows > {bound:.3e}"
    ignored = targets == -100
    assert bool((logprob[ignored] == 0).all() and (entropy[ignored] == 0).all() and (gh[ignored] == 0).all())
    _grad_close("grad_hidden", gh, t_gh)
    _grad_close("grad_weight", gw, t_gw)


@pytest.mark.parametrize("all_options", [False, True], ids=["default", "all-options"])
def test_fused_policy_loss_qwen_head(all_options):
    """The benchmark's fused policy loss (T = 4096): loss, metrics and both gradients vs float32 log-probs fed to
    the float64 PPO reference, and vs the unfused kernels (`linear_logprob_entropy` -> `ppo_loss`)."""
    x = bppo.make_policy_inputs(bppo.POLICY_TOKENS, bppo.HIDDEN, bppo.VOCAB, "cuda", torch.bfloat16)
    T = x["hidden"].shape[0]
    opts, ref_opts = {}, {}
    if all_options:
        g = torch.Generator(device="cpu").manual_seed(2)
        ref_logprobs = x["old_logprobs"] + 0.1 * torch.randn(T, generator=g).cuda()
        # sequence mean over five sequences, one of them a single token
        cu = torch.tensor([0, 5, T // 4, T // 4 + 1, 3 * T // 4, T], dtype=torch.int32, device="cuda")
        common = {"dual_clip": 3.0, "kl_coef": 0.05, "entropy_coef": 0.01, "cu_seqlens": cu}
        opts = dict(common, ref_logprobs=ref_logprobs)
        ref_opts = dict(common, ref_logprobs_T=ref_logprobs.double())

    h, w = x["hidden"].detach().clone().requires_grad_(), x["weight"].detach().clone().requires_grad_()
    loss, metrics = ppo_policy_loss_from_hidden(h, w, x["targets"], x["old_logprobs"], x["advantages"], x["mask"],
                                                **opts)
    gh, gw = torch.autograd.grad(loss, (h, w))

    hu, wu = x["hidden"].detach().clone().requires_grad_(), x["weight"].detach().clone().requires_grad_()
    lp, ent = linear_logprob_entropy(hu, wu, x["targets"])
    u_loss, u_metrics = ppo_loss(lp, x["old_logprobs"], x["advantages"], x["mask"], entropy=ent, **opts)
    u_gh, u_gw = torch.autograd.grad(u_loss, (hu, wu))

    h32, w32 = x["hidden"].float().requires_grad_(), x["weight"].float().requires_grad_()
    t_lp, t_ent = chunked_fp32_logprob_entropy(h32, w32, x["targets"])
    t_loss, t_metrics = ppo_loss_ref(t_lp.double(), x["old_logprobs"].double(), x["advantages"].double(), x["mask"],
                                     entropy_T=t_ent.double(), log_ratio_clamp=LOG_RATIO_CLAMP, **ref_opts)
    t_gh, t_gw = torch.autograd.grad(t_loss, (h32, w32))

    scale = float(t_loss.abs()) + 1e-3
    assert abs(float(loss) - float(t_loss)) <= 1e-3 * scale, f"loss {float(loss)} vs truth {float(t_loss)}"
    assert abs(float(loss) - float(u_loss)) <= 1e-4 * scale, f"fused {float(loss)} vs unfused {float(u_loss)}"
    for name, value in metrics.items():
        # clip fractions count tokens on either side of a threshold: bf16-level log-prob noise may move a few
        tol = 2e-3 if name.endswith("_frac") else 1e-3 * (abs(float(t_metrics[name])) + 1e-3)
        assert abs(float(value) - float(t_metrics[name])) <= tol, f"{name}: {float(value)} vs {float(t_metrics[name])}"
        assert abs(float(value) - float(u_metrics[name])) <= tol, f"{name}: fused vs unfused"
    for name, got, unfused, truth in (("grad_hidden", gh, u_gh, t_gh), ("grad_weight", gw, u_gw, t_gw)):
        _grad_close(name, got, truth)
        _grad_close(f"{name} vs unfused", got, unfused.float())


def test_no_host_sync(monkeypatch):
    """Forward, backward and forward-only scoring, and the fused policy loss with and without gradients, never
    wait for the GPU (torch's sync debug mode raises on any synchronising call); the OVR_CHECK_TARGETS=1 debug
    check does wait, which shows the probe can fail."""
    monkeypatch.delenv("OVR_CHECK_TARGETS", raising=False)
    x = bppo.make_policy_inputs(1000, 512, 151_665, "cuda", torch.bfloat16)
    hidden, weight, targets = x["hidden"], x["weight"], x["targets"]
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ppo_args = (x["old_logprobs"], x["advantages"], x["mask"])

    def run():
        logprob, entropy = linear_logprob_entropy(h, w, targets)
        (logprob.sum() + entropy.sum()).backward()
        linear_logprob_nograd(hidden, weight, targets, with_entropy=True)
        ppo_policy_loss_from_hidden(h, w, targets, *ppo_args, entropy_coef=0.01)[0].backward()
        with torch.no_grad():
            ppo_policy_loss_from_hidden(h, w, targets, *ppo_args)

    run()  # compiles the kernels outside the probe
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        run()
        monkeypatch.setenv("OVR_CHECK_TARGETS", "1")
        with pytest.raises(RuntimeError, match="synchroniz"):
            run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
