"""Packing on 64k sequences: C++ (ovr_kernels._C) vs the pure-Python twin, same inputs, same results.

The brief's bar: first-fit decreasing and Karmarkar-Karp partitions >= 20x faster in C++ than in Python
(extra_info["speedup_vs_python"]). Both sides are the whole public call (validation, conversion, result lists).
"""

import pytest
import torch

from ovr_kernels import _ext
from ovr_kernels.packing import (
    balanced_partition,
    cu_seqlens_from_lengths,
    position_ids_from_cu_seqlens,
    token_budget_microbatches,
)

NUM_SEQS = 65536
pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="ovr_kernels._C not built")


def _lengths(num_seqs=NUM_SEQS):
    g = torch.Generator().manual_seed(0)
    return torch.randint(64, 4097, (num_seqs,), generator=g)  # RL responses: 64..4096 tokens


def _compare(bench, name, run):
    out = bench(run, True, rounds=5, warmup_rounds=1)
    python_s = bench.time_baseline("python", run, False, rounds=1, warmup_rounds=0)  # ~0.3-2 s: one honest round
    assert run(False) == out, f"{name}: C++ and Python results differ"
    ratio = bench.ratio_vs("python", python_s)
    bench.extra_info["num_seqs"] = NUM_SEQS
    bench.rate("seqs_per_s", NUM_SEQS)
    print(f"{name}: C++ {bench.median_s() * 1e3:.1f} ms, Python {python_s * 1e3:.0f} ms, speedup {ratio:.1f}x")
    return out


def test_ffd_microbatches(cpu_bench):
    lengths = _lengths()
    bins = _compare(cpu_bench, "ffd", lambda use_ext: token_budget_microbatches(lengths, 16384, use_ext=use_ext))
    cpu_bench.extra_info["num_bins"] = len(bins)
    cpu_bench.extra_info["fill"] = round(int(lengths.sum()) / (16384 * len(bins)), 4)


@pytest.mark.parametrize("num_parts,cost", [(8, "tokens"), (64, "quadratic")])
def test_balanced_partition(cpu_bench, num_parts, cost):
    lengths = _lengths()
    _, imbalance = _compare(cpu_bench, f"kk{num_parts}-{cost}",
                            lambda use_ext: balanced_partition(lengths, num_parts, cost, use_ext=use_ext))
    cpu_bench.extra_info["imbalance"] = imbalance


def test_cu_seqlens_position_ids(cpu_bench):
    lengths = _lengths(4096)  # 8.5M tokens of position ids (64k sequences would write 1 GB)

    def run(use_ext):
        cu = cu_seqlens_from_lengths(lengths, use_ext=use_ext)
        return position_ids_from_cu_seqlens(cu, use_ext=use_ext)

    pos = cpu_bench(run, True, rounds=5, warmup_rounds=1)
    torch_s = cpu_bench.time_baseline("torch", run, False, rounds=3)
    assert torch.equal(pos, run(False))
    cpu_bench.ratio_vs("torch", torch_s)
    cpu_bench.gbps(pos.numel() * pos.element_size())  # position ids written
