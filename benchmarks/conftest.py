"""Benchmark fixtures: `gpu_bench` and `cpu_bench` wrap pytest-benchmark's `benchmark.pedantic`.

Usage (one measured op per test; baselines are timed in the same run with `time_baseline`):

    def test_op(gpu_bench):                       # skips cleanly without CUDA
        out = gpu_bench(op, x, w, rounds=20, warmup_rounds=3)
        gpu_bench.tflops(2 * M * N * K)           # extra_info["tflops"] from the measured median
        gpu_bench.gbps(bytes_moved)               # extra_info["gbps"]
        base_s = gpu_bench.time_baseline("reference", ref_op, x, w, rounds=5)
        gpu_bench.ratio_vs("reference", base_s)   # extra_info["speedup_vs_reference"] = base median / our median
        gpu_bench.extra_info["reference_peak_extra_mib"] = gpu_bench.peak_extra_mib(ref_op, x, w)  # one call

`gpu_bench(fn, ...)` synchronizes CUDA after every call of `fn` (so wall time covers the kernels), resets and then
records peak memory (`extra_info["peak_mib"]`, torch.cuda.max_memory_allocated over the measured rounds).
`cpu_bench` does the same on CPU. Its `peak_mib` is the growth of the process's peak resident set
(resource.getrusage ru_maxrss) while the op ran, reported as `peak_rss_growth_mib`: a lower bound on the op's own
peak (memory the process already touched earlier is reused and does not show; torch has no CPU allocator stats). Both fill `extra_info` with device name,
torch / triton / CUDA versions, git sha and the date. Derived units need the measured median, so call them after
the measurement; under `--benchmark-disable` they record nothing and return None.
Run: `pytest benchmarks/ --benchmark-only` (CPU benchmarks run, GPU ones skip), `--benchmark-json=out.json` to export.
"""

import datetime
import os
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _git_sha() -> str:
    if os.environ.get("OVR_GIT_SHA"):  # gpu_check.sh: the device machine's copy of the tree may have no .git
        return os.environ["OVR_GIT_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info(device: str) -> dict:
    """Device name, library versions, git sha and UTC date, for `benchmark.extra_info`."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "backend": device,  # "cuda" | "cpu": what the report labels the row with
        "device": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "git_sha": _git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    from ovr_kernels._ext import HAS_CUDA_EXT, HAS_EXT

    info["has_ext"], info["has_cuda_ext"] = HAS_EXT, HAS_CUDA_EXT
    return info


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


class Bench:
    """Callable wrapper around one test's `benchmark` fixture (see the module docstring)."""

    def __init__(self, benchmark, device: str):
        self.benchmark = benchmark
        self.device = device
        self.extra_info = benchmark.extra_info
        self.extra_info.update(environment_info(device))

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _target(self, fn):
        def run(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.sync()  # time the kernels, not the launch
            return out
        return run

    def __call__(self, fn, *args, rounds: int = 10, warmup_rounds: int = 2, iterations: int = 1, **kwargs):
        """Time `fn(*args, **kwargs)` with benchmark.pedantic; returns fn's result."""
        self.sync()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        rss0 = _max_rss_mib()
        out = self.benchmark.pedantic(self._target(fn), args=args, kwargs=kwargs, rounds=rounds,
                                      warmup_rounds=warmup_rounds, iterations=iterations)
        if self.device == "cuda":
            self.extra_info["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 2)
            self.extra_info["peak_above_inputs_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 2)
        else:
            self.extra_info["peak_rss_growth_mib"] = round(_max_rss_mib() - rss0, 2)
        med = self.median_s()
        if med is not None:
            self.extra_info["median_ms"] = round(med * 1e3, 4)
        return out

    def median_s(self):
        """Median seconds per call of the measured op (None before measuring or under --benchmark-disable)."""
        stats = getattr(self.benchmark, "stats", None)
        return None if stats is None else stats.stats.median

    def tflops(self, flops: float):
        """extra_info["tflops"] = flops / median / 1e12."""
        return self._derived("tflops", lambda s: flops / s / 1e12)

    def gbps(self, num_bytes: float):
        """extra_info["gbps"] = bytes moved / median / 1e9."""
        return self._derived("gbps", lambda s: num_bytes / s / 1e9)

    def rate(self, name: str, count: float):
        """extra_info[name] = count / median (e.g. tokens per second)."""
        return self._derived(name, lambda s: count / s)

    def ratio_vs(self, name: str, baseline_s: float):
        """extra_info[f"speedup_vs_{name}"] = baseline seconds / our median (> 1: we are faster)."""
        self.extra_info[f"{name}_median_ms"] = round(baseline_s * 1e3, 4)
        return self._derived(f"speedup_vs_{name}", lambda s: baseline_s / s)

    def peak_mib(self):
        """Peak memory recorded by the last measurement (CUDA: max_memory_allocated; CPU: peak RSS growth)."""
        return self.extra_info.get("peak_mib", self.extra_info.get("peak_rss_growth_mib"))

    def _derived(self, key, from_median):
        med = self.median_s()
        if med is None or med <= 0:
            return None
        value = from_median(med)
        self.extra_info[key] = round(value, 4)
        return value

    def peak_extra_mib(self, fn, *args, **kwargs):
        """CUDA: peak memory of one call of `fn(*args, **kwargs)` above what was allocated before it (MiB, e.g. for
        a baseline timed with `time_baseline`), or "oom" when the call runs out of memory. Not recorded: the caller
        names the extra_info key."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        try:
            fn(*args, **kwargs)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return "oom"
        torch.cuda.synchronize()
        return round((torch.cuda.max_memory_allocated() - base) / 2**20, 2)

    def time_baseline(self, name: str, fn, *args, rounds: int = 5, warmup_rounds: int = 1, **kwargs) -> float:
        """Median seconds of `fn(*args, **kwargs)` timed here (not by pytest-benchmark), for same-run baselines.

        Records extra_info[f"{name}_median_ms"]; a baseline too slow to repeat can pass rounds=1, warmup_rounds=0.
        """
        for _ in range(warmup_rounds):
            fn(*args, **kwargs)
            self.sync()
        times = []
        for _ in range(rounds):
            self.sync()
            t0 = time.perf_counter()
            fn(*args, **kwargs)
            self.sync()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        self.extra_info[f"{name}_median_ms"] = round(med * 1e3, 4)
        return med


def pytest_collection_modifyitems(config, items):
    """Without CUDA, benchmarks marked `gpu` or using `gpu_bench` skip at collection (so pytest-benchmark's fixture
    is never set up and warns of nothing)."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") or "gpu_bench" in getattr(item, "fixturenames", ()):
            item.add_marker(skip_gpu)


@pytest.fixture
def gpu_bench(benchmark):
    """Bench on CUDA; tests using it skip when no CUDA device is present."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return Bench(benchmark, "cuda")


@pytest.fixture
def cpu_bench(benchmark):
    """Bench on CPU (peak memory = growth of peak RSS, see the module docstring)."""
    return Bench(benchmark, "cpu")
