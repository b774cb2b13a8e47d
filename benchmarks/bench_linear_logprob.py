"""Fused linear log-prob + entropy at the Qwen2.5-VL-7B head (H = 3584, V = 152,064), bf16.

GPU (skips without CUDA): T in {4096, 16384}, forward-only (`linear_logprob_nograd(..., with_entropy=True)`, no
autograd) and fwd+bwd (`linear_logprob_entropy` + backward with random upstream gradients on both outputs).
extra_info: ms, TFLOP/s (2*T*H*V per matmul: 2THV forward-only, 6THV fwd+bwd; the backward's logit recompute is
not counted), peak memory above the inputs, and same-run baselines:
  eager        matmul + log_softmax + gather + entropy (same outputs);
  compiled     torch.compile'd per-chunk version of eager over 1024-token chunks, checkpointed (same outputs;
               skipped with OVR_BENCH_HEAVY=0, as gpu_check.sh runs by default: its cold compile is the slowest part);
  liger        liger-kernel's fused linear cross entropy (log-prob only, reduction="sum"), exact gradient;
  cce          cut-cross-entropy's linear_cross_entropy if importable (log-prob only, reduction="sum") with its
               default filter_eps="auto": its backward skips every logit block whose softmax values are all below
               bf16 eps / 32 = 2^-12, an APPROXIMATE gradient (recorded as `cce_logprob_only_gradient`);
  cce_exact    the same with filter_eps=None: exact gradient, like with like.
The log-prob-only baselines are compared with our fwd+bwd of the log-prob alone (`ours_logprob_only_*`: the
forward still produces the entropy, the backward skips its term), recorded separately: like with like.
Logits: "random" (hidden ~ N(0, 1), weight ~ N(0, 1/H): logits ~ N(0, 1), entropy near log V) and "peaky"
(weight scaled 4x, logits ~ N(0, 16), as in a trained model: mass on few tokens). cut-cross-entropy's filter skips
most backward blocks on random logits (flat softmax, every p ~ 1/V) and far fewer on peaky ones, so its speed on
random data overstates it; `cce_filter_skip_fraction` estimates the share of 128 x 128 (token x vocabulary) blocks
it may skip (all p < 2^-12; its block shape is autotuned, so this is an estimate, not its count).
CPU: peak memory of fwd+bwd vs eager at T = 4096, V = 152,064, H = 64 (fp32), each measured in a fresh
subprocess (peak RSS above the inputs), target <= 10% of eager's.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ovr_kernels.linear_logprob import linear_logprob_entropy, linear_logprob_nograd

HIDDEN, VOCAB = 3584, 152_064
CHUNK = 1024


WEIGHT_SCALE = {"random": 1.0, "peaky": 4.0}  # logit std: 1 (flat softmax) or 4 (a trained model's peaky one)
CCE_FILTER_EPS = 2.0**-12  # cut-cross-entropy's filter_eps="auto" for bf16: torch.finfo(torch.bfloat16).eps / 32


def make_inputs(num_tokens, hidden_size, vocab_size, device, dtype, logits="random"):
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(num_tokens, hidden_size, generator=g).to(device, dtype)
    weight = (torch.randn(vocab_size, hidden_size, generator=g) * (WEIGHT_SCALE[logits] * hidden_size**-0.5)).to(
        device, dtype)
    targets = torch.randint(0, vocab_size, (num_tokens,), generator=g)
    targets[::17] = -100
    return hidden, weight, targets.to(device)


def eager_logprob_entropy(hidden, weight, targets, ignore_index=-100):
    logits = (hidden @ weight.t()).float()
    logp = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index
    logprob = logp.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    entropy = -(logp.exp() * logp).sum(-1)
    return torch.where(valid, logprob, 0.0), torch.where(valid, entropy, 0.0)


_compiled_chunk = None


def compiled_chunked_logprob_entropy(hidden, weight, targets):
    """torch.compile'd eager over token chunks, each checkpointed (recomputed in backward): bounded memory."""
    global _compiled_chunk
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(eager_logprob_entropy, dynamic=False)
    outs = [torch.utils.checkpoint.checkpoint(_compiled_chunk, hidden[i:i + CHUNK], weight, targets[i:i + CHUNK],
                                              use_reentrant=False)
            for i in range(0, hidden.shape[0], CHUNK)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def fwd_bwd(fn, hidden, weight, targets, g_logprob, g_entropy):
    hidden.grad = weight.grad = None
    logprob, entropy = fn(hidden, weight, targets)
    loss = (logprob * g_logprob).sum() + (entropy * g_entropy).sum() if g_entropy is not None else \
        (logprob * g_logprob).sum()
    loss.backward()


@torch.no_grad()
def logit_statistics(hidden, weight, block=128):
    """(mean entropy in nats, fraction of block x block (token x vocabulary) logit blocks whose softmax values are
    all below CCE_FILTER_EPS), over token chunks of CHUNK rows."""
    entropy_sum, skippable, blocks = 0.0, 0, 0
    num_tokens = hidden.shape[0] // block * block
    for i in range(0, num_tokens, CHUNK):
        logp = torch.log_softmax((hidden[i:i + CHUNK] @ weight.t()).float(), dim=-1)
        entropy_sum += float(-(logp.exp() * logp).sum())
        rows, vocab = logp.shape[0], logp.shape[1] // block * block
        block_max = logp[:, :vocab].reshape(rows // block, block, vocab // block, block).amax(dim=(1, 3))
        skippable += int((block_max < math.log(CCE_FILTER_EPS)).sum())
        blocks += block_max.numel()
    return entropy_sum / num_tokens, skippable / blocks


def forward_only(fn, hidden, weight, targets):
    with torch.no_grad():
        return fn(hidden, weight, targets)


def _liger_loss():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(reduction="sum")


def _cce_loss():
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return None
    return linear_cross_entropy


# torch.compile of the chunked baseline costs tens of seconds with a cold cache: gpu_check.sh turns it off unless
# asked (GPU_CHECK_HEAVY=1); a plain `pytest benchmarks/` runs it
HEAVY = os.environ.get("OVR_BENCH_HEAVY", "1") == "1"


def _same_output_baselines(bench):
    """(name, fn) of the baselines with our outputs; a heavy one that is off is recorded as not run."""
    if not HEAVY:
        bench.extra_info["compiled_chunked_error"] = "not run: heavy baseline, OVR_BENCH_HEAVY=0"
    return [("eager", eager_logprob_entropy)] + ([("compiled_chunked", compiled_chunked_logprob_entropy)] if HEAVY
                                                 else [])


def _time_or_oom(bench, name, fn, *args, rounds=5):
    try:
        return bench.time_baseline(name, fn, *args, rounds=rounds, warmup_rounds=1)
    except torch.OutOfMemoryError:
        bench.extra_info[f"{name}_median_ms"] = "oom"
        torch.cuda.empty_cache()
        return None


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [4096, 16384])
def test_gpu_forward_only(gpu_bench, num_tokens):
    hidden, weight, targets = make_inputs(num_tokens, HIDDEN, VOCAB, "cuda", torch.bfloat16)

    def ours(h, w, t):
        return linear_logprob_nograd(h, w, t, with_entropy=True)

    gpu_bench(ours, hidden, weight, targets, rounds=10, warmup_rounds=3)
    gpu_bench.tflops(2 * num_tokens * HIDDEN * VOCAB)
    gpu_bench.extra_info.update(shape=f"T={num_tokens} H={HIDDEN} V={VOCAB} bf16", mode="forward-only, with entropy",
                                peak_extra_mib=gpu_bench.peak_extra_mib(ours, hidden, weight, targets))
    for name, fn in _same_output_baselines(gpu_bench):
        seconds = _time_or_oom(gpu_bench, name, forward_only, fn, hidden, weight, targets)
        if seconds is not None:
            gpu_bench.ratio_vs(name, seconds)
            gpu_bench.extra_info[f"{name}_peak_extra_mib"] = gpu_bench.peak_extra_mib(forward_only, fn, hidden,
                                                                                      weight, targets)
    cce = _cce_loss()
    if cce is not None:  # log-prob only (CE): not like for like with ours (+ entropy); recorded for reference
        seconds = _time_or_oom(gpu_bench, "cce_logprob_only", forward_only,
                               lambda h, w, t: cce(h, w, t, reduction="none"), hidden, weight, targets)
        if seconds is not None:
            gpu_bench.ratio_vs("cce_logprob_only", seconds)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens, logits", [(4096, "random"), (16384, "random"), (4096, "peaky")])
def test_gpu_fwd_bwd(gpu_bench, num_tokens, logits):
    hidden, weight, targets = make_inputs(num_tokens, HIDDEN, VOCAB, "cuda", torch.bfloat16, logits)
    entropy_mean, skip_fraction = logit_statistics(hidden, weight)
    hidden.requires_grad_()
    weight.requires_grad_()
    g_logprob = torch.randn(num_tokens, device="cuda")
    g_entropy = torch.randn(num_tokens, device="cuda")
    gpu_bench(fwd_bwd, linear_logprob_entropy, hidden, weight, targets, g_logprob, g_entropy, rounds=10,
              warmup_rounds=3)
    gpu_bench.tflops(6 * num_tokens * HIDDEN * VOCAB)
    gpu_bench.extra_info.update(
        shape=f"T={num_tokens} H={HIDDEN} V={VOCAB} bf16 {logits} logits",
        mode="fwd+bwd, grads from logprob and entropy", logit_entropy_mean_nats=round(entropy_mean, 3),
        cce_filter_skip_fraction=round(skip_fraction, 4),
        flops_counted="6*T*H*V (the backward's logit recompute, another 2THV, is not counted)",
        peak_extra_mib=gpu_bench.peak_extra_mib(fwd_bwd, linear_logprob_entropy, hidden, weight, targets, g_logprob,
                                                g_entropy))
    for name, fn in _same_output_baselines(gpu_bench):
        seconds = _time_or_oom(gpu_bench, name, fwd_bwd, fn, hidden, weight, targets, g_logprob, g_entropy)
        if seconds is not None:
            gpu_bench.ratio_vs(name, seconds)
            gpu_bench.extra_info[f"{name}_peak_extra_mib"] = gpu_bench.peak_extra_mib(fwd_bwd, fn, hidden, weight,
                                                                                      targets, g_logprob, g_entropy)

    # Like with like for the log-prob-only baselines: loss = -sum(logprob) over valid tokens, one backward.
    ones = torch.ones(num_tokens, device="cuda")
    ours_lp = _time_or_oom(gpu_bench, "ours_logprob_only", fwd_bwd, linear_logprob_entropy, hidden, weight,
                           targets, -ones, None)
    gpu_bench.extra_info["ours_logprob_only_peak_extra_mib"] = gpu_bench.peak_extra_mib(
        fwd_bwd, linear_logprob_entropy, hidden, weight, targets, -ones, None)
    baselines = []
    liger = _liger_loss()
    if liger is not None:
        baselines.append(("liger", lambda: liger(weight, hidden, targets)))
    cce = _cce_loss()
    if cce is not None:
        baselines.append(("cce", lambda: cce(hidden, weight, targets, reduction="sum")))
        baselines.append(("cce_exact", lambda: cce(hidden, weight, targets, reduction="sum", filter_eps=None)))
        gpu_bench.extra_info["cce_logprob_only_gradient"] = "approximate: filter_eps=auto"
    for name, loss_fn in baselines:
        def step(loss_fn=loss_fn):
            hidden.grad = weight.grad = None
            loss_fn().backward()
        seconds = _time_or_oom(gpu_bench, f"{name}_logprob_only", step)
        if seconds is not None and ours_lp is not None:
            gpu_bench.extra_info[f"speedup_vs_{name}_logprob_only"] = round(seconds / ours_lp, 4)
            gpu_bench.extra_info[f"{name}_peak_extra_mib"] = gpu_bench.peak_extra_mib(step)
    gpu_bench.extra_info["like_with_like"] = ("liger/cce give log-prob (CE) only: compare them with "
                                              "ours_logprob_only (same loss -sum logprob), not with the main timing")


_CPU_PEAK = textwrap.dedent("""
    import json, resource, sys, torch
    sys.path.insert(0, {bench_dir!r})
    from bench_linear_logprob import eager_logprob_entropy, make_inputs
    from ovr_kernels.linear_logprob import linear_logprob_entropy
    torch.set_num_threads({threads})
    hidden, weight, targets = make_inputs({T}, {H}, {V}, "cpu", torch.float32)
    hidden.requires_grad_(); weight.requires_grad_()
    g = torch.randn({T})
    fn = linear_logprob_entropy if {which!r} == "ours" else eager_logprob_entropy
    def kib(field):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
    # Reset the peak-RSS mark (VmHWM) to the current RSS, so the imports' and input setup's transient peak cannot
    # hide the op's; without /proc (not Linux) fall back to ru_maxrss, a lower bound.
    try:
        open("/proc/self/clear_refs", "w").write("5")
        before = kib("VmRSS")
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    logprob, entropy = fn(hidden, weight, targets)
    ((logprob * g).sum() + (entropy * g).sum()).backward()
    try:
        peak = kib("VmHWM")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("@@" + json.dumps({{"peak_extra_mib": (peak - before) / 1024.0}}))
""")


def _cpu_peak_extra_mib(which, num_tokens, hidden_size, vocab_size):
    """Peak RSS above the inputs of one fwd+bwd, in a fresh process (RSS high-water marks never go down)."""
    import os

    code = _CPU_PEAK.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), threads=torch.get_num_threads(),
                            T=num_tokens, H=hidden_size, V=vocab_size, which=which)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800, check=False)
    if res.returncode != 0 or "@@" not in res.stdout:
        raise RuntimeError(f"{which} peak-memory run failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.split("@@", 1)[1])["peak_extra_mib"]


def _available_gib():
    with open("/proc/meminfo") as f:
        lines = f.readlines()
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def test_cpu_peak_memory_vs_eager(cpu_bench):
    num_tokens, hidden_size = 4096, 64
    if _available_gib() < 16:  # eager fwd+bwd holds several (T, V) fp32 tensors (2.3 GiB each)
        pytest.skip(f"needs ~16 GiB free for the eager baseline, {_available_gib():.1f} GiB available")
    hidden, weight, targets = make_inputs(num_tokens, hidden_size, VOCAB, "cpu", torch.float32)
    hidden.requires_grad_()
    weight.requires_grad_()
    g = torch.randn(num_tokens)
    cpu_bench(fwd_bwd, linear_logprob_entropy, hidden, weight, targets, g, g, rounds=1, warmup_rounds=0)
    ours = _cpu_peak_extra_mib("ours", num_tokens, hidden_size, VOCAB)
    eager = _cpu_peak_extra_mib("eager", num_tokens, hidden_size, VOCAB)
    cpu_bench.extra_info.update(
        shape=f"T={num_tokens} H={hidden_size} V={VOCAB} fp32", mode="fwd+bwd",
        peak_extra_mib=round(ours, 1), eager_peak_extra_mib=round(eager, 1),
        peak_fraction_of_eager=round(ours / eager, 4), target_fraction="<= 0.10",
        method="peak RSS above the inputs, each path in a fresh subprocess")
    assert ours <= 0.10 * eager, f"ours {ours:.0f} MiB vs eager {eager:.0f} MiB"
