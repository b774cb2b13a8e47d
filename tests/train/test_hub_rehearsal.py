"""Rehearsal of a downloaded Qwen2.5-VL-7B-Instruct, on the hub-layout miniature (hub_fixture.py): SFT on 2 ranks ->
RL (1 step, HF engine, 2 ranks) -> eval -> the export reloads to the trained weights; and the trainer's log-probs
equal transformers' own forward of the checkpoint as transformers loads it (text and image), both for the hub's
original layout and for the export. One launcher per stage, the smallest settings."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from shared_runs import torchrun

pytestmark = [pytest.mark.slow, pytest.mark.dist]

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = str(ROOT / "configs" / "tiny.yaml")
# the checkpoint's own image settings (tiny.yaml sets toy ones), small batches, a few tokens
COMMON = ["--config", TINY_YAML, "--data.min_pixels=0", "--data.max_pixels=0", "--data.synth_num_train=64",
          "--data.synth_num_eval=8", "--data.max_seq_len=256", "--data.token_budget=512", "--checkpoint.every=1"]
SFT = ["--sft.steps=2", "--sft.batch_size=4", "--optim.warmup_steps=0", "--optim.lr=1e-3"]
RL = ["--rl.steps=1", "--rl.prompts_per_step=2", "--rl.samples_per_prompt=2", "--rl.max_new_tokens=8",
      "--rl.num_prompts=8", "--rl.text_fraction=0.5", "--rl.critic_updates_per_step=1", "--rl.policy_lr=1e-3",
      "--rl.critic_lr=1e-3", "--rl.warmup_steps=0", "--rl.rollout_engine=hf",
      "--rl.entropy_coef=0.01"]  # a gradient even when every reward is 0, so the exported policy has moved
EVAL = ["--eval.num_text=2", "--eval.num_images=2", "--eval.num_samples=1", "--eval.max_new_tokens=8",
        "--eval.ks=[1]", "--eval.engine=hf", "--eval.reward_workers=1"]


def _run(env, nproc, *args, timeout=600):
    proc = subprocess.run([*torchrun(nproc), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, f"{args[:4]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def logprob_gaps(paths: list) -> dict:
    """{path: {"text": max |trainer - transformers|, "image": ...}}: the trainer's log-probs (sharded load, packed
    varlen batch, fused head) against transformers' own `from_pretrained` + forward, per sample. A world of one."""
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ovr_train.config import load_config
    from ovr_train.data import IGNORE, ImageRef, collate, encode_messages, image_processor
    from ovr_train.dist import init_distributed
    from ovr_train.model import build_sharded_model
    from ovr_train.tokenizer import load_tokenizer, special_ids

    image = Path(os.environ["OVR_CACHE"]) / "noise.png"
    Image.effect_noise((200, 180), 60).convert("RGB").save(image)  # 196x168: 14x12 patches, several ViT windows
    gaps = {}
    for path in paths:
        cfg = load_config(TINY_YAML, [f"--model.path={path}", "--data.min_pixels=0", "--data.max_pixels=0"])
        info = init_distributed(cfg.dist)
        tok = load_tokenizer(path)
        ids, proc = special_ids(tok), image_processor(cfg)
        convs = {"text": [("user", ["Compute (3 + 4) * 2."]), ("assistant", ["<think>7 * 2 = 14</think> \\boxed{14}"])],
                 "image": [("user", [ImageRef(str(image)), "How many dots?"]), ("assistant", ["Wait. \\boxed{3}"])]}
        encs = {k: encode_messages(c, tok, ids, proc) for k, c in convs.items()}
        assert int((encs["image"].input_ids == ids["image_pad"]).sum()) == 42  # the checkpoint's pixel bounds
        model = build_sharded_model(cfg, info, ids, len(tok))
        model.eval()
        batch = collate(list(encs.values()), packing=True, pad_id=ids["endoftext"], merge_size=proc.merge_size)
        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
        with torch.no_grad():
            got = model(**batch.model_inputs(), targets=batch.targets).logprobs
            start, gaps[path] = 0, {}
            for name, e in encs.items():
                mm = (e.input_ids == ids["image_pad"]).int()[None]
                logits = hf(input_ids=e.input_ids[None], pixel_values=e.pixel_values, image_grid_thw=e.grid_thw,
                            mm_token_type_ids=mm).logits[0]
                want = torch.log_softmax(logits.float(), -1).gather(1, e.targets.clamp_min(0)[:, None])[:, 0]
                mask = e.targets != IGNORE
                gaps[path][name] = float((got[start:start + e.length][mask] - want[mask]).abs().max())
                start += e.length
    return gaps


def test_sft_rl_eval_export_from_a_hub_checkpoint(hub_ckpt, tmp_path):
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ovr_train.model import _hf_key

    env = dict(os.environ, OVR_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests" / "train")]))
    env.pop("RANK", None)
    out = tmp_path / "run"
    _run(env, 2, "-m", "ovr_train.launch", "--stage", "sft", f"--model.path={hub_ckpt}", f"--run.out_dir={out}",
         *COMMON, *SFT)
    sft = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sft] == [1, 2] and all(r["loss"] == r["loss"] for r in sft)
    pre = json.loads((out / "sft" / "hf" / "preprocessor_config.json").read_text())
    assert (pre["min_pixels"], pre["max_pixels"]) == (3136, 12845056)  # the checkpoint's, not tiny.yaml's

    _run(env, 2, "-m", "ovr_train.launch", "--stage", "rl", f"--rl.init_from={out / 'sft' / 'hf'}",
         f"--run.out_dir={out}", *COMMON, *RL)
    rl = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rl] == [1] and rl[0]["logprob_gap"] < 1e-4  # rollouts sampled what is scored
    assert rl[0]["grad_norm"] > 0

    _run(env, 1, "-m", "ovr_train.launch", "--stage", "eval", f"--model.path={out / 'rl' / 'hf'}",
         f"--run.out_dir={out}", "--eval.label=rl", *COMMON, *EVAL)
    metrics = json.loads((out / "eval" / "rl.json").read_text())["metrics"]
    assert set(metrics) == {"synth_text", "synth_images"}

    # the export reloads (transformers' loader) to exactly the trained policy of the last RL checkpoint
    dcp_to_torch_save(str(out / "rl" / "checkpoints" / "step_00000001"), str(tmp_path / "rl.pt"))
    trained = torch.load(tmp_path / "rl.pt", weights_only=False)["policy"]["model"]
    want = {k[len("hf."):]: v for k, v in trained.items() if k.startswith("hf.")}
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "rl" / "hf", dtype=torch.float32).state_dict()
    assert set(reloaded) == set(want)
    for name, value in reloaded.items():
        assert torch.equal(value, want[name]), name
    on_disk = {}  # transformers 5 writes the original key layout back: the trainer's loader reads it the same
    for f in sorted((out / "rl" / "hf").glob("*.safetensors")):
        on_disk.update({_hf_key(k): v for k, v in load_file(str(f)).items()})
    assert set(on_disk) == set(trained) and all(torch.equal(on_disk[k], trained[k]) for k in on_disk)
    before = Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "sft" / "hf", dtype=torch.float32).state_dict()
    assert not torch.equal(before["lm_head.weight"], reloaded["lm_head.weight"])  # RL did train it
    hub = Qwen2_5_VLForConditionalGeneration.from_pretrained(hub_ckpt, dtype=torch.float32).state_dict()
    assert set(hub) == set(before) and not torch.equal(hub["lm_head.weight"], before["lm_head.weight"])  # SFT too

    # the trainer's log-probs == transformers' forward, on the hub layout and on the export
    script = (f"import json, test_hub_rehearsal as t; print('GAPS', json.dumps(t.logprob_gaps("
              f"{[str(hub_ckpt), str(out / 'rl' / 'hf')]!r})))")
    stdout = _run(env, 1, "-c", script)
    gaps = json.loads(stdout.split("GAPS", 1)[1])
    for path, by_kind in gaps.items():
        for kind, gap in by_kind.items():
            assert gap < 1e-5, (path, kind, gap)
