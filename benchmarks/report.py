"""Turn benchmark results into a markdown table; optionally refresh the README's results section.

    python benchmarks/report.py RESULTS.json [MORE.json ...] [--md OUT.md] [--readme README.md]
    python benchmarks/report.py --dir benchmarks/results/RUN/ [--md OUT.md] [--combined ALL.json] [--readme README.md]
    python benchmarks/report.py --latest [--readme README.md]   # newest benchmarks/results/*.json

A run directory (benchmarks/gpu_check.sh) holds one pytest-benchmark JSON per benchmark file, tests.xml (junit of the
GPU tests) and sections.tsv (each section's status and seconds). Each JSON file is one pytest run with its own
environment (device, torch / triton / CUDA versions, git sha, date recorded by benchmarks/conftest.py), named in the
header; each row says whether the benchmark ran on the GPU or the CPU, so a GPU run's CPU benchmarks are labelled as
such and a CPU-only run says so. Rows: benchmark, shape, ovr's median ms, each baseline timed in the same run
(its ms and ovr's speedup over it), and the other derived units (TFLOP/s, GB/s, peak MiB...). A file that is missing
or unreadable (a section cut before pytest wrote it) is listed, not fatal.
"""

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"
RESULT_WORDS = ("tflops", "gbps", "tokens_per_s", "mfu", "peak", "ratio", "fraction", "error", "oom", "launches",
                "nats")
ENV_KEYS = ("device", "backend", "gpu_name", "torch", "triton", "cuda", "python", "git_sha", "date")
NOT_RESULTS = {"median_ms", "cpu_threads", "has_ext", "has_cuda_ext", "timestamp", "host", *ENV_KEYS}


def _fmt(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if v == 0 or 0.01 <= abs(v) < 1e5:
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return f"{v:.3e}"


def on_gpu(info: dict) -> bool:
    """Whether a benchmark ran on CUDA: the `backend` its fixture recorded; older files: CUDA peak-memory keys."""
    if "backend" in info:
        return info["backend"] == "cuda"
    return bool(info.get("gpu_name")) or "peak_mib" in info or "cuda" in str(info.get("device", "")).lower()


def run_environment(data: dict) -> dict:
    """The environment of one pytest run: the GPU benchmarks' device when there are any, else the CPU's."""
    benches = data.get("benchmarks", [])
    infos = [b.get("extra_info", {}) for b in benches]
    gpu = [i for i in infos if on_gpu(i)]
    first = (gpu or infos or [{}])[0]
    env = {k: first[k] for k in ENV_KEYS if first.get(k) not in (None, "")}
    env.setdefault("device", data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "?"))
    env.setdefault("date", data.get("datetime", "?"))
    env["kind"] = "GPU" if gpu else "CPU-only"
    return env


def _env_line(env: dict, source: str) -> str:
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "cuda", "git_sha") if env.get(k))
    return f"{env['kind']} run on {env['device']}: {versions}; date {env['date']}; source `{source}`"


def _row(b: dict) -> str:
    info = b.get("extra_info", {})
    shape = " ".join(str(info[k]) for k in ("shape", "mode", "pass_") if k in info)
    baselines = []
    for key, value in info.items():
        m = re.fullmatch(r"(.+)_median_ms", key)
        if m and key != "median_ms":
            speedup = info.get(f"speedup_vs_{m.group(1)}")
            gradient = info.get(f"{m.group(1)}_gradient")  # e.g. a baseline whose gradient is approximate
            baselines.append(f"{m.group(1)} {_fmt(value)} ms" + (f" ({_fmt(speedup)}x)" if speedup is not None else "")
                             + (f" [{gradient}]" if gradient else ""))
    errors = [f"{k[:-6]}: n/a" for k in info if k.endswith("_error")]
    results = [f"{k} {_fmt(v)}" for k, v in info.items() if k not in NOT_RESULTS and not k.endswith("_median_ms")
               and not k.startswith("speedup_vs_") and not k.endswith("_error") and any(w in k for w in RESULT_WORDS)]
    return (f"| {b['name']} | {'GPU' if on_gpu(info) else 'CPU'} | {shape} | {_fmt(b['stats']['median'] * 1e3)} | "
            f"{'; '.join(baselines + errors) or '-'} | {', '.join(results) or '-'} |")


def benchmarks_table(runs: list[tuple[str, dict | None]]) -> str:
    """Markdown for pytest-benchmark runs [(source, data or None when unreadable)]."""
    lines, rows = [], []
    for source, data in runs:
        if data is None:
            lines.append(f"- `{source}`: no results (missing or unreadable: the section was cut before it was written)")
            continue
        if not data.get("benchmarks"):
            lines.append(f"- `{source}`: no benchmark ran (all skipped or deselected)")
            continue
        lines.append("- " + _env_line(run_environment(data), source))
        rows += [_row(b) for b in sorted(data["benchmarks"], key=lambda b: b.get("fullname", b["name"]))]
    out = "\n".join(lines) + "\n"
    if rows:
        out += ("\n| benchmark | on | shape / mode | ovr median ms | baselines, same run (ms, ovr speedup) | "
                "derived units |\n|---|---|---|---:|---|---|\n" + "\n".join(rows) + "\n")
    return out


def tests_table(junit: Path, failures_only: bool = False) -> str:
    """One row per test of a junit file (with `failures_only`, per failed or erroring test): outcome, seconds,
    first line of the failure; the counts of every outcome head it."""
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError) as e:
        return f"GPU tests: no verdicts (`{junit}`: {type(e).__name__})\n"
    rows, counts = [], {}
    for case in root.iter("testcase"):
        if not case.get("name"):  # pytest's placeholder for a session cut by SIGINT: no test behind it
            continue
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                message = (node.get("message") or node.text or "").strip().splitlines()[0][:160] if (
                    node.get("message") or node.text) else ""
                break
        counts[outcome] = counts.get(outcome, 0) + 1
        if failures_only and outcome not in ("FAILED", "ERROR"):
            continue
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        rows.append(f"| {name} | {outcome} | {float(case.get('time', 0)):.1f} | {message.replace('|', '/')} |")
    head = f"GPU tests (`{junit.name}`): " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + "\n\n"
    if not rows:
        return head
    return head + "| test | verdict | s | message |\n|---|---|---:|---|\n" + "\n".join(rows) + "\n"


def sections_table(tsv: Path) -> str:
    lines = [line.split("\t") for line in tsv.read_text().splitlines()[1:] if line.strip()]
    return ("| section | status | s | budget s |\n|---|---|---:|---:|\n"
            + "\n".join(f"| {' | '.join(cols)} |" for cols in lines) + "\n")


def _read(path: Path):
    """A results file's JSON; {} for an empty one (pytest-benchmark writes nothing when every benchmark skipped);
    None when missing or cut mid-write."""
    try:
        text = path.read_text()
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return None


def run_dir_report(run: Path, failures_only: bool = False) -> tuple[str, list]:
    """(markdown, runs) for a gpu_check.sh results directory: its sections, the verdicts of each tests*.xml
    (a rerun's beside the first; with `failures_only`, the counts and the failing tests alone), the benchmarks."""
    logs = [p for p in sorted(run.glob("*.log")) if p.stem.startswith("bench_")]
    names = sorted({p.stem for p in run.glob("bench_*.json")} | {p.stem for p in logs})
    runs = [(str(run / f"{n}.json"), _read(run / f"{n}.json")) for n in names]
    parts = [f"**Results: `{run.name}`** (sections, GPU test verdicts, benchmarks)\n"]
    if (run / "sections.tsv").exists():
        parts.append(sections_table(run / "sections.tsv"))
    for junit in sorted(run.glob("tests*.xml"), key=lambda p: (p.stem != "tests", p.name)) or [run / "tests.xml"]:
        parts.append(tests_table(junit, failures_only))
    parts.append(benchmarks_table(runs))
    return "\n".join(parts), runs


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
    p.add_argument("json", nargs="*", help="pytest-benchmark JSON files")
    p.add_argument("--dir", help="a gpu_check.sh results directory")
    p.add_argument("--latest", action="store_true", help="use the newest benchmarks/results/*.json")
    p.add_argument("--md", help="write the markdown to this file")
    p.add_argument("--combined", help="write every run's benchmarks (and its environment) to one JSON file")
    p.add_argument("--readme", help="replace the README's results section with the table")
    a = p.parse_args(argv)
    if a.dir:
        table, runs = run_dir_report(Path(a.dir))
    else:
        paths = [latest()] if a.latest or not a.json else [Path(x) for x in a.json]
        runs = [(str(x), _read(x)) for x in paths]
        if all(d is None for _, d in runs):
            raise SystemExit(f"no readable results in {[str(x) for x in paths]}")
        table = benchmarks_table(runs)
    if a.md:
        Path(a.md).write_text(table)
    if a.combined:
        Path(a.combined).write_text(json.dumps(
            [{"source": s, "environment": run_environment(d), "benchmarks": d["benchmarks"]}
             for s, d in runs if d and d.get("benchmarks")], indent=1))
    if a.readme:  # the README lists failing tests only; the --md file has every verdict
        update_readme(Path(a.readme), run_dir_report(Path(a.dir), failures_only=True)[0] if a.dir else table)
    sys.stdout.write(table)


if __name__ == "__main__":
    main()
