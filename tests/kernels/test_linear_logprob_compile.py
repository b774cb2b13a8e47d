"""Compile the linear_logprob kernels for sm_80 and sm_90 as they launch at the benchmark shapes (bf16, H = 3584,
V = 152,064, T = 4096 and 16384 on an H100's 132 SMs): each launch is captured from the real launchers on meta tensors
(block configs, launch options, and every int argument, marked divisible by 16 where its value is, as triton's
launcher marks it), then compiled on this environment's triton and on the GPU image's 3.6.0. No register spills,
matrix products on tensor cores (wgmma on sm_90, mma.sync on sm_80). No GPU needed (sm_compile.py)."""

import importlib
import json
import math
from unittest import mock

import pytest
import torch
from sm_compile import capture_launches, compile_many, job_from_launch, triton_versions, uses_tensor_cores

import ovr_kernels.linear_logprob as ll

HIDDEN, VOCAB = 3584, 152_064

FWD_SIGNATURE = {
    "hidden_ptr": "*bf16", "weight_ptr": "*bf16", "targets_ptr": "*i64", "part_ptr": "*fp32",
    "T": "i32", "V": "i32", "H": "i32", "stride_h_t": "i32", "stride_w_v": "i32", "scale2": "fp32",
    "vocab_per_split": "i32", "num_splits": "i32",
    "BLOCK_T": "constexpr", "BLOCK_V": "constexpr", "BLOCK_K": "constexpr", "EVEN_K": "constexpr",
    "WITH_ENTROPY": "constexpr", "UPCAST": "constexpr", "INPUT_PRECISION": "constexpr", "ALIGNED": "constexpr",
}
BWD_SIGNATURE = {
    "hidden_ptr": "*bf16", "weight_ptr": "*bf16", "targets_ptr": "*i64", "max2_ptr": "*fp32", "log2sum_ptr": "*fp32",
    "entropy_ptr": "*fp32", "grad_logprob_ptr": "*fp32", "grad_entropy_ptr": "*fp32", "dz_ptr": "*bf16",
    "T": "i32", "V": "i32", "H": "i32", "stride_h_t": "i32", "stride_w_v": "i32", "stride_dz_t": "i32",
    "v_offset": "i32", "scale2": "fp32", "inv_temperature": "fp32", "ignore_index": "i32",
    "BLOCK_T": "constexpr", "BLOCK_V": "constexpr", "BLOCK_K": "constexpr", "EVEN_K": "constexpr",
    "GROUP_T": "constexpr", "HAS_GRAD_ENTROPY": "constexpr", "UPCAST": "constexpr", "INPUT_PRECISION": "constexpr",
    "ALIGNED": "constexpr",
}

MERGE_SIGNATURE = {
    "part_ptr": "*fp32", "targets_ptr": "*i64", "logprob_ptr": "*fp32", "entropy_ptr": "*fp32", "max2_ptr": "*fp32",
    "log2sum_ptr": "*fp32", "T": "i32", "V": "i32", "num_splits": "i32", "ignore_index": "i32",
    "BLOCK": "constexpr", "BLOCK_S": "constexpr", "WITH_ENTROPY": "constexpr",
}
KERNELS = (("_linear_logprob_fwd_kernel", FWD_SIGNATURE), ("_linear_logprob_bwd_kernel", BWD_SIGNATURE),
           ("_merge_splits_kernel", MERGE_SIGNATURE))


class _Props:
    """torch.cuda.get_device_properties of an H100 SXM / H200 (sm_90), or of an A100-like sm_80 part."""

    def __init__(self, arch):
        self.major, self.minor = divmod(arch, 10)
        self.multi_processor_count = 132
        self.L2_cache_size = 50 * 2**20


BENCH_SHAPES = ((4096, HIDDEN, VOCAB), (16384, HIDDEN, VOCAB))  # (tokens, hidden size, vocabulary)


def launched_jobs(arch, shapes=BENCH_SHAPES):
    """(name, job) per distinct launch of the forward and backward kernels at `shapes` (the benchmark's)."""
    import ovr_kernels._triton as tr

    names, jobs, seen = [], [], set()
    for num_tokens, hidden_size, vocab_size in shapes:
        hidden, weight, targets = (torch.empty(num_tokens, hidden_size, dtype=torch.bfloat16, device="meta"),
                                   torch.empty(vocab_size, hidden_size, dtype=torch.bfloat16, device="meta"),
                                   torch.empty(num_tokens, dtype=torch.int64, device="meta"))
        stats = [torch.empty(num_tokens, device="meta") for _ in range(5)]

        def run(hidden=hidden, weight=weight, targets=targets, stats=stats):
            for with_entropy in (True, False):
                ll._triton_fwd(hidden, weight, targets, 1.0, -100, with_entropy)
            for grad_entropy in (stats[4], None):
                ll._triton_bwd(hidden, weight, targets, 1.0, -100, *stats[:3], stats[3], grad_entropy)

        with mock.patch.object(ll, "INTERPRET", False), mock.patch.object(tr, "INTERPRET", False), \
                mock.patch.object(torch.cuda, "get_device_properties", lambda device=None: _Props(arch)):
            calls = capture_launches(ll, [name for name, _ in KERNELS], run)
        for kernel_name, sig in KERNELS:
            for launch in calls[kernel_name]:
                j = job_from_launch(getattr(ll, kernel_name), sig, launch, arch)
                key = json.dumps([j["constexprs"], sorted(j["divisible"]), j["signature"]], sort_keys=True)
                if key in seen:
                    continue
                seen.add(key)
                flags = {k: v for k, v in j["constexprs"].items()
                         if k in ("WITH_ENTROPY", "HAS_GRAD_ENTROPY", "BLOCK_V", "BLOCK_S")}
                ints = [k for k, t in sig.items() if t == "i32"]
                names.append(f"{kernel_name.removeprefix('_linear_logprob_')} T={num_tokens} {flags} ints not /16: "
                             f"{[k for k in ints if k not in j['divisible']]}")
                jobs.append(j)
    return names, jobs


@pytest.mark.parametrize("triton_dir", triton_versions())
@pytest.mark.parametrize("arch", [80, 90])
def test_launched_kernels_compile_without_spills_on_tensor_cores(arch, triton_dir):
    names, jobs = launched_jobs(arch)
    # fwd with/without entropy, bwd with/without the entropy gradient, the split merge with/without entropy
    assert len(jobs) >= 6 and {j["name"] for j in jobs} == {name for name, _ in KERNELS}
    # the launch marks what is a multiple of 16 (T, V, H, strides), not the rest (e.g. ignore_index = -100)
    assert all({"T", "V", "H", "stride_h_t", "stride_w_v"} <= set(j["divisible"]) for j in jobs
               if j["name"] != "_merge_splits_kernel")
    assert all("ignore_index" not in j["divisible"] for j in jobs if "ignore_index" in j["signature"])
    infos = compile_many(jobs, triton_dir)
    for name, info in zip(names, infos):
        print(f"linear_logprob {name}: {info.summary()}")
    for name, job, info in zip(names, jobs, infos):
        assert info.n_spills == 0, f"{name} sm_{arch}: {info.n_spills} B of spills\n{info.ptxas_log}"
        if job["name"] != "_merge_splits_kernel":  # the merge is elementwise: no matrix product
            assert uses_tensor_cores(info, arch), f"{name} sm_{arch}: no {'wgmma' if arch >= 90 else 'mma.sync'}"
        assert info.shared <= (232_448 if arch >= 90 else 166_912), f"{name} sm_{arch}: {info.shared} B shared"


@pytest.mark.parametrize("triton_dir", triton_versions()[1:])  # the GPU image's triton: what launches there
def test_edge_shapes_compile(triton_dir):
    """One token, one vocabulary split, sizes that are no multiple of 16: triton's launcher turns an int argument
    equal to 1 into the constant 1 (a Python int inside the kernel, with no `.to`), so these launches compile a
    variant that the benchmark shapes never do. A kernel that calls a tensor method on such an argument fails only
    here (seen on an H200 at the test shapes of the fused policy loss: num_splits == 1)."""
    names, jobs = launched_jobs(90, shapes=((1, 64, 10), (37, 80, 300)))
    merges = [j for j in jobs if j["name"] == "_merge_splits_kernel"]
    assert any(j["constexprs"].get("num_splits") == 1 for j in merges), "no launch with one split"
    assert any(j["constexprs"].get("T") == 1 for j in jobs), "no one-token launch"
    for name, info in zip(names, compile_many(jobs, triton_dir)):
        print(f"linear_logprob {name}: {info.summary()}")

def _launched_splits(num_tokens, arch=90):
    """num_splits and BLOCK_T of the forward launch at the Qwen head on the mocked H100 / sm_80 part."""
    import ovr_kernels._triton as tr

    hidden = torch.empty(num_tokens, HIDDEN, dtype=torch.bfloat16, device="meta")
    weight = torch.empty(VOCAB, HIDDEN, dtype=torch.bfloat16, device="meta")
    targets = torch.empty(num_tokens, dtype=torch.int64, device="meta")
    with mock.patch.object(ll, "INTERPRET", False), mock.patch.object(tr, "INTERPRET", False), \
            mock.patch.object(torch.cuda, "get_device_properties", lambda device=None: _Props(arch)):
        calls = capture_launches(ll, ["_linear_logprob_fwd_kernel", "_merge_splits_kernel"],
                                 lambda: ll._triton_fwd(hidden, weight, targets, 1.0, -100, True))
    launch = calls["_linear_logprob_fwd_kernel"][0]
    assert calls["_merge_splits_kernel"][0]["num_splits"] == launch["num_splits"]
    return launch["num_splits"], launch["BLOCK_T"]


@pytest.mark.parametrize("num_tokens", [4096, 16384, 32768, 65536, 262144])
def test_hidden_slabs_in_flight_fit_in_l2(num_tokens):
    """The programs in flight (one per SM, split fastest) hold at most half of the 50 MiB L2 in hidden slabs at
    every T, small T still gets several waves of programs, and the last wave is at least 90% full."""
    num_splits, block_t = _launched_splits(num_tokens)
    num_t_blocks = -(-num_tokens // block_t)
    slabs_in_flight = min(num_t_blocks, -(-132 // num_splits))
    assert slabs_in_flight * block_t * HIDDEN * 2 <= 25 * 2**20, f"S={num_splits}: {slabs_in_flight} slabs"
    programs = num_t_blocks * num_splits
    assert programs >= min(2 * 132, num_t_blocks * (VOCAB // 256 // 4))
    waves = programs / 132
    assert waves / math.ceil(waves) >= 0.9, f"S={num_splits}: {waves:.2f} waves, the last one mostly idle"


POLICY_SIGNATURE = {
    "logits_ptr": "*fp32", "dz_ptr": "*bf16", "targets_ptr": "*i64", "logp_ptr": "*fp32", "ent_ptr": "*fp32",
    "old_ptr": "*fp32", "adv_ptr": "*fp32", "mask_ptr": "*u8", "ref_ptr": "*fp32", "scale_ptr": "*fp32",
    "T": "i32", "V": "i32", "stride_l": "i32", "stride_dz": "i32", "scale2": "fp32", "inv_temperature": "fp32",
    "ignore_index": "i32", "lo": "fp32", "hi": "fp32", "dual_c": "fp32", "kl_coef": "fp32", "ent_coef": "fp32",
    "lr_clamp": "fp32", "BLOCK_T": "constexpr", "BLOCK_V": "constexpr", "WITH_ENTROPY": "constexpr",
    "HAS_ENTROPY_GRAD": "constexpr", "HAS_KL": "constexpr", "KL_TYPE": "constexpr", "HAS_DUAL_CLIP": "constexpr",
}


def policy_jobs(arch, num_tokens=4096):
    """The fused policy loss's softmax/dz kernel as its launcher launches it at the benchmark head (bf16), with the
    default options and with every option on; the PPO kernels it also launches are captured, not run."""
    import ovr_kernels._triton as tr
    import ovr_kernels.policy_loss as pl

    pp = importlib.import_module("ovr_kernels.ppo_loss")  # the package's `ppo_loss` attribute is the function

    meta = {"device": "meta"}
    hidden = torch.empty(num_tokens, HIDDEN, dtype=torch.bfloat16, **meta)
    weight = torch.empty(VOCAB, HIDDEN, dtype=torch.bfloat16, **meta)
    targets = torch.empty(num_tokens, dtype=torch.int64, **meta)
    per_token = [torch.empty(num_tokens, **meta) for _ in range(3)]
    mask = torch.empty(num_tokens, dtype=torch.bool, **meta)
    cu = torch.tensor([0, 5, num_tokens], dtype=torch.int32).to("meta")

    def run():
        old, adv, ref = per_token
        pl._fused_fwd(hidden, weight, targets, old, adv, mask, None, None, None, 1.0, -100, True, 0.2, 0.2, None,
                      0.0, "k3", 0.0)
        pl._fused_fwd(hidden, weight, targets, old, adv, mask, ref, cu, None, 0.7, -100, True, 0.2, 0.28, 3.0,
                      0.05, "k3", 0.01)

    with mock.patch.object(pl, "INTERPRET", False), mock.patch.object(pp, "INTERPRET", False), \
            mock.patch.object(tr, "INTERPRET", False):
        calls = capture_launches(pl, ["_policy_dz_kernel"], lambda: capture_launches(
            pp, ["_ppo_loss_fwd_kernel", "_masked_mean_finalize_kernel"], run))
    return [job_from_launch(pl._policy_dz_kernel, POLICY_SIGNATURE, launch, arch)
            for launch in calls["_policy_dz_kernel"]]


@pytest.mark.parametrize("triton_dir", triton_versions())
@pytest.mark.parametrize("arch", [80, 90])
def test_policy_dz_kernel_compiles_without_spills(arch, triton_dir):
    jobs = policy_jobs(arch)
    assert len(jobs) == 2 and jobs[1]["constexprs"]["HAS_KL"] and jobs[1]["constexprs"]["HAS_ENTROPY_GRAD"]
    for j, info in zip(jobs, compile_many(jobs, triton_dir)):
        print(f"policy_dz {j['constexprs']}: {info.summary()}")
        assert info.n_spills == 0, f"sm_{arch}: {info.n_spills} B of spills\n{info.ptxas_log}"
