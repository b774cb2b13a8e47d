"""PPO losses: the 1M-token PPO loss fwd+bwd, the clipped value loss, advantages, and the fused policy loss.

GPU (skips without CUDA):
  ppo_loss 1M tokens fwd+bwd (fp32 per-token inputs, bool mask): ms, GB/s over the bytes the kernels must move,
    CUDA kernel launches per step (torch.profiler) for ours and for the eager reference composition
    (`reference.ppo_loss_ref` + autograd), the reference's time in the same run; default (ORZ: clip only) and
    every option on (dual clip, KL k3, entropy term, sequence mean).
  value_loss 1M tokens fwd+bwd and masked_whiten / grpo_advantages at RL-step sizes, vs their references.
  fused policy loss at T = 4096, H = 3584, V = 152,064 (Qwen2.5-VL-7B head), bf16: `ppo_policy_loss_from_hidden`
    fwd+bwd (gradients formed in the forward from cuBLAS logits: three GEMMs) vs the unfused
    `linear_logprob_entropy` -> `ppo_loss` (two autograd nodes, the backward recomputes the logits: four GEMMs) and
    vs the eager reference composition (full (T, V) logits): time and peak memory above the inputs.
CPU: the policy loss on a small head (T = 512, H = 128, V = 32,768, fp32): the PyTorch path (token-chunked
  log-prob + reference PPO loss) vs the eager reference with full logits: time and peak RSS growth.
"""

import pytest
import torch
from bench_linear_logprob import make_inputs as lm_head_inputs  # benchmarks/ is on sys.path (no __init__.py)
from torch.profiler import ProfilerActivity, profile

from ovr_kernels.advantages import grpo_advantages, masked_whiten
from ovr_kernels.linear_logprob import linear_logprob_entropy
from ovr_kernels.policy_loss import ppo_policy_loss_from_hidden
from ovr_kernels.ppo_loss import ppo_loss
from ovr_kernels.reference import (
    grpo_advantages_ref,
    linear_logprob_entropy_ref,
    masked_whiten_ref,
    ppo_loss_ref,
    value_loss_ref,
)
from ovr_kernels.value_loss import value_loss

NUM_TOKENS = 1 << 20
HIDDEN, VOCAB, POLICY_TOKENS = 3584, 152_064, 4096


def make_token_inputs(T, device, num_seqs=256):
    """Per-token PPO inputs of T tokens in num_seqs sequences (random lengths), ~10% masked out."""
    g = torch.Generator(device="cpu").manual_seed(0)
    logp = -(torch.randn(T, generator=g).abs() * 1.5)
    cuts = torch.sort(torch.randperm(T - 1, generator=g)[:num_seqs - 1] + 1).values
    cu = torch.cat([torch.tensor([0]), cuts, torch.tensor([T])]).to(torch.int32)
    x = {"logprobs": logp, "old_logprobs": logp + 0.3 * torch.randn(T, generator=g),
         "advantages": torch.randn(T, generator=g), "ref_logprobs": logp + 0.1 * torch.randn(T, generator=g),
         "entropy": torch.rand(T, generator=g) * 3, "mask": torch.rand(T, generator=g) > 0.1, "cu_seqlens": cu}
    return {k: v.to(device) for k, v in x.items()}


def ppo_step(fn, x, all_options):
    """One fwd+bwd of a PPO loss implementation (ours or the reference, which name per-token args with _T)."""
    logp = x["logprobs"].detach().requires_grad_()
    ent = x["entropy"].detach().requires_grad_()
    extra = {}
    if all_options:
        ref_key, ent_key = ("ref_logprobs_T", "entropy_T") if fn is ppo_loss_ref else ("ref_logprobs", "entropy")
        extra = {ref_key: x["ref_logprobs"], ent_key: ent, "kl_coef": 0.05, "entropy_coef": 0.01, "dual_clip": 3.0,
                 "cu_seqlens": x["cu_seqlens"]}
    loss, metrics = fn(logp, x["old_logprobs"], x["advantages"], x["mask"], **extra)
    loss.backward()
    return loss, metrics


def count_cuda_launches(fn, *args):
    """Number of CUDA kernels one call of fn launches (after a warm-up call), from torch.profiler."""
    fn(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("all_options", [False, True], ids=["default", "all_options"])
def test_gpu_ppo_loss_1m(gpu_bench, all_options):
    x = make_token_inputs(NUM_TOKENS, "cuda")
    gpu_bench(ppo_step, ppo_loss, x, all_options, rounds=20, warmup_rounds=3)
    # fwd reads logp, old, adv (4 B each) + mask (1 B); bwd reads them again and writes the gradient; options add
    # ref log-probs (fwd+bwd) and entropy (fwd read, bwd gradient write)
    per_token = 2 * 13 + 4 + (2 * 4 + 4 + 4 if all_options else 0)
    gpu_bench.gbps(per_token * NUM_TOKENS)
    ref_s = gpu_bench.time_baseline("reference", ppo_step, ppo_loss_ref, x, all_options, rounds=10)
    gpu_bench.ratio_vs("reference", ref_s)
    gpu_bench.extra_info.update(
        shape=f"T={NUM_TOKENS} fp32, {x['cu_seqlens'].numel() - 1} sequences",
        mode="fwd+bwd " + ("(dual clip, KL k3, entropy, sequence mean)" if all_options else "(clip only)"),
        launches=count_cuda_launches(ppo_step, ppo_loss, x, all_options),
        reference_launches=count_cuda_launches(ppo_step, ppo_loss_ref, x, all_options))


def value_step(fn, x):
    v = x["logprobs"].detach().requires_grad_()
    loss, metrics = fn(v, x["old_logprobs"], x["advantages"], x["mask"], 0.2)
    loss.backward()
    return loss, metrics


@pytest.mark.gpu
def test_gpu_value_loss_1m(gpu_bench):
    x = make_token_inputs(NUM_TOKENS, "cuda")
    gpu_bench(value_step, value_loss, x, rounds=20, warmup_rounds=3)
    gpu_bench.gbps((2 * 13 + 4) * NUM_TOKENS)
    gpu_bench.ratio_vs("reference", gpu_bench.time_baseline("reference", value_step, value_loss_ref, x, rounds=10))
    gpu_bench.extra_info.update(shape=f"T={NUM_TOKENS} fp32", mode="fwd+bwd, clip 0.2",
                                launches=count_cuda_launches(value_step, value_loss, x),
                                reference_launches=count_cuda_launches(value_step, value_loss_ref, x))


@pytest.mark.gpu
def test_gpu_masked_whiten_1m(gpu_bench):
    x = make_token_inputs(NUM_TOKENS, "cuda")
    gpu_bench(masked_whiten, x["advantages"], x["mask"], rounds=20, warmup_rounds=3)
    gpu_bench.gbps((2 * 5 + 4) * NUM_TOKENS)  # two passes over x (4 B) + mask (1 B), one 4 B write
    gpu_bench.ratio_vs("reference", gpu_bench.time_baseline("reference", masked_whiten_ref, x["advantages"],
                                                            x["mask"], rounds=10))
    gpu_bench.extra_info.update(shape=f"T={NUM_TOKENS} fp32", mode="partials + combine-and-write, two launches",
                                launches=count_cuda_launches(masked_whiten, x["advantages"], x["mask"]),
                                reference_launches=count_cuda_launches(masked_whiten_ref, x["advantages"], x["mask"]))


@pytest.mark.gpu
def test_gpu_grpo_advantages(gpu_bench):
    scores = torch.rand(512 * 16, device="cuda")
    gpu_bench(grpo_advantages, scores, 16, rounds=20, warmup_rounds=3)
    gpu_bench.ratio_vs("reference", gpu_bench.time_baseline("reference", grpo_advantages_ref, scores, 16, rounds=10))
    gpu_bench.extra_info.update(shape="512 groups x 16 samples fp32")


def make_policy_inputs(T, H, V, device, dtype):
    """The linear log-prob benchmark's (hidden, weight, targets) plus rollout-time log-probs and advantages."""
    hidden, weight, targets = lm_head_inputs(T, H, V, device, dtype)
    g = torch.Generator(device="cpu").manual_seed(1)
    old = -(torch.rand(T, generator=g) * 8)  # ratios spread over the clip range
    return {"hidden": hidden, "weight": weight, "targets": targets, "old_logprobs": old.to(device),
            "advantages": torch.randn(T, generator=g).to(device), "mask": targets != -100}


def policy_step(kind, x):
    """fwd+bwd of the policy loss from hidden states: fused node, unfused ops, or the eager reference."""
    h = x["hidden"].detach().requires_grad_()
    w = x["weight"].detach().requires_grad_()
    if kind == "fused":
        loss, _ = ppo_policy_loss_from_hidden(h, w, x["targets"], x["old_logprobs"], x["advantages"], x["mask"])
    else:
        logprob_fn = linear_logprob_entropy if kind == "unfused" else linear_logprob_entropy_ref
        loss_fn = ppo_loss if kind == "unfused" else ppo_loss_ref
        logp, ent = logprob_fn(h, w, x["targets"])
        ent_kw = {"entropy": ent} if kind == "unfused" else {"entropy_T": ent}
        loss, _ = loss_fn(logp, x["old_logprobs"], x["advantages"], x["mask"], **ent_kw)
    loss.backward()
    return loss


@pytest.mark.gpu
def test_gpu_fused_policy_loss(gpu_bench):
    x = make_policy_inputs(POLICY_TOKENS, HIDDEN, VOCAB, "cuda", torch.bfloat16)
    gpu_bench(policy_step, "fused", x, rounds=10, warmup_rounds=3)
    gpu_bench.tflops(6 * POLICY_TOKENS * HIDDEN * VOCAB)  # logits + the two gradient GEMMs
    gpu_bench.extra_info.update(shape=f"T={POLICY_TOKENS} H={HIDDEN} V={VOCAB} bf16", mode="fwd+bwd, entropy metric",
                                fused_peak_extra_mib=gpu_bench.peak_extra_mib(policy_step, "fused", x))
    for kind in ("unfused", "eager"):
        try:
            seconds = gpu_bench.time_baseline(kind, policy_step, kind, x, rounds=5)
        except torch.cuda.OutOfMemoryError:
            gpu_bench.extra_info[f"{kind}_oom"] = True
            continue
        gpu_bench.ratio_vs(kind, seconds)
        gpu_bench.extra_info[f"{kind}_peak_extra_mib"] = gpu_bench.peak_extra_mib(policy_step, kind, x)


@pytest.mark.parametrize("kind", ["fused", "eager"])
def test_cpu_policy_loss_small(cpu_bench, kind):
    """CPU: ours (token-chunked PyTorch log-prob + reference PPO loss) vs eager full-logit reference."""
    x = make_policy_inputs(512, 128, 32_768, "cpu", torch.float32)
    cpu_bench(policy_step, kind, x, rounds=3, warmup_rounds=1)
    cpu_bench.extra_info.update(shape="T=512 H=128 V=32768 fp32", mode="fwd+bwd")
