"""`--stage all`: the miniature OVR pipeline, readable top to bottom.

    base (perception pretraining, images -> \\boxed{answer}) -> eval
    -> sft (text-only cold start from the base model, ViT frozen) -> eval
    -> rl (multimodal PPO from the cold-start model) -> eval
    -> <run.out_dir>/report.md + plots/*.png + summary.json

Every stage's model is evaluated on the same held-out sets (tasks.default_sets: synth_text "eval" split,
synth_images "test" split of the RL reasoning tasks; optionally the base stage's perception tasks), with the same
sampling settings (cfg.eval), so the per-stage numbers compare like with like. Stage wall times (training and eval
separately) go into summary.json and the report. Step counts are fixed by the config (deterministic for a seed);
configs/tiny.yaml sizes them so the whole run takes ~12 minutes on 2 quiet CPU cores, leaving margin under 20.
"""

import copy
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from ovr_train import synth_images
from ovr_train.behaviors import BEHAVIORS
from ovr_train.data import image_processor
from ovr_train.evaluate import evaluate_with_config
from ovr_train.report import write_report
from ovr_train.rl import train_rl
from ovr_train.rollout import rollout
from ovr_train.runlock import lock_run_dir
from ovr_train.sft import train_sft
from ovr_train.tasks import default_sets, perception_tasks_of
from ovr_train.tokenizer import load_tokenizer, special_ids

STAGES = ("base", "sft", "rl")


def _task_of(set_name: str, row: dict, tasks_of_set: dict) -> str:
    """Task name of a result row (items are generated round-robin over the set's tasks, in id order)."""
    tasks = tasks_of_set.get(set_name)
    if not tasks:
        return "all"
    return tasks[int(row["id"].rsplit("-", 1)[1]) % len(tasks)]


def by_task(details: dict, tasks_of_set: dict) -> dict:
    """{set: {task: {"acc": pass@1, "n": questions}}} from evaluate_items' per-question results."""
    out = {}
    for name, rows in details.items():
        groups = {}
        for r in rows:
            groups.setdefault(_task_of(name, r, tasks_of_set), []).append(sum(r["correct"]) / len(r["correct"]))
        out[name] = {t: {"acc": sum(v) / len(v), "n": len(v)} for t, v in sorted(groups.items())}
    return out


def behaviour_accuracy(details: dict, tasks_of_set: dict) -> dict:
    """Does a behaviour go with right answers? {set: {behaviour: {"with", "n_with", "without", "n_without",
    "within_task"}}} over every sample: the accuracy of the samples that show the behaviour and of those that do
    not (None when there are none), and their difference within tasks (the per-task differences weighted by the
    samples showing it, over the tasks that have both; None when none has), since tasks differ both in difficulty
    and in how often a behaviour shows."""
    out = {}
    for name, rows in details.items():
        out[name] = {}
        for b in BEHAVIORS:
            per_task = {}  # task -> [right with, n with, right without, n without]
            for r in rows:
                cell = per_task.setdefault(_task_of(name, r, tasks_of_set), [0, 0, 0, 0])
                for c, hit in zip(r["correct"], r["behaviors"]):
                    k = 0 if hit[b] else 2
                    cell[k] += c
                    cell[k + 1] += 1
            tot = [sum(cell[i] for cell in per_task.values()) for i in range(4)]
            both = [cell for cell in per_task.values() if cell[1] and cell[3]]
            weight = sum(cell[1] for cell in both)
            out[name][b] = {"with": tot[0] / tot[1] if tot[1] else None, "n_with": tot[1],
                            "without": tot[2] / tot[3] if tot[3] else None, "n_without": tot[3],
                            "within_task": sum(cell[1] * (cell[0] / cell[1] - cell[2] / cell[3]) for cell in both)
                            / weight if weight else None}
    return out


def std_error(details_rows: list) -> float:
    """Standard error of pass@1 over questions (per-question accuracy c/n), clustered by content group: questions
    of one group (the same image and question, asked again) move together, so each group counts once. With every
    group a single question this is the sample std / sqrt(Q); NaN with fewer than two groups."""
    accs = [sum(r["correct"]) / len(r["correct"]) for r in details_rows]
    sums = {}
    mean = sum(accs) / len(accs) if accs else 0.0
    for r, a in zip(details_rows, accs):
        sums[_group(r)] = sums.get(_group(r), 0.0) + a - mean
    if len(sums) < 2:
        return float("nan")
    return (len(sums) / (len(sums) - 1) * sum(v * v for v in sums.values())) ** 0.5 / len(accs)


def distinct(details_rows: list) -> int:
    """Content groups among the questions (see `std_error`)."""
    return len({_group(r) for r in details_rows})


def _group(row: dict) -> str:
    """A result row's content group (rows written before groups existed: their own id)."""
    return row.get("group", row["id"])


def image_tasks_of_sets(cfg) -> dict:
    """{held-out image set: its synth_images tasks, in the round-robin order its items were generated in}."""
    return {"synth_images": list(synth_images.REASONING_TASKS),
            "synth_perception": list(perception_tasks_of(cfg.base.tasks))}


def blind_baseline(cfg, num_train_per_task: int = 500) -> dict:
    """What a model that ignores the image scores on the held-out image sets: {set: {"prior": the expected pass@1
    of sampling each task's answer from its frequencies in the "train" split, "majority": pass@1 of always giving
    the train split's most common answer of the task, "ceiling": pass@1 of always giving the held-out set's own
    most common answer of the task (what the best single answer per task scores: the question says nothing about
    the answer, so this bounds an image-blind model up to how the wording varies), "by_task": {task: {"prior",
    "majority", "ceiling"}}}}. Accuracy at or below these uses the question and the answer format, not the
    picture; `num_train_per_task` train items per task estimate the frequencies (deterministic for the data
    seed)."""
    seed = cfg.data.synth_seed
    sizes = {"synth_images": cfg.eval.num_images, "synth_perception": cfg.eval.num_perception}
    out = {}
    for name, tasks in image_tasks_of_sets(cfg).items():
        num = sizes[name]
        if num <= 0:
            continue
        train = synth_images.make_dataset(num_train_per_task * len(tasks), seed, "train", tasks=tasks)
        test = synth_images.make_dataset(num, seed, "test", tasks=tasks)
        rows = {}
        for task in tasks:
            freq = Counter(r["answer"] for r in train if r["task"] == task)
            gold = [r["answer"] for r in test if r["task"] == task]
            if not gold:
                continue
            total, majority = sum(freq.values()), freq.most_common(1)[0][0]
            rows[task] = {"prior": sum(freq[a] for a in gold) / total / len(gold),
                          "majority": sum(a == majority for a in gold) / len(gold),
                          "ceiling": Counter(gold).most_common(1)[0][1] / len(gold), "n": len(gold)}
        keys = ("prior", "majority", "ceiling")
        out[name] = {k: sum(r[k] * r["n"] for r in rows.values()) / len(test) for k in keys}
        out[name]["by_task"] = {t: {k: r[k] for k in keys} for t, r in rows.items()}
    return out


def evaluate_model(cfg, info, model_dir, label: str) -> dict:
    """Collective: evaluate the HF model in `model_dir` on the embedded default's held-out sets with cfg.eval's sampling settings.
    Returns {"metrics": {set: summarize(...)}, "stderr": {set: SE of pass@1}, "distinct": {set: content groups},
    "by_task": ..., "behaviour_accuracy": ..., "seconds"} (same on
    every rank); rank 0 writes <run.out_dir>/eval/<label>.json with the per-question results."""
    ecfg, t0 = cfg.eval, time.perf_counter()
    tok = load_tokenizer(str(model_dir))
    ids = special_ids(tok)
    image_proc = image_processor(cfg, str(model_dir))
    sets = default_sets(ecfg.num_text, ecfg.num_images, cfg.data.synth_seed, ecfg.num_perception, cfg.base.tasks)
    engine = rollout(ecfg.engine, Path(model_dir), tok, ids, info.device, cfg.rollout,
                     image_proc.pixels, seed=ecfg.seed + info.rank,
                     max_batch_size=ecfg.batch_size * ecfg.num_samples)
    metrics, details = evaluate_with_config(cfg, engine, tok, ids, sets, image_proc, info)
    engine.close()  # free its memory before the next stage trains
    tasks_of_set = image_tasks_of_sets(cfg)
    result = {"label": label, "model": str(model_dir), "metrics": metrics,
              "stderr": {k: std_error(v) for k, v in details.items()},
              "distinct": {k: distinct(v) for k, v in details.items()}, "by_task": by_task(details, tasks_of_set),
              "behaviour_accuracy": behaviour_accuracy(details, tasks_of_set),
              "seconds": time.perf_counter() - t0}
    if info.is_main:
        path = Path(cfg.run.out_dir) / "eval" / f"{label}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**result, "questions": details}, indent=1))
        for name, m in metrics.items():
            print(f"[eval] {label} {name}: pass@1 {m['pass@1']:.3f} +- {result['stderr'][name]:.3f} over "
                  f"{m['num_questions']} questions ({result['distinct'][name]} distinct) x {m['num_samples']}, "
                  f"mean length {m['mean_length']:.0f}")
    return result


def command_line() -> str:
    """How this run was started, as a user would type it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    head = f"torchrun --nproc_per_node {world}" if "LOCAL_RANK" in os.environ else "python"
    return f"{head} -m ovr_train.launch " + " ".join(sys.argv[1:])


def run_all(cfg, info) -> dict:
    """Collective: base -> eval -> sft -> eval -> rl -> eval -> report. Returns the summary (also summary.json)."""
    out = Path(cfg.run.out_dir)
    lock_run_dir(info, out, out / "eval")  # the report and the evals; each stage locks its own directory
    times, evals = {}, {}
    t_all = time.perf_counter()
    for stage in STAGES:
        scfg = copy.deepcopy(cfg)  # stages adjust their copy (init path, frozen ViT, ...)
        t0 = time.perf_counter()
        if stage == "rl":
            train_rl(scfg, info)  # starts from <out>/sft/hf (rl.init_from empty)
        else:
            if stage == "sft":
                scfg.sft.init_from = str(out / "base" / "hf")
            train_sft(scfg, info, stage=stage)
        times[f"{stage}_train_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        evals[stage] = evaluate_model(cfg, info, out / stage / "hf", stage)
        times[f"{stage}_eval_s"] = time.perf_counter() - t0
        if info.is_main:
            print(f"[all] {stage}: train {times[f'{stage}_train_s']:.0f}s, eval {times[f'{stage}_eval_s']:.0f}s "
                  f"(total so far {time.perf_counter() - t_all:.0f}s)")
    times["total_s"] = time.perf_counter() - t_all
    summary = {"command": command_line(), "seed": cfg.run.seed, "world_size": info.world_size,
               "steps": {"base": cfg.base.steps, "sft": cfg.sft.steps, "rl": cfg.rl.steps},
               "eval_settings": {"num_samples": cfg.eval.num_samples, "temperature": cfg.eval.temperature,
                                 "max_new_tokens": cfg.eval.max_new_tokens, "seed": cfg.eval.seed},
               "times": times, "evals": evals, "blind": blind_baseline(cfg)}
    if info.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        write_report(out, summary)
        print(f"[all] done in {times['total_s']:.0f}s: {out / 'report.md'}")
    return summary
