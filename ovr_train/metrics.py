"""Metrics: JSONL + TensorBoard logging on rank 0, throughput / MFU / peak memory, and PNG curves.

`MetricsLogger(stage_dir, enabled)` appends one JSON object per logged step to `metrics.jsonl` and mirrors scalars
to TensorBoard (`tensorboard/`); on resume it truncates records past the resumed step, so the curve continues
exactly. `plot_curves` draws chosen keys from a metrics file with matplotlib's Agg backend.
"""

import json
import math
import resource
import time
from pathlib import Path

import matplotlib
import torch
from torch.utils.tensorboard import SummaryWriter

# Dense bf16 tensor-core peaks (FLOP/s) of the GPUs MFU is reported for; unknown devices report no MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device (None on CPU or an unknown GPU: MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak resident set size on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsLogger:
    """Rank-0 JSONL + TensorBoard writer (a no-op on other ranks)."""

    def __init__(self, stage_dir, enabled: bool, resume_step: int = 0, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(stage_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # keep only records the resumed run will not rewrite
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            self._tb = SummaryWriter(str(Path(stage_dir) / "tensorboard"), purge_step=resume_step + 1)

    def log(self, step: int, values: dict):
        if not self.enabled:
            return
        record = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                                   for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self):
        if self._tb is not None:
            self._tb.close()


class Throughput:
    """Tokens/s and MFU over the last step: call `start()` before and `stop(tokens)` after it."""

    def __init__(self, flops_per_token: float, device: torch.device, world_size: int):
        self.flops_per_token, self.device, self.world = flops_per_token, device, world_size
        self.peak = peak_flops(device)
        self._t0 = time.perf_counter()

    def start(self):
        self._t0 = time.perf_counter()

    def stop(self, global_tokens: int) -> dict:
        """global_tokens: tokens processed by all ranks in the step. Returns tokens_per_s (global), step_time_s,
        and mfu (per-GPU achieved / peak FLOP/s) on known GPUs."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = max(time.perf_counter() - self._t0, 1e-9)
        out = {"tokens_per_s": global_tokens / dt, "step_time_s": dt}
        if self.peak:
            out["mfu"] = global_tokens * self.flops_per_token / dt / self.world / self.peak
        return out


def read_metrics(path) -> list:
    """All records of a metrics.jsonl file."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pyplot():
    """matplotlib.pyplot on the Agg backend (PNG files, no display). Imported on the first plot: pyplot costs ~1 s
    (measured), and choosing a backend at import would switch the backend of whoever imports this module."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(metrics_path, png_path, keys: list, title: str = ""):
    """One subplot per key (those present) against step, saved as a PNG (matplotlib Agg, no display needed)."""
    plt = pyplot()
    records = read_metrics(metrics_path)
    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)
