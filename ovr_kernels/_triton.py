"""Backend selection and shared Triton launch helpers.

Every public op asks `use_triton(tensor)` once: CUDA tensors take the Triton/CUDA path, CPU tensors the torch path
(the reference, or a faster torch implementation where the op has one: varlen attention runs torch SDPA).
`OVR_BACKEND=triton` forces Triton (on a CPU-only machine through the interpreter), `OVR_BACKEND=reference` forces
the reference. `TRITON_INTERPRET` must be set before triton is imported, so when Triton is forced on a machine
without CUDA this module sets it before any kernel module imports triton.
"""

import os

import torch

_BACKENDS = ("auto", "triton", "reference")


def backend() -> str:
    """The backend asked for by `OVR_BACKEND` ("auto" when unset); ValueError on an unknown value."""
    value = os.environ.get("OVR_BACKEND", "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise ValueError(f"OVR_BACKEND={value!r} is not one of {_BACKENDS}")
    return value


if backend() == "triton" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton  # noqa: F401
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # a torch build without triton: only the reference path exists
    HAS_TRITON = False


def use_triton(x: torch.Tensor) -> bool:
    """True when the op on `x` should run the Triton kernel (see the module docstring)."""
    choice = backend()
    if choice == "reference":
        return False
    if choice == "triton":
        if not HAS_TRITON:
            raise ValueError("OVR_BACKEND=triton but triton is not installed")
        if not x.is_cuda and not INTERPRET:
            raise ValueError("OVR_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1 set before triton is "
                             "imported (set OVR_BACKEND before importing ovr_kernels)")
        return True
    return x.is_cuda and HAS_TRITON


def compute_dtype(dtype: torch.dtype):
    """The dtype kernels compute matrix products in: the input's on GPU, fp32 under the interpreter (whose bf16
    arithmetic works on raw bits)."""
    if INTERPRET:
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]
