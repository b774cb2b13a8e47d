"""PPO loss, value loss, group advantages, masked whitening and GAE on a GPU at the benchmark sizes (1M tokens,
512 groups x 16, 512 x 4096 GAE tokens): compiled kernels vs the float32 reference vs a float64 truth, forward and
every gradient. Skips without CUDA."""

import importlib

import bench_gae as bgae  # benchmarks/ is on pytest's pythonpath (pyproject.toml)
import bench_ppo_loss as bppo  # benchmarks/ is on pytest's pythonpath (pyproject.toml)
import pytest
import torch
from conftest import assert_close_3way

from ovr_kernels import (
    _ext,
    drgrpo_advantages,
    gae,
    grpo_advantages,
    masked_whiten,
    ppo_loss,
    rloo_advantages,
    value_loss,
)
from ovr_kernels.reference import (
    drgrpo_advantages_ref,
    grpo_advantages_ref,
    masked_whiten_ref,
    ppo_loss_ref,
    rloo_advantages_ref,
    value_loss_ref,
)

gae_module = importlib.import_module("ovr_kernels.gae")

pytestmark = pytest.mark.gpu


def _atol(truth, rel=1e-6):
    return rel * (float(truth.abs().max()) + 1e-12)


def _loss_and_grads(fn, x, dtype, all_options, kind):
    """(loss, metrics, grads) of one fwd+bwd; inputs cast to dtype (the reference names per-token args with _T)."""
    xs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in x.items()}
    logp = xs["logprobs"].detach().requires_grad_()
    ent = xs["entropy"].detach().requires_grad_()
    ref = fn is not ppo_loss and fn is not value_loss
    if kind == "value":
        loss, metrics = fn(logp, xs["old_logprobs"], xs["advantages"], xs["mask"], 0.2)
        return loss, metrics, torch.autograd.grad(loss, (logp,))
    extra = {}
    if all_options:
        extra = {("ref_logprobs_T" if ref else "ref_logprobs"): xs["ref_logprobs"],
                 ("entropy_T" if ref else "entropy"): ent, "kl_coef": 0.05, "entropy_coef": 0.01, "dual_clip": 3.0,
                 "cu_seqlens": xs["cu_seqlens"]}
    loss, metrics = fn(logp, xs["old_logprobs"], xs["advantages"], xs["mask"], **extra)
    return loss, metrics, torch.autograd.grad(loss, (logp, ent) if all_options else (logp,))


@pytest.mark.parametrize("all_options", [False, True], ids=["default", "all-options"])
def test_ppo_loss_1m_tokens(all_options):
    x = bppo.make_token_inputs(bppo.NUM_TOKENS, "cuda")
    got = _loss_and_grads(ppo_loss, x, torch.float32, all_options, "ppo")
    ref = _loss_and_grads(ppo_loss_ref, x, torch.float32, all_options, "ppo")
    truth = _loss_and_grads(ppo_loss_ref, x, torch.float64, all_options, "ppo")
    assert got[0].is_cuda and got[0].dtype == torch.float32
    assert_close_3way("loss", got[0], ref[0], truth[0], factor=4.0, atol=_atol(truth[0], 1e-6))
    for name in truth[1]:
        assert_close_3way(name, got[1][name], ref[1][name], truth[1][name], factor=4.0, atol=_atol(truth[1][name]))
    for i, name in enumerate(("grad_logprobs", "grad_entropy")[:len(truth[2])]):
        assert_close_3way(name, got[2][i], ref[2][i], truth[2][i], factor=4.0, atol=_atol(truth[2][i]))


def test_value_loss_1m_tokens():
    x = bppo.make_token_inputs(bppo.NUM_TOKENS, "cuda")
    got = _loss_and_grads(value_loss, x, torch.float32, False, "value")
    ref = _loss_and_grads(value_loss_ref, x, torch.float32, False, "value")
    truth = _loss_and_grads(value_loss_ref, x, torch.float64, False, "value")
    assert_close_3way("loss", got[0], ref[0], truth[0], factor=4.0, atol=_atol(truth[0]))
    for name in truth[1]:
        assert_close_3way(name, got[1][name], ref[1][name], truth[1][name], factor=4.0, atol=_atol(truth[1][name]))
    assert_close_3way("grad_values", got[2][0], ref[2][0], truth[2][0], factor=4.0, atol=_atol(truth[2][0]))


@pytest.mark.parametrize("op, ref_op", [(grpo_advantages, grpo_advantages_ref), (rloo_advantages, rloo_advantages_ref),
                                        (drgrpo_advantages, drgrpo_advantages_ref)], ids=["grpo", "rloo", "drgrpo"])
def test_group_advantages_rl_step(op, ref_op):
    scores = torch.rand(512 * 16, device="cuda")
    scores[:16] = 1.0  # a constant group: zero advantages, finite
    got = op(scores, 16)
    assert got.is_cuda and bool(torch.isfinite(got).all())
    assert_close_3way(op.__name__, got, ref_op(scores, 16), ref_op(scores.double(), 16), atol=1e-6)


def test_masked_whiten_1m_tokens():
    x = bppo.make_token_inputs(bppo.NUM_TOKENS, "cuda")
    got = masked_whiten(x["advantages"], x["mask"])
    ref = masked_whiten_ref(x["advantages"], x["mask"])
    truth = masked_whiten_ref(x["advantages"].double(), x["mask"])
    assert_close_3way("masked_whiten", got, ref, truth, factor=4.0, atol=1e-5)
    assert bool((got[~x["mask"]] == 0).all())


def test_gae_benchmark_size():
    """512 x 4096 tokens through the CUDA op (fp32 scan) vs the float64 vectorised torch path, which equals the
    per-token reference exactly (tests/kernels/test_gae.py)."""
    if not _ext.HAS_CUDA_EXT:
        pytest.skip("ovr_kernels._C built without nvcc: no CUDA GAE op to check")
    r, v, cu = bgae._inputs("cuda")
    adv, ret = gae(r, v, cu, bgae.GAMMA, bgae.LAM)
    assert adv.is_cuda and adv.dtype == torch.float32
    t_adv, t_ret = gae_module._gae_torch(r.double(), v.double(), cu, bgae.GAMMA, bgae.LAM)
    for name, got, truth in (("advantages", adv, t_adv), ("returns", ret, t_ret)):
        err = float((got.double() - truth).abs().max())
        # fp32 recurrence over 4096 steps of a geometric (gamma * lam < 1) sum: a few ulps of the scale
        assert err <= 1e-5 * (float(truth.abs().max()) + 1.0), f"{name}: max abs err {err:.3e}"
