"""Block-config sweep for the varlen attention kernels, bounded in time, writing winners into the tuning table.

    python benchmarks/autotune.py [--budget 80] [--out sweep.json] [--table ovr_kernels/attention_configs.json]
    python benchmarks/autotune.py --tiny --table /tmp/t.json --out /tmp/s.json   # rehearsal on CPU (interpreter)

For each (arch, dtype, head_dim, causal, short segments) key of the benchmark shapes, each kernel's candidates
(BLOCK_M, BLOCK_N, num_warps, num_stages) are timed at that shape (triton.testing.do_bench, median; the forward
alone for "fwd"; the whole backward with the other kernels at their table configs for the rest: the default
backward for "dkdvq" (the fused dK/dV + dQ kernel), deterministic=True for "dkdv" and "dq", which only it launches;
segments of <= 64 tokens launch only "fwd" and "dkdvq"), in order of how likely they are to win, until the time budget is spent; progress is printed per candidate. A candidate that
fails to launch (shared memory, registers) is recorded and skipped. The table's entry for a key gets a kernel's
winner only when every candidate of that kernel was timed, with a "source" naming device, torch / triton versions
and date; other entries keep theirs. Winners that spill registers are not filtered here: run the compile gate
(tests/kernels/test_varlen_attention_compile.py) before committing a tuned table. --tiny times two candidates per
kernel at tiny shapes through the interpreter: it exercises this control flow, its numbers mean nothing.
"""

import argparse
import datetime
import functools
import importlib
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

# this checkout's ovr_kernels (not an installed copy) and the benchmark modules
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "ovr_kernels" / "attention_configs.json"
# (benchmark shape name, dtype): the keys worth tuning, headline first
KEYS = [("text", torch.bfloat16), ("vit_full", torch.bfloat16), ("windows", torch.bfloat16)]
CANDIDATES = {  # most likely winners first (the budget may stop the sweep part-way)
    "fwd": [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 2),
            (128, 64, 8, 2)],
    "dkdvq": [(64, 128, 8, 2), (16, 128, 8, 2), (32, 64, 8, 1), (32, 128, 8, 1), (64, 64, 4, 2), (32, 64, 8, 2),
              (16, 128, 8, 1)],
    "dkdv": [(32, 64, 8, 2), (64, 64, 8, 2), (64, 128, 8, 2), (32, 128, 8, 2), (32, 128, 8, 1), (64, 64, 8, 1),
             (32, 64, 4, 2)],
    "dq": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
}
TINY_CANDIDATES = {kernel: [(64, 64, 4, 1), (32, 32, 4, 1)] for kernel in ("fwd", "dkdvq", "dkdv", "dq")}
SHORT_KERNELS = ("fwd", "dkdvq")  # what launches when every segment is <= 64 tokens


def table_key(arch: int, dtype: torch.dtype, head_dim: int, causal: bool, short: bool) -> str:
    va = importlib.import_module("ovr_kernels.varlen_attention")
    return (f"sm{90 if arch >= 90 else 80}/{va._DTYPE_NAMES[dtype]}/d{head_dim}/{'causal' if causal else 'full'}/"
            f"{'short' if short else 'long'}")


def format_table(doc: dict) -> str:
    """The table as committed: header fields, then one line per key."""
    head = [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in doc.items() if k != "configs"]
    items = [f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in doc["configs"].items()]
    return "{\n" + "\n".join(head) + '\n  "configs": {\n' + ",\n".join(items) + "\n  }\n}\n"


def _inputs(shape, tiny):
    import bench_varlen_attention as bva

    hq, hkv, d, causal = bva.SHAPES[shape]
    if tiny:
        lengths = [80, 0, 40] if shape != "windows" else [16, 0, 12]  # long (> 64) / short segments
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        g = hq // hkv
        q, k, v = torch.randn(sum(lengths), g, d), torch.randn(sum(lengths), 1, d), torch.randn(sum(lengths), 1, d)
        return lengths, cu, max(lengths), q, k, v, causal
    return bva._inputs(shape)


def _timer(tiny):
    if tiny:  # the interpreter: one timed call is all it can afford
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return run
    import triton.testing

    return lambda fn: triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


def _forward(q, k, v, cu, max_len, causal):
    from ovr_kernels import varlen_attention

    with torch.no_grad():
        varlen_attention(q, k, v, cu, cu, max_len, max_len, causal=causal, check_cu_seqlens_values=False)


def _forward_backward(q, k, v, do, cu, max_len, causal, deterministic):
    from ovr_kernels import varlen_attention

    out = varlen_attention(q, k, v, cu, cu, max_len, max_len, causal=causal, check_cu_seqlens_values=False,
                           deterministic=deterministic)
    torch.autograd.grad(out, (q, k, v), do)


def sweep(budget_s: float, tiny: bool, deadline: float):
    """Time candidates; returns (records, winners {key: {kernel: cfg}} for kernels fully swept)."""
    va = importlib.import_module("ovr_kernels.varlen_attention")
    major, minor = (9, 0) if tiny else torch.cuda.get_device_capability()
    arch = 10 * major + minor
    timer = _timer(tiny)
    candidates = TINY_CANDIDATES if tiny else CANDIDATES
    inputs = [(dtype, _inputs(shape, tiny)) for shape, dtype in KEYS]
    total = sum(len(c) for _, x in inputs for kernel, c in candidates.items() if kernel in SHORT_KERNELS or x[2] > 64)
    records, winners, done = [], {}, 0
    real_block_config = va.block_config
    for dtype, (lengths, cu, max_len, q, k, v, causal) in inputs:
        if not tiny:
            q, k, v = (x.to(dtype) for x in (q, k, v))
        key = table_key(arch, dtype, q.shape[2], causal, max_len <= 64)
        qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
        do = torch.randn_like(q)
        args = (cu, max_len, causal)
        runs = {"fwd": functools.partial(_forward, q, k, v, *args),
                "dkdvq": functools.partial(_forward_backward, qg, kg, vg, do, *args, False),
                "dkdv": functools.partial(_forward_backward, qg, kg, vg, do, *args, True)}
        runs["dq"] = runs["dkdv"]
        for kernel, cands in candidates.items():
            if kernel not in SHORT_KERNELS and max_len <= 64:
                continue  # not launched when every segment fits one kv block (the fused kernel stores dQ)
            timed = []
            for cfg in cands:
                done += 1
                if time.monotonic() > deadline:
                    print(f"[{done}/{total}] budget of {budget_s:.0f} s spent: stopping", flush=True)
                    return records, winners

                def chosen(name, *args, cfg=cfg, kernel=kernel, **kwargs):
                    return cfg if name == kernel else real_block_config(name, *args, **kwargs)

                # the interpreter launches every kernel with _INTERPRET_CONFIG: patch that in a rehearsal
                patch = mock.patch.object(va, "_INTERPRET_CONFIG", cfg) if tiny else \
                    mock.patch.object(va, "block_config", chosen)
                try:
                    with patch:
                        ms = timer(runs[kernel])
                except Exception as e:  # noqa: BLE001 - out of resources etc.: record, try the next one
                    ms = None
                    print(f"[{done}/{total}] {key} {kernel} {cfg}: failed ({type(e).__name__}: {str(e)[:120]})",
                          flush=True)
                records.append({"key": key, "kernel": kernel, "config": list(cfg), "ms": ms})
                if ms is not None:
                    timed.append((ms, cfg))
                    print(f"[{done}/{total}] {key} {kernel} {cfg}: {ms:.3f} ms", flush=True)
            if timed and len(timed) + sum(1 for r in records if r["key"] == key and r["kernel"] == kernel
                                          and r["ms"] is None) == len(cands):
                winners.setdefault(key, {})[kernel] = list(min(timed)[1])
    return records, winners


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=80.0, help="seconds for the whole sweep (default 80)")
    p.add_argument("--out", help="write every timing to this JSON file")
    p.add_argument("--table", default=str(TABLE), help=f"tuning table to update (default {TABLE})")
    p.add_argument("--tiny", action="store_true", help="rehearsal: tiny shapes on CPU through the interpreter")
    a = p.parse_args(argv)
    if a.tiny and Path(a.table).resolve() == TABLE.resolve():
        raise SystemExit("--tiny timings mean nothing: pass --table somewhere other than the committed table")
    if not a.tiny and not torch.cuda.is_available():
        raise SystemExit("autotune: no CUDA device (use --tiny to rehearse on CPU)")
    if a.tiny:
        os.environ["OVR_BACKEND"] = "triton"  # before ovr_kernels is imported: CPU tensors through the interpreter
    t0 = time.monotonic()
    src = Path(a.table) if Path(a.table).exists() else TABLE
    doc = json.loads(src.read_text())
    records, winners = sweep(a.budget, a.tiny, t0 + a.budget)
    if torch.cuda.is_available() and not a.tiny:
        import triton

        device, versions = torch.cuda.get_device_name(), f"torch {torch.__version__}, triton {triton.__version__}"
    else:
        device, versions = "cpu interpreter (rehearsal, meaningless)", f"torch {torch.__version__}"
    source = f"autotune on {device}, {versions}, {datetime.date.today().isoformat()}"
    for key, kernels in winners.items():
        entry = dict(doc["configs"].get(key, {}))
        entry.update(kernels)
        entry["source"] = source
        doc["configs"][key] = entry
    Path(a.table).write_text(format_table(doc))
    if a.out:
        Path(a.out).write_text(json.dumps({"source": source, "records": records, "winners": winners}, indent=1))
    print(f"autotune: {len(records)} candidates timed in {time.monotonic() - t0:.0f} s; winners for "
          f"{sum(len(v) for v in winners.values())} (key, kernel) pairs written to {a.table}")


if __name__ == "__main__":
    main()
