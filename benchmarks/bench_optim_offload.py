"""Optimizer offload (`optim.offload=cpu`): DeepSpeed's CPU Adam vs torch AdamW on CPU fp32 shards, and the whole
tiny SFT step with offload on and off. CPU benchmarks; on a GPU machine they measure the host side the same way.

1. `test_optim_step_cpu[qwen2.5-0.5b/2]` and `[qwen2.5-1.5b/4]`: one AdamW step (weight decay 0.1, betas 0.9/0.95)
   over one rank's FSDP2 shards of a Qwen2.5 LLM's parameters (0.5B: H 896, 24 layers, MLP 4864; 1.5B: H 1536,
   28 layers, MLP 8960; GQA with 2 KV heads, V 151,936 tied, q/k/v biases), sharded over 2 and 4 ranks: each
   parameter's dim-0 slice a rank holds (0.25B and 0.39B parameters). Whole unsharded models need 16 B/param of
   host memory (fp32 param, grad, two moments): 7.9 GB and 24.7 GB, over what a 23 GB machine shared by several
   jobs can hold for the 1.5B one, so both are measured as shards. Measured: ShardedCPUAdam (ovr_train.optim,
   DeepSpeed's AVX C++). Baselines on the same tensors: `torch.optim.AdamW(foreach=True)` (the no-offload path)
   and `AdamW(fused=True)` (torch's fused CPU kernel). Each optimizer gets its own state; extra_info has
   `params`, ns_per_param and `speedup_vs_<baseline>`.
2. `test_sft_step_offload[tiny]` / `[100m]`: the embedded SFT run (1 rank, `python -m ovr_train.launch --stage sft`,
   8 sequences per step, 6 steps, no checkpoints) on the tiny default and on a ~100M-parameter LLM (SFT_MODELS) with `--optim.offload=cpu` (measured: the whole run, startup
   included) vs `none` (baseline, timed the same way); extra_info has the median `step_time_s` of steps 2-6 from
   metrics.jsonl (step 1 includes warm-up) over two runs of each, and their ratio. The DeepSpeed op is built (or loaded from the
   cache) before timing.

The per-GPU memory with offload for the 7B cold start is a formula (launch.memory_estimate), not a measurement:
`python -m ovr_train.launch --stage sft --config configs/ovr_7b_coldstart.yaml --dry-run
--run.dry_run_world_size=8 --optim.offload=cpu` (and 4, 2; `--optim.offload=none` for the comparison).
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ovr_train.optim import build_optimizer, load_cpu_adam_op

ROOT = Path(__file__).resolve().parent.parent
# (hidden, layers, MLP width, KV width = kv_heads * head_dim, vocab) of Qwen2.5's LLMs (tied embeddings)
SHAPES = {"qwen2.5-0.5b": (896, 24, 4864, 128, 151936), "qwen2.5-1.5b": (1536, 28, 8960, 256, 151936)}


def shard_shapes(hidden: int, layers: int, inter: int, kv: int, vocab: int, world: int) -> list:
    """Shapes of one rank's dim-0 shards of every LLM parameter (FSDP2 rounds dim 0 up to a multiple of world)."""
    layer = [(hidden, hidden), (hidden,), (kv, hidden), (kv,), (kv, hidden), (kv,), (hidden, hidden),
             (inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    full = [(vocab, hidden)] + layer * layers + [(hidden,)]
    return [(-(-s[0] // world),) + s[1:] for s in full]


def _optim_case(name: str, world: int):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).requires_grad_() for s in shard_shapes(*SHAPES[name], world)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return params


@pytest.mark.parametrize("name,world", [("qwen2.5-0.5b", 2), ("qwen2.5-1.5b", 4)], ids=["0.5b/2", "1.5b/4"])
def test_optim_step_cpu(cpu_bench, name, world):
    load_cpu_adam_op()
    params = _optim_case(name, world)
    n = sum(p.numel() for p in params)
    kw = {"lr": 1e-4, "betas": (0.9, 0.95), "weight_decay": 0.1}
    cpu_bench.extra_info.update(params=n, shards_of=world, model=name)
    baselines = {}
    for base, flag in (("adamw_foreach", "foreach"), ("adamw_fused", "fused")):
        opt = torch.optim.AdamW(params, **kw, **{flag: True})
        baselines[base] = cpu_bench.time_baseline(base, opt.step, rounds=3, warmup_rounds=1)
        del opt  # its moments: one optimizer's state in memory at a time
    opt = build_optimizer(params, "cpu", kw["lr"], kw["betas"], kw["weight_decay"])
    cpu_bench(opt.step, rounds=3, warmup_rounds=1)
    for base, sec in baselines.items():
        cpu_bench.ratio_vs(base, sec)
        cpu_bench.extra_info[f"{base}_ns_per_param"] = round(sec / n * 1e9, 3)
    cpu_bench.rate("params_per_s", n)


# SFT model sizes: the embedded tiny default, and a ~100M-parameter LLM (H 768, 12 layers, MLP 3072, 12 heads / 4 KV
# heads of 64; mRoPE sections summing to 32) with the tiny ViT
SFT_MODELS = {"tiny": [], "100m": ["--model.hidden_size=768", "--model.num_layers=12", "--model.intermediate_size=3072",
                                   "--model.num_heads=12", "--model.num_kv_heads=4", "--model.mrope_section=[8,12,12]"]}


def _sft_step_times(tmp_path, offload: str, model: str = "tiny") -> list:
    out = tmp_path / f"{offload}{len(list(tmp_path.glob(offload + '*')))}"  # a fresh run directory: never a resume
    cmd = [sys.executable, "-m", "ovr_train.launch", "--stage", "sft", f"--run.out_dir={out}", "--sft.steps=6",
           "--sft.batch_size=8", "--data.synth_num_train=400", "--data.synth_num_eval=40", "--checkpoint.every=0",
           "--checkpoint.export_hf=false", f"--optim.offload={offload}", *SFT_MODELS[model]]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OVR_CACHE=str(tmp_path / "cache"))
    env.pop("RANK", None)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in rows[1:]]


@pytest.mark.parametrize("model", sorted(SFT_MODELS))
def test_sft_step_offload(cpu_bench, tmp_path, model):
    load_cpu_adam_op()
    _sft_step_times(tmp_path, "none")  # builds the tokenizer and corpus cache once, outside the timings
    steps = {"none": [], "cpu": []}
    run = lambda offload: steps[offload].extend(_sft_step_times(tmp_path, offload, model))
    # interleaved, two runs each: this shared machine's load drifts by several x within a minute
    base = cpu_bench.time_baseline("offload_none_run", run, "none", rounds=2, warmup_rounds=0)
    cpu_bench(run, "cpu", rounds=2, warmup_rounds=0)  # measured: whole 6-step runs with offload (startup too)
    cpu_bench.ratio_vs("offload_none_run", base)
    off, on = statistics.median(steps["none"]), statistics.median(steps["cpu"])
    cpu_bench.extra_info.update(step_ms_offload_cpu=round(on * 1e3, 2), step_ms_offload_none=round(off * 1e3, 2),
                                step_slowdown_offload=round(on / off, 4))
    cpu_bench.extra_info.update(model=model)
    print(f"{model} SFT step (median of steps 2-6, 2 runs): offload=none {off * 1e3:.1f} ms, offload=cpu "
          f"{on * 1e3:.1f} ms ({on / off:.2f}x)")
