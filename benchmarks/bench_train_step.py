"""Whole training steps: one SFT step and one RL update (policy + critic), tiny config on CPU and GPU, and a
Qwen2.5-VL-1.5B-shaped config on GPU. Derived units: tokens/s, achieved TFLOP/s, MFU (GPU), peak memory; every
baseline is timed in the same run on the same model and data.

Legend: T tokens of a micro-batch, V vocabulary, H hidden size. What is timed is the trainer's own code on a
world of one process: `sft.train_step` (forward + backward over every micro-batch of a global batch, gradient
clipping, the AdamW step) and `rl.update`, on models built by the trainer (`build_sharded_model`,
`rl.build_models`: FSDP2, fp32 master shards) with its optimizer (`optim.build_optimizer`) and default config
(`configs/tiny.yaml`, one critic update per step). Micro-batches start on the host, as in a run.

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
   response 75% 8-48 / 25% 96-160 tokens), packed by `rl.pack_rollouts`, a random 0/1 score each; old log-probs,
   values, GAE (gamma = lambda = 1) and whitened advantages by `rl.advantages` (untimed). Measured: `rl.update`
   with policy_updates_per_step = critic_updates_per_step = 1: per packed micro-batch policy forward -> `ppo_loss`
   -> backward, AdamW step; then critic forward -> `value_loss` -> backward, AdamW step. Baseline "padded": the
   same update on padded sdpa micro-batches of 8 rollouts in data order.

GPU (skip cleanly without CUDA; FSDP2 mixed precision as in a run: bf16 compute weights, fp32 master shards and
AdamW states; liger kernels when installed, as the trainer):
4. `test_rl_update_tiny_gpu`: 3. on the GPU.
5. `test_sft_step_large`: `LARGE` (Qwen2.5-1.5B's LLM: H 1536, 28 layers, 12 heads / 2 KV heads, MLP 8960,
   V 151,936, tied embeddings; Qwen2.5-VL's ViT: depth 32, width 1280, frozen), random init. 32 sequences,
   80% 64-384 / 20% 1024-1536 tokens (~14k tokens), 4096-token packed micro-batches. Baselines on the same model:
   "padded" (sdpa, 4 rows per micro-batch), "sdpa_packed" (the same packed micro-batches, attention by sdpa with
   transformers' block-diagonal mask from the position ids), "eager_head" (packed, ovr attention, head = full
   (T, V) logits + fp32 log_softmax + gather and entropy instead of the fused log-prob head).
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
import dataclasses
import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from ovr_kernels.hf import ATTN_NAME as OVR_ATTENTION
from ovr_kernels.hf import use_ovr_attention
from ovr_kernels.packing import token_budget_microbatches
from ovr_train import rl, sft
from ovr_train.config import Config, ModelCfg, load_config
from ovr_train.data import IGNORE, Encoded, collate
from ovr_train.dist import DistInfo, compute_dtype
from ovr_train.model import ModelOut, build_sharded_model, flops_per_token
from ovr_train.optim import build_optimizer

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
    """Random text-only (prompt, response ids) pairs, as the engine returns them to rl.py."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        p = SimpleNamespace(token_ids=torch.randint(FIRST_ID, vocab, (_length(g, prompt, prompt, 0.0),),
                                                    generator=g).tolist(), pixel_values=None, image_grid_thw=None)
        out.append((p, torch.randint(FIRST_ID, vocab, (_length(g, short, long, long_frac),), generator=g).tolist()))
    return out


def _packed(samples, budget) -> tuple:
    """(micro-batch plan: lists of sample indices, packed Batches on the host) with token-budget micro-batches."""
    plan = token_budget_microbatches([s.length for s in samples], budget)
    return plan, [collate([samples[i] for i in mb], packing=True) for mb in plan]


def _padded(samples, rows) -> tuple:
    """(plan, padded Batches on the host): `rows` sequences per micro-batch in data order, each padded to its
    longest."""
    plan = [list(range(i, min(i + rows, len(samples)))) for i in range(0, len(samples), rows)]
    return plan, [collate([samples[i] for i in mb], packing=False) for mb in plan]


def _padding_fraction(batches) -> float:
    return round(sum(b.input_ids.numel() - b.num_tokens for b in batches) / sum(b.input_ids.numel() for b in batches),
                 3)


# ----------------------------------------------------------------------------------------------------------------
# Models, optimizer, attention switch: the trainer's own (FSDP2 on a world of one process)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """A process group of one rank (gloo for CPU tensors, NCCL for CUDA ones) so that the models are built and
    sharded by the trainer's own `build_sharded_model` (FSDP2: fp32 master shards, bf16 compute on GPU). Returns
    `info(device)`, the DistInfo of that device. Torn down after this module: later benchmarks start their own."""
    saved = dict(os.environ)
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp_path_factory.mktemp('pg') / 'store'}", rank=0,
                            world_size=1)

    def info(device):
        return DistInfo(0, 1, 0, torch.device(device), backend, init_device_mesh(device, (1,),
                                                                                 mesh_dim_names=("shard",)))

    yield info
    dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def _config(mcfg: ModelCfg, budget: int) -> Config:
    """The trainer's default Config (every section but the model: optimizer, rl.*) with `mcfg`, data.token_budget
    = `budget` and one critic update per step, so that one RL update is one policy and one critic optimizer step."""
    cfg = load_config(None, [f"--data.token_budget={budget}", "--rl.critic_updates_per_step=1"])
    cfg.model = mcfg
    return cfg


def _model_cfg(base: dict | None = None, **overrides) -> ModelCfg:
    """ModelCfg from a field dict (None: the tiny default) with overrides (e.g. num_layers=1 for a CPU smoke run)."""
    return ModelCfg(**{**(base or {}), **overrides})


def _sharded(cfg, info, vocab, value_head=False):
    """`build_sharded_model` on `info.device`, created there (no host copy of a 2B model), in train mode."""
    with torch.device(info.device):
        return build_sharded_model(cfg, info, IDS, vocab, value_head=value_head).train()


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


@contextlib.contextmanager
def _eager_head(model):
    """The model's forward with the eager head: full (T, V) logits in the compute dtype, fp32 log_softmax, gather
    and entropy (what an HF loss does; the baseline of the fused log-prob head)."""
    fused = model.forward

    def forward(*args, targets=None, temperature=1.0, **kwargs):
        hidden_TH = fused(*args, **kwargs).hidden
        logp_TV = torch.log_softmax((hidden_TH @ model.hf.lm_head.weight.t()).float() / temperature, dim=-1)
        logp_T = logp_TV.gather(1, targets.clamp_min(0)[:, None])[:, 0]
        entropy_T = -(logp_TV.exp() * logp_TV).sum(-1)
        valid_T = targets != IGNORE
        return ModelOut(logprobs=torch.where(valid_T, logp_T, torch.zeros_like(logp_T)),
                        entropy=torch.where(valid_T, entropy_T, torch.zeros_like(entropy_T)))

    model.forward = forward
    try:
        yield
    finally:
        del model.forward


def _unpacked_attention(batches) -> list:
    """Packed batches without cu_seqlens: under sdpa transformers then builds the block-diagonal causal mask from
    the per-sequence text position ids (same loss: tests/train/test_model.py)."""
    return [dataclasses.replace(b, cu_seqlens=None, max_seqlen=0) for b in batches]


# ----------------------------------------------------------------------------------------------------------------
# RL batches for rl.py's advantages and update
# ----------------------------------------------------------------------------------------------------------------


def _rl_batch(rollouts, micro, order, device, seed=0):
    """An rl.RolloutBatch of `rollouts` ((prompt, response ids) pairs) in the given micro-batch layout, with a
    random 0/1 score per rollout; one response per prompt."""
    g = torch.Generator().manual_seed(seed)
    prompts = [p for p, _ in rollouts]
    samples = [SimpleNamespace(prompt_index=i, token_ids=r, logprobs=[0.0] * len(r), truncated=False)
               for i, (_, r) in enumerate(rollouts)]
    cu_T = torch.tensor([0] + [len(samples[b].token_ids) for b in order], device=device).cumsum(0).int()
    num_tokens = float(sum(len(r) for _, r in rollouts))
    return rl.RolloutBatch(0, [], prompts, samples, None, (torch.rand(len(rollouts), generator=g) < 0.5).float(),
                           torch.zeros(len(rollouts), dtype=torch.bool), list(range(len(rollouts))), 0, micro, order,
                           cu_T, num_tokens, torch.tensor(num_tokens, device=device))


def _packed_rl(rollouts, dcfg, device):
    """rl.py's own packing (rl.pack_rollouts: token-budget micro-batches)."""
    prompts = [p for p, _ in rollouts]
    samples = [SimpleNamespace(prompt_index=i, token_ids=r) for i, (_, r) in enumerate(rollouts)]
    micro, order, _, _, _ = rl.pack_rollouts(prompts, samples, list(range(len(rollouts))), prompts[0], IDS,
                                             LARGE["spatial_merge_size"], dcfg, device)
    return _rl_batch(rollouts, micro, order, device)


def _padded_rl(rollouts, rows, device):
    """The baseline layout: `rows` rollouts per micro-batch in data order, each padded to its longest."""
    micro = []
    for at in range(0, len(rollouts), rows):
        part = rollouts[at:at + rows]
        batch = collate([rl.rollout_sequence(p, r, IDS, LARGE["spatial_merge_size"]) for p, r in part],
                        packing=False)
        cu = torch.tensor([0] + [len(r) for _, r in part]).cumsum(0).int()
        micro.append(rl.MicroBatch(batch, (batch.targets != IGNORE).nonzero().squeeze(1), cu,
                                   batch.num_loss_tokens))
    return _rl_batch(rollouts, micro, list(range(len(rollouts))), device)


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

SFT_BASELINES = {"padded": ("padded", "sdpa", "fused"), "sdpa_packed": ("sdpa_packed", "sdpa", "fused"),
                 "eager_head": ("packed", OVR_ATTENTION, "eager")}


def bench_sft(bench, mcfg, vocab, samples, *, info, budget, pad_rows, baselines, rounds, base_rounds):
    """Measure sft.py's `train_step` on packed micro-batches (ovr attention, fused head); time `baselines` (keys of
    SFT_BASELINES) on the same model. Returns {name: median seconds} (ours under "packed")."""
    cfg = _config(mcfg, budget)
    device = info.device
    model = _sharded(cfg, info, vocab)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, cfg.optim.offload, 1e-5, cfg.optim.betas, cfg.optim.weight_decay, cfg.optim.eps)
    packed = _packed(samples, budget)[1]
    data = {"packed": packed, "padded": _padded(samples, pad_rows)[1], "sdpa_packed": _unpacked_attention(packed)}
    lengths = [s.length for s in samples]
    real, flops = sum(lengths), _train_flops(model, lengths)
    warm = 1 if device.type == "cuda" else 0
    step = (lambda micro: sft.train_step(model, params, opt, micro, cfg.optim.grad_clip, device, 1))
    step(data["packed"])  # untimed: allocates the AdamW state, compiles the kernels
    _model_info(bench, model, compute_dtype(cfg.model, device), budget)
    bench(step, data["packed"], rounds=rounds, warmup_rounds=warm)
    _record(bench, real, flops)
    bench.extra_info.update(tokens=real, sequences=len(samples), packed_micro_batches=len(data["packed"]),
                            padded_micro_batches=len(data["padded"]),
                            padded_fraction_of_compute=_padding_fraction(data["padded"]))
    times = {"packed": bench.median_s()}
    for name in baselines:
        layout, attn, head = SFT_BASELINES[name]
        with _attention([model], attn), (_eager_head(model) if head == "eager" else contextlib.nullcontext()):
            times[name] = _baseline(bench, name, step, data[layout], rounds=base_rounds, warmup_rounds=warm,
                                    on_oom=lambda: opt.zero_grad(set_to_none=True))
        if times[name]:
            _record(bench, real, flops, name, times[name])
    return times


def bench_rl(bench, mcfg, vocab, rollouts, *, info, budget, pad_rows, baselines, rounds, base_rounds):
    """Measure rl.py's `update` (policy and critic built by rl.build_models) on rl.py's packed micro-batches,
    after rl.py's `advantages` (untimed); time "padded" (sdpa) on the same models when asked."""
    cfg = _config(mcfg, budget)
    device = info.device
    with torch.device(device):
        policy, critic, reference, optims, _ = rl.build_models(cfg, info, IDS, vocab)
    batches = {"packed": _packed_rl(rollouts, cfg.data, device), "padded": _padded_rl(rollouts, pad_rows, device)}
    targets = {"packed": rl.advantages(cfg.rl, policy, critic, reference, batches["packed"], device)}
    lengths = [len(p.token_ids) + len(r) for p, r in rollouts]
    response_tokens = batches["packed"].num_tokens
    real = sum(lengths)
    flops = _train_flops(policy, lengths) + _train_flops(critic, lengths, lm_head=False)
    warm = 1 if device.type == "cuda" else 0

    def update(layout):
        rl.update(cfg.rl, cfg.optim.grad_clip, policy, critic, optims, batches[layout], targets[layout], device)

    update("packed")  # untimed: optimizer state, kernel compiles
    _model_info(bench, policy, compute_dtype(cfg.model, device), budget)
    bench(update, "packed", rounds=rounds, warmup_rounds=warm)
    _record(bench, real, flops)
    bench.rate("response_tokens_per_s", response_tokens)
    padded = [mb.batch for mb in batches["padded"].micro]
    bench.extra_info.update(tokens=real, response_tokens=int(response_tokens), rollouts=len(rollouts),
                            packed_micro_batches=len(batches["packed"].micro), padded_micro_batches=len(padded),
                            padded_fraction_of_compute=_padding_fraction(padded))
    times = {"packed": bench.median_s()}
    if "padded" in baselines:
        with _attention([policy, critic], "sdpa"):
            targets["padded"] = rl.advantages(cfg.rl, policy, critic, reference, batches["padded"], device)
            times["padded"] = _baseline(bench, "padded", update, "padded", rounds=base_rounds, warmup_rounds=warm,
                                        on_oom=lambda: [o.zero_grad(set_to_none=True) for o in optims.values()])
        if times["padded"]:
            _record(bench, real, flops, "padded", times["padded"])
    return times


def _print(what, times, tokens):
    parts = [f"{name} {tokens / s:.0f} tok/s" for name, s in times.items() if s]
    print(f"{what}: " + ", ".join(parts))


# ----------------------------------------------------------------------------------------------------------------
# CPU (tiny config)
# ----------------------------------------------------------------------------------------------------------------


def test_sft_step_packed_vs_padded(cpu_bench, one_rank):
    torch.set_num_threads(2)
    samples = _skewed_samples()
    times = bench_sft(cpu_bench, _model_cfg(), VOCAB, samples, info=one_rank("cpu"), budget=4096,
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


def test_rl_update_tiny_cpu(cpu_bench, one_rank):
    torch.set_num_threads(2)
    rollouts = _rollouts()
    times = bench_rl(cpu_bench, _model_cfg(), VOCAB, rollouts, info=one_rank("cpu"), budget=4096,
                     pad_rows=8, baselines=("padded",), rounds=2, base_rounds=1)
    _print("tiny RL update (CPU)", times, sum(len(p.token_ids) + len(r) for p, r in rollouts))


# ----------------------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_rl_update_tiny_gpu(gpu_bench, one_rank):
    rollouts = _rollouts()
    times = bench_rl(gpu_bench, _model_cfg(), VOCAB, rollouts, info=one_rank("cuda"), budget=4096,
                     pad_rows=8, baselines=("padded",), rounds=10, base_rounds=5)
    _print("tiny RL update (GPU)", times, sum(len(p.token_ids) + len(r) for p, r in rollouts))
    _free()


@pytest.mark.gpu
def test_sft_step_large(gpu_bench, one_rank):
    samples = _skewed_samples(32, vocab=LARGE["vocab_size"], short=(64, 384), long=(1024, 1536))
    times = bench_sft(gpu_bench, _model_cfg(LARGE), LARGE["vocab_size"], samples, info=one_rank("cuda"),
                      budget=LARGE_BUDGET, pad_rows=4, baselines=tuple(SFT_BASELINES), rounds=3, base_rounds=2)
    _print("1.5B SFT step (GPU)", times, sum(s.length for s in samples))
    _free()


@pytest.mark.gpu
def test_rl_update_large(gpu_bench, one_rank):
    rollouts = _rollouts(16, vocab=LARGE["vocab_size"], prompt=(64, 256), short=(32, 512), long=(1024, 2048))
    times = bench_rl(gpu_bench, _model_cfg(LARGE), LARGE["vocab_size"], rollouts, info=one_rank("cuda"),
                     budget=LARGE_BUDGET, pad_rows=4, baselines=("padded",), rounds=3, base_rounds=2)
    _print("1.5B RL update (GPU)", times, sum(len(p.token_ids) + len(r) for p, r in rollouts))
    _free()
