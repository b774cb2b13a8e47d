"""Turn a pytest-benchmark JSON file into a markdown table; optionally refresh the README's results section.

    python benchmarks/report.py RESULTS.json [--md OUT.md] [--readme README.md]
    python benchmarks/report.py --latest [--readme README.md]   # newest benchmarks/results/*.json

Each row: benchmark, median ms, and the derived units the benchmark put in extra_info (TFLOP/s, GB/s, peak MiB,
ratios to baselines measured in the same run). The header names the device, torch/triton/CUDA versions, date and
git sha recorded by benchmarks/conftest.py; CPU-only runs are labelled as such.
"""

import argparse
import json
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"
RESULT_WORDS = ("tflops", "gbps", "tokens_per_s", "mfu", "peak", "speedup", "ratio", "fraction", "_vs_", "error")
ENV_KEYS = {"median_ms", "cpu_threads", "has_ext", "has_cuda_ext", "device", "gpu_name", "torch", "triton", "cuda", "git_sha", "date", "timestamp", "python", "host"}


def _fmt(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if v == 0 or 0.01 <= abs(v) < 1e5:
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return f"{v:.3e}"


def to_markdown(data: dict, source: str) -> str:
    """Markdown for one pytest-benchmark JSON document."""
    benches = data.get("benchmarks", [])
    if not benches:
        raise ValueError(f"{source}: no benchmarks in this file")
    env = {k: v for k, v in benches[0].get("extra_info", {}).items() if k in ENV_KEYS}
    device = env.get("device") or env.get("gpu_name") or data.get("machine_info", {}).get("cpu", {}).get("brand_raw")
    is_cpu = "cuda" not in str(env.get("device", "")).lower() and not env.get("gpu_name")
    head = [f"Device: {device}{' (CPU-only run)' if is_cpu else ''}; "
            + ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "cuda", "git_sha") if env.get(k))
            + f"; date {env.get('date') or data.get('datetime', '?')}; source `{source}`", ""]
    head.append("| benchmark | median ms | shape / mode | results (derived units, ratios to baselines in the same run) |")
    head.append("|---|---:|---|---|")
    for b in sorted(benches, key=lambda b: b.get("fullname", b["name"])):
        info = b.get("extra_info", {})
        shape = " ".join(str(info[k]) for k in ("shape", "mode") if k in info)
        results = ", ".join(f"{k} {_fmt(v)}" for k, v in info.items()
                            if any(w in k for w in RESULT_WORDS) and k not in ENV_KEYS)
        head.append(f"| {b['name']} | {_fmt(b['stats']['median'] * 1e3)} | {shape} | {results} |")
    return "\n".join(head) + "\n"


def latest() -> Path:
    files = sorted(RESULTS.glob("*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise SystemExit(f"no results in {RESULTS}")
    return files[-1]


def update_readme(readme: Path, table: str) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} section")
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{table}{END}", text, flags=re.DOTALL)
    readme.write_text(new)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="?", help="pytest-benchmark JSON file")
    p.add_argument("--latest", action="store_true", help="use the newest benchmarks/results/*.json")
    p.add_argument("--md", help="write the markdown table to this file")
    p.add_argument("--readme", help="replace the README's results section with the table")
    a = p.parse_args(argv)
    path = latest() if a.latest or not a.json else Path(a.json)
    table = to_markdown(json.loads(path.read_text()), str(path))
    if a.md:
        Path(a.md).write_text(table)
    if a.readme:
        update_readme(Path(a.readme), table)
    sys.stdout.write(table)


if __name__ == "__main__":
    main()
