"""rl.update in one process on the tiny default model (no process group: the collectives are no-ops): the named
metric sums it returns against direct computations, with several policy and critic updates per step."""

from types import SimpleNamespace

import torch

from ovr_train import rl
from ovr_train.config import load_config
from ovr_train.data import IGNORE
from ovr_train.dist import all_reduce_sums
from ovr_train.model import build_model

IDS = {"endoftext": 0, "im_start": 1, "im_end": 2, "vision_start": 9, "vision_end": 10, "image_pad": 12,
       "video_pad": 13}
VOCAB = 640


def _batch(cfg, lengths, seed=0):
    """An rl.RolloutBatch of random text rollouts (prompt 5 tokens, responses of `lengths`), packed by rl.py."""
    g = torch.Generator().manual_seed(seed)
    prompts = [SimpleNamespace(token_ids=torch.randint(22, VOCAB, (5,), generator=g).tolist(), pixel_values=None,
                               image_grid_thw=None) for _ in lengths]
    samples = [SimpleNamespace(prompt_index=i, token_ids=torch.randint(22, VOCAB, (n,), generator=g).tolist(),
                               logprobs=[0.0] * n, text="", truncated=False) for i, n in enumerate(lengths)]
    trained = list(range(len(lengths)))
    micro, order, cu_T, num_tokens, norm = rl.pack_rollouts(prompts, samples, trained, prompts[0], IDS, 2, cfg.data,
                                                            torch.device("cpu"))
    scores = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    scored = SimpleNamespace(rewards=scores, num_timeout=0, num_error=0)
    items = [SimpleNamespace(has_image=False) for _ in lengths]
    return rl.RolloutBatch(0, items, prompts, samples, scored, torch.tensor(scores),
                           torch.zeros(len(lengths), dtype=torch.bool), trained, 0, micro, order, cu_T, num_tokens,
                           norm)


def test_update_returns_named_sums_averaged_over_its_updates():
    """lr 0: every update sees the same models, so a sum averaged over the updates equals one update's. On policy
    (ratio 1) the PPO loss summed over tokens is -sum(advantage) (GRPO's group advantages, per token: non-zero as
    the responses' lengths differ); the logged loss is that / tokens, not x the number of updates (3 here)."""
    args = ["--data.token_budget=32", "--data.max_seq_len=32", "--rl.max_new_tokens=12",
            "--rl.length_curriculum=[[0,12]]", "--rl.policy_updates_per_step=3", "--rl.critic_updates_per_step=2",
            "--rl.samples_per_prompt=2"]
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    cfg = load_config(None, [*args, "--rl.algo=grpo"])
    policy = build_model(cfg.model, IDS, VOCAB).train()
    critic = build_model(cfg.model, IDS, VOCAB, value_head=True).train()
    optims = {"policy": torch.optim.AdamW(policy.parameters(), lr=0.0),
              "critic": torch.optim.AdamW(critic.parameters(), lr=0.0)}
    batch = _batch(cfg, [7, 3, 11, 5, 9, 4])
    assert len(batch.micro) > 1 and batch.num_tokens == 39
    tt = rl.advantages(cfg.rl, policy, None, None, batch, cpu)
    sums, skipped = rl.update(cfg.rl, cfg.optim.grad_clip, policy, None, optims, batch, tt, cpu)
    assert skipped == {"policy": 0, "critic": 0}
    assert all(v.dtype == torch.float64 and v.dim() == 0 for v in sums.values())
    want = -(tt.adv_T * tt.weight_T).double().sum()
    assert abs(float(want)) > 1.0
    torch.testing.assert_close(sums["loss"], want, rtol=1e-5, atol=1e-6)
    assert float(sums["clip_frac"]) == 0.0 and abs(float(sums["approx_kl"])) < 1e-6
    # entropy: one forward over every response token, summed
    entropy = 0.0
    with torch.no_grad():
        for mb in batch.micro:
            out = policy(**mb.batch.model_inputs(), targets=mb.batch.targets)
            entropy += float(out.entropy[mb.batch.targets != IGNORE].sum())
    assert abs(float(sums["entropy"]) - entropy) < 1e-4 * entropy
    # the logged means: per response token, the reward per sample and per kind of prompt
    rec = rl.step_metrics(cfg.rl, all_reduce_sums({**rl.rollout_sums(cfg.rl, batch, tt), **sums}, cpu),
                          batch.num_tokens, 1)
    assert rec["loss"] == float(sums["loss"]) / 39 and rec["grad_norm"] == float(sums["grad_norm"]) > 0
    assert rec["reward_mean"] == 0.5 and rec["reward_text"] == 0.5 and rec["kept_fraction"] == 1.0
    assert rec["response_len"] == 39 / 6 and rec["logprob_gap"] == float(tt.old_T.abs().sum()) / 39

    # PPO's critic: at lr 0 it predicts the old values, so no clipping, and its loss is the plain 0.5 x squared
    # error to the returns, averaged over the 2 critic updates
    cfg = load_config(None, args)
    tt = rl.advantages(cfg.rl, policy, critic, None, batch, cpu)
    sums, _ = rl.update(cfg.rl, cfg.optim.grad_clip, policy, critic, optims, batch, tt, cpu)
    torch.testing.assert_close(sums["value_loss"], 0.5 * ((tt.values_T - tt.returns_T) ** 2).double().sum(),
                               rtol=1e-5, atol=1e-6)
    assert float(sums["value_clip_frac"]) == 0.0


def test_a_step_with_nothing_to_train_changes_nothing():
    """Dynamic sampling can drop every group of every rank (all right or all wrong): no micro-batch at all. The
    step then trains on nothing, for PPO and the group methods alike, and leaves the models as they were."""
    args = ["--data.token_budget=32", "--data.max_seq_len=32", "--rl.max_new_tokens=12",
            "--rl.length_curriculum=[[0,12]]", "--rl.samples_per_prompt=2", "--rl.dynamic_sampling=true"]
    cpu = torch.device("cpu")
    for algo in ("ppo", "grpo"):
        cfg = load_config(None, [*args, f"--rl.algo={algo}"])
        torch.manual_seed(0)
        policy = build_model(cfg.model, IDS, VOCAB).train()
        critic = build_model(cfg.model, IDS, VOCAB, value_head=True).train() if algo == "ppo" else None
        optims = {name: torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
                  for name, net in (("policy", policy), ("critic", critic)) if net is not None}
        before = [p.detach().clone() for p in policy.parameters()]
        batch = _batch(cfg, [7, 3, 11, 5, 9, 4])
        micro, order, cu_T, num_tokens, norm = rl.pack_rollouts(batch.prompts, batch.samples, [], batch.prompts[0],
                                                                IDS, 2, cfg.data, cpu)
        assert micro == [] and order == [] and num_tokens == 1.0
        empty = rl.RolloutBatch(0, batch.items, batch.prompts, batch.samples, batch.scored, batch.scores_B,
                                batch.truncated_B, [], 0, micro, order, cu_T, num_tokens, norm)
        tt = rl.advantages(cfg.rl, policy, critic, None, empty, cpu)
        assert tt.old_T is None and tt.adv_T.numel() == 0  # strictly on-policy: update fills old_T
        sums, skipped = rl.update(cfg.rl, cfg.optim.grad_clip, policy, critic, optims, empty, tt, cpu)
        assert tt.old_T.numel() == 0
        assert skipped == {"policy": 0, "critic": 0} and all(float(v) == 0.0 for v in sums.values())
        assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))
        rec = rl.step_metrics(cfg.rl, all_reduce_sums({**rl.rollout_sums(cfg.rl, empty, tt), **sums}, cpu), 1.0, 1)
        assert rec["kept_fraction"] == 0.0 and rec["loss"] == 0.0


def test_old_logprobs_from_the_update_forward_equal_the_recomputed_ones():
    """rl.old_logprobs="auto" (strictly on-policy: the update's own forward, detached) against "recompute" (a
    no-grad pass first), PPO and GSPO, from the same models: the same old log-probs, metric sums and updated
    weights, bit for bit; and advantages runs one policy forward less."""
    args = ["--data.token_budget=32", "--data.max_seq_len=32", "--rl.max_new_tokens=12",
            "--rl.length_curriculum=[[0,12]]", "--rl.samples_per_prompt=2", "--rl.critic_updates_per_step=1"]
    cpu = torch.device("cpu")
    for loss in ("ppo", "gspo"):
        results = {}
        for mode in ("recompute", "auto"):
            cfg = load_config(None, [*args, f"--rl.loss={loss}", f"--rl.old_logprobs={mode}"])
            torch.manual_seed(0)
            policy = build_model(cfg.model, IDS, VOCAB).train()
            critic = build_model(cfg.model, IDS, VOCAB, value_head=True).train()
            optims = {"policy": torch.optim.AdamW(policy.parameters(), lr=1e-2),
                      "critic": torch.optim.AdamW(critic.parameters(), lr=1e-2)}
            batch = _batch(cfg, [7, 3, 11, 5, 9, 4])
            forwards = []
            hook = policy.register_forward_hook(lambda *_, seen=forwards: seen.append(torch.is_grad_enabled()))
            tt = rl.advantages(cfg.rl, policy, critic, None, batch, cpu)
            sums, skipped = rl.update(cfg.rl, cfg.optim.grad_clip, policy, critic, optims, batch, tt, cpu)
            hook.remove()
            assert skipped == {"policy": 0, "critic": 0}
            results[mode] = (tt.old_T, sums, [p.detach().clone() for p in policy.parameters()], forwards)
        (old_r, sums_r, params_r, fw_r), (old_a, sums_a, params_a, fw_a) = results["recompute"], results["auto"]
        assert fw_r.count(False) == len(fw_r) - fw_r.count(True) > 0 and fw_a.count(False) == 0
        assert fw_a.count(True) == fw_r.count(True)
        assert torch.equal(old_r, old_a), loss
        assert sums_r.keys() == sums_a.keys() and all(torch.equal(sums_r[k], sums_a[k]) for k in sums_r), loss
        assert all(torch.equal(a, b) for a, b in zip(params_r, params_a)), loss
        assert any(not torch.equal(a, b) for a, b in zip(params_a, build_model(cfg.model, IDS, VOCAB).parameters()))


def test_old_logprobs_auto_recomputes_when_not_strictly_on_policy():
    for extra in (["--rl.policy_updates_per_step=2"], ["--rl.mismatch=tis_token"]):
        cfg = load_config(None, ["--rl.old_logprobs=auto", *extra])
        assert not rl.reuses_logprobs(cfg.rl)
    assert rl.reuses_logprobs(load_config(None, []).rl)
    assert not rl.reuses_logprobs(load_config(None, ["--rl.old_logprobs=recompute"]).rl)
