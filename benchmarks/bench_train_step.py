"""Whole training steps: one SFT step and one RL update (policy + critic), tiny config on CPU and GPU, and a
Qwen2.5-VL-1.5B-shaped config on GPU. Derived units: tokens/s, achieved TFLOP/s, MFU (GPU), peak memory; every
baseline is timed in the same run on the same model and data.

Legend: T tokens of a micro-batch, V vocabulary, H hidden size. "Step" = forward + backward over every micro-batch
of a global batch + the optimizer step (AdamW, gradient clipping), as `sft.py` / `rl.py` run it on one rank.

CPU (tiny default config, fp32, `configs/tiny.yaml` numbers; sized to run in well under a minute):
1. `test_sft_step_packed_vs_padded`: 32 sequences with skewed lengths (80% 16-48 tokens, 20% 200-256: chat data's
   long tail). Packed (the measured op): ovr varlen attention, 4096-token micro-batches. Baseline "padded": sdpa,
   micro-batches of 8 sequences in data order, each padded to its longest (same model, attention switched). Both
   compute the same loss (tests/train/test_model.py).
2. `test_fused_head_peak_memory`: T=1024, H=256, V=32768 forward + backward. Each variant runs in a fresh
   subprocess and reports its peak-RSS growth over the RSS after setup (VmHWM reset through /proc/self/clear_refs:
   an honest per-variant peak on CPU, which has no allocator stats). The eager head holds (T, V) fp32 logits,
   softmax and gradient, the fused one streams vocab tiles: the eager peak must exceed the fused one by the logits.
3. `test_rl_update_tiny_cpu`: one RL update without generation: 16 random "rollouts" (prompt 16-32 tokens,
   response 75% 8-48 / 25% 96-160 tokens, built with `rl.rollout_sequence`), old log-probs and old values from the
   policy and critic themselves (no grad, as rl.py computes them), a 0/1 score on each last token, GAE
   (gamma = lambda = 1) and whitened advantages. Measured: per packed micro-batch policy forward -> `ppo_loss` ->
   backward, AdamW step; then critic forward -> `value_loss` -> backward, AdamW step (rl.py's update with
   policy_updates_per_step = critic_updates_per_step = 1). Baseline "padded": the same update on padded sdpa
   micro-batches of 8 rollouts.

GPU (skip cleanly without CUDA; bf16 compute weights with fp32 AdamW master weights and states, as FSDP2's mixed
precision keeps them on one rank; liger kernels when installed, as the trainer):
4. `test_rl_update_tiny_gpu`: 3. on the GPU.
5. `test_sft_step_large`: `LARGE` (Qwen2.5-1.5B's LLM: H 1536, 28 layers, 12 heads / 2 KV heads, MLP 8960,
   V 151,936, tied embeddings; Qwen2.5-VL's ViT: depth 32, width 1280, frozen), random init. 32 sequences,
   80% 64-384 / 20% 1024-1536 tokens (~14k tokens), 4096-token packed micro-batches. Baselines on the same model:
   "padded" (sdpa, 4 rows per micro-batch), "sdpa_packed" (the same packed micro-batches, attention by sdpa with
   transformers' block-diagonal mask from the position ids), "eager_head" (packed, ovr attention, head = full
   (T, V) logits + fp32 log_softmax + gather instead of the fused log-prob head).
6. `test_rl_update_large`: 3. with `LARGE` policy and critic (~2.2B parameters each; the critic's LM head, tied to
   its embedding, is frozen as in rl.py), 16 rollouts (prompt 64-256, response 75% 32-512 / 25% 1024-2048 tokens).
   Baseline "padded" (sdpa, 4 rows per micro-batch).
Memory of 6. on one GPU: bf16 weights 2 B/param + fp32 master 4 B + AdamW 8 B per trainable param, x 2 models,
~46 GB before activations (arithmetic, not yet measured): sized for an 80 GB H100 at 4096-token micro-batches.

Units in extra_info: tokens_per_s (real tokens: prompt + response for RL, each seen by both models), tflops =
model FLOPs (`ovr_train.model.flops_per_token` per sequence length: 6 x matmul params + causal attention, no ViT;
the critic without the LM head) / median, mfu = tflops / PEAK_BF16_TFLOPS of the device (GPU only), peak_mib
(CUDA max_memory_allocated: weights + optimizer + activations; CPU: peak-RSS growth), `<baseline>_*` the same for
each baseline and speedup_vs_<baseline> = baseline median / ours.
"""

import contextlib
import gc
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ovr_kernels import gae, ppo_loss, value_loss
from ovr_kernels.hf import ATTN_NAME as OVR_ATTENTION
from ovr_kernels.hf import use_ovr_attention
from ovr_kernels.packing import token_budget_microbatches
from ovr_train.config import ModelCfg
from ovr_train.data import IGNORE, Encoded, collate
from ovr_train.model import build_model, flops_per_token

ROOT = Path(__file__).resolve().parent.parent
IDS = {"endoftext": 0, "im_start": 1, "im_end": 2, "vision_start": 9, "vision_end": 10, "image_pad": 12,
       "video_pad": 13}
VOCAB = 640  # the tiny default's BPE vocabulary, padded to 64
FIRST_ID = 22  # random token ids start above the special tokens

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from NVIDIA's datasheets: H100 SXM5 989.4 (1,979 is the 2:4
# sparse figure), H200 SXM the same chip and clocks (989.4), H100 NVL 835, H100 PCIe 756. Matched in this order
# against torch.cuda.get_device_name(); MFU is left out for any other device.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4))

# Qwen2.5-VL-shaped, 0.5B-3B class: Qwen2.5-1.5B's language model (1.54B params with the tied 151,936 x 1536
# embedding) + Qwen2.5-VL's ViT (depth 32, width 1280, 0.67B, frozen as in SFT stage 1 / RL). ModelCfg fields.
LARGE = {"hidden_size": 1536, "intermediate_size": 8960, "num_layers": 28, "num_heads": 12, "num_kv_heads": 2,
         "vocab_size": 151_936, "tie_word_embeddings": True, "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24],
         "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "vision_depth": 32, "vision_hidden_size": 1280,
         "vision_intermediate_size": 3420, "vision_num_heads": 16, "vision_window_size": 112,
         "vision_fullatt_blocks": [7, 15, 23, 31], "patch_size": 14, "spatial_merge_size": 2, "freeze_vision": True}
LARGE_BUDGET = 4096  # tokens per packed micro-batch (activations + the eager head's (T, V) logits fit beside 6.)


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def _length(g, short, long, long_frac):
    lo, hi = long if torch.rand((), generator=g) < long_frac else short
    return int(torch.randint(lo, hi + 1, (), generator=g))


def _skewed_samples(num=32, seed=0, vocab=VOCAB, short=(16, 48), long=(200, 256), long_frac=0.2) -> list:
    """SFT samples with skewed lengths (inclusive ranges); the first third of each carries no loss (the prompt)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        n = _length(g, short, long, long_frac)
        ids = torch.randint(FIRST_ID, vocab, (n,), generator=g)
        targets = torch.cat([ids[1:], torch.tensor([IGNORE])])
        targets[: n // 3] = IGNORE
        out.append(Encoded(ids, targets, torch.arange(n).expand(3, n).clone()))
    return out


def _rollouts(num=16, seed=1, vocab=VOCAB, prompt=(16, 32), short=(8, 48), long=(96, 160), long_frac=0.25) -> list:
    """Random text-only prompt + response sequences, encoded by the trainer's `rollout_sequence` (targets on the
    response tokens only, mRoPE ids of the whole sequence)."""
    from ovr_train.rl import rollout_sequence  # the RL module imports much of the trainer: only when needed

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        p = SimpleNamespace(token_ids=torch.randint(FIRST_ID, vocab, (_length(g, prompt, prompt, 0.0),),
                                                    generator=g).tolist(), pixel_values=None, image_grid_thw=None)
        response = torch.randint(FIRST_ID, vocab, (_length(g, short, long, long_frac),), generator=g).tolist()
        out.append(rollout_sequence(p, response, IDS, LARGE["spatial_merge_size"]))
    return out


def _packed(samples, budget, device) -> tuple:
    """(micro-batch plan: lists of sample indices, packed Batches on `device`) with token-budget micro-batches."""
    plan = token_budget_microbatches([s.length for s in samples], budget)
    return plan, [collate([samples[i] for i in mb], packing=True).to(device) for mb in plan]


def _padded(samples, rows, device) -> tuple:
    """(plan, padded Batches): `rows` sequences per micro-batch in data order, each padded to its longest."""
    plan = [list(range(i, min(i + rows, len(samples)))) for i in range(0, len(samples), rows)]
    return plan, [collate([samples[i] for i in mb], packing=False).to(device) for mb in plan]


def _padding_fraction(batches) -> float:
    return round(sum(b.input_ids.numel() - b.num_tokens for b in batches) / sum(b.input_ids.numel() for b in batches),
                 3)


# ----------------------------------------------------------------------------------------------------------------
# Models, optimizer, attention switch
# ----------------------------------------------------------------------------------------------------------------


def _model_cfg(base: dict | None = None, **overrides) -> ModelCfg:
    """ModelCfg from a field dict (None: the tiny default) with overrides (e.g. num_layers=1 for a CPU smoke run)."""
    return ModelCfg(**{**(base or {}), **overrides})


def _build(mcfg, vocab, device, dtype, value_head=False):
    """Seeded random-init OvrVLM, created directly on `device` (no host copy of a 2B model), weights cast to
    `dtype` (the compute dtype: bf16 on GPU as under FSDP2 mixed precision, fp32 on CPU), in train mode."""
    with torch.device(device):
        model = build_model(mcfg, IDS, vocab, value_head=value_head)
    return model.to(device=device, dtype=dtype).train()


class MasterAdamW:
    """AdamW (+ gradient-norm clipping) on fp32 master weights of a model whose weights may be bf16: the optimizer
    state is fp32 and the bf16 weights are refreshed from the masters after each step (what FSDP2 mixed precision
    does on one rank, without sharding). fp32 parameters are their own masters (the CPU runs)."""

    def __init__(self, model, lr, grad_clip=1.0):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().requires_grad_() for p in self.params]
        self.grad_clip = grad_clip
        self.opt = torch.optim.AdamW(self.masters, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, foreach=True)

    @torch.no_grad()
    def step(self):
        for p, m in zip(self.params, self.masters):
            if m is not p:  # fp32 copy of the gradient, then free the bf16 one (keeps the transient peak small)
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None
        torch.nn.utils.clip_grad_norm_(self.masters, self.grad_clip, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        for p, m in zip(self.params, self.masters):
            if m is not p:
                p.copy_(m)

    def zero_grad(self):
        for p in self.params:
            p.grad = None
        self.opt.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _attention(models, name):
    """Run `models` with attention `name` ("sdpa" or ovr's), then switch back to ovr's varlen attention."""
    for m in models:
        if name == OVR_ATTENTION:
            use_ovr_attention(m.hf)
        else:
            m.hf.set_attn_implementation(name)
    try:
        yield
    finally:
        for m in models:
            use_ovr_attention(m.hf)


def _inputs(model, batch) -> dict:
    """The batch's forward kwargs; a packed batch under sdpa passes no cu_seqlens: transformers then builds the
    block-diagonal causal mask from the per-sequence text position ids (same loss: checked in this file's smoke)."""
    inputs = batch.model_inputs()
    if batch.cu_seqlens is not None and model.hf.config._attn_implementation != OVR_ATTENTION:
        inputs.update(cu_seqlens=None, max_seqlen=0)
    return inputs


# ----------------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------------


def _token_logprobs(model, batch, head):
    """(T,) fp32 log p(target) (0 where target == -100): the fused head, or the eager head = full (T, V) logits in
    the compute dtype, fp32 log_softmax, gather (what an HF loss does; the baseline of the fused head)."""
    if head == "fused":
        return model(**_inputs(model, batch), targets=batch.targets).logprobs
    hidden_TH = model(**_inputs(model, batch)).hidden
    logp_TV = torch.log_softmax((hidden_TH @ model.hf.lm_head.weight.t()).float(), dim=-1)
    valid_T = batch.targets != IGNORE
    logp_T = logp_TV.gather(1, batch.targets.clamp_min(0)[:, None])[:, 0]
    return torch.where(valid_T, logp_T, torch.zeros_like(logp_T))


def _sft_step(model, batches, opt, head="fused"):
    """One SFT step: token-mean NLL over the global batch, backward per micro-batch, optimizer step."""
    total = sum(b.num_loss_tokens for b in batches)
    for b in batches:
        (-_token_logprobs(model, b, head).sum() / total).backward()
    opt.step()


@torch.no_grad()
def _rollout_targets(policy, critic, samples, plan, batches, seed=0) -> list:
    """Per sample (old log-probs, advantages, old values, returns) over its response tokens, computed as rl.py does
    (no grad, from the packed micro-batches): a random 0/1 score on the last response token, GAE with
    gamma = lambda = 1, advantages whitened over the batch."""
    old, values = [None] * len(samples), [None] * len(samples)
    for mb, b in zip(plan, batches):
        mask_T = b.targets != IGNORE
        lens = [samples[i].num_loss_tokens for i in mb]
        logp = policy(**_inputs(policy, b), targets=b.targets).logprobs[mask_T]
        vals = critic(**_inputs(critic, b)).values[mask_T]
        for i, lp, v in zip(mb, logp.split(lens), vals.split(lens)):
            old[i], values[i] = lp, v
    lens = [s.num_loss_tokens for s in samples]
    device = values[0].device
    cu = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
    g = torch.Generator().manual_seed(seed)
    reward_T = torch.zeros(sum(lens), device=device)
    reward_T[cu[1:].long() - 1] = (torch.rand(len(samples), generator=g) < 0.5).float().to(device)
    adv_T, ret_T = gae(reward_T, torch.cat(values), cu, 1.0, 1.0)
    adv_T = (adv_T - adv_T.mean()) / torch.sqrt(adv_T.var() + 1e-8)
    return list(zip(old, adv_T.split(lens), values, ret_T.split(lens)))


def _rl_micro(plan, batches, targets) -> list:
    """Per micro-batch (batch, response mask, old log-probs, advantages, old values, returns, token weights), the
    per-token tensors in the micro-batch's token order (samples in plan order, packed or padded rows)."""
    out = []
    for mb, b in zip(plan, batches):
        old, adv, val, ret = (torch.cat([targets[i][j] for i in mb]) for j in range(4))
        out.append((b, b.targets != IGNORE, old, adv, val, ret, torch.ones_like(old)))
    return out


def _rl_update(policy, critic, opt_policy, opt_critic, micro, norm):
    """One RL update without generation, as rl.py's (policy_updates_per_step = critic_updates_per_step = 1): per
    micro-batch policy forward -> PPO clipped loss -> backward, AdamW step; then per micro-batch critic forward ->
    clipped value loss -> backward, AdamW step. Losses are divided by the global number of response tokens."""
    for b, mask_T, old_T, adv_T, _, _, w_T in micro:
        out = policy(**_inputs(policy, b), targets=b.targets)
        loss, _ = ppo_loss(out.logprobs[mask_T], old_T, adv_T, w_T, clip_low=0.2, clip_high=0.2, normalizer=norm)
        loss.backward()
    opt_policy.step()
    for b, mask_T, _, _, val_T, ret_T, w_T in micro:
        values_T = critic(**_inputs(critic, b)).values[mask_T]
        vloss, _ = value_loss(values_T, val_T, ret_T, w_T, clip=0.2, normalizer=norm)
        vloss.backward()
    opt_critic.step()


# ----------------------------------------------------------------------------------------------------------------
# Units, baselines, memory
# ----------------------------------------------------------------------------------------------------------------


def _train_flops(model, lengths, lm_head=True) -> float:
    """Model FLOPs of fwd + bwd over sequences of these lengths (`flops_per_token` at each sequence's own length:
    causal attention grows with the length of the sequence, not of the pack); lm_head=False: the critic."""
    base = flops_per_token(model, 0)
    per_len = flops_per_token(model, 1) - base
    if not lm_head:
        base -= 6.0 * model.hf.lm_head.weight.numel()
    return float(sum(n * (base + per_len * n) for n in lengths))


def _peak_tflops(bench):
    if bench.device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def _record(bench, tokens, flops, name=None, seconds=None):
    """tokens_per_s, tflops and (known GPU) mfu of our median, or of a baseline's `seconds` under `<name>_`."""
    seconds = bench.median_s() if seconds is None else seconds
    if not seconds:
        return
    prefix = f"{name}_" if name else ""
    tflops = flops / seconds / 1e12
    bench.extra_info[f"{prefix}tokens_per_s"] = round(tokens / seconds, 1)
    bench.extra_info[f"{prefix}tflops"] = round(tflops, 4)
    peak = _peak_tflops(bench)
    if peak:
        bench.extra_info["mfu_peak_bf16_tflops"] = peak
        bench.extra_info[f"{prefix}mfu"] = round(tflops / peak, 4)


def _baseline(bench, name, fn, *args, rounds, warmup_rounds, on_oom=None):
    """Time a baseline in this run (bench.time_baseline), record its CUDA peak (`<name>_peak_mib`, weights and
    optimizer included, like our peak_mib) and speedup_vs_<name>. Returns its median seconds, or None when it ran
    out of memory (recorded as "oom"; `on_oom` then drops the gradients it left)."""
    cuda = bench.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        seconds = bench.time_baseline(name, fn, *args, rounds=rounds, warmup_rounds=warmup_rounds)
    except torch.OutOfMemoryError:
        bench.extra_info[f"{name}_peak_mib"] = "oom"
        if on_oom is not None:
            on_oom()
        _free()
        return None
    if cuda:
        bench.extra_info[f"{name}_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 2)
    bench.ratio_vs(name, seconds)
    return seconds


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _model_info(bench, model, dtype, budget):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    bench.extra_info.update(params=sum(p.numel() for p in model.parameters()), trainable_params=trainable,
                            compute_dtype=str(dtype).removeprefix("torch."), token_budget=budget,
                            layers=model.hf.config.text_config.num_hidden_layers,
                            hidden=model.hf.config.text_config.hidden_size)
    if bench.device == "cuda":
        bench.extra_info["weights_and_optimizer_mib"] = round(torch.cuda.memory_allocated() / 2**20, 1)


# ----------------------------------------------------------------------------------------------------------------
# Benchmark bodies (device-parametrised: the GPU configs can be smoke-run on CPU at a tiny depth)
# ----------------------------------------------------------------------------------------------------------------

SFT_BASELINES = {"padded": ("padded", "sdpa", "fused"), "sdpa_packed": ("packed", "sdpa", "fused"),
                 "eager_head": ("packed", OVR_ATTENTION, "eager")}


def bench_sft(bench, mcfg, vocab, samples, *, device, dtype, budget, pad_rows, baselines, rounds, base_rounds):
    """Measure `_sft_step` on packed micro-batches (ovr attention, fused head); time `baselines` (keys of
    SFT_BASELINES) on the same model. Returns {name: median seconds} (ours under "packed")."""
    model = _build(mcfg, vocab, device, dtype)
    opt = MasterAdamW(model, lr=1e-5)
    lengths = [s.length for s in samples]
    data = {"packed": _packed(samples, budget, device)[1], "padded": _padded(samples, pad_rows, device)[1]}
    real, flops = sum(lengths), _train_flops(model, lengths)
    warm = 1 if device == "cuda" else 0
    _sft_step(model, data["packed"], opt)  # untimed: allocates the AdamW state, compiles the kernels
    _model_info(bench, model, dtype, budget)
    bench(_sft_step, model, data["packed"], opt, rounds=rounds, warmup_rounds=warm)
    _record(bench, real, flops)
    bench.extra_info.update(tokens=real, sequences=len(samples), packed_micro_batches=len(data["packed"]),
                            padded_micro_batches=len(data["padded"]),
                            padded_fraction_of_compute=_padding_fraction(data["padded"]))
    times = {"packed": bench.median_s()}
    for name in baselines:
        layout, attn, head = SFT_BASELINES[name]
        with _attention([model], attn):
            times[name] = _baseline(bench, name, _sft_step, model, data[layout], opt, head, rounds=base_rounds,
                                    warmup_rounds=warm, on_oom=opt.zero_grad)
        if times[name]:
            _record(bench, real, flops, name, times[name])
    return times


def bench_rl(bench, mcfg, vocab, rollouts, *, device, dtype, budget, pad_rows, baselines, rounds, base_rounds):
    """Measure `_rl_update` on packed micro-batches; time "padded" (sdpa) on the same models when asked."""
    policy = _build(mcfg, vocab, device, dtype)
    critic = _build(mcfg, vocab, device, dtype, value_head=True)
    critic.hf.lm_head.requires_grad_(False)  # as rl.py: unused by the critic (tied: the embedding freezes too)
    opt_p, opt_c = MasterAdamW(policy, lr=1e-6), MasterAdamW(critic, lr=5e-6)
    plan, packed = _packed(rollouts, budget, device)
    targets = _rollout_targets(policy, critic, rollouts, plan, packed)
    micro = {"packed": _rl_micro(plan, packed, targets), "padded": _rl_micro(*_padded(rollouts, pad_rows, device),
                                                                              targets)}
    lengths = [s.length for s in rollouts]
    norm = float(sum(s.num_loss_tokens for s in rollouts))
    real = sum(lengths)
    flops = _train_flops(policy, lengths) + _train_flops(critic, lengths, lm_head=False)
    warm = 1 if device == "cuda" else 0
    _rl_update(policy, critic, opt_p, opt_c, micro["packed"], norm)  # untimed: optimizer state, kernel compiles
    _model_info(bench, policy, dtype, budget)
    bench(_rl_update, policy, critic, opt_p, opt_c, micro["packed"], norm, rounds=rounds, warmup_rounds=warm)
    _record(bench, real, flops)
    bench.rate("response_tokens_per_s", norm)
    bench.extra_info.update(tokens=real, response_tokens=int(norm), rollouts=len(rollouts),
                            packed_micro_batches=len(micro["packed"]), padded_micro_batches=len(micro["padded"]),
                            padded_fraction_of_compute=_padding_fraction([m[0] for m in micro["padded"]]))
    times = {"packed": bench.median_s()}
    if "padded" in baselines:
        with _attention([policy, critic], "sdpa"):
            times["padded"] = _baseline(bench, "padded", _rl_update, policy, critic, opt_p, opt_c, micro["padded"],
                                        norm, rounds=base_rounds, warmup_rounds=warm,
                                        on_oom=lambda: (opt_p.zero_grad(), opt_c.zero_grad()))
        if times["padded"]:
            _record(bench, real, flops, "padded", times["padded"])
    return times


def _print(what, times, tokens):
    parts = [f"{name} {tokens / s:.0f} tok/s" for name, s in times.items() if s]
    print(f"{what}: " + ", ".join(parts))


# ----------------------------------------------------------------------------------------------------------------
# CPU (tiny config)
# ----------------------------------------------------------------------------------------------------------------


def test_sft_step_packed_vs_padded(cpu_bench):
    torch.set_num_threads(2)
    samples = _skewed_samples()
    times = bench_sft(cpu_bench, _model_cfg(), VOCAB, samples, device="cpu", dtype=torch.float32, budget=4096,
                      pad_rows=8, baselines=("padded",), rounds=2, base_rounds=1)
    _print("tiny SFT step (CPU)", times, sum(s.length for s in samples))


_HEAD_SCRIPT = r"""
import json, sys, torch
from ovr_kernels import linear_logprob_entropy

def rss_kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))

torch.manual_seed(0)
T, H, V = (int(x) for x in sys.argv[2:5])
hidden = torch.randn(T, H, requires_grad=True)
weight = (torch.randn(V, H) * 0.02).requires_grad_()
targets = torch.randint(0, V, (T,))
try:  # reset the peak-RSS mark (VmHWM) to the current RSS: the imports' transient peak must not hide the head's
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
base = rss_kib("VmRSS")
if sys.argv[1] == "fused":
    logp, ent = linear_logprob_entropy(hidden, weight, targets)
else:
    logits = hidden @ weight.t()
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(1, targets[:, None])[:, 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)
(-(logp.sum()) + 0.01 * ent.sum()).backward()
peak = rss_kib("VmHWM")
print(json.dumps({"peak_growth_mib": (peak - base) / 1024, "peak_rss_mib": peak / 1024}))
"""
HEAD_T, HEAD_H, HEAD_V = 1024, 256, 32768


def _head_peak_mib(variant: str) -> dict:
    """{"peak_growth_mib": peak RSS growth while the head ran, "peak_rss_mib": the process's peak RSS}."""
    out = subprocess.run([sys.executable, "-c", _HEAD_SCRIPT, variant, str(HEAD_T), str(HEAD_H), str(HEAD_V)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fused_head_peak_memory(cpu_bench):
    from ovr_kernels import linear_logprob_entropy

    torch.manual_seed(0)
    hidden = torch.randn(HEAD_T, HEAD_H, requires_grad=True)
    weight = (torch.randn(HEAD_V, HEAD_H) * 0.02).requires_grad_()
    targets = torch.randint(0, HEAD_V, (HEAD_T,))

    def fused():
        logp, ent = linear_logprob_entropy(hidden, weight, targets)
        (-(logp.sum()) + 0.01 * ent.sum()).backward()

    cpu_bench(fused, rounds=2, warmup_rounds=0)
    fused, eager = _head_peak_mib("fused"), _head_peak_mib("eager")
    for name, res in (("fused", fused), ("eager", eager)):
        cpu_bench.extra_info[f"{name}_peak_growth_mib"] = round(res["peak_growth_mib"], 1)
        cpu_bench.extra_info[f"{name}_peak_rss_mib"] = round(res["peak_rss_mib"], 1)
    logits_mib = HEAD_T * HEAD_V * 4 / 2**20
    cpu_bench.extra_info["logits_fp32_mib"] = logits_mib
    print(f"head peak memory growth: fused {fused['peak_growth_mib']:.0f} MiB vs eager {eager['peak_growth_mib']:.0f} "
          f"MiB (process peak RSS {fused['peak_rss_mib']:.0f} vs {eager['peak_rss_mib']:.0f} MiB; logits alone: "
          f"{logits_mib:.0f} MiB)")
    assert eager["peak_growth_mib"] > fused["peak_growth_mib"] + logits_mib  # the eager head holds at least the logits


def test_rl_update_tiny_cpu(cpu_bench):
    torch.set_num_threads(2)
    rollouts = _rollouts()
    times = bench_rl(cpu_bench, _model_cfg(), VOCAB, rollouts, device="cpu", dtype=torch.float32, budget=4096,
                     pad_rows=8, baselines=("padded",), rounds=2, base_rounds=1)
    _print("tiny RL update (CPU)", times, sum(s.length for s in rollouts))


# ----------------------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_rl_update_tiny_gpu(gpu_bench):
    rollouts = _rollouts()
    times = bench_rl(gpu_bench, _model_cfg(), VOCAB, rollouts, device="cuda", dtype=torch.bfloat16, budget=4096,
                     pad_rows=8, baselines=("padded",), rounds=10, base_rounds=5)
    _print("tiny RL update (GPU)", times, sum(s.length for s in rollouts))
    _free()


@pytest.mark.gpu
def test_sft_step_large(gpu_bench):
    samples = _skewed_samples(32, vocab=LARGE["vocab_size"], short=(64, 384), long=(1024, 1536))
    times = bench_sft(gpu_bench, _model_cfg(LARGE), LARGE["vocab_size"], samples, device="cuda", dtype=torch.bfloat16,
                      budget=LARGE_BUDGET, pad_rows=4, baselines=tuple(SFT_BASELINES), rounds=3, base_rounds=2)
    _print("1.5B SFT step (GPU)", times, sum(s.length for s in samples))
    _free()


@pytest.mark.gpu
def test_rl_update_large(gpu_bench):
    rollouts = _rollouts(16, vocab=LARGE["vocab_size"], prompt=(64, 256), short=(32, 512), long=(1024, 2048))
    times = bench_rl(gpu_bench, _model_cfg(LARGE), LARGE["vocab_size"], rollouts, device="cuda", dtype=torch.bfloat16,
                     budget=LARGE_BUDGET, pad_rows=4, baselines=("padded",), rounds=3, base_rounds=2)
    _print("1.5B RL update (GPU)", times, sum(s.length for s in rollouts))
    _free()
