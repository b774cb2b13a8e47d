"""ovr side by side with TRL: the same tiny Qwen2.5-VL, prompts, data and settings, measured in one run.

Run: `make bench-trl` (= `python benchmarks/bench_vs_trl.py`): prints one table and writes
benchmarks/results/vs-trl-<device>-<date>.{json,md}. Needs the `peers` extra (`pip install -e ".[peers]"`: TRL and
accelerate); without TRL it exits with a clear reason. `--reps`, `--rl-steps`, `--sft-steps` change the sizes,
`--init DIR` starts both sides from another HF model (e.g. runs/tiny/sft/hf, so the reward curve can move), `--sdpa`
adds ovr's padded torch-SDPA mode as a third side, `--noshare` ovr with one prompt copy per sample in its RL update
(rl.share_prompts=false). One comparison at the defaults takes ~11 min on 2 busy cores (~13 with --sdpa).

Under pytest (`pytest benchmarks/ --benchmark-only`) `test_vs_trl` runs a one-repetition comparison only when
OVR_BENCH_TRL=1 is set and TRL imports; otherwise it skips with the reason, so CI spends nothing on it (the whole
comparison takes minutes, far over CI's budget for benchmarks).

What runs, each side as its own process tree (peak RSS = the largest sum of RSS over the tree, sampled every 0.1 s):
- model: the embedded default's tiny Qwen2.5-VL after a few cold-start SFT steps (`--stage sft`), exported as an
  HF directory with its tokenizer and image processor; both sides load that directory.
- RL: the embedded default's generated image questions (image only: TRL 1.16's GRPO cannot batch text-only rows
  beside image rows), exactly `steps * prompts_per_step` prompts so each side sees every prompt once; group size,
  max new tokens, temperature 1, top-p 1, no top-k, constant lr without warmup, AdamW(0.9, 0.95), grad clip 1,
  no KL, clip 0.2, ViT frozen, one optimizer step per rollout batch, group z-score advantages, token-level loss
  normalised by the batch's response tokens. ovr: `python -m ovr_train.launch --stage rl --rl.algo=grpo` (HF engine); TRL:
  GRPOTrainer (loss_type="dapo", scale_rewards="group", beta=0, transformers generate). The reward is ovr's
  verifier (`ovr_train.rewards.score`, 0 for a truncated response) on both sides.
- SFT: the same JSONL (`steps * batch_size` rows of the generated text corpus), batch, steps, lr, ViT frozen,
  loss on assistant tokens only. ovr: `--stage sft` (packed varlen micro-batches); TRL: SFTTrainer with
  padding_free=True (the batch concatenated into one row, no pad tokens).

Numbers: per RL step, generation / scoring / update seconds (ovr's "update" is its time_train_s + time_sync_s:
sequence building, the policy update (its forward gives the old log-probs too) and the weight push into its
rollout engine; TRL's is the rest of its step after generation and scoring), generated tokens/s = response tokens / generation s,
trained tokens/s = response (loss) tokens / update s; SFT tokens/s = non-pad tokens / step s. Step 1 of each run is
warm-up and left out of the rates. Each side runs `--reps` times, interleaved, and every repetition is reported.
"""

import argparse
import datetime
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:  # run as a script: this tree's ovr_train, not an installed one
    sys.path.insert(0, str(ROOT))

# One place for every setting both sides share (see the module docstring for what each side does with them).
SETTINGS = {
    "rl_steps": 4, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 48, "temperature": 1.0,
    "rl_lr": 3e-4, "text_fraction": 0.0, "sft_steps": 5, "sft_batch_size": 16, "sft_lr": 3e-3,
    "init_sft_steps": 2, "threads": 2, "seed": 0,
}


def trl_missing_reason():
    """None when TRL (and accelerate) import, else why the comparison cannot run."""
    try:
        import trl  # noqa: F401
    except ImportError as e:
        return f"TRL is not installed ({e}): `pip install -e \".[peers]\"` to run the comparison with TRL"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Inputs shared by both sides
# ----------------------------------------------------------------------------------------------------------------


def _env(threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", WANDB_DISABLED="true")
    env.pop("TRITON_INTERPRET", None)  # the trainer picks its CPU paths itself
    return env


def prepare(work: Path, s: dict, init: str = "") -> dict:
    """HF model dir, RL prompt JSONL (+ PNGs) and SFT JSONL under `work` (reused when present)."""
    from ovr_train import synth_images, synth_text
    from ovr_train.synth_text import ensure_corpus

    work.mkdir(parents=True, exist_ok=True)
    hf = Path(init) if init else work / "init" / "sft" / "hf"
    if not (hf / "config.json").is_file():
        if init:
            raise ValueError(f"--init {init!r} is not an HF model directory (no config.json)")
        run_tree([sys.executable, "-m", "ovr_train.launch", "--stage", "sft", f"--sft.steps={s['init_sft_steps']}",
                  "--checkpoint.every=0", "--sft.init_from=none", f"--run.out_dir={work / 'init'}"],
                 _env(s["threads"]), work / "init.log")
    n_prompts = s["rl_steps"] * s["prompts_per_step"]
    n_text = round(n_prompts * s["text_fraction"])
    prompts, img_dir = work / "rl_prompts.jsonl", work / "rl_images"
    img_dir.mkdir(exist_ok=True)
    rows = [{"id": f"text-{i}", "question": r["messages"][0]["content"], "answer": r["answer"]}
            for i, r in enumerate(synth_text.generate_items(n_text, s["seed"], "train"))]
    for i in range(n_prompts - n_text):
        r = synth_images.make_item(i, s["seed"], "train")
        r["image"].save(img_dir / f"{i}.png")
        rows.append({"id": f"image-{i}", "question": r["question"], "answer": r["answer"],
                     "images": [f"rl_images/{i}.png"]})
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = ensure_corpus("", 8000, 1000, s["seed"])[0]
    sft = work / "sft.jsonl"
    with open(corpus, encoding="utf-8") as f:
        lines = [next(f) for _ in range(s["sft_steps"] * s["sft_batch_size"])]
    sft.write_text("".join(lines))
    return {"hf": str(hf), "prompts": str(prompts), "sft": str(sft)}


# ----------------------------------------------------------------------------------------------------------------
# Measuring one process tree
# ----------------------------------------------------------------------------------------------------------------


def run_tree(cmd, env, log: Path) -> dict:
    """Run `cmd`; wall seconds and the peak of the summed RSS of it and all its descendants (MiB)."""
    import psutil

    peak, done = [0.0], threading.Event()
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

        def sample():
            root = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                    peak[0] = max(peak[0], total / 2**20)
                except psutil.Error:
                    pass
                done.wait(0.1)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        rc = proc.wait()
        done.set()
        th.join()
    if rc != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed (exit {rc}); log: {log}\n{log.read_text()[-3000:]}")
    return {"wall_s": time.perf_counter() - t0, "peak_rss_mib": peak[0]}


def _rates(steps: list) -> dict:
    """Aggregate per-step records (step 1 left out as warm-up when there are more)."""
    use = steps[1:] if len(steps) > 1 else steps
    tot = {k: sum(r[k] for r in use) for k in use[0] if isinstance(use[0][k], (int, float))}
    out = {k: tot[k] / len(use) for k in tot if k.endswith("_s")}
    if "response_tokens" in tot:
        out["gen_tok_s"] = tot["response_tokens"] / max(tot["gen_s"], 1e-9)
        out["train_tok_s"] = tot["response_tokens"] / max(tot["update_s"], 1e-9)
    if "tokens" in tot:
        out["tok_s"] = tot["tokens"] / max(tot["step_s"], 1e-9)
    out["reward_curve"] = [round(r["reward"], 4) for r in steps if "reward" in r]
    return out


# ovr's configurations: its default (packed varlen micro-batches: on CPU the attention is the plain-PyTorch
# reference of its GPU kernel, one segment at a time) and its padded mode (torch SDPA over padded micro-batches).
OVR_VARIANTS = {"ovr": [], "ovr-sdpa": ["--data.packing=false", "--model.attn_implementation=sdpa"],
                "ovr-noshare": ["--rl.share_prompts=false"]}


def run_ovr_rl(work: Path, inp: dict, s: dict, rep: int, side: str = "ovr") -> dict:
    out = work / f"{side}_rl_{rep}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, never a resumed or appended one
    m = s["max_new_tokens"]
    cmd = [sys.executable, "-m", "ovr_train.launch", "--stage", "rl", f"--run.out_dir={out}",
           f"--rl.init_from={inp['hf']}", f"--rl.prompt_files=[{inp['prompts']}]", f"--rl.steps={s['rl_steps']}",
           f"--rl.prompts_per_step={s['prompts_per_step']}", f"--rl.samples_per_prompt={s['group_size']}",
           f"--rl.max_new_tokens={m}", f"--rl.length_curriculum=[[0,{m}]]", "--rl.algo=grpo",
           f"--rl.policy_lr={s['rl_lr']}", "--rl.warmup_steps=0", f"--rl.temperature={s['temperature']}",
           "--rl.top_p=1.0", "--rl.reward_workers=1", "--checkpoint.every=0", "--checkpoint.export_hf=false",
           "--checkpoint.resume=false", "--eval.every_n_steps=0", f"--run.seed={s['seed']}",
           f"--dist.cpu_threads={s['threads']}", "--optim.grad_clip=1.0", *OVR_VARIANTS[side]]
    tree = run_tree(cmd, _env(s["threads"]), work / f"{side}_rl_{rep}.log")
    recs = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [{"gen_s": r["time_rollout_s"], "score_s": r["time_reward_s"],
              "update_s": r["time_train_s"] + r["time_sync_s"],
              "step_s": r["time_rollout_s"] + r["time_reward_s"] + r["time_train_s"] + r["time_sync_s"],
              "response_tokens": r["response_len"] * s["prompts_per_step"] * s["group_size"],
              "reward": r["reward_mean"]} for r in recs]
    return {**tree, **_rates(steps), "steps": steps}


def run_trl(kind: str, work: Path, inp: dict, s: dict, rep: int) -> dict:
    res = work / f"trl_{kind}_{rep}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--work", str(work),
           "--settings", json.dumps(s), "--inputs", json.dumps(inp), "--result", str(res)]
    tree = run_tree(cmd, _env(s["threads"]), work / f"trl_{kind}_{rep}.log")
    steps = json.loads(res.read_text())["steps"]
    return {**tree, **_rates(steps), "steps": steps}


def run_ovr_sft(work: Path, inp: dict, s: dict, rep: int, side: str = "ovr") -> dict:
    out = work / f"{side}_sft_{rep}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "ovr_train.launch", "--stage", "sft", f"--run.out_dir={out}",
           f"--sft.init_from={inp['hf']}", f"--data.train_files=[{inp['sft']}]", f"--sft.steps={s['sft_steps']}",
           f"--sft.batch_size={s['sft_batch_size']}", f"--optim.lr={s['sft_lr']}", "--optim.warmup_steps=0",
           "--optim.schedule=constant", "--optim.grad_clip=1.0", "--checkpoint.every=0",
           "--checkpoint.export_hf=false", "--checkpoint.resume=false", f"--run.seed={s['seed']}",
           f"--dist.cpu_threads={s['threads']}", *OVR_VARIANTS[side]]
    tree = run_tree(cmd, _env(s["threads"]), work / f"{side}_sft_{rep}.log")
    recs = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [{"step_s": r["step_time_s"], "tokens": r["tokens_per_s"] * r["step_time_s"], "loss": r["loss"]}
             for r in recs]
    return {**tree, **_rates(steps), "steps": steps}


# ----------------------------------------------------------------------------------------------------------------
# The TRL side (run in its own process: `--worker rl|sft`)
# ----------------------------------------------------------------------------------------------------------------


def _trl_common(s: dict, out_dir: str, steps: int, lr: float, batch: int) -> dict:
    return {"output_dir": out_dir, "max_steps": steps, "learning_rate": lr, "lr_scheduler_type": "constant",
            "warmup_steps": 0, "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_epsilon": 1e-8, "weight_decay": 0.0,
            "max_grad_norm": 1.0, "per_device_train_batch_size": batch, "gradient_accumulation_steps": 1,
            "logging_steps": 1, "save_strategy": "no", "report_to": [], "use_cpu": True, "bf16": False, "fp16": False,
            "seed": s["seed"], "dataloader_num_workers": 0, "disable_tqdm": True}


class _StepTimer:
    """TrainerCallback-shaped: wall seconds of every optimizer step and the logs TRL writes after it."""

    def __init__(self):
        self.t0, self.steps, self.logs = 0.0, [], []

    def __getattr__(self, name):  # every other callback event is a no-op
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.steps.append(time.perf_counter() - self.t0)

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs or {}))


DEFAULT_SYSTEM = ("{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
                  "assistant.<|im_end|>\n{% endif %}")


def _tokenizer(hf: str):
    """The exported tokenizer with its chat template's default system turn removed: ovr's own encoder adds no system
    turn when data.system_prompt is empty (the embedded default), so both sides see the same prompt tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf)
    if DEFAULT_SYSTEM not in tok.chat_template:
        raise ValueError(f"{hf}: chat template has no default system turn to remove; prompts would differ")
    tok.chat_template = tok.chat_template.replace(DEFAULT_SYSTEM, "")
    return tok


def _processor(hf: str):
    """Qwen2_5_VLProcessor from the exported tokenizer and image processor. AutoProcessor would also build the video
    processor, which needs torchvision (not importable beside this torch); images need none of it."""
    from transformers import AutoImageProcessor, Qwen2_5_VLProcessor

    class ImageOnly(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" and arg is None else super().check_argument_for_proper_class(
                name, arg)

    tok = _tokenizer(hf)
    # TRL left-pads the prompt ids it generates from but takes mm_token_type_ids from this processor's own padding:
    # right padding (the exported tokenizer's default) shifts the image positions of every shorter prompt
    tok.padding_side = "left"
    return ImageOnly(image_processor=AutoImageProcessor.from_pretrained(hf), tokenizer=tok, video_processor=None,
                     chat_template=tok.chat_template)


def trl_rl_worker(s: dict, inp: dict, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import Qwen2_5_VLForConditionalGeneration
    from trl import GRPOConfig, GRPOTrainer

    from ovr_train.data import load_image
    from ovr_train.rewards import score
    from ovr_train.rollout import blocked_token_ids
    from ovr_train.tasks import load_items
    from ovr_train.tokenizer import special_ids

    torch.set_num_threads(s["threads"])
    items = load_items(inp["prompts"])  # no answer instruction: tiny.yaml sets data.answer_instruction ""
    rows = []
    for it in items:
        (_, parts), = it.messages
        rows.append({"prompt": [{"role": "user", "content": parts[-1]}], "answer": it.gold,
                     "images": [load_image(p) for p in parts[:-1]]})
    processor = _processor(inp["hf"])
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(inp["hf"], dtype=torch.float32,
                                                               attn_implementation="sdpa")
    model.model.visual.requires_grad_(False)  # as ovr's RL (model.freeze_vision, its default): no ViT gradient
    # ovr's sampler never samples special tokens; without the same rule TRL can sample an <|image_pad|>, and its
    # next forward then fails on the image-token count (transformers' get_rope_index)
    blocked = blocked_token_ids(special_ids(processor.tokenizer), len(processor.tokenizer),
                                model.get_output_embeddings().weight.shape[0])
    ends = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
               else [model.generation_config.eos_token_id])
    timing = {"gen_s": 0.0, "score_s": 0.0, "response_tokens": 0}

    def reward(prompts, completions, completion_ids, answer, **kw):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        timing["response_tokens"] += sum(len(c) for c in completion_ids)
        return [score(t, a, truncated=not any(x in ends for x in ids))
                for t, a, ids in zip(texts, answer, completion_ids)]

    class Timed(GRPOTrainer):
        def _generate(self, prompts):
            t = time.perf_counter()
            out = super()._generate(prompts)
            timing["gen_s"] += time.perf_counter() - t
            return out

        def _calculate_rewards(self, *a, **k):
            t = time.perf_counter()
            out = super()._calculate_rewards(*a, **k)
            timing["score_s"] += time.perf_counter() - t
            return out

    batch = s["prompts_per_step"] * s["group_size"]
    args = GRPOConfig(**_trl_common(s, str(work / "trl_rl_out"), s["rl_steps"], s["rl_lr"], batch),
                      num_generations=s["group_size"], max_completion_length=s["max_new_tokens"],
                      temperature=s["temperature"], top_p=1.0, top_k=0, beta=0.0, epsilon=0.2,
                      loss_type="dapo", scale_rewards="group", num_iterations=1, steps_per_generation=1,
                      use_vllm=False, log_completions=False, shuffle_dataset=True,
                      generation_kwargs={"suppress_tokens": blocked})
    timer = _StepTimer()
    trainer = Timed(model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows),
                    processing_class=processor, callbacks=[timer])
    steps, last = [], dict(timing)

    class PerStep(_StepTimer):
        def on_step_end(self, *a, **k):
            now = dict(timing)
            steps.append({k: now[k] - last[k] for k in now})
            last.update(now)

    trainer.add_callback(PerStep())
    trainer.train()
    rewards = [lg["reward"] for lg in timer.logs if "reward" in lg]
    for rec, dt, r in zip(steps, timer.steps, rewards):
        rec.update(step_s=dt, update_s=dt - rec["gen_s"] - rec["score_s"], reward=r)
    return {"steps": steps}


def trl_sft_worker(s: dict, inp: dict, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import Qwen2_5_VLForConditionalGeneration
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(s["threads"])
    rows = []
    for line in Path(inp["sft"]).read_text().splitlines():
        msgs = json.loads(line)["messages"]
        rows.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
    tok = _tokenizer(inp["hf"])
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(inp["hf"], dtype=torch.float32,
                                                               attn_implementation="sdpa")
    model.model.visual.requires_grad_(False)  # as ovr's cold start: the ViT sees no images
    args = SFTConfig(**_trl_common(s, str(work / "trl_sft_out"), s["sft_steps"], s["sft_lr"], s["sft_batch_size"]),
                     padding_free=True, packing=False, completion_only_loss=True, max_length=None,
                     dataset_num_proc=1)
    timer = _StepTimer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[timer])
    trainer.train()
    logs = [lg for lg in timer.logs if "loss" in lg]
    seen = [0] + [lg["num_tokens"] for lg in logs]  # TRL's running count of non-pad tokens
    tokens = [b - a for a, b in itertools.pairwise(seen)]
    losses = [lg["loss"] for lg in logs]
    return {"steps": [{"step_s": dt, "tokens": n, "loss": lo} for dt, n, lo in zip(timer.steps, tokens, losses)]}


# ----------------------------------------------------------------------------------------------------------------
# Table, results, entry points
# ----------------------------------------------------------------------------------------------------------------

DIFFERENCES = [
    ("sampler: ovr's HF engine samples with Gumbel-max on a seeded generator, TRL with transformers' multinomial "
     "sampling (top_k=0); both never sample the special tokens but the two end tokens (image pads, vision markers; "
     "TRL: suppress_tokens)"),
    ("old log-probs: strictly on-policy (one optimizer step per batch, no mismatch correction) both sides take them "
    "from the update's own forward, detached (ovr: rl.old_logprobs=auto); neither runs a separate no-grad pass"),
    ("ovr's update also pushes the new weights into its rollout engine's separate model copy; TRL generates with the "
    "training model itself (nothing to push)"),
    ("batching: ovr packs sequences into token-budget varlen micro-batches (its varlen attention op: on CPU torch "
    "SDPA over length-sorted groups of padded sequences, on GPU its Triton kernel); TRL pads the "
    "RL batch to the longest sequence (sdpa) and, in SFT, concatenates the batch padding-free (sdpa, position ids)"),
    "scoring: ovr scores in a verifier subprocess pool with a hard timeout; TRL calls the same verifier in-process",
    "advantages: both z-score per group with the unbiased std; ovr adds 1e-6 to the std, TRL 1e-4",
    "loss normalisation: both sum token losses over the batch and divide by its response tokens (TRL 'dapo')",
    "prompt order: each side shuffles the same prompt set with its own sampler (each prompt once per run)",
    ("prompts: image questions only (TRL 1.16's GRPO cannot batch text-only rows beside image rows); the chat "
     "template's default system turn is removed on the TRL side, as ovr adds none when data.system_prompt is empty"),
]


def _fmt(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def table(results: dict):
    """One markdown table (every repetition of each side, then the ratios of medians to TRL's) and the ratios."""
    lines = [("| run | gen s/step | score s/step | update s/step | gen tok/s | trained tok/s (RL update) | RL peak RSS "
             "MiB | SFT tok/s | SFT peak RSS MiB | reward per step |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    med = {}
    for side in results:
        for i, (rl, sft) in enumerate(zip(results[side]["rl"], results[side]["sft"])):
            lines.append(f"| {side} #{i + 1} | {_fmt(rl['gen_s'], 2)} | {_fmt(rl['score_s'], 3)} | "
                         f"{_fmt(rl['update_s'], 2)} | {_fmt(rl['gen_tok_s'])} | {_fmt(rl['train_tok_s'])} | "
                         f"{_fmt(rl['peak_rss_mib'], 0)} | {_fmt(sft['tok_s'])} | {_fmt(sft['peak_rss_mib'], 0)} | "
                         f"{' '.join(f'{r:.2f}' for r in rl['reward_curve'])} |")
        med[side] = {k: statistics.median(r[k] for r in results[side][st]) for st, keys in
                     (("rl", ("gen_s", "score_s", "update_s", "gen_tok_s", "train_tok_s", "peak_rss_mib")),
                      ("sft", ("tok_s",))) for k in keys}
        med[side]["sft_peak_rss_mib"] = statistics.median(r["peak_rss_mib"] for r in results[side]["sft"])
    t, ratios = med["trl"], {}
    for side in (x for x in results if x != "trl"):
        o = med[side]
        q = {"gen_s": o["gen_s"] / t["gen_s"], "score_s": o["score_s"] / max(t["score_s"], 1e-9),
             "update_s": o["update_s"] / t["update_s"], "gen_tok_s": o["gen_tok_s"] / t["gen_tok_s"],
             "rl_train_tok_s": o["train_tok_s"] / t["train_tok_s"],
             "rl_peak_rss": o["peak_rss_mib"] / t["peak_rss_mib"],
             "sft_tok_s": o["tok_s"] / t["tok_s"], "sft_peak_rss": o["sft_peak_rss_mib"] / t["sft_peak_rss_mib"]}
        r = {k: f"{v:.2f}x" for k, v in q.items()}
        lines.append(f"| {side} / TRL (medians) | {r['gen_s']} | {r['score_s']} | {r['update_s']} | {r['gen_tok_s']} | "
                     f"**{r['rl_train_tok_s']}** | {r['rl_peak_rss']} | **{r['sft_tok_s']}** | {r['sft_peak_rss']} | |")
        ratios.update({f"{side.replace('-', '_')}_over_trl_{k}": round(v, 4) for k, v in q.items()})
    return "\n".join(lines), ratios


def environment() -> dict:
    import importlib.util

    import torch
    import transformers
    import trl

    spec = importlib.util.spec_from_file_location("_ovr_bench_conftest", ROOT / "benchmarks" / "conftest.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)  # the benchmarks' device / git-sha helpers, by path (not as a test conftest)
    return {"device": helpers._cpu_name(), "cpu_cores": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "python": platform.python_version(),
            "git_sha": helpers._git_sha(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def compare(work: Path, s: dict, reps: int, init: str = "", save: bool = True, sdpa: bool = False,
            noshare: bool = False) -> dict:
    """Prepare the inputs, run each side `reps` times interleaved (the order reversed every other repetition), print
    and (optionally) save the table. sdpa: also run ovr's padded SDPA mode (the "ovr-sdpa" rows); noshare: also ovr
    with one prompt copy per sample (rl.share_prompts=false, the "ovr-noshare" rows)."""
    inp = prepare(work, s, init)
    sides = ["ovr", *(["ovr-sdpa"] if sdpa else []), *(["ovr-noshare"] if noshare else []), "trl"]
    results = {side: {"rl": [], "sft": []} for side in sides}
    for rep in range(reps):
        for side in sides if rep % 2 == 0 else sides[::-1]:
            print(f"[vs-trl] rep {rep + 1}/{reps}: {side} RL ...", flush=True)
            results[side]["rl"].append(run_trl("rl", work, inp, s, rep) if side == "trl" else
                                       run_ovr_rl(work, inp, s, rep, side))
            print(f"[vs-trl] rep {rep + 1}/{reps}: {side} SFT ...", flush=True)
            results[side]["sft"].append(run_trl("sft", work, inp, s, rep) if side == "trl" else
                                        run_ovr_sft(work, inp, s, rep, side))
    env = environment()
    text, ratios = table(results)
    head = (f"{env['device']} ({env['cpu_cores']} cores), torch {env['torch']}, transformers {env['transformers']}, "
            f"TRL {env['trl']}, ovr {env['git_sha'][:10]}, {env['date']}; 1 process per side, "
            f"{s['threads']} threads; settings {json.dumps(s)}")
    print(head + "\n\n" + text)
    out = {"env": env, "settings": s, "results": results, "ratios": ratios, "table": text,
           "differences": DIFFERENCES}
    if save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = RESULTS / f"vs-trl-cpu-{os.cpu_count()}core-{env['date'][:10]}"
        stem.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
        stem.with_suffix(".md").write_text(f"# ovr vs TRL\n\n{head}\n\n{text}\n\nSettings that differ:\n\n" +
                                           "".join(f"- {d}\n" for d in DIFFERENCES))
        print(f"[vs-trl] wrote {stem}.json / .md")
    return out


def test_vs_trl(benchmark, tmp_path):
    """The comparison at one repetition; runs only with OVR_BENCH_TRL=1 and TRL installed (see the docstring).
    The ratios (ovr / TRL, > 1: ovr faster or larger) land in the benchmark's extra_info."""
    import pytest

    if os.environ.get("OVR_BENCH_TRL") != "1":
        pytest.skip("ovr vs TRL takes minutes: set OVR_BENCH_TRL=1 to run it (or `make bench-trl`)")
    reason = trl_missing_reason()
    if reason:
        pytest.skip(reason)
    out = benchmark.pedantic(compare, args=(tmp_path, dict(SETTINGS), 1), kwargs={"save": False}, rounds=1,
                             iterations=1)
    benchmark.extra_info.update(out["env"], **out["ratios"])
    for side in ("ovr", "trl"):
        assert out["results"][side]["rl"][0]["train_tok_s"] > 0 and out["results"][side]["sft"][0]["tok_s"] > 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="", help="scratch directory (default: a fresh one under /tmp)")
    p.add_argument("--reps", type=int, default=2, help="repetitions of each side, interleaved")
    p.add_argument("--rl-steps", type=int, default=SETTINGS["rl_steps"])
    p.add_argument("--sft-steps", type=int, default=SETTINGS["sft_steps"])
    p.add_argument("--init", default="", help="HF model dir both sides start from (default: a few SFT steps)")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    p.add_argument("--sdpa", action="store_true", help="also run ovr's padded torch-SDPA mode (data.packing=false)")
    p.add_argument("--noshare", action="store_true",
                   help="also run ovr with one prompt copy per sample in the RL update (rl.share_prompts=false)")
    p.add_argument("--worker", choices=("rl", "sft"), help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        fn = trl_rl_worker if a.worker == "rl" else trl_sft_worker
        Path(a.result).write_text(json.dumps(fn(json.loads(a.settings), json.loads(a.inputs), Path(a.work))))
        return 0
    reason = trl_missing_reason()
    if reason:
        print(f"[vs-trl] skipped: {reason}")
        return 0
    if a.reps < 1 or a.rl_steps < 1 or a.sft_steps < 1:
        p.error("--reps, --rl-steps and --sft-steps must be >= 1")
    import tempfile

    s = dict(SETTINGS, rl_steps=a.rl_steps, sft_steps=a.sft_steps)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="ovr-vs-trl-"))
    compare(work, s, a.reps, a.init, save=not a.no_save, sdpa=a.sdpa, noshare=a.noshare)
    return 0


if __name__ == "__main__":
    sys.exit(main())
