"""linear_logprob_entropy: logprob, entropy, d(hidden), d(weight) vs the float64 reference, on both backends:
the token-chunked PyTorch path (CPU default) and the Triton kernels under the interpreter (OVR_BACKEND=triton).

Chunk sizes are shrunk so that the PyTorch path runs several token chunks and the Triton backward several token and
vocabulary chunks at test sizes; the forward grid runs two vocabulary splits under the interpreter.
"""

import pytest
import torch
from conftest import assert_close, assert_close_3way
from torch.profiler import ProfilerActivity, profile

import ovr_kernels.linear_logprob as ll
from ovr_kernels.linear_logprob import (
    linear_logprob_bwd,
    linear_logprob_entropy,
    linear_logprob_fwd,
    linear_logprob_nograd,
)
from ovr_kernels.reference import linear_logprob_entropy_ref

# atol per dtype (fwd, bwd): rounding of the fp32 statistics / of the dz tile in the input dtype.
ATOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-3, 2e-3), torch.float16: (1e-3, 1e-3)}


@pytest.fixture
def small_chunks(monkeypatch):
    """PyTorch path: 5-row token chunks. Triton backward: 64-token (one interpreter block) x 128-vocab dz chunks."""
    monkeypatch.setattr(ll, "CPU_CHUNK_ELEMS", 5 * 301)
    monkeypatch.setattr(ll, "MIN_VOCAB_CHUNK", 128)
    monkeypatch.setattr(ll, "SCRATCH_BYTES", 64 * 128 * 2)


def make_inputs(num_tokens, hidden_size, vocab_size, dtype, scale=1.0, num_ignored=2, target_dtype=torch.int64):
    hidden = (torch.randn(num_tokens, hidden_size) * scale).to(dtype)
    weight = (torch.randn(vocab_size, hidden_size) / hidden_size**0.5 * 2.0).to(dtype)
    targets = torch.randint(0, vocab_size, (num_tokens,))
    targets[torch.randperm(num_tokens)[:num_ignored]] = -100
    return hidden, weight, targets.to(target_dtype)


def run_with_grads(fn, hidden, weight, targets, temperature, grad_logprob, grad_entropy):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logprob, entropy = fn(h, w, targets, temperature)
    (logprob * grad_logprob.to(logprob.dtype) + entropy * grad_entropy.to(entropy.dtype)).sum().backward()
    return logprob, entropy, h.grad, w.grad


def check_against_reference(hidden, weight, targets, temperature, atol):
    num_tokens = hidden.shape[0]
    grad_logprob = torch.randn(num_tokens).to(hidden.device)  # drawn on the CPU: the same values on any device
    grad_entropy = torch.randn(num_tokens).to(hidden.device)
    got = run_with_grads(linear_logprob_entropy, hidden, weight, targets, temperature, grad_logprob, grad_entropy)
    ref = run_with_grads(linear_logprob_entropy_ref, hidden, weight, targets, temperature, grad_logprob,
                         grad_entropy)
    truth = run_with_grads(linear_logprob_entropy_ref, hidden.double(), weight.double(), targets, temperature,
                           grad_logprob, grad_entropy)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert got[2].dtype == hidden.dtype and got[3].dtype == weight.dtype
    for i, name in enumerate(["logprob", "entropy", "grad_hidden", "grad_weight"]):
        assert_close_3way(name, got[i], ref[i], truth[i], factor=2.0 if i < 2 else 3.0, atol=atol[i >= 2])
    ignored = targets == -100
    assert bool((got[0][ignored] == 0).all()) and bool((got[1][ignored] == 0).all())
    assert bool((got[2][ignored] == 0).all()), "ignored rows must get no gradient"
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens, hidden_size, vocab_size, temperature", [
    (64, 64, 256, 1.0),   # aligned to the interpreter tiles
    (97, 48, 301, 0.7),   # odd T (two token chunks), H not a multiple of BLOCK_K, V not a tile multiple
    (1, 16, 7, 1.3),      # one token, vocabulary smaller than a tile
])
def test_matches_reference(backend, small_chunks, dtype, num_tokens, hidden_size, vocab_size, temperature):
    hidden, weight, targets = make_inputs(num_tokens, hidden_size, vocab_size, dtype,
                                          num_ignored=min(2, num_tokens - 1))
    check_against_reference(hidden, weight, targets, temperature, ATOL[dtype])


def test_default_chunks_int32_targets(backend):
    """Default chunk sizes (one chunk at this size), int32 targets, all options non-default."""
    hidden, weight, targets = make_inputs(29, 40, 211, torch.float32, num_ignored=5, target_dtype=torch.int32)
    targets[targets == -100] = 7
    targets[:3] = 7  # ignore_index=7 also ignores rows whose target is a real id
    num_tokens = hidden.shape[0]
    g_lp, g_ent = torch.randn(num_tokens), torch.randn(num_tokens)

    def fn(h, w, t, temp):
        return linear_logprob_entropy(h, w, t, temperature=temp, ignore_index=7)

    def ref_fn(h, w, t, temp):
        return linear_logprob_entropy_ref(h, w, t, temp, ignore_index=7)

    got = run_with_grads(fn, hidden, weight, targets, 1.3, g_lp, g_ent)
    ref = run_with_grads(ref_fn, hidden, weight, targets, 1.3, g_lp, g_ent)
    truth = run_with_grads(ref_fn, hidden.double(), weight.double(), targets, 1.3, g_lp, g_ent)
    for i, name in enumerate(["logprob", "entropy", "grad_hidden", "grad_weight"]):
        assert_close_3way(name, got[i], ref[i], truth[i], factor=2.0 if i < 2 else 3.0, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_logits(backend, small_chunks, dtype):
    """Logits of magnitude ~1e3-1e4: no overflow, and the entropy (near 0) does not suffer lse - E[z] cancellation."""
    hidden, weight, targets = make_inputs(97, 48, 301, dtype, scale=1e3)
    got = check_against_reference(hidden, weight, targets, 0.7, ATOL[dtype])
    for x in got:
        assert bool(torch.isfinite(x).all())


def test_entropy_output_unused(backend):
    """Only logprob feeds the loss: entropy's gradient is absent and the grads equal the reference's."""
    hidden, weight, targets = make_inputs(23, 32, 157, torch.float32)
    g_lp = torch.randn(23)
    grads = []
    for fn in (linear_logprob_entropy, linear_logprob_entropy_ref):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        (fn(h, w, targets, 0.7)[0] * g_lp).sum().backward()
        grads.append((h.grad, w.grad))
    assert_close("grad_hidden", grads[0][0], grads[1][0], atol=2e-5)
    assert_close("grad_weight", grads[0][1], grads[1][1], atol=2e-5)


def test_forward_only_path(backend):
    """linear_logprob_nograd: no autograd, entropy only when asked, same values as the training path."""
    hidden, weight, targets = make_inputs(37, 48, 301, torch.bfloat16)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logprob, entropy = linear_logprob_nograd(h, w, targets, temperature=0.7)
    assert entropy is None and not logprob.requires_grad
    logprob2, entropy2 = linear_logprob_nograd(h, w, targets, temperature=0.7, with_entropy=True)
    ref_logprob, ref_entropy = linear_logprob_entropy(h, w, targets, temperature=0.7)
    assert not entropy2.requires_grad
    assert_close("logprob", logprob, ref_logprob.detach(), atol=0, rtol=0)
    assert_close("logprob (with entropy)", logprob2, ref_logprob.detach(), atol=0, rtol=0)
    assert_close("entropy", entropy2, ref_entropy.detach(), atol=0, rtol=0)


def test_launchers(backend):
    """linear_logprob_fwd / linear_logprob_bwd (the PPO loss builds on them) equal the autograd path."""
    hidden, weight, targets = make_inputs(37, 48, 301, torch.float32)
    g_lp, g_ent = torch.randn(37), torch.randn(37)
    logprob, entropy, stats = linear_logprob_fwd(hidden, weight, targets, 1.3, -100, with_entropy=True)
    grad_hidden, grad_weight = linear_logprob_bwd(hidden, weight, targets, 1.3, -100, stats, g_lp, g_ent)
    want = run_with_grads(linear_logprob_entropy, hidden, weight, targets, 1.3, g_lp, g_ent)
    for name, a, b in zip(["logprob", "entropy", "grad_hidden", "grad_weight"],
                          [logprob, entropy, grad_hidden, grad_weight], want):
        assert_close(name, a, b, atol=1e-6, rtol=1e-5)
    # Without entropy: stats carry none, and the backward of logprob alone still works.
    logprob_only, no_entropy, stats = linear_logprob_fwd(hidden, weight, targets, 1.3, -100, with_entropy=False)
    assert no_entropy is None and stats[-1] is None
    assert_close("logprob (no entropy)", logprob_only, logprob, atol=1e-6, rtol=1e-6)
    linear_logprob_bwd(hidden, weight, targets, 1.3, -100, stats, g_lp, None)
    with pytest.raises(ValueError, match="grad_entropy"):
        linear_logprob_bwd(hidden, weight, targets, 1.3, -100, stats, g_lp, g_ent)


def test_empty_tokens(backend):
    hidden, weight, targets = make_inputs(0, 16, 31, torch.float32, num_ignored=0)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logprob, entropy = linear_logprob_entropy(h, w, targets)
    assert logprob.shape == (0,) and entropy.shape == (0,)
    (logprob.sum() + entropy.sum()).backward()
    assert bool((w.grad == 0).all())


def test_torch_compile(backend):
    """The custom op traces with fullgraph=True and its compiled forward/backward equal eager."""
    torch._dynamo.reset()
    hidden, weight, targets = make_inputs(21, 32, 157, torch.float32)
    g_lp, g_ent = torch.randn(21), torch.randn(21)

    def loss_fn(h, w, t):
        logprob, entropy = linear_logprob_entropy(h, w, t, temperature=0.7)
        return (logprob * g_lp + entropy * g_ent).sum()

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(h, w, targets)
        loss.backward()
        results.append((loss, h.grad, w.grad))
    for name, a, b in zip(["loss", "grad_hidden", "grad_weight"], *results):
        assert_close(name, a, b, atol=1e-5, rtol=1e-5)


def test_opcheck():
    """torch.library.opcheck: schema, fake tensor and autograd registrations are consistent."""
    hidden, weight, targets = make_inputs(9, 16, 37, torch.float32)
    hidden.requires_grad_()
    weight.requires_grad_()
    torch.library.opcheck(torch.ops.ovr.linear_logprob_fwd.default, (hidden, weight, targets, 0.7, -100, True))
    torch.library.opcheck(torch.ops.ovr.linear_logprob_fwd.default, (hidden, weight, targets, 1.0, -100, False))


def _largest_allocation(fn):
    """Bytes of the largest net CPU allocation made by any single op while `fn` runs (torch profiler)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


def test_cpu_path_never_builds_full_logits(monkeypatch):
    """The chunked PyTorch path's largest tensor is one token chunk of logits, far below (T, V); the same probe on
    the reference sees the full (T, V) logits, so the probe can fail."""
    monkeypatch.delenv("OVR_BACKEND", raising=False)
    monkeypatch.setattr(ll, "CPU_CHUNK_ELEMS", 8 * 2003)
    hidden, weight, targets = make_inputs(256, 16, 2003, torch.float32)
    full_logits_bytes = 256 * 2003 * 4
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()

    def fwd_bwd():
        logprob, entropy = linear_logprob_entropy(h, w, targets)
        (logprob.sum() + entropy.sum()).backward()

    assert _largest_allocation(lambda: linear_logprob_entropy_ref(hidden, weight, targets)) >= full_logits_bytes
    ours = _largest_allocation(fwd_bwd)
    chunk_bytes = 8 * 2003 * 4
    assert ours <= 3 * chunk_bytes < full_logits_bytes // 8, f"largest allocation {ours} B"


@pytest.mark.parametrize("make_bad, match", [
    (lambda h, w, t: (h[None], w, t), "hidden must have 2 dims"),
    (lambda h, w, t: (h.long(), w, t), "hidden must have dtype"),
    (lambda h, w, t: (h, w.double(), t), "weight must have dtype"),
    (lambda h, w, t: (h, w[:, :-1], t), "weight must have shape"),
    (lambda h, w, t: (h, w.to("meta"), t), "weight is on meta"),
    (lambda h, w, t: (h, w[:0], t), "weight must have at least one vocabulary row"),
    (lambda h, w, t: (h, w, t[:-1]), "targets must have shape"),
    (lambda h, w, t: (h, w, t.float()), "targets must have dtype"),
    (lambda h, w, t: (h, w, torch.cat([t[:-1], t.new_tensor([31])])), r"targets\[8\]=31 is outside \[0, 31\)"),
    (lambda h, w, t: (h, w, torch.cat([t.new_tensor([-1]), t[1:]])), r"targets\[0\]=-1 is outside"),
])
def test_bad_inputs(backend, make_bad, match):
    hidden, weight, targets = make_inputs(9, 16, 31, torch.float32, num_ignored=0)
    with pytest.raises(ValueError, match=match):
        linear_logprob_entropy(*make_bad(hidden, weight, targets))
    with pytest.raises(ValueError, match=match):
        linear_logprob_nograd(*make_bad(hidden, weight, targets))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), "hot"])
def test_bad_temperature(temperature):
    hidden, weight, targets = make_inputs(9, 16, 31, torch.float32)
    with pytest.raises(ValueError, match="temperature"):
        linear_logprob_entropy(hidden, weight, targets, temperature=temperature)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab_size", [151_665, 152_064])
def test_gpu_qwen_vocab(vocab_size):
    """Real kernels at a Qwen2.5 vocabulary (not a tile multiple), bf16, vs the fp32 reference on chunks."""
    torch.manual_seed(0)
    hidden, weight, targets = make_inputs(1000, 512, vocab_size, torch.bfloat16, num_ignored=17)
    hidden, weight, targets = hidden.cuda(), weight.cuda(), targets.cuda()
    check_against_reference(hidden, weight, targets, 0.7, ATOL[torch.bfloat16])


def test_out_of_range_target_is_nan_without_the_value_check(backend, monkeypatch):
    """With the value check off (CUDA tensors without OVR_CHECK_TARGETS), an out-of-range target poisons its own
    log-prob with NaN instead of returning the log-prob of a zero logit; the other rows are unchanged."""
    hidden, weight, targets = make_inputs(37, 48, 301, torch.float32)
    want_logprob, want_entropy = linear_logprob_nograd(hidden, weight, targets, with_entropy=True)
    monkeypatch.setattr(ll, "_sync_checks", lambda x: False)
    bad = targets.clone()
    bad[5], bad[11] = 301, -7
    bad[12] = -100
    logprob, entropy = linear_logprob_nograd(hidden, weight, bad, with_entropy=True)
    assert bool(torch.isnan(logprob[[5, 11]]).all())
    others = torch.ones(37, dtype=torch.bool)
    others[[5, 11, 12]] = False
    assert_close("logprob (other rows)", logprob[others], want_logprob[others], atol=0, rtol=0)
    assert float(logprob[12]) == 0.0
    assert_close("entropy", entropy[others], want_entropy[others], atol=0, rtol=0)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, _ = linear_logprob_entropy(h, w, bad)
    lp.sum().backward()  # the backward runs (no index error); the loss it belongs to is NaN
    assert bool(torch.isfinite(h.grad).all())


def test_target_value_check_switch(monkeypatch):
    """Target values are read (a host sync on CUDA) only for CPU tensors or under OVR_CHECK_TARGETS=1;
    `check_targets` is the caller's once-per-batch check."""
    on_device = torch.empty(3, dtype=torch.int64, device="meta")  # stands in for a CUDA tensor: not on the CPU
    monkeypatch.delenv("OVR_CHECK_TARGETS", raising=False)
    assert ll._sync_checks(torch.zeros(3)) and not ll._sync_checks(on_device)
    monkeypatch.setenv("OVR_CHECK_TARGETS", "1")
    assert ll._sync_checks(on_device)
    ll.check_targets(torch.tensor([0, 30, -100]), 31)
    with pytest.raises(ValueError, match=r"targets\[1\]=31 is outside \[0, 31\) and is not ignore_index=-100"):
        ll.check_targets(torch.tensor([0, 31, -100]), 31)
    with pytest.raises(ValueError, match=r"targets\[0\]=-100 is outside"):
        ll.check_targets(torch.tensor([-100, 3]), 31, ignore_index=-1)


def _bf16_ulps(a, b, floor):
    """|a - b| in units of the last place of bf16 (8 significant bits) at max(|a|, |b|, floor)."""
    a, b = a.double(), b.double()
    _, exp = torch.frexp(torch.maximum(torch.maximum(a.abs(), b.abs()), floor))
    return ((a - b).abs() / torch.ldexp(torch.ones_like(a), exp - 8)).nan_to_num(0.0)


def _chunked_bwd(hidden, weight, targets, stats, g_lp, g_ent, round_chunks=False):
    """The backward with dz chunks of 64 tokens x 128 vocabulary entries, and the dz it used, (T, V) fp64, read off
    the per-chunk GEMMs. round_chunks=True rounds every chunk's GEMM to bf16 (the defect the test must catch)."""
    dz = torch.zeros(hidden.shape[0], weight.shape[0], dtype=torch.float64)
    t0 = [0]
    mm_fp32 = ll._mm_fp32

    def recording_mm(a, b, out=None):
        offset = b.storage_offset() // b.shape[1]
        if b.untyped_storage().data_ptr() == hidden.untyped_storage().data_ptr():
            t0[0] = offset  # dweight GEMM: dz^T @ hidden[t0:t1], issued first for each chunk
        else:
            dz[t0[0]:t0[0] + a.shape[0], offset:offset + a.shape[1]] = a.double()  # dhidden GEMM: dz @ weight[v0:v1]
        result = mm_fp32(a, b, out=out)
        return result.copy_(result.to(torch.bfloat16)) if round_chunks else result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ll, "MIN_VOCAB_CHUNK", 128)
        mp.setattr(ll, "SCRATCH_BYTES", 64 * 128 * 2)
        mp.setattr(ll, "_mm_fp32", recording_mm)
        grads = linear_logprob_bwd(hidden, weight, targets, 1.0, -100, stats, g_lp, g_ent)
    return grads, dz


@pytest.mark.parametrize("with_entropy", [False, True])
def test_chunked_backward_accumulates_in_fp32(triton_backend, with_entropy):
    """bf16, 8 vocabulary x 4 token chunks vs one chunk: the per-chunk GEMMs sum in fp32 and round to bf16 once.

    Both results are fp32 sums of the same bf16 products in different orders, each rounded to bf16 once, so they
    differ by at most one bf16 ulp of the result plus the fp32 order error, <= 2 K 2^-24 S for a sum of K terms of
    absolute sum S. Measuring ulps at no less than K 2^-15 S puts that error under one ulp: <= 2 ulps in all. Where
    a gradient entry nearly cancels, the fp32 order error alone is many ulps of the entry, so ulps at the entry
    itself would be no bound. Rounding each chunk to bf16 instead breaks the bound by a wide margin (10+ ulps)."""
    hidden, weight, targets = make_inputs(256, 64, 1024, torch.bfloat16)
    g_lp, g_ent = torch.randn(256), (torch.randn(256) if with_entropy else None)
    _, _, stats = linear_logprob_fwd(hidden, weight, targets, 1.0, -100, with_entropy=with_entropy)
    one_chunk = linear_logprob_bwd(hidden, weight, targets, 1.0, -100, stats, g_lp, g_ent)
    chunked, dz = _chunked_bwd(hidden, weight, targets, stats, g_lp, g_ent)
    rounded, _ = _chunked_bwd(hidden, weight, targets, stats, g_lp, g_ent, round_chunks=True)
    abs_sums = (dz.abs() @ weight.double().abs(), dz.abs().t() @ hidden.double().abs())
    for name, a, b, bad, abs_sum, num_terms in zip(("grad_hidden", "grad_weight"), chunked, one_chunk, rounded,
                                                   abs_sums, (weight.shape[0], hidden.shape[0])):
        floor = num_terms * 2.0**-15 * abs_sum
        ulps = float(_bf16_ulps(a, b, floor).max())
        assert ulps <= 2.0, f"{name}: {ulps} bf16 ulps between chunked and one chunk"
        assert float(_bf16_ulps(bad, b, floor).max()) > 4.0, f"{name}: per-chunk bf16 rounding went unnoticed"


@pytest.mark.parametrize("num_splits", [1, 3])
def test_split_merge(triton_backend, monkeypatch, num_splits):
    """The merge kernel with one split and with three (padded to a 4-row tile): same numbers as the reference."""
    monkeypatch.setattr(ll, "_num_splits", lambda num_t_blocks, num_v_tiles, slab_bytes, device: num_splits)
    hidden, weight, targets = make_inputs(97, 48, 301, torch.float32)  # 3 vocabulary tiles of 128
    check_against_reference(hidden, weight, targets, 0.7, ATOL[torch.float32])
