"""benchmarks/gpu_check.sh: its rehearsal runs the whole control flow here (warm, tests, one pytest process and JSON
per benchmark file, autotune, trap copy to $OUT, report, README refresh), and without a GPU the real mode fails fast.

One section is given a 1 s budget so that the cut-section path (SIGINT, status in the table, nothing lost) runs too.
"""

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _has_gpu():
    return shutil.which("nvidia-smi") is not None and subprocess.run(["nvidia-smi", "-L"], capture_output=True,
                                                                     check=False).returncode == 0


@pytest.mark.skipif(_has_gpu(), reason="checks the no-GPU failure")
def test_without_a_gpu_fails_fast_and_clearly(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), GPU_CHECK_RESULTS=str(tmp_path / "res"))
    res = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env,
                         check=False)
    assert res.returncode == 2
    assert "no NVIDIA GPU visible" in res.stderr and "--rehearse" in res.stderr
    assert not (tmp_path / "res").exists()


@pytest.mark.slow
def test_rehearsal_writes_results_table_and_copies_them_out(tmp_path):
    out, results = tmp_path / "out", tmp_path / "res"
    readme_before = (ROOT / "README.md").read_text()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}  # else pytest-benchmark is off
    env.update(OUT=str(out), GPU_CHECK_RESULTS=str(results), GPU_CHECK_TRAIN_STEP="0",
               GPU_CHECK_BUDGET_bench_packing="1", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run(["bash", str(SCRIPT), "--rehearse"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=env, check=False)
    log = res.stdout + res.stderr
    assert res.returncode == 1, log  # the cut section makes the run report failure
    assert sorted(p.name for p in out.iterdir()) == ["combined.json", "results.tar.gz", "summary.md"], log
    summary = (out / "summary.md").read_text()
    # sections with their status and time; the cut one says so
    for section in ("warm", "tests", "bench_varlen_attention", "bench_linear_logprob", "bench_ppo_loss", "bench_gae",
                    "autotune"):
        assert f"| {section} | ok |" in summary, (section, summary)
    assert "| bench_packing | timeout after 1 s |" in summary
    # test verdicts: real passes from the interpreter, the GPU tests skipped
    assert "| test_advantages::test_grpo_eps | passed |" in summary
    assert "| test_gpu_varlen_attention::test_benchmark_shapes_match_float64[text-default] | skipped |" in summary
    # benchmark rows from their per-file JSON, labelled CPU
    assert "CPU-only run on" in summary and "| test_gae_cpu | CPU |" in summary
    combined = json.loads((out / "combined.json").read_text())
    assert any(b["name"] == "test_gae_cpu" for run in combined for b in run["benchmarks"])
    with tarfile.open(out / "results.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"bench_gae.json", "bench_gae.log", "tests.xml", "sections.tsv", "autotune.json"} <= names
    # the README refresh ran on a copy; the real README is untouched by a rehearsal
    run_dir = next(p for p in results.iterdir() if p.is_dir())
    assert "| test_gae_cpu | CPU |" in (run_dir / "README.md").read_text()
    assert (ROOT / "README.md").read_text() == readme_before


def test_sections_selects_what_a_second_call_runs(tmp_path):
    """GPU_CHECK_SECTIONS runs the named sections only (the follow-up call of a GPU window); the others are listed
    as not selected, and the run still succeeds and copies its table out."""
    out, results = tmp_path / "out", tmp_path / "res"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.update(OUT=str(out), GPU_CHECK_RESULTS=str(results), GPU_CHECK_SECTIONS="bench_gae", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run(["bash", str(SCRIPT), "--rehearse"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=env, check=False)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log
    summary = (out / "summary.md").read_text()
    assert "| bench_gae | ok |" in summary and "| test_gae_cpu | CPU |" in summary, summary
    for section in ("warm", "tests", "bench_varlen_attention", "bench_train_step"):
        assert f"| {section} | not selected |" in summary, (section, summary)


def test_install_wheels_installs_only_what_is_missing_or_too_old(tmp_path, monkeypatch):
    """A carried wheel of a package the image already has at a recent enough version is left out (it would shadow
    the image's copy); a missing package, or pytest below 8.1, is installed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("install_wheels", ROOT / "benchmarks" / "install_wheels.py")
    iw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(iw)
    wheels = [tmp_path / n for n in ("pytest-9.2.0-py3-none-any.whl", "not_a_real_pkg_ovr-1.0-py3-none-any.whl",
                                     "py_cpuinfo-9.0.0-py3-none-any.whl")]
    versions = {"pytest": "9.0.1", "py-cpuinfo": "9.0.0"}

    def version(name):
        if name not in versions:
            raise iw.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(iw.metadata, "version", version)
    assert [w.name for w in iw.needed(wheels)] == ["not_a_real_pkg_ovr-1.0-py3-none-any.whl"]
    versions["pytest"] = "7.4.0"
    assert [w.name for w in iw.needed(wheels)] == ["pytest-9.2.0-py3-none-any.whl",
                                                   "not_a_real_pkg_ovr-1.0-py3-none-any.whl"]


def test_report_of_a_gpu_run_lists_every_junit_and_the_readme_only_failures():
    """The committed H200 run (a first test pass cut at its budget, then a rerun): both junit files are reported,
    the first pass first; the README form keeps each file's counts and its failing tests, the full form every
    verdict."""
    import report

    run = ROOT / "benchmarks" / "results" / "NVIDIA-H200-2026-12-04-90064b7"
    full, runs = report.run_dir_report(run)
    short, _ = report.run_dir_report(run, failures_only=True)
    assert full.index("(`tests.xml`): 18 FAILED, 73 passed") < full.index("(`tests-rerun.xml`): 16 FAILED, 156 passed")
    assert "(`tests.xml`): 18 FAILED, 73 passed" in short and "(`tests-rerun.xml`): 16 FAILED, 156 passed" in short
    assert "| passed |" in full and "| passed |" not in short
    assert short.count("| FAILED |") == 18 + 16
    assert any(data and data.get("benchmarks") for _, data in runs)
    assert "test_varlen_attention[text-fwd]" in short  # the benchmarks table is in both forms
