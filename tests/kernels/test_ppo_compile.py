"""Compile check: every Triton kernel of the PPO / GSPO / value / advantage ops compiles for sm_80 and sm_90 at
the configurations the benchmarks launch (1M tokens, 512 groups of 16; int arguments marked divisible by 16 where
their benchmark values are, as triton's launcher marks them), on this environment's triton and the GPU image's
3.6.0, with no register spills. These are elementwise / reduction kernels: no
matrix products, so no tensor-core instruction is expected (the fused policy loss's matrix kernels belong to
linear_logprob and are checked by its own compile test). Registers and shared memory are printed per config.
"""

import importlib

import pytest
from sm_compile import compile_many, job, triton_versions

# import_module, not `from ovr_kernels import ppo_loss`: the package exports the function of that name
ppo_loss = importlib.import_module("ovr_kernels.ppo_loss")
value_loss = importlib.import_module("ovr_kernels.value_loss")
gspo_loss = importlib.import_module("ovr_kernels.gspo_loss")
advantages = importlib.import_module("ovr_kernels.advantages")

F32, U8, I32 = "*fp32", "*u8", "*i32"
BLOCK_T = ppo_loss.MAX_BLOCK_T  # the GPU tile of the loss kernels (the 1M-token benchmark config)
NUM_TOKENS, NUM_GROUPS, GROUP_SIZE = 1 << 20, 512, 16  # the benchmarks' sizes
TOKENS = {"T": NUM_TOKENS}
WHITEN_P = -(-NUM_TOKENS // advantages.WHITEN_BLOCK)  # whitening programs (and partial rows) at NUM_TOKENS


def _ppo_fwd_sig():
    return {"logp_ptr": F32, "old_ptr": F32, "adv_ptr": F32, "mask_ptr": U8, "ref_ptr": F32, "ent_ptr": F32,
            "cu_ptr": I32, "part_ptr": F32, "T": "i32", "lo": "fp32", "hi": "fp32", "dual_c": "fp32",
            "kl_coef": "fp32", "ent_coef": "fp32", "lr_clamp": "fp32", "HAS_KL": "constexpr", "KL_TYPE": "constexpr",
            "HAS_ENTROPY": "constexpr", "HAS_DUAL_CLIP": "constexpr", "SEQ_MEAN": "constexpr",
            "BLOCK_T": "constexpr", "NUM_COLS": "constexpr"}


def _ppo_bwd_sig():
    return {"logp_ptr": F32, "old_ptr": F32, "adv_ptr": F32, "mask_ptr": U8, "ref_ptr": F32, "cu_ptr": I32,
            "part_ptr": F32, "out_ptr": F32, "gout_ptr": F32, "glogp_ptr": F32, "gent_ptr": F32, "T": "i32",
            "lo": "fp32", "hi": "fp32", "dual_c": "fp32", "kl_coef": "fp32", "ent_coef": "fp32", "lr_clamp": "fp32",
            "HAS_KL": "constexpr", "KL_TYPE": "constexpr", "HAS_ENTROPY_GRAD": "constexpr",
            "HAS_DUAL_CLIP": "constexpr", "SEQ_MEAN": "constexpr", "BLOCK_T": "constexpr", "NUM_COLS": "constexpr"}


def _ppo_flags(all_on, entropy_key):
    return {"HAS_KL": all_on, "KL_TYPE": 2 if all_on else 0, entropy_key: all_on, "HAS_DUAL_CLIP": all_on, "SEQ_MEAN": all_on,
            "BLOCK_T": BLOCK_T, "NUM_COLS": ppo_loss.NUM_COLS}


def _configs():
    """(label, kernel, signature, constexprs, num_warps, int values): the launches of the benchmarks (ORZ PPO: no option on;
    every option on: KL k3, entropy, dual clip, sequence mean)."""
    out = []
    for all_on in (False, True):
        tag = "all-options" if all_on else "default"
        out.append((f"ppo_fwd[{tag}]", ppo_loss._ppo_loss_fwd_kernel, _ppo_fwd_sig(),
                    _ppo_flags(all_on, "HAS_ENTROPY"), ppo_loss.LOSS_NUM_WARPS, TOKENS))
        out.append((f"ppo_bwd[{tag}]", ppo_loss._ppo_loss_bwd_kernel, _ppo_bwd_sig(),
                    _ppo_flags(all_on, "HAS_ENTROPY_GRAD"), ppo_loss.LOSS_NUM_WARPS, TOKENS))
    for all_on in (False, True):  # GSPO: one program per sequence; lengths of the 1M-token config's sequences
        tag = "all-options" if all_on else "default"
        flags = {"HAS_KL": all_on, "KL_TYPE": 2 if all_on else 0, "SEQ_MEAN": all_on, "BLOCK_T": BLOCK_T,
                 "NUM_COLS": gspo_loss.NUM_COLS}
        fwd = {k: v for k, v in _ppo_fwd_sig().items() if k not in ("T", "dual_c", "HAS_DUAL_CLIP")}
        bwd = {k: v for k, v in _ppo_bwd_sig().items() if k not in ("T", "dual_c", "HAS_DUAL_CLIP")}
        out.append((f"gspo_fwd[{tag}]", gspo_loss._gspo_loss_fwd_kernel, fwd, {**flags, "HAS_ENTROPY": all_on},
                    ppo_loss.LOSS_NUM_WARPS, {}))
        out.append((f"gspo_bwd[{tag}]", gspo_loss._gspo_loss_bwd_kernel, bwd, {**flags, "HAS_ENTROPY_GRAD": all_on},
                    ppo_loss.LOSS_NUM_WARPS, {}))
    out.append(("finalize[ppo]", ppo_loss._masked_mean_finalize_kernel,
                {"part_ptr": F32, "norm_ptr": F32, "loss_ptr": F32, "out_ptr": F32, "P": "i32", "norm_value": "fp32",
                 "NUM_COLS": "constexpr", "MAX_COL": "constexpr", "NORM_MODE": "constexpr", "SEQ_MEAN": "constexpr",
                 "BLOCK_P": "constexpr", "BLOCK_C": "constexpr"},
                {"NUM_COLS": ppo_loss.NUM_COLS, "MAX_COL": ppo_loss.COL_RATIO_MAX, "NORM_MODE": 2, "SEQ_MEAN": False,
                 "BLOCK_P": 256, "BLOCK_C": 16}, 4, {"P": -(-NUM_TOKENS // BLOCK_T)}))
    vsig = {"v_ptr": F32, "vold_ptr": F32, "ret_ptr": F32, "mask_ptr": U8, "cu_ptr": I32, "part_ptr": F32, "T": "i32",
            "clip": "fp32", "HAS_CLIP": "constexpr", "SEQ_MEAN": "constexpr", "BLOCK_T": "constexpr",
            "NUM_COLS": "constexpr"}
    vflags = {"HAS_CLIP": True, "SEQ_MEAN": False, "BLOCK_T": BLOCK_T, "NUM_COLS": value_loss.NUM_COLS}
    out.append(("value_fwd", value_loss._value_loss_fwd_kernel, vsig, vflags, ppo_loss.LOSS_NUM_WARPS, TOKENS))
    vbsig = dict(vsig)
    del vbsig["T"], vbsig["clip"]
    vbsig = {**{k: v for k, v in vbsig.items() if not k.isupper()}, "out_ptr": F32, "gout_ptr": F32, "gv_ptr": F32,
             "T": "i32", "clip": "fp32", **{k: v for k, v in vbsig.items() if k.isupper()}}
    out.append(("value_bwd", value_loss._value_loss_bwd_kernel, vbsig, vflags, ppo_loss.LOSS_NUM_WARPS, TOKENS))
    for name, est in (("grpo", advantages.GRPO), ("rloo", advantages.RLOO), ("drgrpo", advantages.DRGRPO)):
        out.append((f"group_adv[{name}, n={GROUP_SIZE}]", advantages._group_advantages_kernel,
                    {"scores_ptr": F32, "out_ptr": F32, "num_groups": "i32", "group_size": "i32", "eps": "fp32",
                     "ESTIMATOR": "constexpr", "BLOCK_G": "constexpr", "BLOCK_N": "constexpr"},
                    {"ESTIMATOR": est, "BLOCK_G": min(advantages.GROUP_TILE // GROUP_SIZE, NUM_GROUPS),
                     "BLOCK_N": GROUP_SIZE}, 4, {"num_groups": NUM_GROUPS, "group_size": GROUP_SIZE}))
    out.append(("whiten_partial", advantages._whiten_partial_kernel,
                {"x_ptr": F32, "mask_ptr": U8, "part_ptr": F32, "T": "i32", "BLOCK": "constexpr"},
                {"BLOCK": advantages.WHITEN_BLOCK}, 4, TOKENS))
    out.append(("whiten_apply", advantages._whiten_apply_kernel,
                {"x_ptr": F32, "mask_ptr": U8, "part_ptr": F32, "out_ptr": F32, "T": "i32", "P": "i32", "eps": "fp32",
                 "SHIFT_MEAN": "constexpr", "BLOCK": "constexpr", "BLOCK_P": "constexpr"},
                {"SHIFT_MEAN": True, "BLOCK": advantages.WHITEN_BLOCK,
                 "BLOCK_P": min(advantages.WHITEN_PARTIALS, 1 << (WHITEN_P - 1).bit_length())}, 4,
                {**TOKENS, "P": WHITEN_P}))
    return out


@pytest.mark.parametrize("triton_dir", triton_versions())
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_without_spills(arch, triton_dir):
    configs = _configs()
    infos = compile_many([job(k, sig, cx, arch=arch, num_warps=w, num_stages=1, values=vals)
                          for _, k, sig, cx, w, vals in configs], triton_dir)
    for (label, *_), info in zip(configs, infos):
        print(f"{label:28s} {info.summary()}")
    for (label, *_), info in zip(configs, infos):
        assert info.n_regs > 0, f"{label}: ptxas reported no register count\n{info.ptxas_log}"
        assert info.n_spills == 0, f"{label} sm_{arch} spills {info.n_spills} B\n{info.ptxas_log}"
