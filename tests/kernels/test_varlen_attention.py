"""varlen_attention: Triton kernels (under the interpreter here) vs the same-dtype reference vs float64 truth.

Shapes are tiny (segments <= 130 tokens, <= 7 heads) because the interpreter runs ~10 ms per inner-loop iteration;
the 64-row interpreter tiles still put segment ends on both sides of a tile edge (63, 64, 65, 130).
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_3way, max_err
from sm_compile import capture_launches

from ovr_kernels import varlen_attention
from ovr_kernels.reference import varlen_attention_ref

va = importlib.import_module("ovr_kernels.varlen_attention")  # the module (the package exports the function)


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _inputs(lens_q, lens_k, hq, hkv, d, dtype):
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    q = torch.randn(int(cu_q[-1]), hq, d, dtype=dtype)
    k = torch.randn(int(cu_k[-1]), hkv, d, dtype=dtype)
    v = torch.randn(int(cu_k[-1]), hkv, d, dtype=dtype)
    return q, k, v, cu_q, cu_k


def _run(fn, q, k, v, do):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), do.to(out.dtype))
    return out, lse, grads


def _check_lse(kernel_lse, ref_lse, truth_lse, atol):
    """-inf exactly where the truth has it (rows that see no key), 3-way close elsewhere."""
    inf_truth = torch.isinf(truth_lse)
    assert torch.equal(torch.isinf(kernel_lse), inf_truth), "LSE -inf pattern differs from the truth"
    assert bool((kernel_lse[inf_truth] < 0).all())
    fin = ~inf_truth
    assert_close_3way("lse", kernel_lse[fin], ref_lse[fin], truth_lse[fin], atol=atol)


CASES = [
    # lens_q, lens_k (None: same as q), hq, hkv, d, causal, dtype, softmax_scale
    pytest.param([1, 7, 63, 0, 64, 65, 37], None, 2, 2, 64, False, torch.float32, None, id="mha-d64-odd-lengths"),
    pytest.param([1, 7, 63, 0, 64, 65, 37], None, 7, 1, 80, True, torch.float32, None, id="gqa7-d80-causal"),
    pytest.param([65, 1, 0, 130], None, 4, 2, 128, True, torch.bfloat16, 0.3, id="gqa2-d128-causal-bf16-scale"),
    pytest.param([5, 70, 3, 0, 66], [9, 40, 0, 4, 131], 4, 2, 96, True, torch.float32, None,
                 id="sq-ne-sk-causal-bottom-right"),
    pytest.param([5, 70, 3, 0], [9, 40, 0, 4], 2, 1, 80, False, torch.bfloat16, None, id="sq-ne-sk-noncausal-bf16"),
]


def _dq_mode_of(lens_k, deterministic):
    """The dQ path the backward takes for these key lengths under the interpreter's tiles."""
    return va._dq_mode(deterministic, max(lens_k), va._INTERPRET_CONFIG[1])


def test_cases_cover_every_backward_path():
    """The three-way cases run each dQ path: fused with fp32 atomics (long segments, default), fused with plain
    stores (every key segment within one kv block), the separate dQ kernel (deterministic=True, long segments)."""
    modes = {_dq_mode_of(c.values[1] or c.values[0], det) for c in CASES for det in (False, True)}
    assert modes == {va.DQ_SEPARATE, va.DQ_ATOMIC, va.DQ_STORE}


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("lens_q, lens_k, hq, hkv, d, causal, dtype, scale", CASES)
def test_matches_reference_fwd_bwd(triton_backend, lens_q, lens_k, hq, hkv, d, causal, dtype, scale, deterministic):
    lens_k = lens_q if lens_k is None else lens_k
    q, k, v, cu_q, cu_k = _inputs(lens_q, lens_k, hq, hkv, d, dtype)
    do = torch.randn(q.shape, dtype=torch.float64)

    def kernel(q, k, v):
        return varlen_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, softmax_scale=scale,
                                return_lse=True, deterministic=deterministic)

    def ref(q, k, v):
        return varlen_attention_ref(q, k, v, cu_q, cu_k, causal=causal, softmax_scale=scale, return_lse=True)

    out, lse, grads = _run(kernel, q, k, v, do)
    ref_out, ref_lse, ref_grads = _run(ref, q, k, v, do)
    truth_out, truth_lse, truth_grads = _run(ref, q.double(), k.double(), v.double(), do)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (hq, q.shape[0])
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    assert_close_3way("out", out, ref_out, truth_out, factor=2.0, atol=atol)
    _check_lse(lse, ref_lse, truth_lse, atol)
    for name, g, rg, tg in zip(("dq", "dk", "dv"), grads, ref_grads, truth_grads):
        assert g.dtype == dtype
        assert_close_3way(name, g, rg, tg, factor=3.0, atol=atol)


def _causal_pair(cu_q, cu_k, max_len):
    """(kernel, reference) causal attention with LSE over fixed boundaries, as functions of (q, k, v)."""
    def kernel(q, k, v):
        return varlen_attention(q, k, v, cu_q, cu_k, max_len, max_len, causal=True, return_lse=True)

    def ref(q, k, v):
        return varlen_attention_ref(q, k, v, cu_q, cu_k, causal=True, return_lse=True)

    return kernel, ref


def test_forward_pointer_path_for_unaligned_views(triton_backend):
    """A q/k/v view whose token stride is not 16-byte aligned (a fused projection with odd padding) cannot use TMA
    descriptors: the forward takes masked pointer loads instead, with the same results; aligned inputs take TMA."""
    lens, hq, hkv, d = [1, 70, 0, 33], 4, 2, 80
    q, k, v, cu_q, cu_k = _inputs(lens, lens, hq, hkv, d, torch.bfloat16)
    assert va._tma_ok(q.device, q, k, v) and not va._tma_ok(q.device, q.float(), k.float(), v.float())
    packed = torch.randn(q.shape[0], (hq + 2 * hkv) * d + 1, dtype=q.dtype)  # one extra column: 2 * 641 bytes
    qkv = packed[:, :-1].view(q.shape[0], hq + 2 * hkv, d)
    qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:] = q, k, v
    qs, ks, vs = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
    assert not va._tma_ok(qs.device, qs, ks, vs)
    do = torch.randn(q.shape, dtype=torch.float64)

    kernel, ref = _causal_pair(cu_q, cu_k, 70)
    got, aligned = _run(kernel, qs, ks, vs, do), _run(kernel, q, k, v, do)
    truth = _run(ref, q.double(), k.double(), v.double(), do)
    assert_close_3way("out", got[0], aligned[0], truth[0], factor=2.0, atol=1e-3)
    for g, a, t in zip(got[2], aligned[2], truth[2]):
        assert_close_3way("grad", g, a, t, factor=3.0, atol=1e-3)


@pytest.mark.parametrize("lens_q, lens_k", [([9, 4], [3, 0]), ([140, 4], [70, 0])], ids=["store-dq", "atomic-dq"])
def test_rows_without_keys_are_zero(triton_backend, lens_q, lens_k):
    # causal with sk < sq: the first sq - sk queries see no key; a segment with sk = 0 sees nothing at all
    q, k, v, cu_q, cu_k = _inputs(lens_q, lens_k, 2, 2, 64, torch.float32)
    q.requires_grad_()
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True, return_lse=True)
    blind = torch.zeros(q.shape[0], dtype=torch.bool)
    blind[:lens_q[0] - lens_k[0]] = True
    blind[lens_q[0]:] = True
    assert torch.equal(out[blind], torch.zeros_like(out[blind])) and bool(torch.isneginf(lse[:, blind]).all())
    assert bool(torch.isfinite(lse[:, ~blind]).all()) and float(out[~blind].detach().abs().sum()) > 0
    (dq,) = torch.autograd.grad(out, q, torch.randn_like(out))
    assert torch.equal(dq[blind], torch.zeros_like(dq[blind])) and bool(torch.isfinite(dq).all())
    assert float(dq[~blind].abs().sum()) > 0


def test_deterministic_backward_is_bit_identical(triton_backend):
    lens, hq, hkv = [70, 3, 33], 4, 1
    q, k, v, cu_q, cu_k = _inputs(lens, lens, hq, hkv, 64, torch.float32)
    do = torch.randn(q.shape, dtype=torch.float64)
    # the default mode picks the atomic dK/dV path for this small GQA problem; deterministic=True never does
    assert va.use_atomic_dkdv(False, hq, hkv, 64, k.shape[0], 64, q.device)
    assert not va.use_atomic_dkdv(True, hq, hkv, 64, k.shape[0], 64, q.device)

    def kernel(q, k, v):
        return varlen_attention(q, k, v, cu_q, cu_k, 70, 70, causal=True, return_lse=True, deterministic=True)

    first, second = _run(kernel, q, k, v, do), _run(kernel, q, k, v, do)
    for a, b in zip(first[2], second[2]):
        assert torch.equal(a, b)
    truth = _run(lambda q, k, v: varlen_attention_ref(q, k, v, cu_q, cu_k, True, None, True),
                 q.double(), k.double(), v.double(), do)
    for g, tg in zip(first[2], truth[2]):
        assert max_err(g, tg) < 1e-4


def _launched_backward_kernels(lens, hq, hkv, causal, deterministic, dtype=torch.float32):
    """{kernel name: launches} of one backward (kernels replaced by recorders: the gradients are not computed)."""
    q, k, v, cu_q, cu_k = _inputs(lens, lens, hq, hkv, 64, dtype)
    out, lse = va.varlen_attention_fwd(q, k, v, cu_q, cu_k, max(lens), max(lens), causal, 0.125)
    names = ["_varlen_attn_bwd_dkdv_kernel", "_varlen_attn_bwd_dq_kernel"]
    calls = capture_launches(va, names, lambda: va.varlen_attention_bwd(
        torch.randn_like(out), q, k, v, out, lse, cu_q, cu_k, max(lens), max(lens), causal, 0.125, deterministic))
    return {name: calls[name] for name in names}


@pytest.mark.parametrize("lens, causal", [([130, 7], True), ([65, 0, 66], False)])
def test_default_backward_is_one_fused_kernel(triton_backend, lens, causal):
    """Default: one dK/dV kernel that also produces dQ (5 GEMMs), fp32 atomics for segments over one kv block;
    deterministic=True: the dK/dV kernel without dQ, then the dQ kernel."""
    calls = _launched_backward_kernels(lens, 4, 2, causal, False)
    assert not calls["_varlen_attn_bwd_dq_kernel"]
    (dkdv,) = calls["_varlen_attn_bwd_dkdv_kernel"]
    assert dkdv["DQ"] == va.DQ_ATOMIC and dkdv["dq_ptr"].dtype == torch.float32
    calls = _launched_backward_kernels(lens, 4, 2, causal, True)
    assert len(calls["_varlen_attn_bwd_dq_kernel"]) == 1
    assert [c["DQ"] for c in calls["_varlen_attn_bwd_dkdv_kernel"]] == [va.DQ_SEPARATE]


def test_window_backward_stores_dq_without_atomics(triton_backend):
    """Every key segment within one kv block (ViT windows): one program per (segment, head) owns its dQ rows, so
    the fused kernel stores them in the output dtype, deterministic or not."""
    for deterministic in (False, True):
        calls = _launched_backward_kernels([64, 1, 0, 33], 2, 2, False, deterministic, torch.bfloat16)
        assert not calls["_varlen_attn_bwd_dq_kernel"]
        (dkdv,) = calls["_varlen_attn_bwd_dkdv_kernel"]
        assert dkdv["DQ"] == va.DQ_STORE and dkdv["dq_ptr"].dtype == torch.bfloat16


def test_default_backward_matches_deterministic(triton_backend):
    """The fused atomic dQ and the separate dQ kernel agree to fp32 rounding (GQA, causal, a segment of 3 kv blocks)."""
    lens, hq, hkv = [150, 1, 40], 4, 2
    q, k, v, cu_q, cu_k = _inputs(lens, lens, hq, hkv, 80, torch.float32)
    do = torch.randn(q.shape, dtype=torch.float64)
    assert _dq_mode_of(lens, False) == va.DQ_ATOMIC

    def kernel(deterministic):
        return lambda q, k, v: varlen_attention(q, k, v, cu_q, cu_k, 150, 150, causal=True, return_lse=True,
                                                deterministic=deterministic)

    fused, separate = _run(kernel(False), q, k, v, do), _run(kernel(True), q, k, v, do)
    assert torch.equal(fused[0], separate[0])
    for a, b in zip(fused[2], separate[2]):
        assert max_err(a, b) < 1e-5


def test_fused_dq_with_few_q_rows(triton_backend, monkeypatch):
    """With fewer than 64 q rows per step the fused kernel computes dS K transposed (the layout sm_90's tensor cores
    need); the interpreter's usual 64-row tiles do not reach that branch, so run it with 32-row ones."""
    monkeypatch.setattr(va, "_INTERPRET_CONFIG", (32, 64, 4, 1))
    lens, hq, hkv = [70, 1, 0, 45], 4, 2
    q, k, v, cu_q, cu_k = _inputs(lens, lens, hq, hkv, 80, torch.bfloat16)  # 16-bit: the tensor-core layout
    do = torch.randn(q.shape, dtype=torch.float64)
    assert _dq_mode_of(lens, False) == va.DQ_ATOMIC

    kernel, ref = _causal_pair(cu_q, cu_k, 70)
    got, reference = _run(kernel, q, k, v, do), _run(ref, q, k, v, do)
    truth = _run(ref, q.double(), k.double(), v.double(), do)
    for g, r, t in zip(got[2], reference[2], truth[2]):
        assert_close_3way("grad", g, r, t, factor=3.0, atol=1e-3)


def test_packed_matches_padded(triton_backend):
    """S3: a padded batch with random lengths, packed, vs dense SDPA on the padded batch (float64) after unpacking."""
    batch, max_len, hq, hkv, d = 3, 80, 4, 2, 64
    lengths = torch.randint(1, max_len + 1, (batch,)).tolist()
    lengths[0] = max_len
    q_pad = torch.randn(batch, max_len, hq, d, dtype=torch.float64)
    k_pad = torch.randn(batch, max_len, hkv, d, dtype=torch.float64)
    v_pad = torch.randn(batch, max_len, hkv, d, dtype=torch.float64)
    valid = torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None]  # (B, L)
    do_pad = torch.randn(batch, max_len, hq, d, dtype=torch.float64) * valid[..., None, None]

    def padded(q, k, v):
        allowed = valid[:, None, None, :] & torch.ones(max_len, max_len, dtype=torch.bool).tril()
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(hq // hkv, 1),
                                           v.transpose(1, 2).repeat_interleave(hq // hkv, 1), attn_mask=allowed)
        return o.transpose(1, 2) * valid[..., None, None], None

    def packed(q, k, v):
        q32, k32, v32 = (x[valid].float() for x in (q, k, v))
        out = varlen_attention(q32, k32, v32, _cu(lengths), _cu(lengths), max(lengths), max(lengths), causal=True)
        full = torch.zeros(batch, max_len, hq, d, dtype=torch.float64)
        full[valid] = out.double()
        return full, None

    out_pad, _, grads_pad = _run(padded, q_pad, k_pad, v_pad, do_pad)
    out_pk, _, grads_pk = _run(packed, q_pad, k_pad, v_pad, do_pad)
    assert max_err(out_pk, out_pad) < 1e-5
    for g, gp in zip(grads_pk, grads_pad):
        assert max_err(g, gp) < 1e-4


def test_torch_compile_custom_op(triton_backend):
    q, k, v, cu_q, cu_k = _inputs([7, 65], [7, 65], 2, 1, 64, torch.float32)
    q.requires_grad_()

    def fn(q, k, v):
        return varlen_attention(q, k, v, cu_q, cu_k, 65, 65, causal=True)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v)
    (dq,) = torch.autograd.grad(out.sum(), q)
    ref_out = varlen_attention_ref(q, k, v, cu_q, cu_k, True)
    (ref_dq,) = torch.autograd.grad(ref_out.sum(), q)
    assert max_err(out, ref_out) < 1e-5 and max_err(dq, ref_dq) < 1e-4


def test_cpu_lse_is_the_reference(monkeypatch):
    """return_lse on CPU tensors: SDPA has no LSE output, so the call is the reference's, bit for bit."""
    monkeypatch.delenv("OVR_BACKEND", raising=False)
    q, k, v, cu_q, cu_k = _inputs([3, 0, 5], [3, 0, 5], 4, 2, 24, torch.float64)
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, 5, 5, causal=True, return_lse=True)
    ref_out, ref_lse = varlen_attention_ref(q, k, v, cu_q, cu_k, True, None, True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


SDPA_CASES = CASES + [
    # more segments than a tiny group budget holds, length-1 and empty ones, causal rows before their keys
    pytest.param([1, 1, 9, 0, 33, 2, 17, 1, 40], [1, 3, 4, 2, 33, 0, 20, 1, 38], 4, 2, 32, True, torch.float32, None,
                 id="many-segments-rows-without-keys"),
    pytest.param([6, 0, 3, 2], [0, 5, 0, 4], 2, 2, 16, False, torch.float32, None, id="empty-key-segments"),
    pytest.param([64] * 6, None, 4, 4, 32, False, torch.bfloat16, None, id="vit-windows-bf16"),
]


_SDPA = va.varlen_attention_sdpa  # the real CPU path, for the spy that records it was taken


@pytest.mark.parametrize("group_elements", [1 << 24, 512], ids=["one-group", "many-groups"])
@pytest.mark.parametrize("lens_q, lens_k, hq, hkv, d, causal, dtype, scale", SDPA_CASES)
def test_cpu_sdpa_path_matches_reference_fwd_bwd(monkeypatch, lens_q, lens_k, hq, hkv, d, causal, dtype, scale,
                                                 group_elements):
    """The CPU path (torch SDPA over padded groups, what CPU training runs) vs the same-dtype reference vs float64
    truth, forward and every gradient; rows that see no key are exactly 0 with finite gradients."""
    monkeypatch.delenv("OVR_BACKEND", raising=False)
    monkeypatch.setattr(va, "SDPA_GROUP_ELEMENTS", group_elements)
    calls = []
    monkeypatch.setattr(va, "varlen_attention_sdpa", lambda *a: calls.append(1) or _SDPA(*a))
    lens_k = lens_q if lens_k is None else lens_k
    q, k, v, cu_q, cu_k = _inputs(lens_q, lens_k, hq, hkv, d, dtype)
    do = torch.randn(q.shape, dtype=torch.float64)

    def kernel(q, k, v):
        return varlen_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                softmax_scale=scale), None

    def ref(q, k, v):
        return varlen_attention_ref(q, k, v, cu_q, cu_k, causal=causal, softmax_scale=scale), None

    out, _, grads = _run(kernel, q, k, v, do)
    ref_out, _, ref_grads = _run(ref, q, k, v, do)
    truth_out, _, truth_grads = _run(ref, q.double(), k.double(), v.double(), do)
    assert calls, "CPU tensors did not take the SDPA path"
    assert out.dtype == dtype and out.shape == q.shape
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    assert_close_3way("out", out, ref_out, truth_out, factor=2.0, atol=atol)
    for name, g, rg, tg in zip(("dq", "dk", "dv"), grads, ref_grads, truth_grads):
        assert g.dtype == dtype and bool(torch.isfinite(g).all())
        assert_close_3way(name, g, rg, tg, factor=3.0, atol=atol)
    blind = truth_out.abs().amax((1, 2)) == 0  # rows whose truth is 0: no key visible
    assert torch.equal(out[blind], torch.zeros_like(out[blind]))



def test_sdpa_groups_cover_every_segment_once_within_the_budget():
    lens_q = [5, 0, 70, 3, 1, 64, 64, 0, 9]
    lens_k = [9, 4, 70, 0, 1, 64, 60, 2, 9]
    groups = va._sdpa_groups(lens_q, lens_k, budget=64 * 64 * 2)
    flat = [b for g in groups for b in g]
    assert sorted(flat) == [b for b in range(len(lens_q)) if lens_q[b] > 0]  # each segment with queries, once
    assert [lens_k[b] for b in flat] == sorted((lens_k[b] for b in flat), reverse=True)
    for g in groups:
        cells = len(g) * max(lens_q[b] for b in g) * max(max(lens_k[b] for b in g), 1)
        assert len(g) == 1 or cells <= 64 * 64 * 2
    assert groups[0] == [2]  # 70 x 70 alone exceeds the budget: its own group
    assert va._sdpa_groups([0, 0], [3, 4], 100) == []


def test_reference_backend_forces_the_reference_on_cpu(monkeypatch):
    monkeypatch.setenv("OVR_BACKEND", "reference")
    monkeypatch.setattr(va, "varlen_attention_sdpa", lambda *a: pytest.fail("took the SDPA path"))
    q, k, v, cu_q, cu_k = _inputs([3, 0, 5], [3, 0, 5], 4, 2, 24, torch.float32)
    out = varlen_attention(q, k, v, cu_q, cu_k, 5, 5, causal=True)
    assert torch.equal(out, varlen_attention_ref(q, k, v, cu_q, cu_k, True))


def test_head_dim_split():
    assert [va.split_head_dim(d) for d in (64, 80, 96, 128)] == [(64, 0), (64, 16), (64, 32), (128, 0)]
    assert [d for d in range(1, 200) if va.supported_head_dim(d)] == [16, 32, 48, 64, 80, 96, 128]


def _bad(**overrides):
    q, k, v, cu, _ = _inputs([3, 5], [3, 5], 4, 2, 64, torch.float32)
    args = {"q": q, "k": k, "v": v, "cu_seqlens_q": cu, "cu_seqlens_k": cu.clone(), "max_seqlen_q": 5,
            "max_seqlen_k": 5}
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, match", [
    ({"q": torch.randn(8, 64)}, "q must have 3 dims"),
    ({"q": torch.randint(0, 3, (8, 4, 64))}, "q must have dtype"),
    ({"k": torch.randn(8, 2, 64, dtype=torch.float16)}, "k must have dtype"),
    ({"v": torch.randn(8, 2, 32)}, "v must have shape"),
    ({"k": torch.randn(8, 3, 64), "v": torch.randn(8, 3, 64)}, "multiple of the number of k/v heads"),
    ({"k": torch.randn(8, 2, 32), "v": torch.randn(8, 2, 32)}, "k has head_dim 32"),
    ({"q": torch.randn(8, 4, 72)[..., :72], "k": torch.randn(8, 2, 72), "v": torch.randn(8, 2, 72)}, "head_dim=72"),
    ({"q": torch.randn(8, 64, 4).transpose(1, 2)}, "q must have a contiguous last dim"),
    ({"cu_seqlens_q": torch.tensor([0, 3, 8])}, "cu_seqlens_q must have dtype"),
    ({"cu_seqlens_q": torch.tensor([0, 6, 3, 8], dtype=torch.int32)}, "cu_seqlens_q must be non-decreasing"),
    ({"cu_seqlens_k": torch.tensor([0, 3, 7], dtype=torch.int32)}, r"cu_seqlens_k\[-1\]=7"),
    ({"cu_seqlens_q": torch.tensor([1, 3, 8], dtype=torch.int32)}, r"cu_seqlens_q\[0\] must be 0"),
    ({"cu_seqlens_q": torch.tensor([0, 3, 3, 8], dtype=torch.int32)}, "cu_seqlens_k has 3"),
    ({"max_seqlen_q": 4}, "max_seqlen_q=4 is smaller than the longest segment"),
    ({"max_seqlen_k": True}, "max_seqlen_k must be a non-negative Python int"),
    ({"max_seqlen_q": torch.tensor(5)}, "max_seqlen_q must be a non-negative Python int"),
    ({"softmax_scale": -1.0}, "softmax_scale must be a positive"),
])
def test_bad_inputs_raise(triton_backend, overrides, match):
    with pytest.raises(ValueError, match=match):
        varlen_attention(**_bad(**overrides))


def test_bad_inputs_raise_on_reference_path(monkeypatch):
    monkeypatch.setenv("OVR_BACKEND", "reference")
    with pytest.raises(ValueError, match="multiple of the number of k/v heads"):
        varlen_attention(**_bad(k=torch.randn(8, 3, 64), v=torch.randn(8, 3, 64)))
