"""Stage 2, multimodal ORZ-style PPO: `train_rl(cfg, info)` is the whole RL loop, its phases read top to bottom.

One step, in the order of the loop:
1. `rollout_batches` (a generator, one RolloutBatch a step): this rank's prompts (a pure function of seed and step)
   -> rollout engine (n samples each, sampling logprobs) -> rewards (verifier pool, hard timeout; rl.overlong=soft's
   length penalty) -> [dynamic sampling] -> prompt + response sequences with mRoPE ids, packed into token-budget
   micro-batches (every rank runs the same number: loss-free fillers; kept on the host, moved to the device one at
   a time; a prompt is packed once with its samples, which attend to that copy: rl.share_prompts, one ViT pass).
2. `advantages`: old logprobs (policy, or from the update's own forward when strictly on-policy: rl.old_logprobs;
   the frozen reference's in the same pass when rl.kl_coef > 0) and values
   (critic) -> GAE (gamma = lambda = 1) or group advantages (GRPO / RLOO / Dr.GRPO) -> batch advantage
   normalisation over all ranks -> per-token loss weights (rl.mismatch correction, rl.overlong=mask).
3. `update`: policy update(s) (rl.loss: PPO or GSPO) and critic updates, losses divided by the GLOBAL number of
   response tokens, an update with a NaN/inf loss or gradient skipped and counted (rl.max_bad_steps in a row
   abort); returns named metric sums.
4. weights pushed to the engine -> the step's metric sums all-reduced once (`dist.all_reduce_sums`) -> log ->
   [held-out eval] -> checkpoint.
The prompt pool drops prompts too long for data.token_budget next to the longest response, and every prompt is
built in the one format of data.PromptFormat.

Legend: T response tokens of this rank (packed, micro-batch order), B sequences, G prompt groups.
"""

import math
import time
import zlib
from dataclasses import dataclass
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
from ovr_train.dist import all_reduce, all_reduce_sums, broadcast_object, clip_grad_norm, compute_dtype
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


def rollout_group(prompt, responses, ids, merge):
    """A prompt packed once with several responses -> one Encoded with branches (`data.Encoded`): the prompt but
    its last token, then per response a branch of [the prompt's last token, the response]. Each branch sees the
    prompt and itself, at the positions the response has after its own copy of the prompt, so its log-probs are
    those of `rollout_sequence(prompt, response)`; the prompt's last token is repeated per branch because its
    output predicts each response's first token. One response: `rollout_sequence` itself."""
    if len(responses) == 1:
        return rollout_sequence(prompt, responses[0], ids, merge)
    head, last = prompt.token_ids[:-1], prompt.token_ids[-1]
    mrope = mrope_position_ids(torch.tensor(prompt.token_ids, dtype=torch.long), prompt.image_grid_thw,
                               ids["image_pad"], merge)
    tokens, targets, positions = [list(head)], [[IGNORE] * len(head)], [mrope[:, :-1]]
    for response in responses:  # a response's tokens are text: all three mRoPE rows advance by one per token
        tokens.append([last, *response])
        targets.append([*response, IGNORE])
        positions.append(mrope[:, -1:] + torch.arange(len(response) + 1))
    return Encoded(torch.tensor([t for part in tokens for t in part], dtype=torch.long),
                   torch.tensor([t for part in targets for t in part], dtype=torch.long), torch.cat(positions, 1),
                   prompt.pixel_values, prompt.image_grid_thw, branches=tuple(len(r) + 1 for r in responses))


def prompt_groups(trained, samples, prompt_length, budget, share):
    """The trained samples (indices into `samples`) as packing units: with `share`, each prompt's samples in runs
    that fit `budget` tokens once the prompt is packed once per run (`rollout_group`); else one sample per unit."""
    if not share:
        return [[b] for b in trained]
    by_prompt = {}
    for b in trained:
        by_prompt.setdefault(samples[b].prompt_index, []).append(b)
    units = []
    for p, members in by_prompt.items():
        run, used = [], prompt_length(p) - 1
        for b in members:
            extra = len(samples[b].token_ids) + 1
            if run and used + extra > budget:
                units.append(run)
                run, used = [], prompt_length(p) - 1
            run.append(b)
            used += extra
        units.append(run)
    return units


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


@dataclass
class MicroBatch:
    """One packed micro-batch on the host and what a pass needs of it without a device sync: the positions of its
    response tokens in the flattened batch (long), its response boundaries (int32) and their count."""

    batch: object
    loss_index: torch.Tensor
    cu: torch.Tensor
    count: int


@dataclass
class RolloutBatch:
    """One step's rollouts on this rank, ready to train. Per-token tensors follow `order` (micro-batch order)."""

    step: int  # 0-based
    items: list  # this rank's prompt items of the step
    prompts: list  # their built prompts (rollout.Prompt)
    samples: list  # n engine samples per prompt, prompt-major
    scored: object  # the verifier's rewards.RewardBatch (its rewards, timeouts and errors)
    scores_B: torch.Tensor  # reward per sample (+ rl.overlong=soft's penalty), fp32, host
    truncated_B: torch.Tensor  # bool per sample, host
    trained: list  # the samples trained on: all, or those of the groups dynamic sampling keeps
    max_new_tokens: int
    micro: list  # MicroBatch per pass, loss-free fillers included: the same count on every rank
    order: list  # sample index of each packed response, in token order
    cu_T: torch.Tensor  # response boundaries in token order, int32 on the device
    num_tokens: float  # response tokens of the trained samples over all ranks (at least 1)
    norm: torch.Tensor  # num_tokens / world, 0-d fp32 on the device: FSDP averages gradients over ranks
    clock: tuple = ()  # perf_counter at the start, after generation, after scoring


@dataclass
class TokenTargets:
    """What the update trains on, per response token (RolloutBatch.order): the no-grad pass's log-probs and values,
    the advantages and returns, and the loss weights. None where the run has no such term."""

    old_T: torch.Tensor  # the policy's log-probs before the update (None until `update` fills it: `reuses_logprobs`)
    ref_T: torch.Tensor | None  # the frozen reference's (rl.kl_coef > 0)
    rollout_T: torch.Tensor  # the engine's sampling log-probs
    reward_T: torch.Tensor  # the score on each response's last token, 0 elsewhere
    values_T: torch.Tensor | None  # the critic's (PPO)
    returns_T: torch.Tensor | None
    adv_T: torch.Tensor
    mask_T: torch.Tensor  # 1, or 0 on truncated responses under rl.overlong=mask (policy and critic losses)
    weight_T: torch.Tensor  # the policy loss's weight: mask_T x the rl.mismatch correction
    corrected_T: torch.Tensor  # bool: the tokens whose weight the mismatch correction capped or zeroed


def on_device(micro, device):
    """(micro-batch, response-token positions, response boundaries) moved to the device one at a time, for one pass
    over the step's MicroBatches: at scale they do not all fit beside the models (1,024 sequences of up to 64k
    tokens per rank, with images). Index tensors, not a boolean mask, pick the response tokens: a mask's
    nonzero count would sync the host in every micro-batch."""
    for mb in micro:
        m = mb.batch.to(device)
        yield m, mb.loss_index.to(device, non_blocking=True), mb.cu.to(device, non_blocking=True)
        del m  # released before the next one is moved


def pack_rollouts(prompts, samples, trained, filler_prompt, ids, merge, dcfg, device, share=True):
    """The trained samples as prompt + response sequences packed into data.token_budget micro-batches, padded with
    loss-free fillers (built on `filler_prompt`) to the largest count of any rank; with `share` (rl.share_prompts,
    packed batches only) a prompt is packed once with its samples (`rollout_group`). Collective (2 small
    all-reduces). Returns (micro, order, cu_T, num_tokens, norm) as RolloutBatch holds them."""
    units = prompt_groups(trained, samples, lambda p: len(prompts[p].token_ids), dcfg.token_budget,
                          share and dcfg.packing)
    seqs = [rollout_group(prompts[samples[u[0]].prompt_index], [samples[b].token_ids for b in u], ids, merge)
            for u in units]
    plan = token_budget_microbatches([s.length for s in seqs], dcfg.token_budget) if seqs else []
    tokens = all_reduce(torch.tensor([sum(len(samples[b].token_ids) for b in trained)], dtype=torch.float64,
                                     device=device))[0].clamp_min(1)
    num_micro = int(all_reduce(torch.tensor([len(plan)], device=device), op=torch.distributed.ReduceOp.MAX))
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    micro = []
    for mb in plan:
        batch = collate([seqs[k] for k in mb], dcfg.packing, ids["endoftext"], merge)
        cu = torch.tensor([0] + [len(samples[b].token_ids) for k in mb for b in units[k]]).cumsum(0).int()
        micro.append(MicroBatch(batch, (batch.targets != IGNORE).nonzero().squeeze(1), cu, batch.num_loss_tokens))
    dummy = filler([rollout_sequence(filler_prompt, [], ids, merge)], dcfg.packing, ids["endoftext"], merge)
    micro += [MicroBatch(dummy, torch.zeros(0, dtype=torch.long), torch.zeros(2, dtype=torch.int32), 0)] * (
        num_micro - len(plan))  # a filler: one empty response
    order = [b for mb in plan for k in mb for b in units[k]]
    cu_T = torch.tensor([0] + [len(samples[b].token_ids) for b in order], device=device).cumsum(0).int()
    return micro, order, cu_T, float(tokens), tokens.float() / world


def rollout_batches(cfg, info, engine, verifier, items, active, start, make_prompt, ids, merge):
    """Yield this rank's RolloutBatch of each step from `start` to rl.steps: sample the step's prompts from
    `active` (indices into `items`), generate n responses each, score them, [dynamic sampling], pack. Lazy: the
    next step's rollout runs when the loop asks for it, after this step's weights were pushed to the engine."""
    rcfg, rank, world, device = cfg.rl, info.rank, info.world_size, info.device
    sampler = StepSampler(len(active), rcfg.prompts_per_step, cfg.run.seed)
    n = rcfg.samples_per_prompt
    for step in range(start, rcfg.steps):
        t0 = time.perf_counter()
        # ---- rollout: this rank's share of the step's prompts, n samples each ----
        batch_items = [items[active[i]] for i in sampler.batch_indices(step)][rank::world]
        prompts = [make_prompt(it) for it in batch_items]
        max_len = max_new_tokens_at(rcfg, step)
        seed = zlib.crc32(f"{cfg.run.seed}:{step}:{rank}".encode())  # reproducible on resume
        engine.wake_up()
        samples = engine.generate(prompts, n=n, max_new_tokens=max_len, temperature=rcfg.temperature,
                                  top_p=rcfg.top_p, seed=seed) if prompts else []
        engine.sleep()
        t1 = time.perf_counter()

        # ---- rewards (timeouts and errors are counted, never silent) ----
        scored = verifier.score([s.text for s in samples], [batch_items[s.prompt_index].gold for s in samples],
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
            right_G = correct_B.view(-1, n).sum(1).tolist()
            groups = [g for g in groups if 0 < right_G[g] < n]
        trained = [g * n + j for g in groups for j in range(n)]

        # ---- sequences -> token-budget micro-batches (same count on every rank) ----
        filler_prompt = prompts[0] if prompts else make_prompt(items[active[0]])
        micro, order, cu_T, num_tokens, norm = pack_rollouts(prompts, samples, trained, filler_prompt, ids, merge,
                                                             cfg.data, device, rcfg.share_prompts)
        yield RolloutBatch(step, batch_items, prompts, samples, scored, scores_B, truncated_B, trained, max_len,
                           micro, order, cu_T, num_tokens, norm, (t0, t1, t2))


def advantages(rcfg, policy, critic, reference, batch, device) -> TokenTargets:
    """The no-grad pass over the step's micro-batches (the policy's old log-probs, the reference's in the same
    pass, the critic's values; models stay in train mode: the ViT runs everywhere), then GAE (PPO, whitened over
    every rank's tokens) or group advantages, and the per-token loss weights."""
    order, cu_T, n = batch.order, batch.cu_T, rcfg.samples_per_prompt

    # Dynamic sampling can leave a rank with no sample to train (its micro-batches are all fillers), or every
    # rank (no micro-batch at all): empty per-token tensors, and the update then changes nothing.
    def tokens(parts):
        return torch.cat(parts) if parts else torch.zeros(0, device=device)

    recompute = not reuses_logprobs(rcfg)
    with torch.no_grad():
        old_T, ref_T = [], []
        if recompute or reference is not None:
            for m, k, _ in on_device(batch.micro, device):  # the reference's log-probs in the policy's pass
                if recompute:
                    old_T.append(policy(**m.model_inputs(), targets=m.targets,
                                        temperature=rcfg.temperature).logprobs[k])
                if reference is not None:
                    ref_T.append(reference(**m.model_inputs(), targets=m.targets,
                                           temperature=rcfg.temperature).logprobs[k])
        old_T, ref_T = tokens(old_T) if recompute else None, tokens(ref_T) if reference is not None else None
        rollout_T = torch.tensor([lp for b in order for lp in batch.samples[b].logprobs], device=device)
        like_T = rollout_T  # fp32, one entry per response token: the shape of the per-token tensors below
        reward_T = torch.zeros_like(like_T)
        if len(order):
            reward_T[cu_T[1:].long() - 1] = batch.scores_B[order].to(device)  # the score sits on the last token
        values_T = returns_T = None
        if critic is not None:
            values_T = tokens([critic(**m.model_inputs()).values[k] for m, k, _ in on_device(batch.micro, device)])
            adv_T, returns_T = gae(reward_T, values_T, cu_T, rcfg.gamma, rcfg.lam) if order else (like_T, like_T)
            adv_T = global_whiten(adv_T)  # ORZ: batch-level advantage normalisation (group methods: per group)
        elif order:
            adv_T = broadcast_to_tokens(group_advantages(rcfg.algo, batch.scores_B, n)[order].to(device), cu_T)
        else:
            adv_T = like_T
        mask_T = torch.ones_like(like_T)
        if rcfg.overlong == "mask" and len(order):
            mask_T = broadcast_to_tokens((~batch.truncated_B[order]).float().to(device), cu_T)
        weight_T, corrected_T = mismatch_weights(rcfg.mismatch, rcfg.mismatch_cap, like_T if old_T is None else old_T,
                                                 rollout_T, cu_T)
        weight_T = weight_T * mask_T
    return TokenTargets(old_T, ref_T, rollout_T, reward_T, values_T, returns_T, adv_T, mask_T, weight_T, corrected_T)


def reuses_logprobs(rcfg) -> bool:
    """rl.old_logprobs="auto" on a strictly on-policy step: the update's own forward gives the old log-probs (the
    policy has not stepped yet when it runs), so `advantages` skips its policy pass."""
    return rcfg.old_logprobs == "auto" and rcfg.policy_updates_per_step == 1 and rcfg.mismatch == "none"


def update(rcfg, grad_clip, policy, critic, optims, batch, tt, device):
    """rl.policy_updates_per_step policy updates, then (PPO) rl.critic_updates_per_step critic updates over the
    step's micro-batches; an update with a NaN/inf loss or gradient is skipped on every rank alike. Returns (this
    rank's metric sums by name as 0-d float64 device tensors, each averaged over its updates; {"policy": skipped,
    "critic": skipped}). No host sync inside a micro-batch loop: one per update, for the guard. Fills tt.old_T
    from its forward when `advantages` left it None (`reuses_logprobs`)."""
    sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in
            ("loss", "clip_frac", "approx_kl", "entropy", "ref_kl", "grad_norm", "value_loss", "value_clip_frac")}
    skipped, norm = {"policy": 0, "critic": 0}, batch.norm
    own_old = tt.old_T is None
    if own_old and rcfg.policy_updates_per_step != 1:
        raise ValueError(f"update: old log-probs come from the update's forward only for one policy update, got "
                         f"rl.policy_updates_per_step={rcfg.policy_updates_per_step}")
    old_parts = []
    for _ in range(rcfg.policy_updates_per_step):
        at, loss_sum = 0, torch.zeros((), device=device)
        for (m, k, cu), mb in zip(on_device(batch.micro, device), batch.micro):
            out = policy(**m.model_inputs(), targets=m.targets, temperature=rcfg.temperature)
            sl = slice(at, at + mb.count)
            at += mb.count
            logp = out.logprobs[k]
            old = logp.detach() if own_old else tt.old_T[sl]
            if own_old:
                old_parts.append(old)
            loss, met = policy_loss(rcfg, logp, out.entropy[k], old, tt.adv_T[sl], tt.weight_T[sl], cu, norm,
                                    tt.ref_T[sl] if tt.ref_T is not None else None)
            (loss + 0.0 * out.logprobs.sum()).backward()  # a filler still runs FSDP's backward collectives
            loss_sum += loss.detach()
            w = mb.count / rcfg.policy_updates_per_step
            sums["loss"] += (loss.detach() * norm).double() / rcfg.policy_updates_per_step
            sums["clip_frac"] += (met["clip_frac"] * w).double()
            sums["approx_kl"] += (met["approx_kl"] * w).double()
            sums["entropy"] += (out.entropy[k].detach().sum() / rcfg.policy_updates_per_step).double()
            sums["ref_kl"] += met["kl"].double() * w
        grad_norm, applied = guarded_step(policy, optims["policy"], loss_sum, grad_clip)
        sums["grad_norm"] += grad_norm.double() / rcfg.policy_updates_per_step
        skipped["policy"] += not applied
    if own_old:
        tt.old_T = torch.cat(old_parts) if old_parts else torch.zeros(0, device=device)
    for _ in range(rcfg.critic_updates_per_step if critic is not None else 0):
        at, loss_sum = 0, torch.zeros((), device=device)
        for (m, k, _), mb in zip(on_device(batch.micro, device), batch.micro):
            v_all = critic(**m.model_inputs()).values
            sl = slice(at, at + mb.count)
            at += mb.count
            vloss, vmet = value_loss(v_all[k], tt.values_T[sl], tt.returns_T[sl], tt.mask_T[sl],
                                     clip=rcfg.value_clip, normalizer=norm)
            (vloss + 0.0 * v_all.sum()).backward()
            loss_sum += vloss.detach()
            w = mb.count / rcfg.critic_updates_per_step
            sums["value_loss"] += (vloss.detach() * norm / rcfg.critic_updates_per_step).double()
            sums["value_clip_frac"] += (vmet["vf_clip_frac"] * w).double()
        skipped["critic"] += not guarded_step(critic, optims["critic"], loss_sum, grad_clip)[1]
    return sums, skipped


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


def rollout_sums(rcfg, batch, tt) -> dict:
    """This rank's sums behind the step's rollout metrics, by name: rewards, lengths, verifier failures, the
    rollout / trainer log-prob gap, behaviour counts and rewards per kind of prompt (text, image), and (PPO) the
    returns and their residuals to the values (explained variance)."""
    samples, scored = batch.samples, batch.scored
    is_img = [batch.items[s.prompt_index].has_image for s in samples]
    hits = [behaviors.detect(s.text) for s in samples]
    sums = {"samples": len(samples), "reward": batch.scores_B.sum(), "reward_sq": batch.scores_B.square().sum(),
            "response_tokens": sum(len(s.token_ids) for s in samples),
            "truncated": sum(s.truncated for s in samples), "reward_timeouts": scored.num_timeout,
            "reward_errors": scored.num_error, "trained_samples": len(batch.trained),
            "logprob_gap": (tt.old_T - tt.rollout_T).abs().sum(), "text_samples": is_img.count(False),
            "image_samples": is_img.count(True),
            "reward_text": sum(float(r) for r, im in zip(scored.rewards, is_img) if not im),
            "reward_image": sum(float(r) for r, im in zip(scored.rewards, is_img) if im)}
    sums.update({f"behav/{k}": v for k, v in behaviors.tally(hits, is_img).items()})
    if tt.values_T is not None:
        residual_T = tt.returns_T - tt.values_T
        sums.update(returns=tt.returns_T.sum(), returns_sq=tt.returns_T.square().sum(), residual=residual_T.sum(),
                    residual_sq=residual_T.square().sum())
    if rcfg.mismatch != "none":  # over the policy loss's tokens (overlong-masked ones count as weight 0)
        sums.update({"mismatch/weight": tt.weight_T.double().sum(), "mismatch/corrected": tt.corrected_T.double().sum()})
    return sums


def step_metrics(rcfg, s, num_tokens, world) -> dict:
    """The logged means of one step from the metric sums `s` over all ranks (rollout_sums and update's, summed by
    dist.all_reduce_sums): per sample, per response token (num_tokens of the trained samples), per kind of prompt
    (NaN for a kind the step had none of)."""
    num_s, nt = max(s["samples"], 1), num_tokens
    rec = {"reward_mean": s["reward"] / num_s,
           "reward_std": math.sqrt(max(s["reward_sq"] / num_s - (s["reward"] / num_s) ** 2, 0)),
           "response_len": s["response_tokens"] / num_s, "truncation_rate": s["truncated"] / num_s,
           "reward_timeouts": s["reward_timeouts"], "reward_errors": s["reward_errors"],
           "kept_fraction": s["trained_samples"] / num_s, "logprob_gap": s["logprob_gap"] / nt,
           "loss": s["loss"] / nt, "clip_frac": s["clip_frac"] / nt, "approx_kl": s["approx_kl"] / nt,
           "entropy": s["entropy"] / nt, "grad_norm": s["grad_norm"] / world,
           "reward_text": s["reward_text"] / s["text_samples"] if s["text_samples"] else math.nan,
           "reward_image": s["reward_image"] / s["image_samples"] if s["image_samples"] else math.nan}
    if rcfg.kl_coef:
        rec["ref_kl"] = s["ref_kl"] / nt  # rl.kl_estimator's mean over the response tokens
    if "mismatch/weight" in s:
        rec.update({"mismatch/weight_mean": s["mismatch/weight"] / nt,
                    "mismatch/corrected_frac": s["mismatch/corrected"] / nt})
    if "returns" in s:
        rec.update(value_loss=s["value_loss"] / nt, value_clip_frac=s["value_clip_frac"] / nt,
                   explained_var=1 - _var(s["residual"], s["residual_sq"], nt) / max(
                       _var(s["returns"], s["returns_sq"], nt), 1e-8))
    rates = behaviors.rates({k[len("behav/"):]: v for k, v in s.items() if k.startswith("behav/")})
    rec.update({f"behav/{split}/{b}": rates[f"{split}/{b}"] for split in ("text", "image", "transfer")
                for b in behaviors.BEHAVIORS})
    return rec


def dump_rollouts(path, batch, tt):
    """rl.dump_rollouts: the step's samples, scores and per-token tensors of this rank, for tests and debugging."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = {k: (v.cpu() if v is not None else None) for k, v in vars(tt).items()}
    torch.save({"samples": [(s.prompt_index, s.token_ids, s.logprobs, s.text, s.finish_reason) for s in batch.samples],
                "answers": [it.answer for it in batch.items], "prompt_ids": [p.token_ids for p in batch.prompts],
                "scores": batch.scores_B, "order": batch.order, "cu": batch.cu_T.cpu(), "old": cpu["old_T"],
                "reward": cpu["reward_T"], "adv": cpu["adv_T"], "weight": cpu["weight_T"], "mask": cpu["mask_T"],
                "rollout": cpu["rollout_T"], "ref": cpu["ref_T"], "values": cpu["values_T"],
                "returns": cpu["returns_T"]}, path)


def build_models(cfg, info, ids, tokenizer_size):
    """The sharded policy, the critic (PPO only; its unused LM head frozen), the frozen reference (rl.kl_coef > 0
    only) and an AdamW with linear warmup then a constant rate for each trained model. Returns (policy, critic or
    None, reference or None, optimizers by name, schedulers by name)."""
    rcfg = cfg.rl
    policy = build_sharded_model(cfg, info, ids, tokenizer_size)
    critic = build_sharded_model(cfg, info, ids, tokenizer_size, value_head=True) if rcfg.algo == "ppo" else None
    if critic is not None:
        critic.hf.lm_head.requires_grad_(False)  # unused by the critic: no gradient, so no optimizer state
    # the KL term's reference: a frozen copy of the RL start point, sharded like the policy (not checkpointed: a
    # resumed run rebuilds it from init_from); no KL term, no reference model
    reference = build_sharded_model(cfg, info, ids, tokenizer_size).requires_grad_(False) if rcfg.kl_coef else None
    optims, scheds = {}, {}
    for name, net, lr in [("policy", policy, rcfg.policy_lr)] + ([("critic", critic, rcfg.critic_lr)] if critic
                                                                  is not None else []):
        optims[name] = build_optimizer([p for p in net.parameters() if p.requires_grad], cfg.optim.offload, lr,
                                       rcfg.betas, rcfg.weight_decay)
        scheds[name] = torch.optim.lr_scheduler.LambdaLR(
            optims[name], lambda s: min(1.0, (s + 1) / (rcfg.warmup_steps + 1)))
    return policy, critic, reference, optims, scheds


def train_rl(cfg, info) -> Path:
    """Run (or resume) the RL stage; returns its directory (checkpoints/, metrics.jsonl, curves.png, ...)."""
    rcfg, rank, world, device = cfg.rl, info.rank, info.world_size, info.device
    stage_dir = Path(cfg.run.out_dir) / "rl"
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
    ids, merge = special_ids(tok), image_proc.merge_size
    fmt, limit = PromptFormat.of(cfg.data), cfg.data.token_budget - longest_response(rcfg)

    def make_prompt(item):
        return build_prompt(item, tok, ids, image_proc, fmt)

    pool_items = prompt_pool(rcfg, cfg.data.synth_seed)
    items, too_long = fitting_prompts(pool_items, [prompt_length(it, tok, ids, image_proc, fmt) for it in pool_items],
                                      limit)
    if info.is_main:
        print(f"[rl] prompt pool: {len(items)} prompts; dropped {too_long} longer than {limit} tokens "
              f"(data.token_budget {cfg.data.token_budget} - the longest max_new_tokens {longest_response(rcfg)})")
    cfg.model.path = str(init_from)
    torch.manual_seed(cfg.run.seed)
    policy, critic, reference, optims, scheds = build_models(cfg, info, ids, len(tok))
    engine = rollout(rcfg.rollout_engine, init_from, tok, ids, device, cfg.rollout, image_proc.pixels,
                     seed=cfg.run.seed + rank)
    names = {n for n, _ in (engine.model if hasattr(engine, "model") else policy.hf).named_parameters()}
    verifier = RewardPool(default_num_workers(rcfg.reward_workers), rcfg.reward_timeout_s, score, rcfg.format_reward)
    active = list(range(len(items)))  # the prompts the steps draw from (indices into items): all, or pre-filtered

    # ---- resume (or pre-filter the prompt pool by pass rate with the initial policy) ----
    nets = {"policy": policy, "critic": critic}
    start, bad_in_a_row, states = 0, 0, {name: ModelState(nets[name], optim) for name, optim in optims.items()}
    latest = latest_checkpoint(stage_dir / "checkpoints") if cfg.checkpoint.resume else None
    if latest is not None:
        trainer = load_checkpoint(latest, states, rank)
        for name, sched in scheds.items():
            sched.load_state_dict(trainer["schedulers"][name])
        # "keep": the key of checkpoints written before it was renamed, so those runs still resume
        active = trainer["active_prompts"] if "active_prompts" in trainer else trainer["keep"]
        start, bad_in_a_row = trainer["step"], trainer["bad_in_a_row"]
        push_weights(policy, engine, names)  # the engine was built from init_from: give it the resumed policy
        if info.is_main:
            print(f"[rl] resumed from {latest} at step {start}")
    elif rcfg.prefilter_samples:
        mine = active[rank::world]
        samples = engine.generate([make_prompt(items[i]) for i in mine], n=rcfg.prefilter_samples,
                                  max_new_tokens=max_new_tokens_at(rcfg, 0), temperature=rcfg.temperature,
                                  top_p=rcfg.top_p, seed=cfg.run.seed + rank)
        scored = verifier.score([s.text for s in samples], [items[mine[s.prompt_index]].gold for s in samples],
                                [s.truncated for s in samples])
        rates = torch.tensor(scored.rewards).clamp(max=1).view(len(mine), -1).mean(1).tolist()
        passed = [i for i, r in zip(mine, rates) if rcfg.prefilter_min_pass < r < rcfg.prefilter_max_pass]
        gathered = [broadcast_object(passed, src) for src in range(world)]
        active = sorted(i for part in gathered for i in part)
        if info.is_main:
            print(f"[rl] pre-filter: kept {len(active)} of {len(items)} prompts with pass rate in "
                  f"({rcfg.prefilter_min_pass}, {rcfg.prefilter_max_pass}) over {rcfg.prefilter_samples} samples")
    if start >= rcfg.steps and info.is_main:
        print(f"[rl] nothing to do: checkpoint step {start} >= rl.steps {rcfg.steps} (raise rl.steps to train more)")
    held_out = eval_sets(cfg.eval, cfg.data.synth_seed) if cfg.eval.every_n_steps else {}
    logger = MetricsLogger(stage_dir, info.is_main, resume_step=start)

    # ---- one step a batch: rollout + rewards + packing (the generator) -> advantages -> update -> push -> log
    # -> [held-out eval] -> checkpoint ----
    for batch in rollout_batches(cfg, info, engine, verifier, items, active, start, make_prompt, ids, merge):
        step, (t0, t1, t2) = batch.step, batch.clock
        tt = advantages(rcfg, policy, critic, reference, batch, device)
        update_sums, skipped = update(rcfg, cfg.optim.grad_clip, policy, critic, optims, batch, tt, device)
        if rcfg.dump_rollouts:  # after the update: it fills tt.old_T when it computed them
            dump_rollouts(stage_dir / "rollouts" / f"step{step + 1}_rank{rank}.pt", batch, tt)
        for sched in scheds.values():
            sched.step()
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

        # ---- log: the step's sums all-reduced in one collective ----
        sums = all_reduce_sums({**rollout_sums(rcfg, batch, tt), **update_sums}, device)
        rec = step_metrics(rcfg, sums, batch.num_tokens, world)
        if rcfg.mismatch != "none":
            weight_T = tt.weight_T
            rec["mismatch/weight_max"] = all_reduce(weight_T.max() if weight_T.numel() else weight_T.new_zeros(()),
                                                    op=torch.distributed.ReduceOp.MAX).item()
        rec.update({"max_new_tokens": batch.max_new_tokens, "policy_skipped": skipped["policy"],
                    "critic_skipped": skipped["critic"], "lr": scheds["policy"].get_last_lr()[0],
                    "tokens_per_s": sums["response_tokens"] / (t5 - t0), "time_rollout_s": t1 - t0,
                    "time_reward_s": t2 - t1, "time_train_s": t4 - t2, "time_sync_s": t5 - t4})
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
            if batch.scored.first_error:
                print(f"[rl]   verifier error: {batch.scored.first_error}")

        # ---- checkpoint (policy, critic, both optimizers, schedulers, data position = step, RNG) ----
        if (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0) or step + 1 == rcfg.steps:
            save_checkpoint(stage_dir / "checkpoints", step + 1, states,
                            {"schedulers": {k: s.state_dict() for k, s in scheds.items()}, "active_prompts": active,
                             "bad_in_a_row": bad_in_a_row}, rank,
                            cfg.checkpoint.keep, dump_config(cfg))
    verifier.close()
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
