"""Full RL steps on 2 ranks (torchrun, gloo) with the HF engine on a tiny random Qwen2.5-VL: mixed image / text
ranks don't hang, rewards / GAE / batch whitening on the real rollouts match the references, the trainer's old
logprobs match the rollout's, and a resumed run continues exactly like an uninterrupted one. The
runs that several tests (here, test_rl_options.py, test_offload.py) read are launched once per session
(shared_runs.once)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from shared_runs import once, torchrun

from ovr_kernels.reference import gae_ref, masked_whiten_ref
from ovr_train.rewards import score

pytestmark = [pytest.mark.dist, pytest.mark.slow]

TINY = ["--model.hidden_size=64", "--model.intermediate_size=128", "--model.num_layers=2",
        "--model.mrope_section=[2,3,3]", "--model.vision_depth=1", "--model.vision_hidden_size=32",
        "--model.vision_intermediate_size=64", "--model.vision_num_heads=2", "--model.vision_fullatt_blocks=[0]"]
RL = ["--rl.prompts_per_step=2", "--rl.samples_per_prompt=3", "--rl.max_new_tokens=12",
      "--rl.length_curriculum=[[0,12]]", "--rl.num_prompts=24", "--rl.text_fraction=0.5",
      "--rl.critic_updates_per_step=2", "--rl.dump_rollouts=true", "--rl.policy_lr=1e-3", "--rl.critic_lr=1e-3",
      "--checkpoint.every=1"]
SYSTEM, INSTRUCTION = "You are a careful solver.", "Put the final answer in \\boxed{}."


def _make_init_dir(root):
    """A tiny random Qwen2.5-VL saved as an HF directory with the small BPE tokenizer (stands in for SFT's hf/)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ovr_train.config import load_config
    from ovr_train.model import hf_config, model_vocab_size
    from ovr_train.tokenizer import load_tokenizer, special_ids

    cfg = load_config(None, TINY)
    tok = load_tokenizer("", "bpe", cfg.model.bpe_vocab_size, str(root / "cache"), 0)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(hf_config(cfg.model, model_vocab_size(cfg.model, len(tok)),
                                                         special_ids(tok)))
    model.save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    return root


@pytest.fixture(scope="module")
def init_dir():
    """The RL start point, one per test session (the RL test modules launch their runs under it)."""
    return once("rl-init", _make_init_dir)


def launch(root, out, steps, *extra):
    cmd = [*torchrun(2), "-m", "ovr_train.launch",
           "--stage", "rl", f"--rl.init_from={root / 'hf'}", f"--run.out_dir={out}", f"--rl.steps={steps}",
           f"--data.cache_dir={root / 'cache'}", *TINY, *RL, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def dumps(out, step):
    return [torch.load(Path(out) / "rl" / "rollouts" / f"step{step}_rank{r}.pt", weights_only=False) for r in (0, 1)]


def straight_run(init_dir):
    """A 3-step run with the default options of this file (several tests compare with it)."""
    return once("rl-straight", lambda out: (launch(init_dir, out, 3), out)[1])


MASK_CAP = 1 + 5e-7  # the fault-probe run's rl.mismatch_cap (mask_seq): the fp32 rollout / trainer gap crosses it


def faults_run(init_dir):
    """One 2-rank run through rl_faults.py on a prompt file (text and image rows, one too long) with a system
    prompt, the answer instruction and a frozen ViT, rl.overlong=mask and rl.mismatch=mask_seq; the policy loss is
    NaN at step 2 and the critic's at step 3, so the guard skips both updates and aborts at step 3
    (rl.max_bad_steps=2). Each sample packs its own prompt copy (rl.share_prompts=false), so that a pass has
    enough micro-batches to show the streaming. Returns {out, probe, log, returncode}."""
    from PIL import Image

    def run(tmp):
        Image.effect_noise((112, 112), 50).convert("RGB").save(tmp / "dots.png")
        rows = [{"id": f"t{i}", "question": f"Compute {i} + {i + 1}.", "answer": str(2 * i + 1)} for i in range(4)]
        rows += [{"id": f"i{i}", "question": f"How many dots are there? ({i})", "answer": "3", "image": "dots.png"}
                 for i in range(4)]
        rows.append({"id": "long", "question": "Compute 1 + 1. " + "Think hard. " * 60, "answer": "2"})
        (tmp / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        out, probe = tmp / "run", tmp / "probe"
        cmd = [*torchrun(2), str(Path(__file__).parent / "rl_faults.py"), str(probe), "--stage", "rl",
               f"--rl.init_from={init_dir / 'hf'}",
               f"--run.out_dir={out}", "--rl.steps=4", f"--data.cache_dir={init_dir / 'cache'}", *TINY, *RL,
               "--rl.prompts_per_step=4", f"--rl.prompt_files=[{tmp / 'prompts.jsonl'}]",
               f"--data.system_prompt={SYSTEM}", f"--data.answer_instruction={INSTRUCTION}", "--data.max_seq_len=100",
               "--data.token_budget=128", "--model.freeze_vision=true", "--rl.max_bad_steps=2",
               "--rl.critic_updates_per_step=1", "--rl.overlong=mask", "--rl.mismatch=mask_seq",
               f"--rl.mismatch_cap={MASK_CAP}", "--rl.share_prompts=false"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2]),
               "OVR_NAN_POLICY_STEP": "2", "OVR_NAN_CRITIC_STEP": "3"}
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env,
                              cwd=Path(__file__).parents[2])
        return {"out": out, "probe": probe, "log": proc.stdout + proc.stderr, "returncode": proc.returncode}

    return once("rl-faults", run)


def test_rl_steps_match_references_and_resume(init_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = init_dir / "run"
    # held-out eval of the pushed policy every 2 steps (eval.every_n_steps); it must not perturb training (the
    # resumed run below is compared with a straight run that never evaluates)
    launch(init_dir, out, 2, "--eval.every_n_steps=2", "--eval.num_text=2", "--eval.num_images=2",
           "--eval.num_samples=1", "--eval.max_new_tokens=8", "--eval.ks=[1]")
    records = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert "eval/synth_images/pass@1" not in records[0]
    assert 0.0 <= records[1]["eval/synth_images/pass@1"] <= 1.0 and 0.0 <= records[1]["eval/synth_text/pass@1"] <= 1.0
    for r in records:
        assert r["reward_timeouts"] == 0 and r["reward_errors"] == 0
        assert r["logprob_gap"] < 1e-3, r["logprob_gap"]  # trainer (packed varlen) vs rollout (HF generate)
        assert r["clip_frac"] == 0.0 and r["approx_kl"] < 1e-8  # strictly on-policy: the update forward = old
        assert all(torch.isfinite(torch.tensor(v)) for k, v in r.items() if k in ("loss", "value_loss", "entropy"))
    assert (out / "rl" / "curves.png").is_file() and (out / "rl" / "behaviors.png").is_file()

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(init_dir / "hf"), attn_implementation="sdpa").eval()
    mixed = False
    for step in (1, 2):
        ranks = dumps(out, step)
        image_pad = hf.config.image_token_id
        has_img = [any(image_pad in p for p in d["prompt_ids"]) for d in ranks]
        all_img = [all(image_pad in p for p in d["prompt_ids"]) for d in ranks]
        mixed |= has_img[0] != has_img[1] or all_img[0] != all_img[1]
        advs, raw = [], []
        for d in ranks:
            # rewards: the verifier's scores are the pure function's
            for (pi, _, _, text, reason), got in zip(d["samples"], d["scores"].tolist()):
                assert got == score(text, d["answers"][pi], reason == "length")
            # GAE on the real rollout: reference reverse loop over the packed responses
            adv, ret = gae_ref(d["reward"], d["values"], d["cu"], 1.0, 1.0)
            torch.testing.assert_close(d["returns"], ret, atol=1e-5, rtol=1e-5)
            raw.append(adv)
            advs.append(d["adv"])
            # the reward sits on each response's last token; with gamma = lambda = 1, return = reward everywhere
            lengths = (d["cu"][1:] - d["cu"][:-1]).tolist()
            torch.testing.assert_close(ret, torch.repeat_interleave(d["scores"][d["order"]], torch.tensor(lengths)))
            # trainer-vs-rollout: old logprobs equal the engine's sampling logprobs token by token
            rollout = torch.tensor([lp for b in d["order"] for lp in d["samples"][b][2]])
            torch.testing.assert_close(d["old"], rollout, atol=3e-3, rtol=1e-3)  # measured max 1.2e-3
            if step == 1:  # and, for text prompts, a plain HF forward of the initial model
                for b in d["order"][:3]:
                    pi, resp = d["samples"][b][0], d["samples"][b][1]
                    if image_pad in d["prompt_ids"][pi]:
                        continue
                    ids = torch.tensor([d["prompt_ids"][pi] + resp])
                    with torch.no_grad():
                        logits = hf(input_ids=ids).logits[0, len(d["prompt_ids"][pi]) - 1:-1]
                    want = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(resp)[:, None])[:, 0]
                    torch.testing.assert_close(torch.tensor(d["samples"][b][2]), want, atol=5e-4, rtol=1e-4)
        # batch advantage normalisation over BOTH ranks' tokens
        cat = torch.cat(raw)
        torch.testing.assert_close(torch.cat(advs), masked_whiten_ref(cat, torch.ones_like(cat)), atol=1e-5,
                                   rtol=1e-5)
    assert mixed, "no step had ranks with different image/text mixes: pick another seed"

    # resume: continue to step 3 from the step-2 checkpoint, and compare with an uninterrupted 3-step run
    log = launch(init_dir, out, 3)
    assert "resumed from" in log and "at step 2" in log
    straight = straight_run(init_dir)
    for a, b in zip(dumps(out, 3), dumps(straight, 3)):
        assert [s[1] for s in a["samples"]] == [s[1] for s in b["samples"]]
        torch.testing.assert_close(a["adv"], b["adv"])
        torch.testing.assert_close(a["old"], b["old"])


def test_rl_prompt_format_length_filter_vision_switch_nan_guard_and_streaming(init_dir, tmp_path):
    """The fault-probe run (faults_run): the NaN guard skips the poisoned updates and aborts, over-long prompts are
    dropped, one prompt format, the frozen ViT stays frozen, and micro-batches reach the device one at a time."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoTokenizer

    from ovr_train.model import _hf_key

    run = faults_run(init_dir)
    out, probe, log = run["out"], run["probe"], run["log"]
    # the guard: step 2 skips the policy update, step 3 the critic's, then 2 bad steps in a row abort the run
    assert run["returncode"] != 0 and "2 consecutive steps with non-finite policy or critic updates" in log, log[-4000:]
    records = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["policy_skipped"], r["critic_skipped"]) for r in records] == [(1, 0, 0), (2, 1, 0)]
    assert "step 3: non-finite loss or gradient: skipped 0 policy and 1 critic" in log
    for d in dumps(out, 3):  # step 3's logprobs and values come from the models the skipped updates left finite
        assert torch.isfinite(d["old"]).all() and torch.isfinite(d["values"]).all()
    # over-long prompts are dropped when the pool is loaded, and reported
    assert "prompt pool: 8 prompts; dropped 1 longer than 116 tokens" in log
    # one prompt format: the rollouts' prompts carry the system prompt and the instruction once each
    tok = AutoTokenizer.from_pretrained(str(init_dir / "hf"))
    for d in dumps(out, 1) + dumps(out, 2):
        for p in d["prompt_ids"]:
            text = tok.decode(p)
            assert text.count(SYSTEM) == 1 and text.count(INSTRUCTION) == 1, text
    # model.freeze_vision=true is honoured: the ViT is frozen (no optimizer state) and keeps its initial weights
    dcp_to_torch_save(out / "rl" / "checkpoints" / "step_00000002", tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    init = {_hf_key(k): v for k, v in load_file(str(next((init_dir / "hf").glob("*.safetensors")))).items()}
    vit = [k for k in init if k.startswith("hf.model.visual.")]
    assert vit and all(torch.equal(ckpt["policy"]["model"][k], init[k]) for k in vit)
    for net in ("policy", "critic"):
        trained = list(ckpt[net]["optim"]["state"])
        assert any(".layers.0." in k for k in trained) and not any(".visual." in k for k in trained), net
    # micro-batches are streamed: 4 passes a step (old logprobs, values, policy, critic) over >= 4 micro-batches,
    # each moved to the device when used; at most the current, the next and one left from the previous pass live
    for rank in (0, 1):
        probe_state = json.loads(Path(f"{probe}.rank{rank}.json").read_text())
        assert probe_state["moves"] >= 3 * 4 * 4 and probe_state["max_live"] <= 3, probe_state
