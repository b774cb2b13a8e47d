"""Entry point: `torchrun [--nproc_per_node N] -m ovr_train.launch --stage {base,sft,rl,all,eval} [--config F.yaml]
[--section.field=value | --section.field value ...] [--dry-run]`; `python -m ovr_train.launch ...` runs one
process.

Without --config the embedded default (configs/tiny.yaml) runs: the tiny Qwen2.5-VL-shaped model on the generated
data. `--stage all` is the whole miniature OVR pipeline (ovr_train/pipeline.py): base perception pretraining ->
text-only cold start -> multimodal RL, each stage's model evaluated on held-out text and image sets, then a report
(<run.out_dir>/report.md + plots/). The resolved config is printed at start and saved in the stage directory and each checkpoint.
--dry-run builds the model on the meta device (no weights, no memory), prints the FSDP plan, parameter counts and a
per-GPU memory estimate for the world size (with --stage rl also the RL step's plan: policy and critic shards,
vLLM weights and KV cache, the weight push, activations, as a formula), and exits.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
from transformers import AutoConfig

from ovr_train.config import Config, dump_config, load_config, longest_response
from ovr_train.dist import fsdp_units, init_distributed, shutdown
from ovr_train.evaluate import evaluate
from ovr_train.model import build_model, param_counts
from ovr_train.pipeline import run_all
from ovr_train.rl import train_rl
from ovr_train.runlock import RunDirBusy, die_with_launcher
from ovr_train.sft import train_sft
from ovr_train.tokenizer import SPECIAL_TOKENS, load_tokenizer, special_ids


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ovr_train.launch", description=__doc__.split("\n\n")[0],
                                epilog="Any --section.field=value overrides the config, e.g. --sft.steps=20 "
                                       "--optim.lr=1e-3 --data.train_files='[a.jsonl]'.")
    # ---- what to run ----
    p.add_argument("--stage", choices=("base", "sft", "rl", "all", "eval"), required=True,
                   help="base (perception pretraining), sft (text cold start), rl, all (base -> sft -> rl with "
                        "held-out evals and a report), or eval (a checkpoint on --eval.sets=a.jsonl,b.jsonl)")
    p.add_argument("--config", default=None, help="YAML config (default: the embedded configs/tiny.yaml)")
    # ---- inspection ----
    p.add_argument("--dry-run", action="store_true", help="print the FSDP plan, parameter counts and a per-GPU "
                                                          "memory estimate, then exit (no weights loaded)")
    args, rest = p.parse_known_args(argv)
    overrides, bad, i = [], [], 0
    while i < len(rest):  # --section.field=value or --section.field value
        tok = rest[i]
        key = tok.split("=", 1)[0]
        if not (tok.startswith("--") and "." in key):
            bad.append(tok)
        elif "=" in tok:
            overrides.append(tok)
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            overrides.append(f"{tok}={rest[i + 1]}")
            i += 1
        else:
            bad.append(tok)
        i += 1
    if bad:
        p.error(f"unrecognised arguments {bad}: overrides are --section.field=value or --section.field value")
    return args, overrides


# ----------------------------------------------------------------------------------------------------------------
# What a stage reads: an input it would ignore, or toy numbers about to meet a real model, is an error
# ----------------------------------------------------------------------------------------------------------------


def check_inputs(stage: str, cfg: Config, config_file) -> None:
    """ValueError when `stage` would silently ignore a data file or model given to it, or when --model.path names a
    checkpoint other than the embedded tiny architecture while no --config was given (the embedded default's toy
    numbers, e.g. optim.lr=3e-3 and data.max_pixels=12544, would then train or evaluate a real model)."""
    reads = {"data.train_files": stage in ("sft", "all"), "rl.prompt_files": stage in ("rl", "all"),
             "eval.sets": stage == "eval" or (stage in ("rl", "all") and cfg.eval.every_n_steps > 0),
             "model.path": stage != "rl"}
    given = {"data.train_files": cfg.data.train_files, "rl.prompt_files": cfg.rl.prompt_files,
             "eval.sets": cfg.eval.sets, "model.path": cfg.model.path}
    unread = [k for k, v in given.items() if v and not reads[k]]
    if unread:
        raise ValueError(f"--stage {stage} does not read {', '.join(unread)}: data.train_files is read by sft and all, "
                         "rl.prompt_files by rl and all, eval.sets by eval (and by rl and all with "
                         "eval.every_n_steps > 0), model.path by every stage but rl (which starts from rl.init_from)")
    hf_config = Path(cfg.model.path or ".") / "config.json"
    if config_file is None and cfg.model.path and hf_config.is_file():
        tc = AutoConfig.from_pretrained(cfg.model.path).get_text_config()
        if (tc.hidden_size, tc.num_hidden_layers) != (cfg.model.hidden_size, cfg.model.num_layers):
            raise ValueError(
                f"--model.path={cfg.model.path} is a {tc.num_hidden_layers}-layer model of width {tc.hidden_size}, not "
                f"the embedded tiny model, and no --config was given: the embedded default's toy numbers (optim.lr="
                f"{cfg.optim.lr}, data.max_seq_len={cfg.data.max_seq_len}, data.max_pixels={cfg.data.max_pixels}, "
                f"rl.policy_lr={cfg.rl.policy_lr}, ...) would apply to it. Pass the recipe's config "
                "(--config configs/ovr_7b_coldstart.yaml for sft, configs/ovr_7b_rl.yaml for rl and eval) or your own;"
                " --config configs/tiny.yaml uses the toy numbers on purpose")


# ----------------------------------------------------------------------------------------------------------------
# --dry-run
# ----------------------------------------------------------------------------------------------------------------


def memory_estimate(cfg: Config, counts: dict, unit_sizes: list, world: int, layer_act_bytes: float) -> dict:
    """Rough per-GPU memory (GiB) under FSDP2 with bf16 compute: sharded fp32 master params, fp32 grads and AdamW
    moments (trainable only), the largest gathered units in bf16 (current + prefetched), the root's gathered
    parameters, and activations of one micro-batch of `data.token_budget` tokens. With optim.offload=cpu the
    shards, gradients and moments move to host memory ("host_per_rank", not in "total")."""
    gib = 2**30
    shard = world // cfg.dist.hsdp_replicas
    param_b = 4 * counts["total"] / shard
    grad_b = 4 * counts["trainable"] / shard
    adam_b = 8 * counts["trainable"] / shard
    largest = sorted(unit_sizes, reverse=True)[:2]
    gathered_b = 2 * sum(largest) + 2 * counts["embed_and_head"]
    tokens = cfg.data.token_budget
    h, layers = cfg.model.hidden_size, cfg.model.num_layers
    if cfg.model.activation_checkpointing:  # layer inputs kept, one layer's internals live during recompute
        act_b = tokens * h * 2 * layers + tokens * layer_act_bytes
    else:
        act_b = tokens * layer_act_bytes * layers
    if cfg.optim.offload == "cpu":  # shards and moments in host memory; on the GPU only the unit in flight's
        # fp32 shard (copied in to gather) and its fp32 reduced gradient shard (before the copy out)
        staging_b = 2 * 4 * largest[0] / shard
        total = staging_b + gathered_b + act_b
        return {"offload_staging_fp32": staging_b / gib, "gathered_bf16": gathered_b / gib,
                "activations": act_b / gib, "total": total / gib,
                "host_per_rank": (param_b + grad_b + adam_b) / gib}
    total = param_b + grad_b + adam_b + gathered_b + act_b  # the fused head builds no (T, V) logits: no term
    return {"params_fp32_shard": param_b / gib, "grads_fp32_shard": grad_b / gib, "adamw_shard": adam_b / gib,
            "gathered_bf16": gathered_b / gib, "activations": act_b / gib, "total": total / gib}


def rl_memory_plan(cfg: Config, counts: dict, unit_sizes: list, world: int, layer_act_bytes: float,
                   lm_head: int) -> dict:
    """Per-GPU memory (GiB) of one RL step, as a formula: an estimate from parameter counts, not a measurement.

    Resident the whole step: policy and critic fp32 parameter shards + AdamW moments of their trainable parameters
    (the critic's unused LM head is frozen, it adds a bias-free scalar head), and with rl.kl_coef > 0 the frozen
    reference's fp32 shard. Rollout: + vLLM's full bf16 weights
    and its KV cache: vLLM takes `rollout.gpu_memory_utilization` of the GPU for weights + KV cache (its
    activation workspace is ignored here), reported as concurrent full-length sequences. Train (vLLM asleep at
    level 1: weights on the CPU, KV cache freed): + fp32 gradient shards of the net being updated, the gathered bf16
    units, the LLM activations of one `data.token_budget` micro-batch and the ViT's for the prompt room of a
    full-length sequence filled with image. Weight push, as push_weights streams it: + vLLM's woken bf16 weights
    + one full parameter at a time (the largest, the embedding or LM head: its fp32 gather and bf16 copy)."""
    gib, mcfg = 2**30, cfg.model
    shard = world // cfg.dist.hsdp_replicas
    h, layers = mcfg.hidden_size, mcfg.num_layers
    critic_total = counts["total"] + h
    critic_trainable = counts["trainable"] - lm_head + h
    policy_b = (4 * counts["total"] + 8 * counts["trainable"]) / shard
    critic_b = (4 * critic_total + 8 * critic_trainable) / shard
    reference_b = 4 * counts["total"] / shard if cfg.rl.kl_coef else 0.0  # frozen: no AdamW, no gradients
    resident = policy_b + critic_b + reference_b
    vllm_weights = 2 * counts["total"]
    kv_per_token = 2 * layers * mcfg.num_kv_heads * (h // mcfg.num_heads) * 2  # K and V, bf16
    vllm_share = cfg.rollout.gpu_memory_utilization * cfg.run.gpu_memory_gib * gib
    kv_b = vllm_share - vllm_weights
    grads = 4 * max(counts["trainable"], critic_trainable) / shard
    gathered = 2 * sum(sorted(unit_sizes, reverse=True)[:2]) + 2 * counts["embed_and_head"]
    tokens = cfg.data.token_budget
    lm_act = (tokens * h * 2 * layers + tokens * layer_act_bytes if mcfg.activation_checkpointing
              else tokens * layer_act_bytes * layers)
    patches = (tokens - longest_response(cfg.rl)) * mcfg.spatial_merge_size ** 2
    vit_h, vit_layer = mcfg.vision_hidden_size, 2 * (4 * mcfg.vision_hidden_size + 3 * mcfg.vision_intermediate_size)
    vit_act = patches * (2 * vit_h * mcfg.vision_depth + vit_layer if mcfg.activation_checkpointing
                         else vit_layer * mcfg.vision_depth)
    train = resident + grads + gathered + lm_act + vit_act
    largest_param = 6 * counts["embed_and_head"] / 2  # fp32 gather + bf16 copy of the embedding (or the LM head)
    push = resident + vllm_weights + largest_param
    return {"policy_shard_adamw": policy_b / gib, "critic_shard_adamw": critic_b / gib,
            "reference_shard": reference_b / gib,
            "rollout_vllm_weights": vllm_weights / gib, "rollout_kv_cache": kv_b / gib,
            "rollout_full_length_seqs": kv_b / (kv_per_token * tokens), "train_grads": grads / gib,
            "train_gathered_bf16": gathered / gib, "train_llm_activations": lm_act / gib,
            "train_vit_activations": vit_act / gib, "train_peak": train / gib, "push_largest_param":
            largest_param / gib, "push_peak": push / gib, "rollout_peak": (resident + vllm_share) / gib,
            "vit_patches": patches, "kv_bytes_per_token": kv_per_token}


def print_rl_plan(cfg: Config, plan: dict, world: int) -> bool:
    """Print the RL memory plan; True when every phase fits in 90% of run.gpu_memory_gib."""
    limit = 0.9 * cfg.run.gpu_memory_gib
    print(f"RL step memory plan per GPU (FORMULA, an estimate from parameter counts, not measured; {world} GPUs, "
          f"micro-batch {cfg.data.token_budget} tokens, responses up to {longest_response(cfg.rl)}):")
    rows = [("resident", "policy fp32 shard + AdamW", plan["policy_shard_adamw"]),
            ("resident", "critic fp32 shard + AdamW", plan["critic_shard_adamw"]),
            *([("resident", "KL reference fp32 shard", plan["reference_shard"])] if cfg.rl.kl_coef else []),
            ("rollout", "vLLM weights (bf16, full copy)", plan["rollout_vllm_weights"]),
            ("rollout", "vLLM KV cache (its share less weights)", plan["rollout_kv_cache"]),
            ("train", "gradients (fp32 shard)", plan["train_grads"]),
            ("train", "gathered bf16 units", plan["train_gathered_bf16"]),
            ("train", "LLM activations", plan["train_llm_activations"]),
            ("train", f"ViT activations ({plan['vit_patches']} patches)", plan["train_vit_activations"]),
            ("push", "largest parameter, gathered (streamed push)", plan["push_largest_param"])]
    for phase, what, gib in rows:
        print(f"  {phase:>8} {what:>40}: {gib:8.2f} GiB")
    seqs = plan["rollout_full_length_seqs"]
    fits = {"rollout": seqs >= 1 and plan["rollout_peak"] <= limit, "train": plan["train_peak"] <= limit,
            "push": plan["push_peak"] <= limit}
    print(f"  rollout: resident + vLLM's share {plan['rollout_peak']:.2f} GiB; the KV cache holds {max(seqs, 0):.1f} "
          f"sequences of {cfg.data.token_budget} tokens at once ({plan['kv_bytes_per_token']} B/token)")
    print(f"  train peak {plan['train_peak']:.2f} GiB; weight-push peak {plan['push_peak']:.2f} GiB (resident + vLLM "
          "weights + one full parameter)")
    verdict = "fits" if all(fits.values()) else "does NOT fit (" + ", ".join(k for k, v in fits.items() if not v) + ")"
    print(f"  -> the RL step {verdict} in {cfg.run.gpu_memory_gib:.0f} GiB (formula; keeping ~10% for the allocator "
          "and NCCL buffers)")
    return all(fits.values())


def dry_run(cfg: Config, stage: str = "sft"):
    world = int(os.environ.get("WORLD_SIZE", cfg.run.dry_run_world_size))
    if cfg.model.path:
        tok = load_tokenizer(cfg.model.path)
        ids, vocab = special_ids(tok), len(tok)
    else:  # the architecture alone decides the plan; special-token ids follow the tokenizer's layout
        qwen = cfg.model.tokenizer == "qwen"
        base = 151643 if qwen else 0  # Qwen2.5 puts them after its 151,643 ranks, the small BPE first
        pos = {t: base + i for i, t in enumerate(SPECIAL_TOKENS)}
        ids = {"endoftext": pos["<|endoftext|>"], "im_start": pos["<|im_start|>"], "im_end": pos["<|im_end|>"],
               "vision_start": pos["<|vision_start|>"], "vision_end": pos["<|vision_end|>"],
               "image_pad": pos["<|image_pad|>"], "video_pad": pos["<|video_pad|>"]}
        vocab = 151665 if qwen else cfg.model.bpe_vocab_size
    mcfg = cfg.model
    mcfg.attn_implementation = "sdpa"  # no kernel registration needed to count parameters
    model = build_model(mcfg, ids, vocab, meta=True)
    counts = param_counts(model)
    units = [(name, sum(p.numel() for p in mod.parameters())) for name, mod in fsdp_units(model)]
    root = counts["total"] - sum(n for _, n in units)
    tc = model.hf.config.text_config
    if cfg.model.path:  # the checkpoint's architecture sizes the activations, not the --model.* numbers
        mcfg.hidden_size, mcfg.num_layers = tc.hidden_size, tc.num_hidden_layers
    h, inter = tc.hidden_size, tc.intermediate_size
    kv = tc.num_key_value_heads * (h // tc.num_attention_heads)
    # Saved activations of one decoder layer per token in bf16 (norm inputs, q/k/v, attention out, MLP
    # gate/up/act/down inputs): ~ (4h + 2kv + 3*inter) values.
    layer_act = 2 * (4 * h + 2 * kv + 3 * inter)
    est = memory_estimate(cfg, counts, [n for _, n in units], world, layer_act)
    print(f"== dry run: {model.hf.config.model_type}, world size {world} "
          f"({'HSDP ' + str(cfg.dist.hsdp_replicas) + ' replicas x ' + str(world // cfg.dist.hsdp_replicas) if cfg.dist.hsdp_replicas > 1 else 'FSDP'})")
    print(f"parameters: total {counts['total'] / 1e9:.3f}B, trainable {counts['trainable'] / 1e9:.3f}B, "
          f"ViT {counts['vision'] / 1e9:.3f}B ({'frozen' if cfg.model.freeze_vision else 'trained'}), "
          f"LLM layers {counts['llm_layers'] / 1e9:.3f}B, embeddings + LM head {counts['embed_and_head'] / 1e9:.3f}B")
    print("FSDP plan (fully_shard order; each unit gathers in bf16, reduces grads in fp32):")
    layer_sizes = [n for name, n in units if name.startswith("layers.")]
    print(f"  unit visual: {units[0][1] / 1e6:.1f}M params")
    print(f"  units layers.0..{len(layer_sizes) - 1}: {len(layer_sizes)} x {layer_sizes[0] / 1e6:.1f}M params")
    print(f"  root (embed_tokens, norm, lm_head): {root / 1e6:.1f}M params, kept gathered from forward to backward")
    print(f"memory per GPU (estimate, micro-batch {cfg.data.token_budget} tokens, activation checkpointing "
          f"{'on' if cfg.model.activation_checkpointing else 'off'}):")
    for key, value in est.items():
        print(f"  {key:>20}: {value:8.2f} GiB{' (host memory, not GPU)' if key == 'host_per_rank' else ''}")
    verdict = "fits" if est["total"] < 0.9 * cfg.run.gpu_memory_gib else "does NOT fit"
    print(f"  -> {verdict} in {cfg.run.gpu_memory_gib:.0f} GiB (keep ~10% for the allocator and NCCL buffers)")
    if stage == "rl":
        est["rl"] = rl_memory_plan(cfg, counts, [n for _, n in units], world, layer_act,
                                   model.hf.lm_head.weight.numel())
        est["rl"]["fits"] = print_rl_plan(cfg, est["rl"], world)
    return est


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    die_with_launcher()  # first: the earlier, the shorter the window in which the launcher can die unseen
    args, overrides = parse_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        check_inputs(args.stage, cfg, args.config)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        print(f"# resolved config ({args.config or 'embedded default configs/tiny.yaml'})\n{dump_config(cfg)}")
    if args.dry_run:
        if rank0:
            dry_run(cfg, args.stage)
        return
    info = init_distributed(cfg.dist, cpu_collectives=cfg.optim.offload == "cpu")
    try:
        if args.stage in ("base", "sft"):
            train_sft(cfg, info, stage=args.stage)
        if args.stage == "rl":
            train_rl(cfg, info)
        if args.stage == "all":
            run_all(cfg, info)
        if args.stage == "eval":
            evaluate(cfg, info)
    except RunDirBusy as e:  # every rank raised it before touching a file: one plain message, no tracebacks
        if info.is_main:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    finally:
        if torch.distributed.is_initialized():
            shutdown()


if __name__ == "__main__":
    main()
