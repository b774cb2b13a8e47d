"""The compiled module ovr_kernels._C: loads after the normal install, reports CUDA support matching the build,
rejects bad sizes/scalars with clean ValueErrors, and the package works with it disabled (pure-Python fallbacks).
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from ovr_kernels import _ext
from ovr_kernels.gae import gae
from ovr_kernels.packing import balanced_partition, token_budget_microbatches

disabled = os.environ.get("OVR_DISABLE_EXT") == "1"
needs_ext = pytest.mark.skipif(disabled, reason="OVR_DISABLE_EXT=1")
_CU0 = torch.zeros(1, dtype=torch.int32)  # cu_seqlens of zero sequences: a valid pointer for the scalar checks


@needs_ext
def test_extension_loads():
    import ovr_kernels._C as C

    assert _ext.HAS_EXT, "pip install -e . should build ovr_kernels._C (OVR_SKIP_EXT unset)"
    for name in ("has_cuda", "cu_seqlens_from_lengths", "position_ids", "ffd_microbatches", "kk_partition",
                 "gae_cpu"):
        assert hasattr(C, name), name


@needs_ext
def test_has_cuda_matches_build():
    """setup.py links the CUDA launchers exactly when it finds nvcc (and OVR_SKIP_CUDA_BUILD != 1)."""
    from ovr_kernels import _C

    nvcc_found = os.environ.get("OVR_SKIP_CUDA_BUILD") != "1" and (
        shutil.which("nvcc") is not None
        or any(os.path.exists(os.path.join(os.environ.get(v, ""), "bin", "nvcc")) for v in ("CUDA_HOME", "CUDA_PATH")
               if os.environ.get(v)))
    assert _C.has_cuda() == nvcc_found
    assert _ext.HAS_CUDA_EXT == _C.has_cuda()
    assert hasattr(_C, "gae_cuda") == _C.has_cuda()


@needs_ext
@pytest.mark.parametrize("call,match", [
    (lambda C: C.ffd_microbatches(0, -1, 10), "n must be >= 0, got -1"),
    (lambda C: C.ffd_microbatches(0, 3, 10), "lengths is a null pointer for 3 elements"),
    (lambda C: C.ffd_microbatches(0, 0, 0), "max_tokens must be > 0, got 0"),
    (lambda C: C.kk_partition(0, 0, 0, False), "num_parts must be > 0, got 0"),
    (lambda C: C.cu_seqlens_from_lengths(0, -2, 0), "n must be >= 0, got -2"),
    (lambda C: C.position_ids(0, 2, 0), "cu is a null pointer for 3 elements"),
    (lambda C: C.gae_cpu(0, 0, 0, -1, 0, 0, 1.0, 1.0, 0), "num_seqs must be >= 0"),
    (lambda C: C.gae_cpu(0, 0, _CU0.data_ptr(), 0, 0, 0, 1.5, 1.0, 0), r"gamma must be in \[0, 1\], got 1.5"),
    (lambda C: C.gae_cpu(0, 0, _CU0.data_ptr(), 0, 0, 0, 1.0, float("nan"), 0), r"lam must be in \[0, 1\], got nan"),
    (lambda C: C.gae_cpu(0, 0, _CU0.data_ptr(), 0, 0, 0, 1.0, 1.0, 2), "dtype code must be 0 .float32. or 1 .float64., got 2"),
])
def test_binding_rejects_bad_sizes(call, match):
    from ovr_kernels import _C

    with pytest.raises(ValueError, match=match):
        call(_C)


@needs_ext
def test_binding_checks_lengths_with_the_wrapper_messages():
    from ovr_kernels import _C

    lengths = torch.tensor([3, 9, -1], dtype=torch.int64)
    with pytest.raises(ValueError, match="sequence 1 has length 9 > max_tokens=5"):
        _C.ffd_microbatches(lengths.data_ptr(), 3, 5)
    with pytest.raises(ValueError, match=r"lengths\[2\] must be >= 0, got -1"):
        _C.kk_partition(lengths.data_ptr(), 3, 2, False)


def test_wrappers_give_clean_value_errors():
    with pytest.raises(ValueError, match="sequence 0 has length 7 > max_tokens=4"):
        token_budget_microbatches([7], 4)
    with pytest.raises(ValueError, match="num_parts must be a positive int"):
        balanced_partition([1], -1)
    with pytest.raises(ValueError, match="gamma must be <= 1.0"):
        gae(torch.zeros(2), torch.zeros(2), torch.tensor([0, 2], dtype=torch.int32), gamma=2.0)


def test_package_works_without_the_extension():
    """OVR_DISABLE_EXT=1 hides _C: HAS_EXT is False and the ops fall back (FFD 7,5,3,2 into 10: [7, 3], [5, 2])."""
    code = ("import torch, ovr_kernels as o; from ovr_kernels.packing import balanced_partition, "
            "token_budget_microbatches; from ovr_kernels.reference import gae_ref\n"
            "assert not o.HAS_EXT and not o.HAS_CUDA_EXT\n"
            "r, v = torch.randn(9), torch.randn(9); cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32)\n"
            "assert all(torch.equal(a, b) for a, b in zip(o.gae(r, v, cu, 0.9, 0.8), gae_ref(r, v, cu, 0.9, 0.8)))\n"
            "print(token_budget_microbatches([5, 3, 7, 2], 10), balanced_partition([8, 7, 6, 5, 4], 2))")
    env = dict(os.environ, OVR_DISABLE_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[[2, 1], [0, 3]] ([[1, 3, 4], [0, 2]], 1.0666666666666667)"
