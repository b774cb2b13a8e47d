"""One tiny SFT step on CPU: packing vs padding throughput on length-skewed data, and the fused log-prob head vs
an eager head (full logits + log_softmax) in peak memory.

1. `test_sft_step_packed_vs_padded`: the tiny default model (configs/tiny.yaml numbers), a global batch of 64
   sequences with skewed lengths (80% 16-48 tokens, 20% 200-256: chat data's long tail). Packed: varlen kernel,
   4096-token micro-batches. Padded (the baseline): sdpa, micro-batches of 8 sequences in data order, each padded
   to its longest. Both compute the same loss (tests/train/test_model.py); extra_info has real tokens/s for both
   and the speedup (expected >= 2x: padding wastes most of the compute on this mix).
2. `test_fused_head_peak_memory`: T=2048 tokens, H=256, V=32768 forward + backward. Each variant runs in a fresh
   subprocess and reports its peak-RSS growth (an honest per-variant peak on CPU, which has no allocator stats):
   the eager head holds (T, V) fp32 logits, softmax and gradient, the fused one streams vocab tiles.
"""

import json
import subprocess
import sys
from pathlib import Path

import torch

from ovr_train.config import ModelCfg
from ovr_train.data import Encoded, collate
from ovr_train.model import build_model

ROOT = Path(__file__).resolve().parent.parent
IDS = {"endoftext": 0, "im_start": 1, "im_end": 2, "vision_start": 9, "vision_end": 10, "image_pad": 12,
       "video_pad": 13}
VOCAB = 640  # the tiny default's BPE vocabulary, padded to 64


def _skewed_samples(num: int = 64, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        long = torch.rand((), generator=g) < 0.2
        n = int(torch.randint(200, 257, (), generator=g)) if long else int(torch.randint(16, 49, (), generator=g))
        ids = torch.randint(22, VOCAB, (n,), generator=g)
        targets = torch.cat([ids[1:], torch.tensor([-100])])
        targets[: n // 3] = -100  # the prompt part carries no loss
        out.append(Encoded(ids, targets, torch.arange(n).expand(3, n).clone()))
    return out


def _step(model, batches):
    model.zero_grad(set_to_none=True)
    total = sum(b.num_loss_tokens for b in batches)
    for b in batches:
        out = model(**b.model_inputs(), targets=b.targets)
        (-out.logprobs.sum() / total).backward()


def test_sft_step_packed_vs_padded(cpu_bench):
    torch.set_num_threads(2)
    samples = _skewed_samples()
    packed_model = build_model(ModelCfg(), IDS, VOCAB)
    padded_model = build_model(ModelCfg(attn_implementation="sdpa"), IDS, VOCAB)
    padded_model.load_state_dict(packed_model.state_dict())
    lengths = [s.length for s in samples]
    from ovr_kernels.packing import token_budget_microbatches

    packed = [collate([samples[i] for i in mb], packing=True) for mb in token_budget_microbatches(lengths, 4096)]
    padded = [collate(samples[i:i + 8], packing=False) for i in range(0, len(samples), 8)]
    real = sum(lengths)
    cpu_bench(_step, packed_model, packed, rounds=5, warmup_rounds=1)
    padded_s = cpu_bench.time_baseline("padded", _step, padded_model, padded, rounds=5, warmup_rounds=1)
    cpu_bench.rate("tokens_per_s", real)
    cpu_bench.extra_info["padded_tokens_per_s"] = round(real / padded_s, 1)
    cpu_bench.extra_info["padded_fraction_of_compute"] = round(
        sum(b.input_ids.numel() - b.num_tokens for b in padded) / sum(b.input_ids.numel() for b in padded), 3)
    speedup = cpu_bench.ratio_vs("padded", padded_s)
    print(f"packed {real / cpu_bench.median_s():.0f} tok/s vs padded {real / padded_s:.0f} tok/s: {speedup:.2f}x")


_HEAD_SCRIPT = r"""
import json, resource, sys, torch
torch.manual_seed(0)
T, H, V = 2048, 256, 32768
hidden = torch.randn(T, H, requires_grad=True)
weight = (torch.randn(V, H) * 0.02).requires_grad_()
targets = torch.randint(0, V, (T,))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "fused":
    from ovr_kernels import linear_logprob_entropy
    logp, ent = linear_logprob_entropy(hidden, weight, targets)
else:
    logits = hidden @ weight.t()
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(1, targets[:, None])[:, 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)
(-(logp.sum()) + 0.01 * ent.sum()).backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_growth_mib": (peak - base) / 1024, "peak_rss_mib": peak / 1024}))
"""


def _head_peak_mib(variant: str) -> dict:
    """{"peak_growth_mib": peak RSS growth while the head ran, "peak_rss_mib": the process's peak RSS}."""
    out = subprocess.run([sys.executable, "-c", _HEAD_SCRIPT, variant], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fused_head_peak_memory(cpu_bench):
    from ovr_kernels import linear_logprob_entropy

    torch.manual_seed(0)
    hidden = torch.randn(2048, 256, requires_grad=True)
    weight = (torch.randn(32768, 256) * 0.02).requires_grad_()
    targets = torch.randint(0, 32768, (2048,))

    def fused():
        logp, ent = linear_logprob_entropy(hidden, weight, targets)
        (-(logp.sum()) + 0.01 * ent.sum()).backward()

    cpu_bench(fused, rounds=3, warmup_rounds=1)
    fused, eager = _head_peak_mib("fused"), _head_peak_mib("eager")
    for name, res in (("fused", fused), ("eager", eager)):
        cpu_bench.extra_info[f"{name}_peak_growth_mib"] = round(res["peak_growth_mib"], 1)
        cpu_bench.extra_info[f"{name}_peak_rss_mib"] = round(res["peak_rss_mib"], 1)
    cpu_bench.extra_info["logits_fp32_mib"] = 2048 * 32768 * 4 / 2**20
    print(f"head peak memory growth: fused {fused['peak_growth_mib']:.0f} MiB vs eager {eager['peak_growth_mib']:.0f} "
          f"MiB (process peak RSS {fused['peak_rss_mib']:.0f} vs {eager['peak_rss_mib']:.0f} MiB; logits alone: "
          "256 MiB)")
    assert eager["peak_growth_mib"] > fused["peak_growth_mib"] + 256  # the eager head holds at least the logits
