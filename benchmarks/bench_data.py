"""The SFT data path at the paper's scale: token-store build throughput, and the memory and start-up time of a rank's
data path for 20k, 200k and 2M samples, against the in-memory loader training used before the store.

Legend: N samples in the corpus, W build worker processes.

Corpora: `synth_text`'s generated problems (the tiny default's training data: short reasoning traces, ~95 tokens
each with the repository's 640-token BPE tokenizer), written as JSONL and built into stores by the real builder:
20k, 200k and 2M samples (2M: ~190M tokens; the paper's cold start is ~2M samples of ~5k tokens, 10B tokens, so
sample COUNT is at the paper's scale, tokens per sample are not).
1. `test_build_store[W]` (W = 1, 2): build the 200k corpus's store from its JSONL, one round each (a build takes
   tens of seconds). Units: tokens_per_s, samples_per_s; W=2 also speedup_vs_1_worker.
2. `test_sft_data_path_memory`: for each N a fresh process loads the tokenizer (its peak RSS then is
   `base_rss_mib`: Python, torch, tokenizer: what every run pays), opens the data (`startup_s`, peak RSS
   `startup_peak_mib`), then runs 50 steps of what one rank of an 8-rank job does per step: the step's global batch
   (256 samples) from the sampler, the token-balanced plan over 8 ranks from the lengths, and collation of rank 0's
   packed 16384-token micro-batches, then `TokenStore.release` as sft.py does (`steps_peak_mib`: the process's
   peak RSS over the whole run, VmHWM).
   "store" opens the token store (memory-mapped; built beforehand, not timed); "in_memory" is
   `data.load_sft_samples`, every sample encoded in memory at start-up as training did before the store, for
   N <= BASELINE_MAX (2M would need ~10x its 200k memory and start-up on a machine shared with other jobs).
   Goal: store peak RSS within 10% from 20k to 2M samples, start-up under 5 s at every size.

Run: `pytest benchmarks/bench_data.py --benchmark-only -s` measures 20k and 200k samples (a few minutes), so that
`pytest benchmarks/ --benchmark-only` stays short; the paper-scale point is opt-in:
`OVR_BENCH_DATA_SIZES=20000,200000,2000000` (generating and building the 2M corpus takes ~15-30 min on 2 cores the
first time; OVR_BENCH_DATA_DIR keeps corpora and stores between runs). OVR_BENCH_DATA_BUILD sets the build corpus
(default 200000). On a 2-core CPU machine shared with other jobs, W=2's speedup is bounded by the cores free.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ovr_train.config import DataCfg
from ovr_train.data import ImageProcessor
from ovr_train.store import TokenStore, open_store
from ovr_train.synth_text import ensure_corpus
from ovr_train.tokenizer import load_tokenizer, special_ids

ROOT = Path(__file__).resolve().parent.parent
SIZES = [int(s) for s in os.environ.get("OVR_BENCH_DATA_SIZES", "20000,200000").split(",")]
BUILD_N = int(os.environ.get("OVR_BENCH_DATA_BUILD", "200000"))
BASELINE_MAX = 200000
PROC = ImageProcessor(12544, 50176)  # the tiny default's bounds (the corpora are text: no image is processed)
STEPS, BATCH, WORLD, BUDGET = 50, 256, 8, 16384


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    # OVR_BENCH_DATA_DIR: keep the generated corpora and stores between runs (the 2M build takes ~20 min here)
    root = Path(os.environ["OVR_BENCH_DATA_DIR"]) if os.environ.get("OVR_BENCH_DATA_DIR") else \
        tmp_path_factory.mktemp("bench_data")
    cache = str(root / "cache")
    return {"root": root, "cache": cache, "tok": load_tokenizer(kind="bpe", cache_dir=cache), "built": {}}


def _corpus(work, n: int) -> Path:
    return ensure_corpus(work["cache"], n, 10, 0)[0]


def _build(work, n: int, workers: int, store_dir: str = ""):
    cfg = DataCfg(cache_dir=work["cache"], store_dir=store_dir, build_workers=workers)
    tok = work["tok"]
    return open_store([_corpus(work, n)], tok, special_ids(tok), PROC, cfg)


@pytest.mark.parametrize("workers", [1, 2])
def test_build_store(cpu_bench, work, workers):
    _corpus(work, BUILD_N)  # generated outside the timing
    store_dir = str(work["root"] / f"build_w{workers}")
    shutil.rmtree(store_dir, ignore_errors=True)  # a real build, never a reuse
    store = cpu_bench(_build, work, BUILD_N, workers, store_dir, rounds=1, warmup_rounds=0)
    work["built"][workers] = store
    tokens = store.meta["num_tokens"]
    cpu_bench.extra_info.update(num_samples=len(store), num_tokens=tokens, workers=workers)
    tok_s = cpu_bench.rate("tokens_per_s", tokens)
    cpu_bench.rate("samples_per_s", len(store))
    if workers == 2 and 1 in work["built"]:
        cpu_bench.ratio_vs("1_worker", work["built"][1].meta["build_seconds"])
    print(f"build W={workers}: {len(store)} samples, {tokens} tokens, {cpu_bench.median_s():.1f} s, "
          f"{tok_s:.0f} tokens/s")


def _probe(kind: str, source: str, cache: str) -> dict:
    """One measurement in this (fresh) process; see the module docstring."""
    from ovr_train.data import StepSampler, collate, load_sft_samples, step_plan

    def hwm_mib() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
        return float("nan")

    tok = load_tokenizer(kind="bpe", cache_dir=cache)
    ids = special_ids(tok)
    cfg = DataCfg(cache_dir=cache)
    proc = PROC
    base = hwm_mib()
    t0 = time.perf_counter()
    if kind == "store":
        store = TokenStore(source, proc)
        lengths, read, n, release = store.lengths, store.read, len(store), store.release
    else:
        samples, _ = load_sft_samples([source], tok, ids, proc, cfg)
        lengths, read, n, release = [s.length for s in samples], samples.__getitem__, len(samples), lambda: None
    sampler = StepSampler(n, BATCH, seed=0)
    startup_s, startup_peak = time.perf_counter() - t0, hwm_mib()
    tokens = 0
    for step in range(STEPS):
        plan = step_plan(sampler.batch_indices(step), lengths, WORLD, BUDGET, True)
        for mb in plan[0]:
            if mb is not None:
                tokens += collate([read(i) for i in mb], True, ids["endoftext"]).num_tokens
        release()  # as sft.py does once per step
    return {"num_samples": n, "base_rss_mib": round(base, 1), "startup_s": round(startup_s, 3),
            "startup_peak_mib": round(startup_peak, 1), "steps_peak_mib": round(hwm_mib(), 1),
            "rank0_tokens": tokens}


def _run_probe(kind: str, source, cache: str) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.bench_data import _probe; "
            f"print('RESULT', json.dumps(_probe({kind!r}, {str(source)!r}, {cache!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=3600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), check=False)
    if out.returncode != 0:
        raise AssertionError(f"probe {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT"))[7:])


def test_sft_data_path_memory(cpu_bench, work):
    results = {}
    built = {len(s): str(s.path) for s in work["built"].values()}
    stores = {n: _build(work, n, 2, built.get(n, "")).path for n in SIZES}  # built (or reused) before measuring

    def measure():
        for n in SIZES:
            results[f"store_{n}"] = _run_probe("store", stores[n], work["cache"])
            if n <= BASELINE_MAX:
                results[f"in_memory_{n}"] = _run_probe("in_memory", _corpus(work, n), work["cache"])

    cpu_bench(measure, rounds=1, warmup_rounds=0)
    cpu_bench.extra_info["probes"] = results
    stores = [results[f"store_{n}"] for n in SIZES]
    spread = max(r["steps_peak_mib"] for r in stores) / min(r["steps_peak_mib"] for r in stores) - 1
    cpu_bench.extra_info["store_peak_rss_spread"] = round(spread, 4)
    cpu_bench.extra_info["store_max_startup_s"] = max(r["startup_s"] for r in stores)
    print(f"\n{'data path':<22} {'samples':>9} {'start-up s':>10} {'base MiB':>9} {'start-up peak MiB':>17} "
          f"{'50-step peak MiB':>16}")
    for name, r in results.items():
        print(f"{name:<22} {r['num_samples']:>9} {r['startup_s']:>10.3f} {r['base_rss_mib']:>9.0f} "
              f"{r['startup_peak_mib']:>17.0f} {r['steps_peak_mib']:>16.0f}")
    print(f"store peak RSS spread over {SIZES}: {spread * 100:.1f}% (goal <= 10%)")
