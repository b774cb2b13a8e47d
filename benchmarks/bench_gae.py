"""GAE on 512 sequences x 4096 tokens (2M packed tokens): C++ (CPU) and CUDA vs the reference and the torch fallback.

The reference is a per-token Python loop (~5-10 us a token): it is timed once on 8 of the 512 sequences and scaled
by 64 (its cost is linear in tokens), reported as reference_loop_scaled_ms. GB/s counts rewards + values read
and advantages + returns written once.
"""

import pytest
import torch

from ovr_kernels import _ext
from ovr_kernels.gae import gae
from ovr_kernels.packing import cu_seqlens_from_lengths
from ovr_kernels.reference import gae_ref

NUM_SEQS, SEQ_LEN, SUBSET = 512, 4096, 8
GAMMA, LAM = 0.99, 0.95


def _inputs(device, num_seqs=NUM_SEQS):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(num_seqs * SEQ_LEN, generator=g)
    v = torch.randn(num_seqs * SEQ_LEN, generator=g)
    cu = cu_seqlens_from_lengths([SEQ_LEN] * num_seqs)
    return r.to(device), v.to(device), cu.to(device)


def _reference_loop_scaled(bench, device):
    r, v, cu = _inputs(device, SUBSET)
    sub_s = bench.time_baseline("reference_loop_subset", gae_ref, r, v, cu, GAMMA, LAM, rounds=1, warmup_rounds=0)
    return sub_s * NUM_SEQS / SUBSET


def _measure(bench, device, rounds, warmup_rounds, fallback_rounds):
    """Time gae (C++ on CPU, CUDA on GPU) and, in the same run, the torch fallback and the scaled reference loop;
    returns (rewards, values, cu_seqlens, advantages) for the caller's correctness check."""
    r, v, cu = _inputs(device)
    adv, _ = bench(gae, r, v, cu, GAMMA, LAM, rounds=rounds, warmup_rounds=warmup_rounds)
    bench.gbps(4 * r.numel() * r.element_size())
    bench.rate("tokens_per_s", r.numel())
    bench.extra_info.update(num_seqs=NUM_SEQS, seq_len=SEQ_LEN, dtype=str(r.dtype))
    torch_s = bench.time_baseline("torch_fallback", gae, r, v, cu, GAMMA, LAM, use_ext=False, rounds=fallback_rounds)
    bench.ratio_vs("torch_fallback", torch_s)
    bench.ratio_vs("reference_loop_scaled", _reference_loop_scaled(bench, device))
    return r, v, cu, adv


@pytest.mark.skipif(not _ext.HAS_EXT, reason="ovr_kernels._C not built")
def test_gae_cpu(cpu_bench):
    r, v, cu, adv = _measure(cpu_bench, "cpu", rounds=5, warmup_rounds=1, fallback_rounds=1)
    sub = SUBSET * SEQ_LEN
    assert torch.equal(adv[:sub], gae_ref(r[:sub], v[:sub], cu[:SUBSET + 1], GAMMA, LAM)[0])


def test_gae_cuda(gpu_bench):
    if not _ext.HAS_CUDA_EXT:
        pytest.skip("ovr_kernels._C built without nvcc")
    r, v, cu, adv = _measure(gpu_bench, "cuda", rounds=50, warmup_rounds=5, fallback_rounds=3)
    truth, _ = gae(r.double().cpu(), v.double().cpu(), cu.cpu(), GAMMA, LAM)
    gpu_bench.extra_info["max_abs_err_vs_fp64"] = float((adv.double().cpu() - truth).abs().max())
