"""Group advantages (GRPO / RLOO / Dr.GRPO), masked whitening and broadcast_to_tokens: Triton kernels
(OVR_BACKEND=triton; the interpreter on CPU) vs the same-dtype reference vs the float64 reference.
"""

import pytest
import torch
from conftest import assert_close, assert_close_3way

from ovr_kernels import reference
from ovr_kernels.advantages import (
    broadcast_to_tokens,
    drgrpo_advantages,
    grpo_advantages,
    masked_whiten,
    rloo_advantages,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ESTIMATORS = [
    (grpo_advantages, reference.grpo_advantages_ref),
    (rloo_advantages, reference.rloo_advantages_ref),
    (drgrpo_advantages, reference.drgrpo_advantages_ref),
]


def make_scores(num_groups, group_size, dtype):
    """Binary rewards plus a little noise, with a constant group first (std 0) and a mean shift (cancellation)."""
    scores = (torch.rand(num_groups, group_size) > 0.5).float() + 0.1 * torch.randn(num_groups, group_size) + 3.0
    scores[0] = 1.0
    return scores.reshape(-1).to(dtype).to(DEVICE)


@pytest.mark.parametrize("fn, ref_fn", ESTIMATORS, ids=["grpo", "rloo", "drgrpo"])
@pytest.mark.parametrize("num_groups, group_size, dtype", [
    (64, 8, torch.float32),     # aligned
    (37, 5, torch.bfloat16),    # odd group size (padded tile lanes), several programs
    (300, 1, torch.float32),    # groups of one
    (3, 100, torch.float16),    # wide groups
])
def test_group_advantages_match_reference(triton_backend, fn, ref_fn, num_groups, group_size, dtype):
    scores = make_scores(num_groups, group_size, dtype)
    got = fn(scores, group_size)
    assert got.dtype == dtype and got.shape == scores.shape
    assert bool(torch.isfinite(got).all())
    assert_close_3way("advantages", got, ref_fn(scores, group_size), ref_fn(scores.double(), group_size),
                      atol=1e-5 if dtype == torch.float32 else 1e-2)
    assert bool((got[:group_size] == 0).all()), "a constant group has zero advantage"
    if group_size == 1:
        assert bool((got == 0).all())


@pytest.mark.parametrize("fn", [grpo_advantages, rloo_advantages, drgrpo_advantages], ids=["grpo", "rloo", "drgrpo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_constant_groups_are_exactly_zero(backend, fn, dtype):
    """All-right or all-wrong groups are common in RL: their advantage is exactly 0, whatever the score and the
    group size (a mean rounded an ulp away from the scores, divided by a std of that size, is not 0)."""
    group_size = 100
    values = torch.tensor([0.7, 3.7, 1.0, -2.9, 1 / 3])
    scores = values.repeat_interleave(group_size).to(dtype).to(DEVICE)
    got = fn(scores, group_size)
    assert bool((got == 0).all()), f"constant groups: max |advantage| {float(got.abs().max()):.3e}, want 0"


def test_grpo_eps(triton_backend):
    scores = make_scores(16, 4, torch.float32)
    got = grpo_advantages(scores, 4, eps=0.5)
    assert_close("grpo eps", got, reference.grpo_advantages_ref(scores.double(), 4, eps=0.5), atol=1e-6)


@pytest.mark.parametrize("T, mask_kind, shift_mean, dtype", [
    (1024, "bool", True, torch.float32),
    (5003, "float", False, torch.float32),   # two tiles under the interpreter, float weights, rescale only
    (777, "bool", True, torch.bfloat16),
    (1, "bool", True, torch.float32),        # one token: variance over max(n - 1, 1)
])
def test_masked_whiten_matches_reference(triton_backend, T, mask_kind, shift_mean, dtype):
    x = (torch.randn(T) * 3.0 + 5.0).to(dtype).to(DEVICE)
    keep = torch.rand(T) > 0.3 if T > 1 else torch.ones(1, dtype=torch.bool)
    mask = (keep if mask_kind == "bool" else keep * torch.rand(T)).to(DEVICE)
    if mask_kind == "float":
        mask = mask.to(dtype)
    got = masked_whiten(x, mask, shift_mean=shift_mean)
    ref = reference.masked_whiten_ref(x, mask, shift_mean)
    truth = reference.masked_whiten_ref(x.double(), mask.double() if mask.is_floating_point() else mask, shift_mean)
    assert got.dtype == dtype
    assert_close_3way("whitened", got, ref, truth, atol=1e-5 if dtype == torch.float32 else 1e-2)
    assert bool((got[~keep.to(DEVICE)] == 0).all())
    if T > 1 and shift_mean:
        m = keep.to(DEVICE)
        assert abs(float(got[m].double().mean())) < 0.02 and abs(float(got[m].double().std()) - 1.0) < 0.02


def test_masked_whiten_many_programs(triton_backend, monkeypatch):
    """79 programs of 64 tokens, partial rows combined 16 at a time, some programs fully masked, a large mean
    (1e3) over a unit spread: the combined variance has no cancellation (three-way vs the float64 reference)."""
    import ovr_kernels.advantages as adv

    monkeypatch.setattr(adv, "WHITEN_BLOCK", 64)
    monkeypatch.setattr(adv, "WHITEN_PARTIALS", 16)
    x = (torch.randn(5003) + 1e3).to(DEVICE)
    mask = (torch.rand(5003) > 0.5).to(DEVICE)
    mask[128:320] = False
    got = masked_whiten(x, mask)
    ref = reference.masked_whiten_ref(x, mask)
    truth = reference.masked_whiten_ref(x.double(), mask)
    assert_close_3way("whitened", got, ref, truth, atol=1e-5)


def test_masked_whiten_all_masked_is_finite(triton_backend):
    x = torch.randn(100, device=DEVICE)
    out = masked_whiten(x, torch.zeros(100, dtype=torch.bool, device=DEVICE))
    assert bool((out == 0).all())


def test_broadcast_to_tokens():
    values = torch.tensor([1.5, -2.0, 0.25, 7.0], device=DEVICE)
    cu = torch.tensor([0, 3, 3, 4, 6], dtype=torch.int32, device=DEVICE)
    out = broadcast_to_tokens(values, cu)
    expected = torch.cat([values[b].repeat(int(cu[b + 1] - cu[b])) for b in range(4)])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("call, match", [
    (lambda: grpo_advantages(torch.zeros(10), 3), "not a multiple of group_size=3"),
    (lambda: rloo_advantages(torch.zeros(4), 0), "group_size must be an int >= 1, got 0"),
    (lambda: drgrpo_advantages(torch.zeros(4), 2.0), "group_size must be an int >= 1, got 2.0"),
    (lambda: grpo_advantages(torch.zeros(4, 1), 2), "scores must have 1 dims"),
    (lambda: grpo_advantages(torch.zeros(4, dtype=torch.int64), 2), "scores must have dtype"),
    (lambda: grpo_advantages(torch.zeros(4), 2, eps=0.0), "eps must be > 0.0"),
    (lambda: masked_whiten(torch.zeros(4), torch.ones(3, dtype=torch.bool)), r"mask must have shape \(4,\)"),
    (lambda: masked_whiten(torch.zeros(4), torch.ones(4, dtype=torch.int32)), "mask must have dtype"),
    (lambda: masked_whiten(torch.zeros(4), torch.ones(4, dtype=torch.bool), eps=-1.0), "eps must be >= 0.0"),
    (lambda: broadcast_to_tokens(torch.zeros(2), torch.tensor([0, 1, 3])), "cu_seqlens must have dtype"),
    (lambda: broadcast_to_tokens(torch.zeros(2), torch.tensor([0, 3], dtype=torch.int32)),
     r"cu_seqlens must have shape \(3,\)"),
    (lambda: broadcast_to_tokens(torch.zeros(2), torch.tensor([0, 3, 1], dtype=torch.int32)), "non-decreasing"),
])
def test_bad_inputs_raise(triton_backend, call, match):
    with pytest.raises(ValueError, match=match):
        call()
