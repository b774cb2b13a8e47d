"""varlen_attention on an H100: fwd and fwd+bwd, bf16, vs baselines timed in the same run (GPU only; skips here).

Shapes: (a) text: 16k tokens packed from lengths 512..8192, 28 q / 4 kv heads, D = 128, causal;
(b) ViT windows: 16k patches in windows of <= 64 (some shorter, some empty), 16 heads, D = 80, non-causal;
(c) ViT full attention: images of 1k-4k patches, 16 heads, D = 80, non-causal.
Passes (ids): fwd; fwd_bwd (the default backward: dQ from the dK/dV kernel, 5 GEMMs, fp32 atomics on long segments);
fwd_bwd_det (deterministic=True: the separate dQ kernel, 7 GEMMs). Each backward pass also times the other backward
mode as the baseline `ovr_fused` / `ovr_deterministic`, so the two compare in one run.
Providers: ovr (measured by pytest-benchmark); baselines via `time_baseline`: torch SDPA per segment with the flash
and cuDNN backends, FlexAttention with a document mask, torch.nn.attention.varlen when present, flash-attn's
flash_attn_varlen_func when installed. A baseline that fails (unsupported head dim, missing backend) is recorded as
`<name>_error` in extra_info instead of failing the benchmark.
Units: TFLOP/s = 4 * sum(s_i^2) * Hq * D (/2 causal; fwd+bwd counts the backward 2.5x); GB/s for (b) from the
tensors each pass must move (fwd: q, k, v, o; fwd+bwd adds do, dq, dk, dv and o, do re-read).
"""

import random

import pytest
import torch
import torch.nn.functional as F

from ovr_kernels import varlen_attention

pytestmark = pytest.mark.gpu

TOTAL = 16384


def _lengths(shape: str) -> list[int]:
    rng = random.Random(0)
    if shape == "text":
        lengths, left = [], TOTAL
        while left > 0:
            n = min(left, rng.choice([512, 1024, 2048, 3000, 4096, 8192]))
            lengths.append(n)
            left -= n
        return lengths
    if shape == "windows":  # mostly full 64-patch windows, some partial, some empty (repeated cu_seqlens)
        lengths, left = [], TOTAL
        while left > 0:
            n = min(left, rng.choice([64] * 6 + [48, 32, 16, 0]))
            lengths.append(n)
            left -= n
        return lengths
    return [1024, 4096, 2304, 3136, 1600, 4096, 128]  # images 1k-4k patches (+ a small one), 16384 in all


SHAPES = {  # name: (num_q_heads, num_kv_heads, head_dim, causal)
    "text": (28, 4, 128, True),
    "windows": (16, 16, 80, False),
    "vit_full": (16, 16, 80, False),
}


def _inputs(shape):
    hq, hkv, d, causal = SHAPES[shape]
    lengths = _lengths(shape)
    assert sum(lengths) == TOTAL
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q = torch.randn(TOTAL, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(TOTAL, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(TOTAL, hkv, d, device="cuda", dtype=torch.bfloat16)
    return lengths, cu, max(lengths), q, k, v, causal


def _flops(lengths, hq, d, causal):
    return 4 * sum(n * n for n in lengths) * hq * d / (2 if causal else 1)


def _sdpa_per_segment(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def run(q, k, v, lengths, causal):
        group = q.shape[1] // k.shape[1]
        outs, start = [], 0
        with sdpa_kernel(chosen):
            for n in lengths:
                if n == 0:
                    continue
                qs = q[start:start + n].transpose(0, 1)[None]
                ks = k[start:start + n].transpose(0, 1)[None].repeat_interleave(group, 1)
                vs = v[start:start + n].transpose(0, 1)[None].repeat_interleave(group, 1)
                outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)[0].transpose(0, 1))
                start += n
        return torch.cat(outs)
    return run


def _flex(lengths, causal, hq, hkv):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"),
                                  torch.tensor(lengths, device="cuda"))

    def mask_mod(b, h, q_idx, kv_idx):
        same = doc[q_idx] == doc[kv_idx]
        return same & (q_idx >= kv_idx) if causal else same

    block_mask = create_block_mask(mask_mod, None, None, TOTAL, TOTAL, device="cuda")
    compiled = torch.compile(flex_attention)

    def run(q, k, v, lengths, causal):
        out = compiled(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                       block_mask=block_mask, enable_gqa=hq != hkv)
        return out[0].transpose(0, 1)
    return run


def _torch_varlen(cu, max_len, hq, hkv):
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    # torch 2.11 (the GPU image's) has no enable_gqa (a TypeError on the H200); later releases ask for the flag.
    # Without it, K/V with fewer heads go to the kernel as they are: whether 2.11 takes them is not yet seen (an
    # error is recorded as this baseline's n/a, as before)
    gqa = {"enable_gqa": hq != hkv} if "enable_gqa" in inspect.signature(varlen_attn).parameters else {}

    def run(q, k, v, lengths, causal):
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, window_size=(-1, 0) if causal else (-1, -1), **gqa)
    return run


def _flash_attn(cu, max_len):
    from flash_attn import flash_attn_varlen_func

    def run(q, k, v, lengths, causal):
        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=causal)
    return run


def _baselines(lengths, cu, max_len, hq, hkv, causal):
    """name -> builder of fn(q, k, v, lengths, causal); built lazily so a missing one fails alone."""
    return {"sdpa_flash": lambda: _sdpa_per_segment("flash"), "sdpa_cudnn": lambda: _sdpa_per_segment("cudnn"),
            "flex": lambda: _flex(lengths, causal, hq, hkv), "torch_varlen": lambda: _torch_varlen(cu, max_len, hq, hkv),
            "flash_attn": lambda: _flash_attn(cu, max_len)}


def _time_baselines(bench, lengths, cu, max_len, q, k, v, causal, backward):
    hq, hkv = q.shape[1], k.shape[1]
    best = None
    for name, make in _baselines(lengths, cu, max_len, hq, hkv, causal).items():
        try:
            fn = make()
            if backward:
                qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
                do = torch.randn_like(q)

                def step(fn=fn, qg=qg, kg=kg, vg=vg, do=do):
                    torch.autograd.grad(fn(qg, kg, vg, lengths, causal), (qg, kg, vg), do)
                seconds = bench.time_baseline(name, step, rounds=5, warmup_rounds=2)
            else:
                with torch.no_grad():
                    seconds = bench.time_baseline(name, fn, q, k, v, lengths, causal, rounds=5, warmup_rounds=2)
        except Exception as e:  # noqa: BLE001 - a missing / unsupported baseline is reported, not fatal
            bench.extra_info[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        bench.ratio_vs(name, seconds)
        best = seconds if best is None else min(best, seconds)
    if best is not None:
        bench.ratio_vs("best_baseline", best)


def _ovr_step(q, k, v, cu, max_len, causal, do, deterministic):
    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))

    def step():
        out = varlen_attention(qg, kg, vg, cu, cu, max_len, max_len, causal=causal, check_cu_seqlens_values=False,
                               deterministic=deterministic)
        torch.autograd.grad(out, (qg, kg, vg), do)
    return step


@pytest.mark.parametrize("backward", [None, "fused", "deterministic"], ids=["fwd", "fwd_bwd", "fwd_bwd_det"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_varlen_attention(gpu_bench, shape, backward):
    lengths, cu, max_len, q, k, v, causal = _inputs(shape)
    hq, hkv, d, _ = SHAPES[shape]
    if backward:
        do = torch.randn_like(q)
        op = _ovr_step(q, k, v, cu, max_len, causal, do, backward == "deterministic")
    else:
        def op():
            with torch.no_grad():
                varlen_attention(q, k, v, cu, cu, max_len, max_len, causal=causal, check_cu_seqlens_values=False)
    gpu_bench(op, rounds=20, warmup_rounds=3)
    gpu_bench.extra_info.update(shape=shape, num_segments=len(lengths), max_seqlen=max_len, heads=f"{hq}/{hkv}",
                                head_dim=d, causal=causal, pass_="fwd+bwd" if backward else "fwd",
                                backward=backward or "")
    flops = _flops(lengths, hq, d, causal) * (3.5 if backward else 1.0)
    gpu_bench.tflops(flops)
    if shape == "windows":
        elem = q.element_size()
        per_pass = (2 * q.numel() + 2 * k.numel()) * elem  # q, o + k, v
        gpu_bench.gbps(per_pass * (3 if backward else 1))
    if backward:  # the other backward mode of this kernel, in the same run
        other = "deterministic" if backward == "fused" else "fused"
        seconds = gpu_bench.time_baseline(f"ovr_{other}", _ovr_step(q, k, v, cu, max_len, causal, do,
                                                                    other == "deterministic"),
                                          rounds=5, warmup_rounds=2)
        gpu_bench.ratio_vs(f"ovr_{other}", seconds)
    _time_baselines(gpu_bench, lengths, cu, max_len, q, k, v, causal, backward is not None)
