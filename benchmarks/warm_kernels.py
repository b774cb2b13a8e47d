"""Run every Triton kernel once at its benchmark specialisation so that the tests and benchmarks after it find
compiled kernels in the shared TRITON_CACHE_DIR (gpu_check.sh sets it) instead of compiling inside a timed section.

    python benchmarks/warm_kernels.py          # CUDA, benchmark shapes
    python benchmarks/warm_kernels.py --tiny   # rehearsal: tiny shapes on CPU through the interpreter

Prints each kernel family's wall time (compile + one run).
"""

import argparse
import os
import sys
import time
from pathlib import Path

# this checkout's ovr_kernels (not an installed copy) and the benchmark modules
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch


def _timed(label, fn):
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    print(f"warm {label}: {time.perf_counter() - t0:.1f} s", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (the interpreter)")
    a = p.parse_args(argv)
    if a.tiny:
        os.environ["OVR_BACKEND"] = "triton"  # before ovr_kernels is imported: CPU tensors through the interpreter
    device = "cpu" if a.tiny else "cuda"
    if not a.tiny and not torch.cuda.is_available():
        raise SystemExit("warm_kernels: no CUDA device (use --tiny to rehearse on CPU)")

    import bench_linear_logprob as bll
    import bench_ppo_loss as bppo
    import bench_varlen_attention as bva

    from ovr_kernels import (
        grpo_advantages,
        linear_logprob_entropy,
        masked_whiten,
        ppo_loss,
        value_loss,
        varlen_attention,
    )

    def attention():
        for shape in bva.SHAPES:
            if a.tiny:
                hq, hkv, d, causal = bva.SHAPES[shape]
                lengths = [3, 0, 17]
                cu = torch.tensor([0, 3, 3, 20], dtype=torch.int32)
                q = torch.randn(20, 2 * (hq // hkv), d)
                k, v = torch.randn(20, 2, d), torch.randn(20, 2, d)
            else:
                lengths, cu, _, q, k, v, causal = bva._inputs(shape)
            qg, kg, vg = (x.requires_grad_() for x in (q, k, v))
            out = varlen_attention(qg, kg, vg, cu, cu, max(lengths), max(lengths), causal=causal)
            torch.autograd.grad(out, (qg, kg, vg), torch.randn_like(out))

    def linear_logprob():
        sizes = [(8, 32, 50)] if a.tiny else [(4096, bll.HIDDEN, bll.VOCAB), (16384, bll.HIDDEN, bll.VOCAB)]
        for t, h, v in sizes:
            hidden, weight, targets = bll.make_inputs(t, h, v, device, torch.float32 if a.tiny else torch.bfloat16)
            hg, wg = hidden.requires_grad_(), weight.requires_grad_()
            lp, ent = linear_logprob_entropy(hg, wg, targets)
            torch.autograd.grad((lp + ent).sum(), (hg, wg))
            del hidden, weight, hg, wg

    def losses():
        x = bppo.make_token_inputs(64 if a.tiny else bppo.NUM_TOKENS, device, num_seqs=4 if a.tiny else 256)
        for all_options in (False, True):
            bppo.ppo_step(ppo_loss, x, all_options)
        bppo.value_step(value_loss, x)
        masked_whiten(x["advantages"], x["mask"])
        grpo_advantages(torch.rand(4 * 16 if a.tiny else 512 * 16, device=device), 16)
        sizes = (16, 32, 50, torch.float32) if a.tiny else (bppo.POLICY_TOKENS, bppo.HIDDEN, bppo.VOCAB, torch.bfloat16)
        bppo.policy_step("fused", bppo.make_policy_inputs(*sizes[:3], device, sizes[3]))

    _timed("varlen_attention", attention)
    _timed("linear_logprob", linear_logprob)
    _timed("ppo/value/advantages/fused policy loss", losses)


if __name__ == "__main__":
    main()
