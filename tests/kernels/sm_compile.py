"""Compile Triton kernels for real GPU targets on a machine without a GPU.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` lowers a kernel to PTX and cubin with no driver.
Register and spill counts are read from `ptxas -v` (Triton's bundled ptxas, the one that built the cubin), since
`CompiledKernel.n_regs` needs a driver. The tests set TRITON_INTERPRET=1, under which `@triton.jit` returns
interpreter objects that cannot be compiled, so the compilation runs in a subprocess with the interpreter off that
re-imports the kernel's module by name. That subprocess can load another triton (`triton_dir`: a folder made by
`pip install --target DIR triton==X`, put first on PYTHONPATH), e.g. the GPU image's 3.6.0 beside CI's 3.7.1.

What launches: triton's launcher specialises every pointer argument that is 16-byte aligned AND every int argument
whose value is divisible by 16 (strides, token counts, vocabulary sizes), and compiles that variant; its register
use, spills and cp.async pipelining differ from the unspecialised one. `job(..., values={...})` marks exactly the
arguments a launch with those int values would mark.

Usage:
    info = compile_for_arch(_my_fwd_kernel, {"x_ptr": "*bf16", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 128},
                            arch=90, num_warps=8, num_stages=3, values={"n": 4096})
    assert info.n_spills == 0 and uses_tensor_cores(info, 90)
`compile_many([...job dicts...])` compiles several in one subprocess (each costs ~1 s; the subprocess start ~3 s).
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

_WORKER = r"""
import importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget

def ptxas_path():
    d = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    p = os.path.join(d, "ptxas")
    return p if os.path.exists(p) else "ptxas"

out = []
print("@@TRITON@@" + triton.__version__ + "@@")
for job in json.loads(sys.stdin.read()):
    fn = getattr(importlib.import_module(job["module"]), job["name"])
    fn = getattr(fn, "fn", fn) if not isinstance(fn, triton.runtime.jit.JITFunction) else fn
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise TypeError(f"{job['module']}.{job['name']} is not a @triton.jit kernel")
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in job["divisible"]}
    src = ASTSource(fn, job["signature"], constexprs=job["constexprs"], attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32),
                        options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]})
    ptx = ck.asm["ptx"]
    arch_name = "sm_90a" if job["arch"] == 90 else f"sm_{job['arch']}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        open(path, "w").write(ptx)
        res = subprocess.run([ptxas_path(), "-v", f"--gpu-name={arch_name}", path, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True)
    log = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill_st = re.search(r"(\d+) bytes spill stores", log)
    spill_ld = re.search(r"(\d+) bytes spill loads", log)
    out.append({"n_regs": int(regs.group(1)) if regs else -1,
                "n_spills": (int(spill_st.group(1)) if spill_st else 0) + (int(spill_ld.group(1)) if spill_ld else 0),
                "shared": int(ck.metadata.shared), "ptx": ptx, "ptxas_log": log})
print("@@JSON@@" + json.dumps(out))
"""


@dataclass
class SMInfo:
    """What compiling one kernel config for one architecture produced."""

    name: str
    arch: int
    n_regs: int
    n_spills: int  # spill stores + spill loads, bytes (ptxas -v)
    shared: int  # bytes of shared memory the kernel launches with
    asm: dict = field(repr=False, default_factory=dict)  # {"ptx": ...}
    ptxas_log: str = field(repr=False, default="")
    triton_version: str = ""  # the triton that compiled it

    def summary(self) -> str:
        return (f"{self.name} sm_{self.arch} (triton {self.triton_version}): {self.n_regs} regs, {self.shared} B "
                f"shared, {self.n_spills} B spills")


def launch_divisible(signature: dict, values: dict) -> list[str]:
    """The arguments a launch marks divisible by 16: every pointer (torch allocations are 16-byte aligned) and every
    int argument whose value in `values` is a multiple of 16. Every int argument must have a value."""
    ints = [k for k, t in signature.items() if t[0] in "iu"]
    missing = [k for k in ints if k not in values]
    if missing:
        raise ValueError(f"no launch value for int arguments {missing}")
    return [k for k, t in signature.items() if t.startswith("*")] + [k for k in ints if values[k] % 16 == 0]


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the call instead of launching."""

    def __init__(self, kernel):
        self.arg_names = list(kernel.arg_names)
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = dict(zip(self.arg_names, args))
            named.update(kwargs)
            self.calls.append(named)
        return launch


def capture_launches(module, kernel_names: list[str], run) -> dict[str, list[dict]]:
    """Run `run()` with `module`'s kernels `kernel_names` replaced by recorders; returns {name: [launch kwargs]}
    (every argument by name, plus num_warps / num_stages). Call it with meta tensors and the module's GPU settings
    patched in (INTERPRET off, device properties) to see exactly what a GPU launch at those shapes passes."""
    recorders = {name: _Recorder(getattr(module, name)) for name in kernel_names}
    saved = {name: getattr(module, name) for name in kernel_names}
    try:
        for name, rec in recorders.items():
            setattr(module, name, rec)
        run()
    finally:
        for name, kernel in saved.items():
            setattr(module, name, kernel)
    return {name: rec.calls for name, rec in recorders.items()}


def job_from_launch(kernel, signature: dict, launch: dict, arch: int) -> dict:
    """The compile job of one captured launch: its constexprs and launch options, and the ints it passed marked as
    triton's launcher marks them (an int equal to 1 is specialised to the constant 1, as triton does)."""
    sig = dict(signature)
    constexprs = {k: launch[k] for k, t in signature.items() if t == "constexpr"}
    values = {k: int(launch[k]) for k, t in signature.items() if t[0] in "iu" and not t.startswith("*")}
    for k, v in list(values.items()):
        if v == 1:
            sig[k] = "constexpr"
            constexprs[k] = 1
            del values[k]
    return job(kernel, sig, constexprs, arch, launch.get("num_warps", 4), launch.get("num_stages", 3),
               values=values)


def _job(kernel, signature, constexprs, arch, num_warps, num_stages, divisible=None, values=None):
    fn = getattr(kernel, "fn", kernel)
    if values is not None:
        divisible = launch_divisible(signature, values)
    elif divisible is None:  # every pointer 16-byte aligned, no int marked (not what launches when ints are 16k)
        divisible = [k for k, t in signature.items() if t.startswith("*")]
    return {"module": fn.__module__, "name": fn.__name__, "signature": signature, "constexprs": constexprs or {},
            "arch": arch, "num_warps": num_warps, "num_stages": num_stages, "divisible": list(divisible)}


def compile_many(jobs: list[dict], triton_dir: str | None = None) -> list[SMInfo]:
    """Compile jobs built by `job(...)` in one subprocess with TRITON_INTERPRET off; with `triton_dir`, the triton
    installed there (first on PYTHONPATH) instead of this environment's."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OVR_BACKEND")}
    if triton_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(triton_dir), os.getcwd(), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    res = subprocess.run([sys.executable, "-c", _WORKER], input=json.dumps(jobs), capture_output=True, text=True,
                         env=env, timeout=600, check=False)
    if res.returncode != 0 or "@@JSON@@" not in res.stdout:
        raise RuntimeError(f"compiling {[j['name'] for j in jobs]} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    version = res.stdout.split("@@TRITON@@", 1)[1].split("@@", 1)[0]
    raw = json.loads(res.stdout.split("@@JSON@@", 1)[1])
    return [SMInfo(j["name"], j["arch"], r["n_regs"], r["n_spills"], r["shared"], {"ptx": r["ptx"]}, r["ptxas_log"],
                   version) for j, r in zip(jobs, raw)]


def job(kernel, signature: dict, constexprs: dict | None = None, arch: int = 90, num_warps: int = 4,
        num_stages: int = 3, divisible: list[str] | None = None, values: dict | None = None) -> dict:
    """One compile job: kernel (a @triton.jit function defined at module level), Triton signature
    ({"x_ptr": "*bf16", "n": "i32", "BLOCK": "constexpr"}), constexpr values, target sm arch, launch options.

    `values` ({int argument: its value at the launch being checked}) marks what that launch marks
    (`launch_divisible`); without it `divisible` names the arguments marked divisible by 16 (default: every pointer;
    [] compiles the unspecialised variant).
    """
    return _job(kernel, signature, constexprs, arch, num_warps, num_stages, divisible, values)


def compile_for_arch(kernel, signature: dict, constexprs: dict | None = None, arch: int = 90, num_warps: int = 4,
                     num_stages: int = 3, divisible: list[str] | None = None, values: dict | None = None,
                     triton_dir: str | None = None) -> SMInfo:
    """Compile one kernel config for sm_`arch` (80 or 90) and return its resource usage (see `job`)."""
    return compile_many([_job(kernel, signature, constexprs, arch, num_warps, num_stages, divisible, values)],
                        triton_dir)[0]


def uses_tensor_cores(info: SMInfo, arch: int | None = None) -> bool:
    """True when the PTX holds tensor-core matrix instructions: wgmma on sm_90, mma.sync on sm_80."""
    ptx = info.asm["ptx"]
    arch = info.arch if arch is None else arch
    return ("wgmma" in ptx) if arch >= 90 else ("mma.sync" in ptx)


TRITON_DIRS = {"3.6.0": ".cache/triton-3.6.0"}  # `make install` puts the GPU image's triton there


def triton_versions() -> list:
    """pytest params: this environment's triton (None) and each extra version installed under TRITON_DIRS (skipped
    with the command to install it when absent)."""
    import pytest

    root = Path(__file__).resolve().parents[2]
    params = [pytest.param(None, id="triton-env")]
    for version, rel in TRITON_DIRS.items():
        path = root / rel
        marks = [] if (path / "triton" / "__init__.py").exists() else [pytest.mark.skip(
            reason=f"triton {version} not installed: pip install --no-deps --target {rel} triton=={version}")]
        params.append(pytest.param(str(path), id=f"triton-{version}", marks=marks))
    return params
