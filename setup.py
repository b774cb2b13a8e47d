"""Builds ovr_kernels._C: a pybind11 module over raw pointers (no torch headers, so it never needs rebuilding when torch changes).

- C++ sources: csrc/*.cpp, always (unless OVR_SKIP_EXT=1, which installs pure Python).
- CUDA sources: csrc/*.cu, compiled by nvcc for sm_80 and sm_90 when nvcc is found and OVR_SKIP_CUDA_BUILD != 1,
  linked into the same module against the static CUDA runtime; the module then defines `has_cuda() == True`.
"""

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def _nvcc():
    if os.environ.get("OVR_SKIP_CUDA_BUILD") == "1":
        return None
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cudart_dir(cuda_home):
    for lib_dir in ("lib64", "lib", "targets/x86_64-linux/lib"):
        if (cuda_home / lib_dir / "libcudart_static.a").exists():
            return cuda_home / lib_dir
    return None


def _cuda_home(nvcc):
    """The CUDA toolkit that holds libcudart_static: $CUDA_HOME, nvcc's install prefix or /usr/local/cuda; None
    (with a printed warning) when none has it: the module is then built with its CPU functions only."""
    candidates = [os.environ.get("CUDA_HOME"), Path(nvcc).resolve().parent.parent, "/usr/local/cuda"]
    for c in candidates:
        if c and _cudart_dir(Path(c)) is not None:
            return Path(c)
    print(f"WARNING: nvcc found at {nvcc} but no libcudart_static.a in {[str(c) for c in candidates if c]}: "
          "building ovr_kernels._C WITHOUT its CUDA ops (CPU functions only; the CUDA GAE falls back to torch). "
          "Set CUDA_HOME to a toolkit with the static runtime to build them.", flush=True)
    return None


class BuildExt(build_ext):
    """Compiles csrc/*.cu with nvcc into objects that are linked into the pybind11 module."""

    def build_extensions(self):
        nvcc = _nvcc()
        for ext in self.extensions:
            if nvcc is None:
                continue
            cuda_home = _cuda_home(nvcc)
            if cuda_home is None:
                continue
            objs = []
            tmp = Path(self.build_temp) / "cuda"
            tmp.mkdir(parents=True, exist_ok=True)
            for cu in sorted(CSRC.glob("*.cu")):
                obj = tmp / (cu.stem + ".o")
                cmd = [nvcc, "-c", str(cu), "-o", str(obj), "-O3", "-std=c++17", "--compiler-options", "-fPIC",
                       "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                       f"-I{CSRC}"]
                print(" ".join(cmd), flush=True)
                subprocess.check_call(cmd)
                objs.append(str(obj))
            if not objs:
                continue
            ext.extra_objects += objs
            ext.define_macros += [("OVR_WITH_CUDA", "1")]
            ext.library_dirs.append(str(_cudart_dir(cuda_home)))
            ext.libraries += ["cudart_static", "rt", "dl", "pthread"]
            ext.include_dirs.append(str(cuda_home / "include"))
        super().build_extensions()


def _ext_modules():
    if os.environ.get("OVR_SKIP_EXT") == "1":
        return []
    from pybind11.setup_helpers import Pybind11Extension

    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
    return [Pybind11Extension("ovr_kernels._C", sources, include_dirs=[str(CSRC)], cxx_std=17,
                              extra_compile_args=["-O3"])]


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": BuildExt})
