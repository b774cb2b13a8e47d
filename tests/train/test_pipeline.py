"""`--stage all` end to end (base -> eval -> sft -> eval -> rl -> eval -> report) on a shrunken model and step counts
through the real launcher (torchrun, 2 ranks, gloo), run twice with the same seed: report sections, plots, per-stage
evals and determinism. Plus the pieces: the base stage's perception corpus, its config, the SFT init resolution."""

import json
import math
import os
import re
import statistics
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from shared_runs import torchrun

from ovr_train import synth_images
from ovr_train.behaviors import BEHAVIORS
from ovr_train.config import load_config
from ovr_train.pipeline import behaviour_accuracy, blind_baseline, distinct, std_error
from ovr_train.report import BLIND_ROW, CEILING_ROW, PLOTS, SECTIONS, aggregate, claims, main
from ovr_train.rewards import extract_boxed
from ovr_train.sft import base_stage_config, resolve_sft_init
from ovr_train.synth_images import PERCEPTION_TASKS, ensure_perception_corpus

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model.hidden_size=64", "--model.intermediate_size=128", "--model.num_layers=2",
        "--model.mrope_section=[2,3,3]", "--model.vision_depth=1", "--model.vision_hidden_size=32",
        "--model.vision_intermediate_size=64", "--model.vision_num_heads=2", "--model.vision_fullatt_blocks=[0]"]
SHORT = ["--base.steps=3", "--base.batch_size=8", "--base.num_train=64", "--sft.steps=3", "--sft.batch_size=8",
         "--data.synth_num_train=64", "--data.synth_num_eval=8", "--data.token_budget=512", "--rl.steps=2",
         "--rl.prompts_per_step=4", "--rl.samples_per_prompt=2", "--rl.num_prompts=16", "--rl.max_new_tokens=16",
         "--rl.length_curriculum=[[0,16]]", "--rl.critic_updates_per_step=1", "--eval.num_text=4",
         "--eval.num_images=6", "--eval.num_perception=4", "--eval.num_samples=2", "--eval.max_new_tokens=16",
         "--checkpoint.every=0"]


def _run_all(out: Path, cache: Path) -> subprocess.CompletedProcess:
    cmd = [*torchrun(2), "-m", "ovr_train.launch", "--stage", "all", f"--run.out_dir={out}",
           f"--data.cache_dir={cache}", *TINY, *SHORT]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.dist
@pytest.mark.slow
def test_stage_all_end_to_end_and_deterministic(tmp_path):
    cache = tmp_path / "cache"
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        _run_all(out, cache)
    out = runs[0]
    report = (out / "report.md").read_text()
    positions = [report.find(s) for s in SECTIONS]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), positions
    for name in PLOTS:
        png = out / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"plots/{name}" in report
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["evals"]) == ["base", "sft", "rl"]
    for stage in ("base", "sft", "rl"):
        assert (out / stage / "hf" / "config.json").is_file()
        metrics = summary["evals"][stage]["metrics"]
        assert {k: m["num_questions"] for k, m in metrics.items()} == {"synth_text": 4, "synth_images": 6,
                                                                         "synth_perception": 4}
        assert all(m["num_samples"] == 2 and 0 <= m["pass@1"] <= 1 for m in metrics.values())
        assert summary["times"][f"{stage}_train_s"] > 0 and summary["times"][f"{stage}_eval_s"] > 0
        per_q = json.loads((out / "eval" / f"{stage}.json").read_text())["questions"]
        assert len(per_q["synth_images"]) == 6
        assert all(r["group"].startswith(("more_than|", "total_two|", "digit_")) for r in per_q["synth_images"])
        assert summary["evals"][stage]["distinct"]["synth_images"] == len({r["group"] for r in per_q["synth_images"]})
        assert set(summary["evals"][stage]["behaviour_accuracy"]["synth_images"]) == set(BEHAVIORS)
    assert set(summary["evals"]["rl"]["by_task"]["synth_images"]) == {"more_than", "total_two", "digit_sum",
                                                                      "digit_diff"}
    # the table shows what the summary holds (no recomputation in the report)
    acc = summary["evals"]["rl"]["metrics"]["synth_images"]["pass@1"]
    assert any(line.startswith("| rl |") and f"{acc:.3f}" in line for line in report.splitlines())
    # the image-blind prior and ceiling of the run's held-out image sets, beside the stages and in the claims
    assert set(summary["blind"]) == {"synth_images", "synth_perception"}
    assert all(0 <= summary["blind"][n][k] <= 1 for n in summary["blind"] for k in ("prior", "majority", "ceiling"))
    assert all(f"| {r} |" in report for r in (BLIND_ROW, CEILING_ROW)) and "3. RL's held-out image accuracy" in report
    rl_metrics = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert len(rl_metrics) == 2 and all("reward_image" in r and "reward_text" in r for r in rl_metrics)
    # the SFT stage started from the base stage's export; model.freeze_vision=false (the tiny default, so that RL
    # trains the ViT) leaves the ViT of the text-only cold start exactly as the base stage left it: zero gradients
    sft_cfg = load_config(str(out / "sft" / "config.yaml"))
    assert sft_cfg.model.path == str(out / "base" / "hf") and not sft_cfg.model.freeze_vision
    vit = [{k: v for k, v in load_file(str(f)).items() if "visual." in k}
           for f in (next((out / s / "hf").glob("*.safetensors")) for s in ("base", "sft"))]
    assert vit[0] and vit[0].keys() == vit[1].keys() and all(torch.equal(vit[0][k], vit[1][k]) for k in vit[0])

    # same seed -> same numbers: training losses, RL rewards, every held-out answer
    for stage in ("base", "sft"):
        losses = [[json.loads(line)["loss"] for line in (r / stage / "metrics.jsonl").read_text().splitlines()]
                  for r in runs]
        assert losses[0] == losses[1], stage
    other = [json.loads(line) for line in (runs[1] / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward_mean"] for r in rl_metrics] == [r["reward_mean"] for r in other]
    for stage in ("base", "sft", "rl"):
        qa, qb = (json.loads((r / "eval" / f"{stage}.json").read_text())["questions"] for r in runs)
        assert qa == qb, stage

    # the two runs aggregated (the seeds table of the docs): every stage, the same numbers twice, spread 0
    table = aggregate(runs)
    assert all(f"| {s} |" in table for s in ("base", "sft", "rl")) and "+- 0.000" in table


def test_report_cli_refuses_missing_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([])
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert f"no summary.json (written at the end of a `--stage all` run) in: {tmp_path}" in capsys.readouterr().err


def _fake_run(path, seed, acc, se, image_rates, rollouts, blind=None):
    """A run directory with a summary.json (acc[stage][set], one s.e. for all; `blind`: the image-blind ceiling of
    synth_images, its prior 0.05 below) and an RL metrics.jsonl."""
    evals = {}
    for stage, sets in acc.items():
        metrics = {n: {"pass@1": a, "num_questions": 600, "num_samples": 2} for n, a in sets.items()}
        for b in BEHAVIORS:
            metrics["synth_images"][f"behavior/{b}"] = image_rates[stage].get(b, 0.0)
            metrics["synth_text"][f"behavior/{b}"] = 0.5
        shown = {"with": 0.4 + 0.1 * seed, "n_with": 100, "without": 0.2, "n_without": 50, "within_task": 0.1}
        evals[stage] = {"metrics": metrics, "stderr": {n: se for n in sets}, "by_task": {},
                        "behaviour_accuracy": {"synth_images": {"verification": shown, "reflection": {
                            "with": None, "n_with": 0, "without": 0.3, "n_without": 150, "within_task": None}}}}
    times = {f"{s}_{k}_s": 1.0 for s in acc for k in ("train", "eval")} | {"total_s": 60.0}
    path.mkdir(parents=True)
    summary = {"seed": seed, "evals": evals, "times": times}
    if blind is not None:
        summary["blind"] = {"synth_images": {"prior": blind - 0.05, "majority": blind, "ceiling": blind,
                                             "by_task": {}}}
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "rl").mkdir()
    (path / "rl" / "metrics.jsonl").write_text("\n".join(json.dumps({"step": i + 1, **r})
                                                         for i, r in enumerate(rollouts)))


def test_aggregate_claims_and_behaviour_change(tmp_path):
    acc = [{"base": {"synth_text": 0.10, "synth_images": 0.20}, "sft": {"synth_text": 0.30, "synth_images": 0.10},
            "rl": {"synth_text": 0.31, "synth_images": 0.26}},
           {"base": {"synth_text": 0.10, "synth_images": 0.22}, "sft": {"synth_text": 0.34, "synth_images": 0.12},
            "rl": {"synth_text": 0.30, "synth_images": 0.24}}]
    rates = [{"base": {}, "sft": {"verification": 0.2, "reflection": 0.4}, "rl": {"verification": 0.5}},
             {"base": {}, "sft": {"verification": 0.1, "reflection": 0.3}, "rl": {"verification": 0.3,
                                                                                  "reflection": 0.35}}]
    # 20 steps: the first and last 10% are steps 1-2 and 19-20
    rollouts = [{"behav/image/verification": 0.1 if i < 2 else (0.9 if i >= 18 else 0.5),
                 "behav/text/verification": 1.0, "behav/transfer/verification": float("nan") if i == 0 else 0.2}
                for i in range(20)]
    runs = [tmp_path / "s0", tmp_path / "s1"]
    for i, run in enumerate(runs):
        _fake_run(run, i, acc[i], 0.01, rates[i], rollouts, blind=0.25)
    lines = aggregate(runs).splitlines()
    row = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ")}
    # image: +0.16 and +0.12, each s.e. hypot(0.01, 0.01); pooled +0.14 +- sqrt(2 * 0.0002) / 2
    assert row["image: RL - cold start"] == ("| image: RL - cold start | +0.160 +- 0.014 | +0.120 +- 0.014 | "
                                             "+0.140 +- 0.010 | **above** |")
    assert row["image: RL - base"].endswith("| +0.040 +- 0.010 | **above** |")
    # the image-blind ceiling (0.25, a constant of the set) against RL 0.26 / 0.24, each RL's own s.e. 0.01
    assert row["image: RL - image-blind ceiling"] == ("| image: RL - image-blind ceiling | +0.010 +- 0.010 | "
                                                      "-0.010 +- 0.010 | +0.000 +- 0.007 | **not below** |")
    assert row[BLIND_ROW].startswith(f"| {BLIND_ROW} | - | 0.200 +- 0.000")
    assert row[CEILING_ROW].startswith(f"| {CEILING_ROW} | - | 0.250 +- 0.000")
    # text: +0.01 and -0.04 -> pooled -0.015 +- 0.010: within 2 s.e. of zero
    assert row["text: RL - cold start"].endswith("| -0.015 +- 0.010 | **not below** |")
    # rollouts 0.1 -> 0.9 on images, transfer skips the NaN step; held-out 0.15 -> 0.40, up in both runs
    assert row["verification"] == ("| verification | 0.100 -> 0.900 | 1.000 -> 1.000 | 0.200 -> 0.200 | "
                                   "0.150 -> 0.400 | yes |")
    assert row["reflection"].endswith("| 0.350 -> 0.175 | no |")  # down in run 0 (0.4 -> 0), up in run 1
    # accuracy with vs without verification: the mean over runs, samples summed; never-shown behaviours left out
    shown = lines[next(i for i, line in enumerate(lines) if line.startswith("Behaviours and right answers")):]
    shown = [line for line in shown[:next(i for i, line in enumerate(shown) if line.startswith("| run |"))]
             if line.startswith("| ") and "---" not in line][1:]
    assert shown == [f"| {s} | verification | 0.450 (200) | 0.200 (100) | +0.100 |" for s in ("base", "sft", "rl")]


def test_blind_baseline_is_the_train_answer_prior(monkeypatch):
    # train: task a answers 1, 1, 1, 2 and task b 3, 3; held out: a 1, 2 and b 3, 4, 3
    answers = {"train": {"more_than": ["1", "1", "1", "2"], "total_two": ["3", "3"]},
               "test": {"more_than": ["1", "2"], "total_two": ["3", "4", "3"]}}

    def fake_dataset(num, seed=0, split="train", tasks=(), **_):
        return [{"task": t, "answer": a} for t, rows in answers[split].items() if t in tasks for a in rows]

    monkeypatch.setattr(synth_images, "make_dataset", fake_dataset)
    monkeypatch.setattr(synth_images, "REASONING_TASKS", ("more_than", "total_two"))
    cfg = load_config(None, ["--eval.num_images=5", "--eval.num_perception=0"])
    out = blind_baseline(cfg)
    assert list(out) == ["synth_images"]  # no perception set asked for
    # a: sampling from {1: 3/4, 2: 1/4} is right (3/4 + 1/4) / 2; always "1" is right 1/2. b: 2/3 either way
    # ceiling: the held-out set's own most common answer, a: 1 of 2, b: "3" 2 of 3
    assert out["synth_images"]["by_task"] == {"more_than": {"prior": 0.5, "majority": 0.5, "ceiling": 0.5},
                                              "total_two": {"prior": 2 / 3, "majority": 2 / 3, "ceiling": 2 / 3}}
    assert out["synth_images"]["prior"] == pytest.approx((0.5 * 2 + 2 / 3 * 3) / 5)
    # train majority "3" for b, held out mostly "4": majority 1/3, ceiling 2/3
    answers["test"]["total_two"] = ["4", "4", "3"]
    b = blind_baseline(cfg)["synth_images"]["by_task"]["total_two"]
    assert b == {"prior": pytest.approx(1 / 3), "majority": pytest.approx(1 / 3), "ceiling": pytest.approx(2 / 3)}


def test_claims_rl_against_the_blind_ceiling():
    ev = {s: {"metrics": {"synth_images": {"pass@1": a, "num_questions": 600}}, "stderr": {"synth_images": 0.01}}
          for s, a in (("sft", 0.05), ("rl", 0.20))}
    above = claims({"evals": ev, "blind": {"synth_images": {"prior": 0.1, "ceiling": 0.15}}})[-1]
    assert above.startswith("3. ") and "0.200 vs 0.150 (+0.050, s.e. 0.010; the training answers' prior scores " \
        "0.100): **holds**" in above
    below = claims({"evals": ev, "blind": {"synth_images": {"prior": 0.1, "ceiling": 0.19}}})[-1]
    assert "(+0.010, s.e. 0.010; the training answers' prior scores 0.100): **does NOT hold**" in below
    assert not any(line.startswith("3. ") for line in claims({"evals": ev}))  # summaries written before the prior


def _rows(accs, groups=None):
    """Per-question result rows of 2 samples each with the given accuracies (0, 0.5 or 1)."""
    return [{"id": f"q-{i}", "correct": [int(a >= 0.5), int(a >= 1.0)],
             **({"group": groups[i]} if groups else {})} for i, a in enumerate(accs)]


def test_std_error_counts_a_content_group_once():
    accs = [0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0]
    plain = statistics.stdev(accs) / len(accs) ** 0.5
    assert std_error(_rows(accs)) == pytest.approx(plain, rel=1e-12)  # no groups: each question its own
    assert distinct(_rows(accs)) == len(accs)
    # every question asked 4 times over (same content, same answers): the s.e. of the 7 distinct questions, where
    # treating the 28 as independent would halve it
    repeated = _rows([a for a in accs for _ in range(4)], [f"g{i}" for i in range(len(accs)) for _ in range(4)])
    assert std_error(repeated) == pytest.approx(plain, rel=1e-12) and distinct(repeated) == 7
    assert math.isnan(std_error(_rows([0.0, 1.0], ["g", "g"])))


def test_behaviour_accuracy_with_without_and_within_tasks():
    def row(i, correct, verified):
        return {"id": f"image-{i}", "correct": correct, "behaviors": [{b: b == "verification" and v for b in
                                                                       BEHAVIORS} for v in verified]}
    # ids 0 and 2 are task "a", id 1 is task "b" (round-robin over ["a", "b"])
    details = {"synth_images": [row(0, [1, 0], [True, False]), row(1, [1, 1], [False, False]),
                                row(2, [1, 0], [True, True])]}
    out = behaviour_accuracy(details, {"synth_images": ["a", "b"]})["synth_images"]
    v = out["verification"]
    # with: 2 of the 3 verified samples right; without: 2 of 3 (task a's miss, task b's two hits)
    assert (v["with"], v["n_with"], v["without"], v["n_without"]) == (pytest.approx(2 / 3), 3, pytest.approx(2 / 3), 3)
    # within tasks: only task a has both (2/3 with vs 0/1 without), weighted by its 3 verified samples
    assert v["within_task"] == pytest.approx(2 / 3)
    r = out["reflection"]
    assert r["with"] is None and r["n_with"] == 0 and r["without"] == pytest.approx(4 / 6) and r["within_task"] is None


def test_perception_corpus_answers_in_boxed_form(tmp_path):
    path = ensure_perception_corpus(str(tmp_path), 24, seed=1)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 24
    assert {r["task"] for r in rows} == {"count_color", "count_all", "color_largest", "digit_read"}
    for r in rows:
        user, reply = r["messages"]
        assert user["content"][0]["image"].startswith("data:image/png;base64,")
        assert extract_boxed(reply["content"]) == r["answer"]
        assert "<think>" not in reply["content"]  # no reasoning traces in the base stage
    assert ensure_perception_corpus(str(tmp_path), 24, seed=1).read_text() == path.read_text()  # cached, stable


def test_perception_corpus_read_first(tmp_path):
    """read_first: each reply reads the image in the described pictures' wording, then answers; its own cache file;
    the question, image and answer of every row are those of the plain corpus."""
    plain = [json.loads(line) for line in ensure_perception_corpus(str(tmp_path), 24, seed=1).read_text().splitlines()]
    path = ensure_perception_corpus(str(tmp_path), 24, seed=1, read_first=True)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert path.name.endswith("_reads.jsonl") and len(rows) == 24
    wording = {"count_color": r"count the (red|blue|green|yellow) shapes", "count_all": "count the shapes",
               "color_largest": "find the largest shape", "digit_read": "read the (left|right) digit"}
    for r, p in zip(rows, plain):
        assert r["messages"][0] == p["messages"][0] and r["answer"] == p["answer"]
        reply, question = r["messages"][1]["content"], r["messages"][0]["content"][1]["text"]
        m = re.fullmatch(r"<think>First, (" + wording[r["task"]] + r"): (\w+)\.</think>\nThe answer is \\boxed\{(\w+)\}\.",
                         reply)
        assert m and m[m.lastindex - 1] == m[m.lastindex] == r["answer"], reply
        if m.lastindex == 4:  # the colour or side the question asks about
            assert m[2] in question, (reply, question)


def test_base_corpus_read_first_works_the_reasoning_tasks(tmp_path):
    """read_first with reasoning tasks in the base stage: each reply reads the two things the question names, in
    its order, then does the one operation; reads checked against the scene's caption (the generator's shapes or
    digits, not its steps), the result against the answer."""
    tasks = ("count_color", "more_than", "total_two", "digit_sum", "digit_diff")
    path = ensure_perception_corpus(str(tmp_path), 40, seed=2, tasks=tasks, read_first=True)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    ops = {"more_than": "-", "total_two": "+", "digit_sum": "+", "digit_diff": "-"}
    for i, r in enumerate(rows):
        if r["task"] == "count_color":
            continue
        item = synth_images.make_item(i, 2, "train", tasks)
        question, reply = r["messages"][0]["content"][1]["text"], r["messages"][1]["content"]
        assert item["question"] == question and item["answer"] == r["answer"]
        if r["task"].startswith("digit"):
            left, right = map(int, item["description"].split())
            m = re.fullmatch(r"<think>First, read the left digit: (\d+)\. Then, read the right digit: (\d+)\. "
                             r"Then, (\d+) ([-+]) (\d+) = (\d+)\.</think>\nThe answer is \\boxed\{(\d+)\}\.", reply)
            assert m, reply
            assert (int(m[1]), int(m[2])) == (left, right)
            operands = (left, right) if r["task"] == "digit_sum" else (max(left, right), min(left, right))
        else:
            a, b = re.search(r"(red|blue|green|yellow) .*?(red|blue|green|yellow)", question).groups()
            colours = [part.split()[0] for part in item["description"].split(", ")]
            m = re.fullmatch(rf"<think>First, count the {a} shapes: (\d+)\. Then, count the {b} shapes: (\d+)\. "
                             r"Then, (\d+) ([-+]) (\d+) = (\d+)\.</think>\nThe answer is \\boxed\{(\d+)\}\.", reply)
            assert m, reply
            assert (int(m[1]), int(m[2])) == (colours.count(a), colours.count(b))
            operands = (colours.count(a), colours.count(b))
        assert (int(m[3]), m[4], int(m[5])) == (operands[0], ops[r["task"]], operands[1]), reply
        assert m[6] == m[7] == r["answer"], reply
    assert {r["task"] for r in rows} == set(tasks)


def test_perception_corpus_cache_follows_the_splits(tmp_path, monkeypatch):
    # a cache written under other split fractions holds another "train" set (items now in "val"): never reused
    from ovr_train import synth_images

    path = ensure_perception_corpus(str(tmp_path), 8, seed=1)
    monkeypatch.setattr(synth_images, "VAL_FRACTION", 0.0)
    assert ensure_perception_corpus(str(tmp_path), 8, seed=1) != path


def test_base_stage_config_and_sft_init(tmp_path):
    cfg = load_config(None, ["--base.steps=7", "--base.lr=2e-3", "--run.seed=3", f"--run.out_dir={tmp_path}"])
    base = base_stage_config(cfg)
    assert (base.sft.steps, base.optim.lr, base.model.freeze_vision) == (7, 2e-3, False)
    assert base.model.init_seed == cfg.model.init_seed + 3 and cfg.sft.steps != 7  # cfg itself is untouched
    assert resolve_sft_init(cfg) == ""  # auto without a base export: random init
    (tmp_path / "base" / "hf").mkdir(parents=True)
    (tmp_path / "base" / "hf" / "config.json").write_text("{}")
    assert resolve_sft_init(cfg) == str(tmp_path / "base" / "hf")
    cfg.model.path = str(tmp_path / "user_model")  # an explicit model always wins over a stale base export
    assert resolve_sft_init(cfg) == str(tmp_path / "user_model")
    cfg.model.path = ""
    cfg.sft.init_from = "none"
    assert resolve_sft_init(cfg) == ""
    cfg.sft.init_from = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="sft.init_from=.*missing.*no config.json"):
        resolve_sft_init(cfg)
    with pytest.raises(ValueError, match=r"base.tasks=\['fly'\]: must be a non-empty subset of"):
        load_config(None, ["--base.tasks=[fly]"])
    assert set(cfg.base.tasks) <= set(PERCEPTION_TASKS)
