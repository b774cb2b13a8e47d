"""Stage 2, multimodal ORZ-style PPO: `train_rl(cfg, info)` is the whole RL loop, readable top to bottom (T1).

One step: this rank's prompts (a pure function of seed and step) -> rollout engine (n samples each, sampling
logprobs) -> rewards (verifier pool, hard timeout; rl.overlong=soft's length penalty) -> [dynamic sampling] ->
prompt + response sequences with mRoPE ids, packed into token-budget micro-batches (every rank runs the same number:
loss-free fillers; kept on the host, moved to the device one at a time; a prompt's samples share one copy of its
pixels and one ViT pass) -> old logprobs (policy; the frozen reference's in the same pass when rl.kl_coef > 0) and
values (critic) -> GAE (gamma = lambda = 1) or group advantages (GRPO / RLOO / Dr.GRPO) -> batch advantage
normalisation over all ranks -> per-token loss weights (rl.mismatch correction, rl.overlong=mask) -> policy
update(s) (rl.loss: PPO or GSPO) and critic updates, losses divided by the GLOBAL number of response tokens (T4), an
update with a NaN/inf loss or gradient skipped and counted (rl.max_bad_steps in a row abort) -> weights pushed to
the engine -> log -> checkpoint. The prompt pool drops prompts too long for data.token_budget next to the longest
response, and every prompt is built in the one format of data.PromptFormat.

Legend: T response tokens of this rank (packed, micro-batch order), B sequences, G prompt groups.
"""

import math
import time
import zlib
from pathlib import Path

import torch

from ovr_kernels import (
    broadcast_to_tokens,
    drgrpo_advantages,
    gae,
    grpo_advantages,
    gspo_loss,
    ppo_loss,
    rloo_advantages,
    token_budget_microbatches,
    value_loss,
)
from ovr_train import behaviors
from ovr_train.checkpoint import ModelState, export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from ovr_train.config import dump_config, longest_response
from ovr_train.data import (
    IGNORE,
    Encoded,
    PromptFormat,
    StepSampler,
    collate,
    filler,
    image_processor,
    mrope_position_ids,
)
from ovr_train.dist import all_reduce, broadcast_object, clip_grad_norm, compute_dtype
from ovr_train.evaluate import evaluate_with_config
from ovr_train.metrics import MetricsLogger, plot_curves, read_metrics
from ovr_train.model import build_sharded_model
from ovr_train.optim import build_optimizer
from ovr_train.rewards import RewardPool, default_num_workers, score
from ovr_train.rollout import rollout
from ovr_train.runlock import lock_run_dir
from ovr_train.tasks import build_prompt, eval_sets, fitting_prompts, prompt_length, prompt_pool
from ovr_train.tokenizer import load_tokenizer, special_ids

SFT_COMMAND = "torchrun --nproc_per_node 2 -m ovr_train.launch --stage sft"


def max_new_tokens_at(rcfg, step):
    """Length curriculum: the max_len of the last (from_step, max_len) pair with from_step <= step."""
    cap = rcfg.max_new_tokens
    for from_step, max_len in rcfg.length_curriculum:
        if step >= int(from_step):
            cap = int(max_len)
    return cap


def rollout_sequence(prompt, response_ids, ids, merge):
    """Prompt + response -> Encoded with targets on the response tokens only (none for an empty response: a
    loss-free filler) and mRoPE ids of the whole sequence, computed before packing (the response continues the
    prompt's text positions after its image)."""
    full = torch.tensor(prompt.token_ids + list(response_ids), dtype=torch.long)
    targets = torch.full_like(full, IGNORE)
    p = len(prompt.token_ids)
    targets[p - 1:-1] = full[p:]  # position t predicts token t + 1
    mrope = mrope_position_ids(full, prompt.image_grid_thw, ids["image_pad"], merge)
    return Encoded(full, targets, mrope, prompt.pixel_values, prompt.image_grid_thw)


def group_advantages(algo, scores_B, n):
    """Critic-free advantages per sample from its group of n: GRPO (z-score), RLOO (leave-one-out), Dr.GRPO."""
    if algo == "grpo":
        return grpo_advantages(scores_B, n)
    if algo == "rloo":
        return rloo_advantages(scores_B, n)
    return drgrpo_advantages(scores_B, n)


def stream_weights(policy, names, dtype):
    """Yield (HF name, full tensor in `dtype`) for each policy parameter in `names`, one at a time, all-gathered
    from the FSDP shards on the policy's device. Collective: every rank must consume it to the end (every rank's
    engine needs the full weights). Peak extra memory: one full parameter plus what the engine holds while it
    loads (vLLM: the current layer)."""
    for key, param in policy.named_parameters():
        if key.startswith("hf.") and key[3:] in names:
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            yield key[3:], full.detach().to(dtype)


def push_weights(policy, engine, names):
    """Collective: stream the policy's weights into this rank's engine (HF parameter names, the engine's dtype)."""
    count = engine.load_weights(stream_weights(policy, names, engine.dtype))
    if count != len(names):
        raise RuntimeError(f"push_weights: {count} of the engine's {len(names)} parameters received new weights")


def on_device(micro, device):
    """(micro-batch, loss mask) moved to the device one at a time, for one pass over the step's micro-batches: at
    scale they do not all fit beside the models (1,024 sequences of up to 64k tokens per rank, with images)."""
    for batch in micro:
        m = batch.to(device)
        yield m, m.targets != IGNORE
        del m  # released before the next one is moved


def overlong_penalty(lengths_B, limit, cache):
    """DAPO's soft overlong punishment, added to the reward: 0 up to limit - cache tokens, then falling linearly
    to -1 at the limit."""
    return ((limit - cache - lengths_B.float()) / cache).clamp(-1.0, 0.0)


def mismatch_weights(mode, cap, old_T, rollout_T, cu_T):
    """Per-token policy-loss weights that correct the rollout engine / trainer mismatch (rl.mismatch), from the
    log-ratio trainer - engine per token ("_token") or summed over each response ("_seq", then per token of it):
    TIS caps the ratio at `cap`, masking zeroes the weight where the ratio leaves [1/cap, cap]. Returns (weight_T
    fp32, corrected_T bool: the tokens whose weight was capped or zeroed)."""
    if mode == "none":
        return torch.ones_like(old_T), torch.zeros_like(old_T, dtype=torch.bool)
    log_ratio = (old_T - rollout_T).double()
    if mode.endswith("_seq"):
        lengths = (cu_T[1:] - cu_T[:-1]).long()
        seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=old_T.device), lengths)
        log_ratio = torch.zeros(lengths.numel(), dtype=torch.float64, device=old_T.device).index_add(
            0, seq, log_ratio)[seq]
    log_cap = math.log(cap)
    if mode.startswith("tis"):
        corrected = log_ratio > log_cap
        return torch.exp(log_ratio.clamp(max=log_cap)).float(), corrected
    corrected = log_ratio.abs() > log_cap
    return (~corrected).float(), corrected


def policy_loss(rcfg, logprobs, entropy, old, adv, weight, cu, norm, ref):
    """rl.loss on one micro-batch's response tokens: PPO's per-token ratio, or GSPO's one ratio per response (its
    sequence boundaries `cu`, int32 on the device); `weight` is the per-token loss weight, `ref` the reference
    policy's log-probs (None without a KL term). Returns (loss, metrics)."""
    opts = {"clip_low": rcfg.clip_low, "clip_high": rcfg.clip_high, "normalizer": norm,
            "entropy": entropy if rcfg.entropy_coef else None, "entropy_coef": rcfg.entropy_coef,
            "ref_logprobs": ref, "kl_coef": rcfg.kl_coef, "kl_type": rcfg.kl_estimator}
    if rcfg.loss == "gspo":
        return gspo_loss(logprobs, old, adv, weight, cu, **opts)
    return ppo_loss(logprobs, old, adv, weight, **opts)


def guarded_step(net, optim, loss, grad_clip):
    """Clip and apply the accumulated gradients unless this rank's `loss` summed over ranks or the global gradient
    norm is NaN/inf, which skips the update on every rank alike. Returns (norm, applied); one host sync."""
    norm = clip_grad_norm([p for p in net.parameters() if p.requires_grad], grad_clip).to(loss.device)
    applied = bool(torch.isfinite(all_reduce(loss.detach().clone())) & torch.isfinite(norm))
    if applied:
        optim.step()
    optim.zero_grad(set_to_none=True)
    return norm, applied


def global_whiten(x_T, eps=1e-8):
    """Batch advantage normalisation over every rank's tokens: (x - mean) / sqrt(var + eps), unbiased variance."""
    s = all_reduce(torch.stack([torch.tensor(float(x_T.numel()), dtype=torch.float64), x_T.double().sum(),
                                x_T.double().square().sum()]).to(x_T.device))
    mean = s[1] / s[0].clamp_min(1)
    var = ((s[2] - s[0] * mean * mean) / (s[0] - 1).clamp_min(1)).clamp_min(0)
    return ((x_T.double() - mean) * torch.rsqrt(var + eps)).to(x_T.dtype)


def _var(total, total_sq, count):
    """Unbiased variance from a sum and a sum of squares over `count` items."""
    return (total_sq - total * total / count) / max(count - 1, 1)


def train_rl(cfg, info) -> Path:
    """Run (or resume) the RL stage; returns its directory (checkpoints/, metrics.jsonl, curves.png, ...)."""
    rcfg, rank, world, device = cfg.rl, info.rank, info.world_size, info.device
    stage_dir, use_critic = Path(cfg.run.out_dir) / "rl", rcfg.algo == "ppo"
    lock_run_dir(info, stage_dir)  # before any file is touched: one live run per directory
    init_from = Path(rcfg.init_from or Path(cfg.run.out_dir) / "sft" / "hf")
    if not (init_from / "config.json").is_file():
        raise FileNotFoundError(f"RL starts from the SFT model at {init_from}, which does not exist: run `{SFT_COMMAND}`"
                                " first (or --stage all), or point --rl.init_from at an HF model directory")
    if info.is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "config.yaml").write_text(dump_config(cfg))

    # ---- tokenizer, prompts, models, optimizers, engine, verifier ----
    tok = load_tokenizer(str(init_from))
    image_proc = image_processor(cfg, str(init_from))  # the SFT export's preprocessor_config unless overridden
    ids, merge, pad_id = special_ids(tok), image_proc.merge_size, special_ids(tok)["endoftext"]
    fmt, limit = PromptFormat.of(cfg.data), cfg.data.token_budget - longest_response(rcfg)
    pool_items = prompt_pool(rcfg, cfg.data.synth_seed)
    items, too_long = fitting_prompts(pool_items, [prompt_length(it, tok, ids, image_proc, fmt) for it in pool_items],
                                      limit)
    if info.is_main:
        print(f"[rl] prompt pool: {len(items)} prompts; dropped {too_long} longer than {limit} tokens "
              f"(data.token_budget {cfg.data.token_budget} - the longest max_new_tokens {longest_response(rcfg)})")
    cfg.model.path = str(init_from)
    torch.manual_seed(cfg.run.seed)
    policy = build_sharded_model(cfg, info, ids, len(tok))
    critic = build_sharded_model(cfg, info, ids, len(tok), value_head=True) if use_critic else None
    if critic is not None:
        critic.hf.lm_head.requires_grad_(False)  # unused by the critic: no gradient, so no optimizer state
    # the KL term's reference: a frozen copy of the RL start point, sharded like the policy (not checkpointed: a
    # resumed run rebuilds it from init_from); no KL term, no reference model
    reference = build_sharded_model(cfg, info, ids, len(tok)).requires_grad_(False) if rcfg.kl_coef else None
    nets = [("policy", policy, rcfg.policy_lr)] + ([("critic", critic, rcfg.critic_lr)] if use_critic else [])
    optims, scheds = {}, {}
    for name, net, lr in nets:
        optims[name] = build_optimizer([p for p in net.parameters() if p.requires_grad], cfg.optim.offload, lr,
                                       rcfg.betas, rcfg.weight_decay)
        scheds[name] = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, then constant (RECIPE.md)
            optims[name], lambda s: min(1.0, (s + 1) / (rcfg.warmup_steps + 1)))
    engine = rollout(rcfg.rollout_engine, init_from, tok, ids, device, cfg.rollout, image_proc.pixels,
                     seed=cfg.run.seed + rank)
    names = {n for n, _ in (engine.model if hasattr(engine, "model") else policy.hf).named_parameters()}
    pool = RewardPool(default_num_workers(rcfg.reward_workers), rcfg.reward_timeout_s, score, rcfg.format_reward)
    keep = list(range(len(items)))

    # ---- resume (or pre-filter the prompt pool by pass rate with the initial policy) ----
    start, bad_in_a_row, states = 0, 0, {name: ModelState(net, optims[name]) for name, net, _ in nets}
    latest = latest_checkpoint(stage_dir / "checkpoints") if cfg.checkpoint.resume else None
    if latest is not None:
        trainer = load_checkpoint(latest, states, rank)
        for name, sched in scheds.items():
            sched.load_state_dict(trainer["schedulers"][name])
        start, keep, bad_in_a_row = trainer["step"], trainer["keep"], trainer["bad_in_a_row"]
        push_weights(policy, engine, names)  # the engine was built from init_from: give it the resumed policy
        if info.is_main:
            print(f"[rl] resumed from {latest} at step {start}")
    elif rcfg.prefilter_samples:
        mine = keep[rank::world]
        samples = engine.generate([build_prompt(items[i], tok, ids, image_proc, fmt) for i in mine],
                                  n=rcfg.prefilter_samples, max_new_tokens=max_new_tokens_at(rcfg, 0),
                                  temperature=rcfg.temperature, top_p=rcfg.top_p, seed=cfg.run.seed + rank)
        scored = pool.score([s.text for s in samples], [items[mine[s.prompt_index]].gold for s in samples],
                            [s.truncated for s in samples])
        rates = torch.tensor(scored.rewards).clamp(max=1).view(len(mine), -1).mean(1).tolist()
        passed = [i for i, r in zip(mine, rates) if rcfg.prefilter_min_pass < r < rcfg.prefilter_max_pass]
        gathered = [broadcast_object(passed, src) for src in range(world)]
        keep = sorted(i for part in gathered for i in part)
        if info.is_main:
            print(f"[rl] pre-filter: kept {len(keep)} of {len(items)} prompts with pass rate in "
                  f"({rcfg.prefilter_min_pass}, {rcfg.prefilter_max_pass}) over {rcfg.prefilter_samples} samples")
    if start >= rcfg.steps and info.is_main:
        print(f"[rl] nothing to do: checkpoint step {start} >= rl.steps {rcfg.steps} (raise rl.steps to train more)")
    held_out = eval_sets(cfg.eval, cfg.data.synth_seed) if cfg.eval.every_n_steps else {}
    sampler = StepSampler(len(keep), rcfg.prompts_per_step, cfg.run.seed)
    logger = MetricsLogger(stage_dir, info.is_main, resume_step=start)

    for step in range(start, rcfg.steps):
        t0 = time.perf_counter()
        # ---- rollout: this rank's share of the step's prompts, n samples each ----
        batch_items = [items[keep[i]] for i in sampler.batch_indices(step)][rank::world]
        prompts = [build_prompt(it, tok, ids, image_proc, fmt) for it in batch_items]
        n, max_len = rcfg.samples_per_prompt, max_new_tokens_at(rcfg, step)
        seed = zlib.crc32(f"{cfg.run.seed}:{step}:{rank}".encode())  # reproducible on resume
        engine.wake_up()
        samples = engine.generate(prompts, n=n, max_new_tokens=max_len, temperature=rcfg.temperature,
                                  top_p=rcfg.top_p, seed=seed) if prompts else []
        engine.sleep()
        t1 = time.perf_counter()

        # ---- rewards (timeouts and errors are counted, never silent) ----
        scored = pool.score([s.text for s in samples], [batch_items[s.prompt_index].gold for s in samples],
                            [s.truncated for s in samples])
        scores_B = torch.tensor(scored.rewards, dtype=torch.float32)
        correct_B = scores_B >= 1.0
        truncated_B = torch.tensor([bool(s.truncated) for s in samples], dtype=torch.bool)
        if rcfg.overlong == "soft":  # every response near the limit, truncated or not
            scores_B += overlong_penalty(torch.tensor([len(s.token_ids) for s in samples]), max_len,
                                         rcfg.overlong_cache)
        t2 = time.perf_counter()

        # ---- dynamic sampling: drop groups where every sample is right or every one is wrong ----
        groups = list(range(len(prompts)))
        if rcfg.dynamic_sampling:
            correct_GN = correct_B.view(-1, n)
            groups = [g for g in groups if 0 < int(correct_GN[g].sum()) < n]
        kept = [g * n + j for g in groups for j in range(n)]

        # ---- sequences -> token-budget micro-batches (same count on every rank) ----
        seqs = [rollout_sequence(prompts[samples[b].prompt_index], samples[b].token_ids, ids, merge) for b in kept]
        plan = token_budget_microbatches([s.length for s in seqs], cfg.data.token_budget) if seqs else []
        plan = [[kept[k] for k in mb] for mb in plan]  # indices into samples
        counts = all_reduce(torch.tensor([len(plan), sum(len(samples[b].token_ids) for b in kept)],
                                         dtype=torch.float64, device=device), op=torch.distributed.ReduceOp.SUM)
        num_micro = int(all_reduce(torch.tensor([len(plan)], device=device), op=torch.distributed.ReduceOp.MAX))
        num_tokens = counts[1].clamp_min(1).float()
        norm = num_tokens / world  # FSDP averages gradients over ranks: x world makes it sum / global tokens
        seq_of = dict(zip(kept, seqs))
        dummy = rollout_sequence(prompts[0] if prompts else build_prompt(items[keep[0]], tok, ids, image_proc, fmt), [],
                                 ids, merge)
        micro = [collate([seq_of[b] for b in mb], cfg.data.packing, pad_id, merge) for mb in plan]  # on the host
        micro += [filler([dummy], cfg.data.packing, pad_id, merge)] * (num_micro - len(plan))
        order = [b for mb in plan for b in mb]  # token order of every per-token tensor below
        cu_T = torch.tensor([0] + [len(samples[b].token_ids) for b in order], device=device).cumsum(0).int()
        count_of = [m.num_loss_tokens for m in micro]  # host counts: no device sync in the passes below
        cu_of = [torch.tensor([0] + [len(samples[b].token_ids) for b in mb]).cumsum(0).int() for mb in plan]
        cu_of += [torch.zeros(2, dtype=torch.int32)] * (num_micro - len(plan))  # a filler: one empty response

        # ---- old logprobs, values, advantages (no grad; models stay in train mode: the ViT runs everywhere) ----
        with torch.no_grad():
            old_T, ref_T = [], []
            for m, k in on_device(micro, device):  # the reference's log-probs in the same pass as the policy's
                old_T.append(policy(**m.model_inputs(), targets=m.targets, temperature=rcfg.temperature).logprobs[k])
                if reference is not None:
                    ref_T.append(reference(**m.model_inputs(), targets=m.targets,
                                           temperature=rcfg.temperature).logprobs[k])
            old_T, ref_T = torch.cat(old_T), torch.cat(ref_T) if reference is not None else None
            rollout_T = torch.tensor([lp for b in order for lp in samples[b].logprobs], device=device)
            reward_T = torch.zeros_like(old_T)
            if len(order):
                reward_T[cu_T[1:].long() - 1] = scores_B[order].to(device)  # the score sits on the last token
            if use_critic:
                values_T = torch.cat([critic(**m.model_inputs()).values[k] for m, k in on_device(micro, device)])
                adv_T, returns_T = gae(reward_T, values_T, cu_T, rcfg.gamma, rcfg.lam)
            else:
                group_adv = group_advantages(rcfg.algo, scores_B, n) if len(scores_B) else scores_B
                adv_T = broadcast_to_tokens(group_adv[order].to(device), cu_T)
            if use_critic:  # ORZ: batch-level advantage normalisation (group methods normalise per group)
                adv_T = global_whiten(adv_T)
            # per-token loss weights: 0 on truncated responses under rl.overlong=mask (policy and critic), times
            # the mismatch correction (policy only)
            keep_T = torch.ones_like(old_T)
            if rcfg.overlong == "mask" and len(order):
                keep_T = broadcast_to_tokens((~truncated_B[order]).float().to(device), cu_T)
            weight_T, corrected_T = mismatch_weights(rcfg.mismatch, rcfg.mismatch_cap, old_T, rollout_T, cu_T)
            weight_T = weight_T * keep_T

        if rcfg.dump_rollouts:
            (stage_dir / "rollouts").mkdir(parents=True, exist_ok=True)
            torch.save({"samples": [(s.prompt_index, s.token_ids, s.logprobs, s.text, s.finish_reason)
                                    for s in samples], "answers": [it.answer for it in batch_items],
                        "prompt_ids": [p.token_ids for p in prompts], "scores": scores_B, "order": order,
                        "cu": cu_T.cpu(), "old": old_T.cpu(), "reward": reward_T.cpu(), "adv": adv_T.cpu(),
                        "weight": weight_T.cpu(), "keep": keep_T.cpu(), "rollout": rollout_T.cpu(),
                        "ref": ref_T.cpu() if ref_T is not None else None,
                        "values": values_T.cpu() if use_critic else None,
                        "returns": returns_T.cpu() if use_critic else None},
                       stage_dir / "rollouts" / f"step{step + 1}_rank{rank}.pt")

        # ---- policy update(s): 1 optimizer step per rollout batch by default; a NaN/inf one is skipped ----
        # loss, clip, approx kl, entropy, vloss, vclip, pg, grad norm, kl to the reference
        stats = torch.zeros(9, dtype=torch.float64, device=device)
        skipped = {"policy": 0, "critic": 0}
        for _ in range(rcfg.policy_updates_per_step):
            at, loss_sum = 0, torch.zeros((), device=device)
            for (m, k), cnt, cu in zip(on_device(micro, device), count_of, cu_of):
                out = policy(**m.model_inputs(), targets=m.targets, temperature=rcfg.temperature)
                sl = slice(at, at + cnt)
                at += cnt
                loss, met = policy_loss(rcfg, out.logprobs[k], out.entropy[k], old_T[sl], adv_T[sl], weight_T[sl],
                                        cu.to(device), norm, ref_T[sl] if ref_T is not None else None)
                (loss + 0.0 * out.logprobs.sum()).backward()  # a filler still runs FSDP's backward collectives
                loss_sum += loss.detach()
                w = cnt / rcfg.policy_updates_per_step
                stats[:4] += torch.stack([loss.detach() * norm, met["clip_frac"] * w, met["approx_kl"] * w,
                                          (out.entropy[k].detach().sum() / rcfg.policy_updates_per_step)]).double()
                stats[8] += met["kl"].double() * w
            grad_norm, applied = guarded_step(policy, optims["policy"], loss_sum, cfg.optim.grad_clip)
            stats[7] += grad_norm
            skipped["policy"] += not applied
        scheds["policy"].step()

        # ---- critic updates (4 by default), clipped value loss against the GAE returns; NaN/inf ones skipped ----
        for _ in range(rcfg.critic_updates_per_step if use_critic else 0):
            at, loss_sum = 0, torch.zeros((), device=device)
            for (m, k), cnt in zip(on_device(micro, device), count_of):
                v_all = critic(**m.model_inputs()).values
                sl = slice(at, at + cnt)
                at += cnt
                vloss, vmet = value_loss(v_all[k], values_T[sl], returns_T[sl], keep_T[sl], clip=rcfg.value_clip,
                                         normalizer=norm)
                (vloss + 0.0 * v_all.sum()).backward()
                loss_sum += vloss.detach()
                w = cnt / rcfg.critic_updates_per_step
                stats[4:6] += torch.stack([vloss.detach() * norm / rcfg.critic_updates_per_step,
                                           vmet["vf_clip_frac"] * w]).double()
            skipped["critic"] += not guarded_step(critic, optims["critic"], loss_sum, cfg.optim.grad_clip)[1]
        if use_critic:
            scheds["critic"].step()
        bad_in_a_row = bad_in_a_row + 1 if skipped["policy"] or skipped["critic"] else 0
        if bad_in_a_row and info.is_main:
            print(f"[rl] step {step + 1}: non-finite loss or gradient: skipped {skipped['policy']} policy and "
                  f"{skipped['critic']} critic update(s) ({bad_in_a_row} step(s) in a row)")
        if bad_in_a_row >= rcfg.max_bad_steps:
            raise RuntimeError(f"{bad_in_a_row} consecutive steps with non-finite policy or critic updates "
                               f"(rl.max_bad_steps={rcfg.max_bad_steps}): aborting at step {step + 1}")
        t4 = time.perf_counter()

        # ---- push the new weights to the rollout engine (a sleeping vLLM engine wakes its weights for it; the
        # KV cache wakes in the next rollout's wake_up) ----
        push_weights(policy, engine, names)
        t5 = time.perf_counter()

        # ---- log: every sum is all-reduced once ----
        texts, is_img = [s.text for s in samples], [batch_items[s.prompt_index].has_image for s in samples]
        hits = [behaviors.detect(t) for t in texts]
        per_split = [[sum(h[b] for h, im in zip(hits, is_img) if im == split) for b in behaviors.BEHAVIORS]
                     for split in (False, True)]
        lens = [len(s.token_ids) for s in samples]
        vals = values_T if use_critic else torch.zeros_like(old_T)
        rets = returns_T if use_critic else torch.zeros_like(old_T)
        sums = torch.tensor(
            [len(samples), float(scores_B.sum()), float(scores_B.square().sum()), sum(lens),
             sum(s.truncated for s in samples), scored.num_timeout, scored.num_error, len(kept),
             float((old_T - rollout_T).abs().sum()), float(rets.sum()), float(rets.square().sum()),
             float((rets - vals).sum()), float((rets - vals).square().sum()), is_img.count(False), is_img.count(True),
             *per_split[0], *per_split[1],
             sum(float(r) for r, im in zip(scored.rewards, is_img) if not im),
             sum(float(r) for r, im in zip(scored.rewards, is_img) if im)], dtype=torch.float64, device=device)
        all_reduce(sums)
        all_reduce(stats)
        num_s, nt = max(sums[0].item(), 1), num_tokens.item()
        rec = {"reward_mean": sums[1].item() / num_s,
               "reward_std": math.sqrt(max(sums[2].item() / num_s - (sums[1].item() / num_s) ** 2, 0)),
               "response_len": sums[3].item() / num_s, "truncation_rate": sums[4].item() / num_s,
               "reward_timeouts": sums[5].item(), "reward_errors": sums[6].item(), "kept_fraction": sums[7].item()
               / num_s, "logprob_gap": sums[8].item() / nt, "loss": stats[0].item() / nt,
               "clip_frac": stats[1].item() / nt, "approx_kl": stats[2].item() / nt, "entropy": stats[3].item() / nt,
               "grad_norm": stats[7].item() / world / rcfg.policy_updates_per_step, "max_new_tokens": max_len,
               "policy_skipped": skipped["policy"], "critic_skipped": skipped["critic"],
               "lr": scheds["policy"].get_last_lr()[0], "tokens_per_s": sums[3].item() / (t5 - t0),
               "time_rollout_s": t1 - t0, "time_reward_s": t2 - t1, "time_train_s": t4 - t2, "time_sync_s": t5 - t4}
        nb2 = 15 + 2 * len(behaviors.BEHAVIORS)  # per-kind reward sums follow the behaviour counts
        rec.update(reward_text=sums[nb2].item() / sums[13].item() if sums[13] else math.nan,
                   reward_image=sums[nb2 + 1].item() / sums[14].item() if sums[14] else math.nan)
        if rcfg.kl_coef:
            rec["ref_kl"] = stats[8].item() / nt  # rl.kl_estimator's mean over the response tokens
        if rcfg.mismatch != "none":  # over the policy loss's tokens (overlong-masked ones count as weight 0)
            mismatch = all_reduce(torch.stack([weight_T.double().sum(), corrected_T.double().sum()]))
            weight_max = all_reduce(weight_T.max() if weight_T.numel() else weight_T.new_zeros(()),
                                    op=torch.distributed.ReduceOp.MAX)
            rec.update({"mismatch/weight_mean": mismatch[0].item() / nt, "mismatch/weight_max": weight_max.item(),
                        "mismatch/corrected_frac": mismatch[1].item() / nt})
        if use_critic:
            rec.update(value_loss=stats[4].item() / nt, value_clip_frac=stats[5].item() / nt,
                       explained_var=1 - _var(sums[11].item(), sums[12].item(), nt) / max(
                           _var(sums[9].item(), sums[10].item(), nt), 1e-8))
        nb = len(behaviors.BEHAVIORS)
        for i, b in enumerate(behaviors.BEHAVIORS):
            text_rate = sums[15 + i].item() / sums[13].item() if sums[13] else math.nan
            image_rate = sums[15 + nb + i].item() / sums[14].item() if sums[14] else math.nan
            rec.update({f"behav/text/{b}": text_rate, f"behav/image/{b}": image_rate,
                        f"behav/transfer/{b}": image_rate / text_rate if text_rate > 0 else math.nan})
        # ---- held-out evaluation of the just-pushed policy every eval.every_n_steps (and at the last step) ----
        if cfg.eval.every_n_steps and ((step + 1) % cfg.eval.every_n_steps == 0 or step + 1 == rcfg.steps):
            engine.wake_up()
            evals, _ = evaluate_with_config(cfg, engine, tok, ids, held_out, image_proc, info)
            engine.sleep()
            rec.update({f"eval/{name}/{k}": v for name, m in evals.items() for k, v in m.items()
                        if k.startswith("pass@") or k == "mean_length"})
        logger.log(step + 1, rec)
        if info.is_main:
            print(f"[rl] step {step + 1}/{rcfg.steps} reward {rec['reward_mean']:.3f} len {rec['response_len']:.1f} "
                  f"trunc {rec['truncation_rate']:.2f} kl {rec['approx_kl']:.4f} gap {rec['logprob_gap']:.2e} "
                  f"timeouts {int(rec['reward_timeouts'])} errors {int(rec['reward_errors'])} ({t5 - t0:.1f}s)")
            if scored.first_error:
                print(f"[rl]   verifier error: {scored.first_error}")

        # ---- checkpoint (policy, critic, both optimizers, schedulers, data position = step, RNG) ----
        if (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0) or step + 1 == rcfg.steps:
            save_checkpoint(stage_dir / "checkpoints", step + 1, states,
                            {"schedulers": {k: s.state_dict() for k, s in scheds.items()}, "keep": keep,
                             "bad_in_a_row": bad_in_a_row}, rank,
                            cfg.checkpoint.keep, dump_config(cfg))
    pool.close()
    logger.close()
    if cfg.checkpoint.export_hf:  # collective: the final policy as an HF dir (what --stage all evaluates)
        export_hf(policy, tok, stage_dir / "hf", rank, compute_dtype(cfg.model, device), image_proc)
    if info.is_main:
        records = read_metrics(stage_dir / "metrics.jsonl")
        plot_curves(stage_dir / "metrics.jsonl", stage_dir / "curves.png", ["reward_mean", "reward_image", "reward_text", "response_len",
                    "truncation_rate", "approx_kl", "entropy", "value_loss", "logprob_gap", "ref_kl"], title="RL (PPO)")
        history = [(r["step"], {k[len("behav/"):]: v for k, v in r.items() if k.startswith("behav/")})
                   for r in records]
        if history:
            behaviors.plot_behaviors(history, stage_dir / "behaviors.png")
    return stage_dir
