"""RL options off the paper's recipe: rollout / trainer mismatch correction (rl.mismatch), GSPO (rl.loss), overlong
shaping (rl.overlong) and the KL term to a frozen reference (rl.kl_coef): the pure functions against direct
computations, then 2-rank runs of the tiny model whose dumped rollouts are checked the same way."""

import json
import math

import pytest
import torch
from test_rl_step import MASK_CAP, dumps, faults_run, init_dir, launch  # noqa: F401  (init_dir: a fixture)

from ovr_train.config import RLCfg
from ovr_train.rewards import score
from ovr_train.rl import mismatch_weights, overlong_penalty


def direct_weights(mode, cap, old, rollout, lengths):
    """rl.mismatch written out sequence by sequence, token by token, in Python floats."""
    weights, corrected, at = [], [], 0
    for n in lengths:
        lr = [float(o) - float(r) for o, r in zip(old[at:at + n], rollout[at:at + n])]
        at += n
        ratios = [math.exp(sum(lr))] * n if mode.endswith("_seq") else [math.exp(x) for x in lr]
        for r in ratios:
            if mode.startswith("tis"):
                weights.append(min(r, cap))
                corrected.append(r > cap)
            else:
                inside = 1 / cap <= r <= cap
                weights.append(1.0 if inside else 0.0)
                corrected.append(not inside)
    return torch.tensor(weights), torch.tensor(corrected, dtype=torch.bool)


@pytest.mark.parametrize("mode", ["tis_token", "tis_seq", "mask_token", "mask_seq"])
def test_mismatch_weights_match_direct_computation(mode):
    lengths = [3, 0, 1, 7, 4, 2, 5, 6, 1, 3]
    old = -torch.rand(sum(lengths)) * 2
    rollout = old + torch.randn(sum(lengths)) * 0.5
    cu = torch.tensor([0] + lengths).cumsum(0).int()
    weight, corrected = mismatch_weights(mode, 1.3, old, rollout, cu)
    want_w, want_c = direct_weights(mode, 1.3, old.tolist(), rollout.tolist(), lengths)
    torch.testing.assert_close(weight, want_w, atol=1e-6, rtol=1e-6)
    assert torch.equal(corrected, want_c) and 0 < int(corrected.sum()) < len(corrected)
    none_w, none_c = mismatch_weights("none", 1.3, old, rollout, cu)
    assert torch.equal(none_w, torch.ones_like(old)) and not none_c.any()


def test_overlong_penalty_is_dapo_ramp():
    """limit 100, cache 20: 0 up to 80 tokens, then -1/20 per token, -1 at the limit."""
    got = overlong_penalty(torch.tensor([0, 80, 81, 90, 99, 100]), 100, 20)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.05, -0.5, -0.95, -1.0]))


@pytest.mark.parametrize("kw, match", [
    ({"loss": "grpo"}, "rl.loss='grpo': must be one of"), ({"mismatch": "tis"}, "rl.mismatch='tis'"),
    ({"mismatch_cap": 1.0}, "rl.mismatch_cap=1.0: must be > 1"), ({"overlong": "cut"}, "rl.overlong='cut'"),
    ({"overlong": "soft", "overlong_cache": 24576}, "rl.overlong_cache=24576: must be > 0, and with rl.overlong=soft"),
    ({"overlong_cache": 0}, "rl.overlong_cache=0"), ({"kl_estimator": "k2"}, "rl.kl_estimator='k2'"),
    ({"kl_coef": -0.1}, "rl.kl_coef=-0.1: must be >= 0"), ({"clip_high": 1.0}, r"must be in \[0, 1\)"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        RLCfg(**kw)


def records(out):
    return [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.dist
@pytest.mark.slow
def test_rl_gspo_tis_soft_overlong_and_kl(init_dir):  # noqa: F811
    """2 steps with rl.loss=gspo, token-level TIS with a cap that the fp32 gap between HF generate and the packed
    trainer (~1e-7 here) still crosses, DAPO's soft overlong penalty and a low_var KL term: the weights, rewards and
    reference log-probs in the dumps are the direct computations', and the logged means are the dumps'. The random
    tiny model truncates every response (equal rewards: zero advantages), so an entropy bonus moves the policy."""
    out, cap, limit, cache = init_dir / "opts", 1 + 1e-7, 12, 4
    launch(init_dir, out, 2, "--rl.loss=gspo", "--rl.mismatch=tis_token", f"--rl.mismatch_cap={cap}",
           "--rl.overlong=soft", f"--rl.overlong_cache={cache}", "--rl.kl_coef=0.1", "--rl.kl_estimator=low_var",
           "--rl.entropy_coef=0.01", "--checkpoint.export_hf=false")
    recs = records(out)
    corrected = 0
    for step, rec in zip((1, 2), recs):
        ranks = dumps(out, step)
        weights, num_corrected = [], 0
        for d in ranks:
            lengths = (d["cu"][1:] - d["cu"][:-1]).tolist()
            rollout = [lp for b in d["order"] for lp in d["samples"][b][2]]
            torch.testing.assert_close(d["rollout"], torch.tensor(rollout))
            want_w, want_c = direct_weights("tis_token", cap, d["old"].tolist(), rollout, lengths)
            torch.testing.assert_close(d["weight"], want_w, atol=1e-6, rtol=1e-6)
            weights.append(want_w)
            num_corrected += int(want_c.sum())
            # soft overlong: the verifier's score plus the ramp over the last `cache` tokens before the limit
            for (pi, ids, _, text, reason), got in zip(d["samples"], d["scores"].tolist()):
                want = score(text, d["answers"][pi], reason == "length") + min(
                    0.0, max(-1.0, (limit - cache - len(ids)) / cache))
                assert got == pytest.approx(want, abs=1e-6)
            # the reference is the RL start point: at step 1 its log-probs are the policy's, later they differ
            if step == 1:
                assert torch.equal(d["ref"], d["old"])
            else:
                assert not torch.equal(d["ref"], d["old"])
        w = torch.cat(weights)
        assert rec["mismatch/weight_mean"] == pytest.approx(float(w.mean()), rel=1e-5)
        assert rec["mismatch/weight_max"] == pytest.approx(float(w.max()), rel=1e-6)
        assert rec["mismatch/corrected_frac"] == pytest.approx(num_corrected / len(w))
        corrected += num_corrected
        assert math.isfinite(rec["loss"]) and rec["ref_kl"] >= 0.0
    assert recs[0]["ref_kl"] < 1e-7 < recs[1]["ref_kl"]  # on the start point, then after one update
    assert corrected > 0, "the cap should bind on some tokens: lower it"


@pytest.mark.dist
@pytest.mark.slow
def test_rl_overlong_mask_and_sequence_masking(init_dir):  # noqa: F811
    """rl.overlong=mask drops truncated responses from the policy and critic losses (per-token mask 0) and
    sequence-level masking multiplies in; a run where every response is truncated still trains finitely. Checked
    on step 1 of test_rl_step's fault-probe run, which runs with these options (its NaNs start at step 2)."""
    out = faults_run(init_dir)["out"]
    rec = records(out)[0]
    truncated = 0
    for d in dumps(out, 1):
        lengths = (d["cu"][1:] - d["cu"][:-1]).tolist()
        trunc = [d["samples"][b][4] == "length" for b in d["order"]]
        truncated += sum(trunc)
        mask = torch.repeat_interleave(torch.tensor([0.0 if t else 1.0 for t in trunc]), torch.tensor(lengths))
        assert torch.equal(d["mask"], mask)
        want_w, _ = direct_weights("mask_seq", MASK_CAP, d["old"].tolist(), d["rollout"].tolist(), lengths)
        torch.testing.assert_close(d["weight"], want_w * mask)
    assert truncated > 0, "the tiny model should hit the 12-token limit on some responses"
    assert math.isfinite(rec["loss"]) and math.isfinite(rec["value_loss"])
