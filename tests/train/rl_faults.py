"""`torchrun tests/train/rl_faults.py OUT.json [launch args]`: ovr_train.launch with test probes (test_rl_step.py).

OVR_NAN_POLICY_STEP / OVR_NAN_CRITIC_STEP (1-based): that step's policy / critic loss is made NaN on every rank (the
guard must skip the update). OVR_FAKE_REWARDS=1: each response scores crc32(text) % 2 (non-zero advantages from a
random policy, to compare training curves across code versions). Every `Batch.to` result is tracked while alive: OUT.json (one per rank) records the most
micro-batches resident on the device at once and how many moves there were.
"""

import faulthandler
import json
import os
import sys
import weakref
import zlib

from ovr_train import data, launch, rewards, rl

state = {"step": 0, "live": 0, "max_live": 0, "moves": 0}
nan_policy = int(os.environ.get("OVR_NAN_POLICY_STEP", "0"))
nan_critic = int(os.environ.get("OVR_NAN_CRITIC_STEP", "0"))


def _released():
    state["live"] -= 1


def _to(self, device, _to=data.Batch.to):
    moved = _to(self, device)
    state["live"] += 1
    state["moves"] += 1
    state["max_live"] = max(state["max_live"], state["live"])
    weakref.finalize(moved, _released)
    return moved


def _steps(rcfg, step, _f=rl.max_new_tokens_at):  # called once per step, with the 0-based step
    state["step"] = step + 1
    return _f(rcfg, step)


def _poisoned(fn, at):
    def wrapper(*args, **kwargs):
        loss, met = fn(*args, **kwargs)
        return (loss * float("nan") if state["step"] == at else loss), met
    return wrapper


def _fake_score(self, responses, answers, truncated=None, _score=rewards.RewardPool.score):
    batch = _score(self, responses, answers, truncated)
    batch.rewards = [float(zlib.crc32(r.encode()) % 2) for r in responses]
    return batch


if __name__ == "__main__":  # the reward pool's spawned workers import this file too: they must not train
    faulthandler.dump_traceback_later(float(os.environ.get("OVR_DUMP_AFTER_S", "1e9")), exit=True)
    data.Batch.to = _to
    rl.max_new_tokens_at = _steps
    rl.ppo_loss = _poisoned(rl.ppo_loss, nan_policy)
    rl.value_loss = _poisoned(rl.value_loss, nan_critic)
    if os.environ.get("OVR_FAKE_REWARDS") == "1":
        rewards.RewardPool.score = _fake_score
    out, args = sys.argv[1], sys.argv[2:]
    try:
        launch.main(args)
    finally:
        with open(f"{out}.rank{os.environ.get('RANK', '0')}.json", "w") as f:
            json.dump(state, f)
