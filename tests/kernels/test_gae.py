"""GAE: C++ (CPU) == torch fallback == reference exactly; closed forms for gamma/lambda edge values; packed equals
per-sequence; CUDA kernel vs reference (GPU); csrc/gae.cu compiles for sm_80 and sm_90a (nvcc).

Legend: T packed tokens, B sequences.
"""

import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import assert_close

from ovr_kernels import _ext
from ovr_kernels.gae import gae
from ovr_kernels.packing import cu_seqlens_from_lengths
from ovr_kernels.reference import gae_ref

CSRC = Path(__file__).resolve().parents[2] / "csrc"
needs_ext = pytest.mark.skipif(not _ext.HAS_EXT, reason="ovr_kernels._C not built")

# lengths with empty segments (0), length-1 sequences, a prime and one longer than a CUDA warp chunk (32)
LENGTHS = [[1], [3, 0, 1, 7, 0, 0, 2], [0, 5, 1, 1, 33, 0, 64, 13], [97, 1, 0, 40]]
GAMMA_LAM = [(1.0, 1.0), (0.99, 0.95), (0.0, 0.7), (0.9, 0.0), (0.0, 0.0), (1.0, 0.5)]


def _inputs(lengths, dtype=torch.float32, device="cpu"):
    cu = cu_seqlens_from_lengths(lengths).to(device)
    total = sum(lengths)
    return torch.randn(total, dtype=dtype, device=device), torch.randn(total, dtype=dtype, device=device), cu


def _closed_form(r_T, v_T, lengths, gamma, lam):
    """Independent float64 ground truth: A_t = sum_{j>=t} (gamma lam)^(j-t) delta_j with a dense weight matrix."""
    adv = []
    start = 0
    for n in lengths:
        r, v = r_T[start:start + n].double().cpu(), v_T[start:start + n].double().cpu()
        v_next = torch.cat([v[1:], v.new_zeros(1)])[:n]
        delta = r + gamma * v_next - v
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        w = torch.where(j >= i, torch.tensor(gamma * lam, dtype=torch.float64) ** (j - i).clamp_min(0).double(),
                        torch.zeros((), dtype=torch.float64))
        adv.append(w @ delta)
        start += n
    adv = torch.cat(adv) if adv else torch.zeros(0, dtype=torch.float64)
    return adv, adv + v_T.double().cpu()


@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
def test_cpp_equals_fallback_equals_reference(lengths, dtype, gamma, lam):
    r, v, cu = _inputs(lengths, dtype)
    ref_adv, ref_ret = gae_ref(r, v, cu, gamma, lam)
    fb_adv, fb_ret = gae(r, v, cu, gamma, lam, use_ext=False)
    assert fb_adv.dtype == dtype and fb_ret.dtype == dtype
    assert torch.equal(fb_adv, ref_adv) and torch.equal(fb_ret, ref_ret)
    if _ext.HAS_EXT:
        ext_adv, ext_ret = gae(r, v, cu, gamma, lam, use_ext=True)
        assert ext_adv.dtype == dtype and ext_ret.dtype == dtype
        assert torch.equal(ext_adv, ref_adv), f"C++ != reference: {(ext_adv - ref_adv).abs().max()}"
        assert torch.equal(ext_ret, ref_ret)
    truth_adv, truth_ret = _closed_form(r, v, lengths, gamma, lam)
    tol = 1e-10 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 2e-2)
    assert_close("advantages vs closed form", ref_adv, truth_adv, atol=tol * 10, rtol=tol)
    assert_close("returns vs closed form", ref_ret, truth_ret, atol=tol * 10, rtol=tol)


def test_mixed_dtypes_match_reference():
    r, v, cu = _inputs([4, 0, 9], torch.float64)
    v = v.float()
    for use_ext in [False, True] if _ext.HAS_EXT else [False]:
        adv, ret = gae(r, v, cu, 0.97, 0.9, use_ext=use_ext)
        ref_adv, ref_ret = gae_ref(r, v, cu, 0.97, 0.9)
        assert adv.dtype == torch.float32
        assert torch.equal(adv, ref_adv) and torch.equal(ret, ref_ret)


@pytest.mark.parametrize("use_ext", [False, pytest.param(True, marks=needs_ext)])
def test_gamma_lam_one_is_reward_to_go_minus_value(use_ext):
    lengths = [6, 1, 0, 11]
    r, v, cu = _inputs(lengths, torch.float64)
    adv, ret = gae(r, v, cu, 1.0, 1.0, use_ext=use_ext)
    to_go = torch.cat([r[s:e].flip(0).cumsum(0).flip(0) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())])
    assert_close("returns == reward-to-go", ret, to_go, atol=1e-12)
    assert_close("advantages == reward-to-go - V", adv, to_go - v, atol=1e-12)


@pytest.mark.parametrize("use_ext", [False, pytest.param(True, marks=needs_ext)])
def test_edge_values(use_ext):
    lengths = [5, 0, 1, 8]
    r, v, cu = _inputs(lengths, torch.float64)
    v_next = torch.cat([torch.cat([v[s + 1:e], v.new_zeros(1)]) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())
                        if e > s])
    adv, _ = gae(r, v, cu, 0.0, 0.3, use_ext=use_ext)  # gamma = 0: one-step, V_{t+1} ignored
    assert_close("gamma=0", adv, r - v, atol=1e-12)
    adv, _ = gae(r, v, cu, 0.8, 0.0, use_ext=use_ext)  # lambda = 0: TD(0) residual
    assert_close("lam=0", adv, r + 0.8 * v_next - v, atol=1e-12)
    adv, ret = gae(r, v, cu, 0.8, 1.0, use_ext=use_ext)  # lambda = 1: discounted return - V
    disc = torch.cat([torch.stack([sum(0.8 ** (j - t) * r[j] for j in range(t, e)) for t in range(s, e)])
                      for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()) if e > s])
    assert_close("lam=1 returns", ret, disc, atol=1e-12)


@pytest.mark.parametrize("use_ext", [False, pytest.param(True, marks=needs_ext)])
def test_packed_equals_per_sequence(use_ext):
    lengths = [7, 0, 1, 40, 3]
    r, v, cu = _inputs(lengths, torch.float32)
    adv, ret = gae(r, v, cu, 0.99, 0.95, use_ext=use_ext)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        one = torch.tensor([0, e - s], dtype=torch.int32)
        a1, r1 = gae(r[s:e], v[s:e], one, 0.99, 0.95, use_ext=use_ext)
        assert torch.equal(adv[s:e], a1) and torch.equal(ret[s:e], r1)


def test_no_autograd_and_reference_backend(monkeypatch):
    r, v, cu = _inputs([3, 4])
    v.requires_grad_(True)
    adv, ret = gae(r, v, cu, 0.9, 0.9)
    assert not adv.requires_grad and not ret.requires_grad
    monkeypatch.setenv("OVR_BACKEND", "reference")
    adv_ref, _ = gae(r, v, cu, 0.9, 0.9)
    assert torch.equal(adv_ref, gae_ref(r, v, cu, 0.9, 0.9)[0])


def test_use_ext_true_without_extension(monkeypatch):
    r, v, cu = _inputs([3])
    monkeypatch.setattr(_ext, "HAS_EXT", False)
    with pytest.raises(ValueError, match="use_ext=True"):
        gae(r, v, cu, use_ext=True)


@pytest.mark.parametrize("make,match", [
    (lambda r, v, cu: (r[None], v, cu, 1.0, 1.0), "rewards must have 1 dims"),
    (lambda r, v, cu: (r, v.long(), cu, 1.0, 1.0), "values must have dtype"),
    (lambda r, v, cu: (r[:-1], v, cu, 1.0, 1.0), r"rewards must have shape \(10,\)"),
    (lambda r, v, cu: ([0.0] * 10, v, cu, 1.0, 1.0), "rewards must be a torch.Tensor"),
    (lambda r, v, cu: (r, v, cu.long(), 1.0, 1.0), "cu_seqlens must have dtype"),
    (lambda r, v, cu: (r, v, torch.tensor([0, 4, 3, 10], dtype=torch.int32), 1.0, 1.0), "non-decreasing"),
    (lambda r, v, cu: (r, v, torch.tensor([0, 4, 9], dtype=torch.int32), 1.0, 1.0), r"cu_seqlens\[-1\]=9"),
    (lambda r, v, cu: (r, v, torch.tensor([1, 4, 10], dtype=torch.int32), 1.0, 1.0), r"cu_seqlens\[0\] must be 0"),
    (lambda r, v, cu: (r, v, cu, 1.5, 1.0), "gamma must be <= 1.0, got 1.5"),
    (lambda r, v, cu: (r, v, cu, -0.1, 1.0), "gamma must be >= 0.0, got -0.1"),
    (lambda r, v, cu: (r, v, cu, 1.0, float("nan")), "lam must be finite"),
    (lambda r, v, cu: (r, v, cu, 1.0, "x"), "lam must be a number"),
])
def test_bad_inputs(make, match):
    r, v, cu = _inputs([4, 6])
    with pytest.raises(ValueError, match=match):
        gae(*make(r, v, cu))


@pytest.mark.nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_gae_cu_compiles(arch, tmp_path):
    """csrc/gae.cu builds for Ampere and Hopper without spills (ptxas -v reports registers per instantiation)."""
    out = subprocess.run(["nvcc", f"-arch={arch}", "-c", str(CSRC / "gae.cu"), "-o", str(tmp_path / "gae.o"),
                          "-std=c++17", "-O3", f"-I{CSRC}", "-Xptxas", "-v"], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "gae.o").stat().st_size > 0
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill stores", out.stderr)]
    regs = [int(s) for s in re.findall(r"Used (\d+) registers", out.stderr)]
    print(f"{arch}: registers per dtype instantiation {regs}, spill stores {spills}")
    assert len(regs) == 4, out.stderr  # fp32, fp64, fp16, bf16
    assert spills and all(s == 0 for s in spills)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.0, 0.5), (0.9, 0.0)])
def test_cuda_matches_reference(dtype, gamma, lam):
    if not _ext.HAS_CUDA_EXT:
        pytest.skip("ovr_kernels._C built without nvcc")
    lengths = [0, 1, 31, 32, 33, 0, 1000, 7, 4096, 2]
    r, v, cu = _inputs(lengths, dtype, "cuda")
    adv, ret = gae(r, v, cu, gamma, lam)
    torch.cuda.synchronize()
    assert adv.is_cuda and adv.dtype == dtype
    ref_adv, ref_ret = gae_ref(r, v, cu, gamma, lam)  # float64 accumulation, cast to dtype
    truth_adv, truth_ret = gae_ref(r.double(), v.double(), cu, gamma, lam)
    scale = float(truth_ret.abs().max()) + 1.0
    # fp32 scan over <= 4096 tokens: error ~ eps32 * scale * log2(chunks); bf16 output rounding dominates for bf16
    tol = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 1e-2}[dtype]
    for name, out, ref, truth in [("adv", adv, ref_adv, truth_adv), ("ret", ret, ref_ret, truth_ret)]:
        err = float((out.double() - truth).abs().max())  # all three on the GPU (gae_ref keeps the device)
        ref_err = float((ref.double() - truth).abs().max())
        assert err <= 2 * ref_err + tol * scale, f"{name}: cuda err {err:.3e}, ref err {ref_err:.3e}"
    # the default stream and a side stream give the same result
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        adv2, _ = gae(r, v, cu, gamma, lam)
    s.synchronize()
    assert torch.equal(adv, adv2)
