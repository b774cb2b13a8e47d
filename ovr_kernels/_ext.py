"""Optional compiled module: `HAS_EXT` / `HAS_CUDA_EXT` are resolved once at import and never raise."""

import os

try:
    if os.environ.get("OVR_DISABLE_EXT") == "1":  # test override: exercise the pure-Python fallbacks
        raise ImportError("disabled by OVR_DISABLE_EXT=1")
    from ovr_kernels import _C

    HAS_EXT = True
    HAS_CUDA_EXT = bool(_C.has_cuda())
except ImportError:
    _C = None
    HAS_EXT = False
    HAS_CUDA_EXT = False
