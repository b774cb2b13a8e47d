"""varlen_attention on a GPU at the benchmark shapes: the compiled bf16 kernels (tensor-core dots the interpreter
cannot run) vs the bf16 reference vs a float64 truth, forward, LSE and every gradient. Skips without CUDA.

Shapes are the benchmark's own (benchmarks/bench_varlen_attention.py): 16k packed text tokens causal GQA 28/4 D = 128;
ViT windows of <= 64 tokens with empty segments D = 80; whole-image ViT D = 80. The references run one segment (and
a few heads) at a time so that the float64 score matrices of an 8k-token segment stay a few GB.
"""

import importlib
import itertools

import bench_varlen_attention as bva  # benchmarks/ is on pytest's pythonpath (pyproject.toml)
import pytest
import torch
from conftest import assert_close_3way

from ovr_kernels import varlen_attention
from ovr_kernels.reference import varlen_attention_ref

va = importlib.import_module("ovr_kernels.varlen_attention")

pytestmark = pytest.mark.gpu

MAX_SCORES = 1 << 27  # elements of one reference score block (heads x sq x sk): 1 GiB in float64


def _reference(q, k, v, cu, causal, do, dtype):
    """(out, lse, dq, dk, dv) of the reference in `dtype`, one segment at a time; a long segment one query head at a
    time (its kv head's gradients summed in fp32 or better, as a single call would)."""
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    q, k, v, do = (x.to(dtype) for x in (q, k, v, do))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out, dq = torch.zeros_like(q), torch.zeros_like(q)
    dk, dv = torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device)
    lse = torch.full((hq, q.shape[0]), float("-inf"), dtype=torch.float64, device=q.device)
    bounds = cu.tolist()
    for start, end in itertools.pairwise(bounds):
        n = end - start
        if n == 0:
            continue
        seg_cu = torch.tensor([0, n], dtype=torch.int32, device=q.device)
        # (q heads, kv heads) blocks: every head at once for short segments, else one q head with its kv head
        blocks = [(slice(0, hq), slice(0, hkv))] if hq * n * n <= MAX_SCORES else \
            [(slice(h, h + 1), slice(h // group, h // group + 1)) for h in range(hq)]
        for qh, kh in blocks:
            qs, ks, vs = (x[start:end, h].detach().clone().requires_grad_() for x, h in ((q, qh), (k, kh), (v, kh)))
            o, seg_lse = varlen_attention_ref(qs, ks, vs, seg_cu, seg_cu, causal, None, return_lse=True)
            gq, gk, gv = torch.autograd.grad(o, (qs, ks, vs), do[start:end, qh])
            out[start:end, qh], lse[qh, start:end], dq[start:end, qh] = o.detach(), seg_lse.detach().double(), gq
            dk[start:end, kh] += gk.to(acc)
            dv[start:end, kh] += gv.to(acc)
    return out, lse, dq, dk.to(dtype), dv.to(dtype)


def _check(shape_inputs, atol_scale=1e-3, deterministic=False, do=None):
    _, cu, max_len, q, k, v, causal = shape_inputs
    do = torch.randn_like(q) if do is None else do
    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = varlen_attention(qg, kg, vg, cu, cu, max_len, max_len, causal=causal, return_lse=True,
                                deterministic=deterministic)
    got = (out, lse, *torch.autograd.grad(out, (qg, kg, vg), do))
    ref = _reference(q, k, v, cu, causal, do, q.dtype)
    truth = _reference(q, k, v, cu, causal, do, torch.float64)
    assert got[0].dtype == q.dtype and all(g.dtype == q.dtype for g in got[2:])
    for name, g, r, t in zip(("out", "lse", "dq", "dk", "dv"), got, ref, truth):
        finite = torch.isfinite(t)
        assert torch.equal(torch.isfinite(g), finite), f"{name}: non-finite pattern differs from the truth"
        # bf16 outputs round at 2^-8 relative: the absolute slack is relative to the tensor's scale
        atol = atol_scale * float(t[finite].abs().max())
        assert_close_3way(name, g[finite], r[finite], t[finite], factor=2.0, atol=atol)
    return got


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("shape", list(bva.SHAPES))
def test_benchmark_shapes_match_float64(shape, deterministic):
    """Both backward modes at every benchmark shape: the default (dQ from the dK/dV kernel: fp32 atomics for text
    and whole images, plain stores for windows) and deterministic=True (the separate dQ kernel, except windows)."""
    torch.manual_seed(0)
    inputs = bva._inputs(shape)
    assert inputs[3].is_cuda and inputs[3].dtype == torch.bfloat16
    _check(inputs, deterministic=deterministic)


def _dq_mode(lengths, q, causal, deterministic):
    block_n = va._launch_params("dkdvq", q.shape[2], max(lengths), q.device, q.dtype, causal)[1]
    return va._dq_mode(deterministic, max(lengths), block_n)


@pytest.mark.parametrize("shape", ["text", "windows"])
def test_backward_modes_at_benchmark_shapes(shape):
    """Text takes the atomic dQ by default and matches the deterministic path within bf16 rounding; windows store
    dQ from one program each, so the default backward is bit-reproducible there; deterministic=True is
    bit-reproducible everywhere."""
    torch.manual_seed(0)
    lengths, cu, max_len, q, k, v, causal = bva._inputs(shape)
    do = torch.randn_like(q)

    def grads(deterministic):
        qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
        out = varlen_attention(qg, kg, vg, cu, cu, max_len, max_len, causal=causal, deterministic=deterministic)
        return torch.autograd.grad(out, (qg, kg, vg), do)

    expected = va.DQ_ATOMIC if shape == "text" else va.DQ_STORE
    assert _dq_mode(lengths, q, causal, False) == expected
    default, ordered, again = grads(False), grads(True), grads(True)
    for a, o, o2 in zip(default, ordered, again):
        assert torch.equal(o, o2)
        assert float((a.float() - o.float()).abs().max()) <= 2e-2 * float(o.float().abs().max())
    if expected == va.DQ_STORE:
        for a, a2 in zip(default, grads(False)):
            assert torch.equal(a, a2)


def test_atomic_dkdv_path_matches_deterministic():
    """GQA at D = 80 with few kv blocks takes the fp32-atomic dK/dV variant (and the atomic dQ); it matches the
    truth like the ordered sums do and stays within bf16 rounding of them."""
    torch.manual_seed(0)
    lengths = [700, 1, 0, 1347]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    total = sum(lengths)
    q = torch.randn(total, 28, 80, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(total, 4, 80, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    block_n = va._launch_params("dkdvq", 80, max(lengths), q.device, q.dtype, True)[1]
    assert va.use_atomic_dkdv(False, 28, 4, 80, total, block_n, q.device)
    assert _dq_mode(lengths, q, True, False) == va.DQ_ATOMIC
    do = torch.randn_like(q)
    atomic = _check((lengths, cu, max(lengths), q, k, v, True), do=do)
    ordered = _check((lengths, cu, max(lengths), q, k, v, True), deterministic=True, do=do)
    for a, o in zip(atomic[2:], ordered[2:]):
        assert float((a.float() - o.float()).abs().max()) <= 2e-2 * float(o.float().abs().max())


def test_forward_tma_and_pointer_paths_agree():
    """On sm_90 aligned inputs take the TMA forward; a q/k/v view with a token stride that is not 16-byte aligned
    takes the pointer path; both match the truth like the reference does (segments of 1, 0, 700 and 130 tokens)."""
    torch.manual_seed(0)
    lengths, hq, hkv, d = [1, 0, 700, 130], 28, 4, 128
    total = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    packed = torch.randn(total, (hq + 2 * hkv) * d + 1, device="cuda", dtype=torch.bfloat16)
    qkv = packed[:, :-1].view(total, hq + 2 * hkv, d)
    q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
    assert not va._tma_ok(q.device, q, k, v)
    aligned = [x.contiguous() for x in (q, k, v)]
    assert va._tma_ok(q.device, *aligned) == (torch.cuda.get_device_capability()[0] >= 9)
    do = torch.randn_like(aligned[0])
    pointer = _check((lengths, cu, max(lengths), q, k, v, True), do=do)
    tma = _check((lengths, cu, max(lengths), *aligned, True), do=do)
    for a, b in zip(pointer[:2], tma[:2]):
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))


def test_fp32_routes_to_its_own_tiles_or_is_rejected():
    """fp32 on CUDA: D <= FP32_MAX_HEAD_DIM runs the table's fp32 tiles (ieee dots) and matches the truth like the
    fp32 reference does; a larger D is refused with a clear error instead of launching a spilling kernel."""
    torch.manual_seed(0)
    lengths, cu, max_len, q, k, v, causal = bva._inputs("vit_full")
    _check((lengths, cu, max_len, q.float(), k.float(), v.float(), causal), atol_scale=1e-5)
    q = torch.randn(64, 4, 128, device="cuda")
    cu = torch.tensor([0, 64], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="fp32 q/k/v with head_dim=128 on CUDA"):
        varlen_attention(q, q[:, :2], q[:, :2], cu, cu, 64, 64, causal=True)
