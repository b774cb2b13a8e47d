"""Packing: C++ == pure-Python twins; each checked against an independent computation (accumulate, loops, a naive
first fit, hand-worked Karmarkar-Karp) and its invariants; pack/unpack round trips and gradients; bad inputs.

Legend: B sequences, L padded length, T packed tokens, X trailing feature dims.
"""

import itertools
import random

import pytest
import torch

from ovr_kernels import _ext
from ovr_kernels.packing import (
    balanced_partition,
    cu_seqlens_from_lengths,
    pack,
    position_ids_from_cu_seqlens,
    token_budget_microbatches,
    unpack,
)

EXT = [False, pytest.param(True, marks=pytest.mark.skipif(not _ext.HAS_EXT, reason="ovr_kernels._C not built"))]


def _random_lengths(n, high, seed, zeros=True):
    rng = random.Random(seed)
    return [rng.randint(0 if zeros else 1, high) for _ in range(n)]


# ---------------------------------------------------------------- cu_seqlens / position ids


@pytest.mark.parametrize("use_ext", EXT)
@pytest.mark.parametrize("lengths", [[], [0], [1], [5, 0, 0, 3, 1], _random_lengths(300, 50, 0)])
def test_cu_seqlens_and_position_ids(lengths, use_ext):
    cu = cu_seqlens_from_lengths(lengths, use_ext=use_ext)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, *itertools.accumulate(lengths)]
    assert torch.equal(cu_seqlens_from_lengths(torch.tensor(lengths, dtype=torch.int32), use_ext=use_ext), cu)
    if not lengths:
        return
    pos = position_ids_from_cu_seqlens(cu, use_ext=use_ext)
    assert pos.dtype == torch.int64
    assert pos.tolist() == [p for n in lengths for p in range(n)]


def test_cu_seqlens_ext_equals_python_large():
    lengths = torch.randint(0, 512, (2_000,))
    cu = cu_seqlens_from_lengths(lengths, use_ext=False)
    assert torch.equal(cu_seqlens_from_lengths(lengths), cu)
    assert torch.equal(position_ids_from_cu_seqlens(cu), position_ids_from_cu_seqlens(cu, use_ext=False))


@pytest.mark.parametrize("lengths,match", [
    ([3, -1], r"lengths\[1\] must be >= 0, got -1"),
    ([3, 1.5], r"lengths\[1\] must be an int, got 1.5"),
    ([[1], [2]], r"lengths\[0\] must be an int, got \[1\]"),
    (torch.tensor([1.0, 2.0]), "lengths must have dtype"),
    (torch.ones(2, 2, dtype=torch.int64), "lengths must have 1 dims"),
    (5, "lengths must be a 1-D integer tensor or a sequence of ints"),
    ([2**30, 2**30], "more than int32"),
])
def test_cu_seqlens_bad_inputs(lengths, match):
    with pytest.raises(ValueError, match=match):
        cu_seqlens_from_lengths(lengths)


@pytest.mark.parametrize("cu,match", [
    (torch.tensor([0, 3, 2], dtype=torch.int32), "non-decreasing"),
    (torch.tensor([1, 3], dtype=torch.int32), r"cu_seqlens\[0\] must be 0, got 1"),
    (torch.tensor([0, 3]), "cu_seqlens must have dtype"),
    (torch.tensor([0], dtype=torch.int32), "at least 2 entries"),
])
def test_position_ids_bad_inputs(cu, match):
    with pytest.raises(ValueError, match=match):
        position_ids_from_cu_seqlens(cu)


# ---------------------------------------------------------------- pack / unpack


@pytest.mark.parametrize("feature_shape", [(), (3,), (2, 5)])
def test_pack_unpack_round_trip_and_grads(feature_shape):
    lengths = [4, 0, 1, 7, 7, 2]
    padded = torch.randn(len(lengths), 7, *feature_shape, dtype=torch.float64, requires_grad=True)
    packed, cu, max_seqlen = pack(padded, lengths)
    assert max_seqlen == 7 and cu.tolist() == [0, *itertools.accumulate(lengths)]
    assert torch.equal(packed, torch.cat([padded[b, :n] for b, n in enumerate(lengths)]))
    out = unpack(packed, cu, 9, pad_value=-3.0)
    assert out.shape == (len(lengths), 9, *feature_shape)
    for b, n in enumerate(lengths):
        assert torch.equal(out[b, :n], padded[b, :n])
        assert bool((out[b, n:] == -3.0).all())
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    mask = (torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]).reshape(len(lengths), 7, *[1] * len(feature_shape))
    assert torch.equal(padded.grad, torch.where(mask, weight[:, :7], torch.zeros(())))
    if not feature_shape:  # numerical Jacobian: one forward per input element, so the smallest case only
        assert torch.autograd.gradcheck(lambda p: unpack(pack(p, lengths)[0], cu, 7),
                                        (padded.detach().requires_grad_(),), fast_mode=True)


def test_pack_bad_inputs():
    padded = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"lengths\[1\]=5 exceeds the padded length 4"):
        pack(padded, [1, 5])
    with pytest.raises(ValueError, match="lengths has 3 entries but padded has batch size 2"):
        pack(padded, [1, 1, 1])
    with pytest.raises(ValueError, match="padded must have at least 2 dims"):
        pack(torch.zeros(3), [1, 1, 1])
    packed, cu, _ = pack(padded, [3, 4])
    with pytest.raises(ValueError, match="max_len=3 is shorter than the longest sequence"):
        unpack(packed, cu, 3)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\]=7 must equal the number of packed tokens 6"):
        unpack(packed[:6], cu, 4)
    with pytest.raises(ValueError, match="max_len must be a non-negative int"):
        unpack(packed, cu, 4.0)


# ---------------------------------------------------------------- first-fit decreasing


def _naive_ffd(lengths, max_tokens):
    """Independent first-fit decreasing: scan every open bin in order."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for b in range(len(bins)):
            if room[b] >= lengths[i]:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    return bins


@pytest.mark.parametrize("use_ext", EXT)
@pytest.mark.parametrize("n,high,max_tokens", [(0, 1, 5), (1, 5, 5), (7, 9, 10), (500, 300, 1000), (333, 64, 64),
                                              (300, 40, 5000)])  # last: max_tokens > 4n takes the comparison sort
def test_ffd_matches_naive(n, high, max_tokens, use_ext):
    lengths = _random_lengths(n, high, seed=n)
    bins = token_budget_microbatches(lengths, max_tokens, use_ext=use_ext)
    assert bins == _naive_ffd(lengths, max_tokens)
    assert sorted(i for b in bins for i in b) == list(range(n))
    assert all(sum(lengths[i] for i in b) <= max_tokens for b in bins)


def test_ffd_hand_example_and_ties():
    # sorted (-len, index): 8(6) 7(2) 5(0) 3(1) 2(3) 2(4) 1(5); bins of 10: [8, 2(3)], [7, 3], [5, 2(4), 1]
    assert token_budget_microbatches([5, 3, 7, 2, 2, 1, 8], 10, use_ext=False) == [[6, 3], [2, 1], [0, 4, 5]]
    assert token_budget_microbatches(torch.tensor([4, 4, 4]), 8) == [[0, 1], [2]]


@pytest.mark.parametrize("use_ext", EXT)
def test_ffd_ext_equals_python_large(use_ext):
    lengths = torch.randint(1, 8192, (20_000,))
    assert token_budget_microbatches(lengths, 16384, use_ext=use_ext) == token_budget_microbatches(
        lengths, 16384, use_ext=False)


@pytest.mark.parametrize("use_ext", EXT)
def test_ffd_bad_inputs(use_ext):
    with pytest.raises(ValueError, match="sequence 2 has length 11 > max_tokens=10"):
        token_budget_microbatches([3, 10, 11, 12], 10, use_ext=use_ext)
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="max_tokens must be a positive int"):
            token_budget_microbatches([1], bad, use_ext=use_ext)
    with pytest.raises(ValueError, match=r"lengths\[1\] must be >= 0, got -1"):
        token_budget_microbatches([2, -1], 4, use_ext=use_ext)


def test_use_ext_true_without_extension(monkeypatch):
    monkeypatch.setattr(_ext, "HAS_EXT", False)
    with pytest.raises(ValueError, match="use_ext=True"):
        token_budget_microbatches([1, 2], 4, use_ext=True)
    assert token_budget_microbatches([1, 2], 4) == [[1, 0]]  # the default falls back to Python


# ---------------------------------------------------------------- Karmarkar-Karp partitions


def _check_partition(lengths, num_parts, cost, parts, imbalance):
    weights = [x if cost == "tokens" else x * x for x in lengths]
    assert len(parts) == num_parts
    assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
    assert all(p == sorted(p) for p in parts)
    if len(lengths) >= num_parts:
        assert all(parts), f"empty part in {parts}"
    loads = [sum(weights[i] for i in p) for p in parts]
    assert loads == sorted(loads, reverse=True)
    # largest differencing never widens the spread beyond the heaviest item (merges keep max spread of their inputs)
    assert loads[0] - loads[-1] <= max(weights, default=0)
    total = sum(weights)
    assert imbalance == pytest.approx(max(loads) * num_parts / total if total else 1.0, rel=1e-12)


def test_kk_hand_example():
    # KK on 8,7,6,5,4 into 2: (8,7)->1, (6,5)->1, (4, 8|7)->11|8, (11|8, 6|5)->16|14
    parts, imbalance = balanced_partition([8, 7, 6, 5, 4], 2, use_ext=False)
    assert parts == [[1, 3, 4], [0, 2]] and imbalance == pytest.approx(16 / 15)


@pytest.mark.parametrize("use_ext", EXT)
@pytest.mark.parametrize("cost", ["tokens", "quadratic"])
@pytest.mark.parametrize("n,num_parts", [(0, 3), (2, 5), (5, 5), (1, 1), (40, 1), (97, 4), (1000, 8), (64, 64)])
def test_kk_invariants_and_ext_equals_python(n, num_parts, cost, use_ext):
    lengths = _random_lengths(n, 2000, seed=n + num_parts)
    parts, imbalance = balanced_partition(lengths, num_parts, cost=cost, use_ext=use_ext)
    _check_partition(lengths, num_parts, cost, parts, imbalance)
    assert (parts, imbalance) == balanced_partition(lengths, num_parts, cost=cost, use_ext=False)


@pytest.mark.parametrize("use_ext", EXT)
def test_kk_zero_lengths_still_fill_every_part(use_ext):
    parts, imbalance = balanced_partition([0, 0, 0, 0, 9], 4, use_ext=use_ext)
    _check_partition([0, 0, 0, 0, 9], 4, "tokens", parts, imbalance)
    assert imbalance == pytest.approx(4.0)
    parts, imbalance = balanced_partition([0, 0, 0], 2, use_ext=use_ext)
    assert all(parts) and imbalance == 1.0


def test_kk_quality_on_many_sequences():
    lengths = _random_lengths(4096, 8192, seed=1, zeros=False)
    _, imbalance = balanced_partition(lengths, 8)
    assert imbalance < 1.001  # thousands of items: the differencing spread is a few tokens out of ~2M per part


@pytest.mark.parametrize("kwargs,match", [
    ({"num_parts": 0}, "num_parts must be a positive int, got 0"),
    ({"num_parts": 2.0}, "num_parts must be a positive int, got 2.0"),
    ({"num_parts": 2, "cost": "flops"}, "cost must be one of"),
])
def test_kk_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        balanced_partition([1, 2, 3], **kwargs)


@pytest.mark.parametrize("use_ext", EXT)
def test_kk_bad_lengths(use_ext):
    with pytest.raises(ValueError, match=r"lengths\[1\] must be >= 0, got -2"):
        balanced_partition([1, -2, 3], 2, use_ext=use_ext)
    with pytest.raises(ValueError, match="total quadratic cost overflows int64; lengths are too large for cost='quadratic'"):
        balanced_partition([2**31, 2**31, 2**31], 2, cost="quadratic", use_ext=use_ext)
    with pytest.raises(ValueError, match="total tokens cost overflows int64"):
        balanced_partition([2**62, 2**62], 2, use_ext=use_ext)
