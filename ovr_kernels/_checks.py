"""Input validation shared by every public op: raise ValueError naming the argument and the offending value.

Kernels trust what passes these checks.
"""

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x, *, ndim: int | None = None, dtypes: Sequence[torch.dtype] | None = None,
                 device: torch.device | None = None, shape: Sequence[int | None] | None = None,
                 contiguous: bool = False) -> torch.Tensor:
    """Validate one tensor argument; returns it unchanged. `shape` entries of None match any size."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")  # noqa: TRY004 (one error type)
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but the other inputs are on {device}")
    if shape is not None and (x.dim() != len(shape)
                              or any(s is not None and s != xs for s, xs in zip(shape, x.shape))):
        want = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if contiguous and not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (strides {tuple(x.stride())}); call .contiguous() first")
    return x


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int, device: torch.device | None = None) -> torch.Tensor:
    """cu_seqlens: int32, 1-D, >= 2 entries, starts at 0, non-decreasing (repeats = empty segments), ends at `total`."""
    check_tensor(name, cu, ndim=1, dtypes=(torch.int32,), device=device)
    if cu.numel() < 2:
        raise ValueError(f"{name} must have at least 2 entries (B+1 with B >= 1), got {cu.numel()}")
    cu_cpu = cu.detach().to("cpu", torch.int64)
    if int(cu_cpu[0]) != 0:
        raise ValueError(f"{name}[0] must be 0, got {int(cu_cpu[0])}")
    steps = cu_cpu[1:] - cu_cpu[:-1]
    if bool((steps < 0).any()):
        i = int(torch.nonzero(steps < 0)[0, 0])
        raise ValueError(f"{name} must be non-decreasing: {name}[{i}]={int(cu_cpu[i])} > "
                         f"{name}[{i + 1}]={int(cu_cpu[i + 1])}")
    if int(cu_cpu[-1]) != total:
        raise ValueError(f"{name}[-1]={int(cu_cpu[-1])} must equal the number of packed tokens {total}")
    return cu


def max_seqlen_of(cu: torch.Tensor) -> int:
    """Longest segment of a cu_seqlens tensor (one host sync; callers pass max_seqlen to avoid it)."""
    return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0


def check_scalar(name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    """A finite Python number within [low, high] (or (low, high] with low_open)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")
    return v


def check_normalizer(normalizer, device):
    """A loss denominator: None, a Python number > 0, or a 0-d float/int tensor on `device` (its value is not read:
    no sync). Returns it (a number as a float)."""
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor):
        check_tensor("normalizer", normalizer, ndim=0, device=device)
        if normalizer.dtype == torch.bool or normalizer.is_complex():
            raise ValueError(f"normalizer must be a float or integer tensor, got {normalizer.dtype}")
        return normalizer
    return check_scalar("normalizer", normalizer, low=0.0, low_open=True)


def check_token_inputs(names_tensors, mask_T, cu_seqlens) -> int:
    """Per-token loss inputs: 1-D contiguous float tensors of one length T on one device (None entries skipped), a
    bool or float mask of the same length, optional int32 cu_seqlens ending at T. Returns T.

    Inside torch.compile the cu_seqlens values are not checked (that needs a host sync, which breaks the graph)."""
    first_name, first = names_tensors[0]
    check_tensor(first_name, first, ndim=1, dtypes=FLOAT_DTYPES, contiguous=True)
    T, device = first.shape[0], first.device
    for name, x in names_tensors[1:]:
        if x is not None:
            check_tensor(name, x, dtypes=FLOAT_DTYPES, device=device, shape=(T,), contiguous=True)
    check_tensor("mask", mask_T, dtypes=(torch.bool,) + FLOAT_DTYPES, device=device, shape=(T,), contiguous=True)
    if cu_seqlens is not None:
        if torch.compiler.is_compiling():
            check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=device)
        else:
            check_cu_seqlens("cu_seqlens", cu_seqlens, T, device=device)
    return T
