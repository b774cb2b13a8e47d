"""The `--stage all` run report: <out_dir>/report.md and PNG plots under <out_dir>/plots/.

Sections (tests/train/test_pipeline.py checks them): Command, Wall time per stage, Accuracy per stage, Accuracy per
task, Behaviour rates per stage (text vs image responses and the transfer ratio image / text), Behaviours and right
answers on images (accuracy with vs without each behaviour), RL curves, Claims.
Plots: rl_curves.png (sampled reward, all / image / text prompts, and mean response length per RL step),
accuracy.png (held-out pass@1 per stage per set), behaviors.png (behaviour rate per stage, text vs image),
wall_time.png (training and eval seconds per stage). Everything is read from the summary `pipeline.run_all` builds
and the RL stage's metrics.jsonl; nothing here recomputes a metric.
"""

import argparse
import json
import math
import statistics
from pathlib import Path

from ovr_train.behaviors import BEHAVIORS
from ovr_train.metrics import pyplot, read_metrics

SECTIONS = ("## Command", "## Wall time per stage", "## Accuracy per stage", "## Accuracy per task",
            "## Behaviour rates per stage", "## Behaviours and right answers on images", "## RL curves", "## Claims")
PLOTS = ("rl_curves.png", "accuracy.png", "behaviors.png", "wall_time.png")
BLIND_ROW = "image-blind (train answer prior)"
CEILING_ROW = "image-blind ceiling (best constant answer)"
BLIND_NOTE = ("image-blind (pipeline.blind_baseline): the expected pass@1 of a model that ignores the image and "
              "samples each task's answer from its frequencies in the training split; the ceiling: always the "
              "held-out set's most common answer of each task, what the best single answer per task scores. "
              "Accuracy at or below them does not show that the picture is used.")
SET_TITLES = {"synth_text": "text (held-out arithmetic)", "synth_images": "image (held-out reasoning)",
              "synth_perception": "image perception (held-out)"}


def _fmt(x, spec="{:.3f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else spec.format(x)


def _stages(summary) -> list:
    return [s for s in ("base", "sft", "rl") if s in summary["evals"]]


def _tenths(records: list) -> tuple:
    """The first and the last 10% (at least one) of the RL steps' records."""
    k = max(1, len(records) // 10)
    return records[:k], records[-k:]


def _questions(stage_eval, set_name) -> str:
    """'600 Q', or '600 Q, 342 distinct' when some questions repeat the same content."""
    q = stage_eval["metrics"][set_name]["num_questions"]
    d = stage_eval.get("distinct", {}).get(set_name, q)
    return f"{q} Q" if d == q else f"{q} Q, {d} distinct"


def _rate(summary, stage, set_name, behavior):
    m = summary["evals"][stage]["metrics"].get(set_name)
    return m.get(f"behavior/{behavior}") if m else None


def plot_rl_curves(records: list, path: Path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    steps = [r["step"] for r in records]
    for key, label in (("reward_mean", "all prompts"), ("reward_image", "image prompts"),
                       ("reward_text", "text prompts")):
        axes[0].plot(steps, [r.get(key, math.nan) for r in records], label=label, lw=1.2)
    axes[0].set_title("RL sampled reward")
    axes[1].plot(steps, [r.get("response_len", math.nan) for r in records], lw=1.2)
    axes[1].set_title("RL mean response length (tokens)")
    for ax in axes:
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(summary, path: Path):
    plt = pyplot()
    stages = _stages(summary)
    sets = list(summary["evals"][stages[0]]["metrics"])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / max(len(sets), 1)
    for j, name in enumerate(sets):
        accs = [summary["evals"][s]["metrics"][name]["pass@1"] for s in stages]
        errs = [summary["evals"][s]["stderr"][name] for s in stages]
        xs = [i + (j - (len(sets) - 1) / 2) * width for i in range(len(stages))]
        ax.bar(xs, accs, width, yerr=errs, capsize=3, label=SET_TITLES.get(name, name))
    ax.set_xticks(range(len(stages)), stages)
    ax.set_ylabel("held-out pass@1")
    ax.set_ylim(0, 1)
    ax.set_title("Accuracy per stage (error bars: 1 s.e. over questions)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_stage_behaviors(summary, path: Path):
    """Bars of each behaviour's rate in held-out responses per stage, text vs image sets."""
    plt = pyplot()
    stages = _stages(summary)
    fig, axes = plt.subplots(1, len(BEHAVIORS), figsize=(3 * len(BEHAVIORS), 3.2), squeeze=False)
    for ax, b in zip(axes[0], BEHAVIORS):
        for j, (set_name, label) in enumerate((("synth_text", "text"), ("synth_images", "image"))):
            vals = [_rate(summary, s, set_name, b) or 0.0 for s in stages]
            ax.bar([i + (j - 0.5) * 0.4 for i in range(len(stages))], vals, 0.4, label=label)
        ax.set_xticks(range(len(stages)), stages)
        ax.set_ylim(0, 1.02)
        ax.set_title(b, fontsize=9)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Behaviour rate in held-out responses per stage")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_wall_time(summary, path: Path):
    plt = pyplot()
    stages = [s for s in ("base", "sft", "rl") if f"{s}_train_s" in summary["times"]]
    train = [summary["times"][f"{s}_train_s"] / 60 for s in stages]
    ev = [summary["times"].get(f"{s}_eval_s", 0.0) / 60 for s in stages]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(stages, train, label="training")
    ax.bar(stages, ev, bottom=train, label="eval")
    ax.set_ylabel("minutes")
    ax.set_title(f"Wall time per stage (total {summary['times'].get('total_s', 0) / 60:.1f} min)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _gain(x, a, b, set_name):
    """(acc of stage b - acc of stage a, combined s.e.) on `set_name` in summary x; None when a stage is missing.
    a = "blind": the image-blind ceiling (a constant of the set: the s.e. is stage b's alone)."""
    ev = x["evals"]
    if a == "blind":
        if b not in ev or set_name not in ev[b]["metrics"] or set_name not in x.get("blind", {}):
            return None
        return ev[b]["metrics"][set_name]["pass@1"] - x["blind"][set_name]["ceiling"], ev[b]["stderr"][set_name]
    if a not in ev or b not in ev or set_name not in ev[b]["metrics"]:
        return None
    return (ev[b]["metrics"][set_name]["pass@1"] - ev[a]["metrics"][set_name]["pass@1"],
            math.hypot(ev[a]["stderr"][set_name], ev[b]["stderr"][set_name]))


def claims(summary) -> list:
    """The run's claims, stated as measured (no thresholds tuned after the fact: 'clear margin' means the RL gain
    exceeds twice the combined standard error of the two accuracies): RL over the cold start on images, behaviours
    carried into image answers by the cold start, RL over the image-blind ceiling on images."""
    lines = []
    ev = summary["evals"]
    gain = _gain(summary, "sft", "rl", "synth_images")
    if gain is not None:
        a, b = ev["sft"]["metrics"]["synth_images"]["pass@1"], ev["rl"]["metrics"]["synth_images"]["pass@1"]
        se = gain[1]
        q = ev["rl"]["metrics"]["synth_images"]["num_questions"]
        verdict = "holds" if gain[0] > 2 * se else "does NOT hold"
        lines.append(f"1. RL raises held-out image accuracy over the cold-start model: {a:.3f} -> {b:.3f} "
                     f"({b - a:+.3f}, combined s.e. {se:.3f}, {q} questions): **{verdict}** in this run "
                     "(criterion: gain > 2 s.e.).")
    if "base" in ev and "sft" in ev and "synth_images" in ev["sft"]["metrics"]:
        found = []
        for b in BEHAVIORS:
            before, after = _rate(summary, "base", "synth_images", b), _rate(summary, "sft", "synth_images", b)
            if before is not None and after is not None and before == 0 and after > 0:
                found.append(f"{b} {after:.3f}")
        verdict = "holds" if found else "does NOT hold"
        lines.append("2. Behaviours learned from text appear in image responses after the cold start where the base "
                     f"had none: **{verdict}** ({', '.join(found) if found else 'no behaviour went from 0 to > 0'}).")
    blind = summary.get("blind", {}).get("synth_images")
    if blind and "rl" in ev and "synth_images" in ev["rl"]["metrics"]:
        acc, se = ev["rl"]["metrics"]["synth_images"]["pass@1"], ev["rl"]["stderr"]["synth_images"]
        verdict = "holds" if acc - blind["ceiling"] > 2 * se else "does NOT hold"
        lines.append(f"3. RL's held-out image accuracy is above what the best single answer per task scores "
                     f"without the image (the image-blind ceiling): {acc:.3f} vs {blind['ceiling']:.3f} "
                     f"({acc - blind['ceiling']:+.3f}, s.e. {se:.3f}; the training answers' prior scores "
                     f"{blind['prior']:.3f}): **{verdict}** in this run (criterion: difference > 2 s.e.).")
    return lines


def write_report(out_dir, summary: dict) -> Path:
    """Write <out_dir>/report.md and <out_dir>/plots/*.png from `summary` (pipeline.run_all) and rl/metrics.jsonl."""
    out = Path(out_dir)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    records = read_metrics(out / "rl" / "metrics.jsonl")
    plot_rl_curves(records, plots / "rl_curves.png")
    plot_accuracy(summary, plots / "accuracy.png")
    plot_stage_behaviors(summary, plots / "behaviors.png")
    plot_wall_time(summary, plots / "wall_time.png")

    stages, times, ev = _stages(summary), summary["times"], summary["evals"]
    es = summary["eval_settings"]
    sets = list(ev[stages[0]]["metrics"]) if stages else []
    md = ["# Miniature OVR: base -> text cold start -> multimodal RL", "",
          "## Command", "", f"`{summary['command']}`", "",
          (f"Seed {summary['seed']}, {summary['world_size']} rank(s); steps: base {summary['steps']['base']}, sft "
          f"{summary['steps']['sft']}, rl {summary['steps']['rl']}. Eval: {es['num_samples']} sample(s) per "
          f"question at temperature {es['temperature']}, at most {es['max_new_tokens']} new tokens, sampling seed "
          f"{es['seed']}; held-out sets never trained on."), "",
          "## Wall time per stage", "", "| stage | training (s) | eval (s) |", "|---|---|---|"]
    for s in ("base", "sft", "rl"):
        if f"{s}_train_s" in times:
            md.append(f"| {s} | {times[f'{s}_train_s']:.0f} | {_fmt(times.get(f'{s}_eval_s'), '{:.0f}')} |")
    md += ["", f"Total: {times.get('total_s', 0):.0f} s ({times.get('total_s', 0) / 60:.1f} min).", "",
           "![wall time](plots/wall_time.png)", "",
           "## Accuracy per stage", "", "pass@1 on held-out questions, +- 1 standard error over questions.", "",
           "| stage | " + " | ".join(f"{SET_TITLES.get(n, n)} ({_questions(ev[stages[0]], n)})" for n in sets)
           + " | image mean length |",
           "|---|" + "---|" * (len(sets) + 1)]
    for s in stages:
        cells = [f"{ev[s]['metrics'][n]['pass@1']:.3f} +- {ev[s]['stderr'][n]:.3f}" for n in sets]
        img = ev[s]["metrics"].get("synth_images", {})
        md.append(f"| {s} | " + " | ".join(cells) + f" | {_fmt(img.get('mean_length'), '{:.0f}')} |")
    blind = summary.get("blind", {})
    if blind:
        for key, title in (("prior", BLIND_ROW), ("ceiling", CEILING_ROW)):
            md.append(f"| {title} | " + " | ".join(_fmt(blind.get(n, {}).get(key)) for n in sets) + " | - |")
        md += ["", BLIND_NOTE]
    md += ["", "![accuracy](plots/accuracy.png)", "", "## Accuracy per task", ""]
    for n in sets:
        tasks = sorted({t for s in stages for t in ev[s]["by_task"].get(n, {})})
        if tasks == ["all"]:
            continue
        md += [f"{SET_TITLES.get(n, n)}:", "", "| stage | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        md += [f"| {s} | " + " | ".join(_fmt(ev[s]["by_task"][n].get(t, {}).get("acc")) for t in tasks) + " |"
               for s in stages]
        if n in blind:
            for key, title in (("prior", BLIND_ROW), ("ceiling", CEILING_ROW)):
                md.append(f"| {title} | " + " | ".join(_fmt(blind[n]["by_task"].get(t, {}).get(key)) for t in tasks)
                          + " |")
        md.append("")
    md += ["## Behaviour rates per stage", "",
           ("Fraction of held-out responses showing each behaviour (keyword proxy, ovr_train/behaviors.py), in "
           "responses to text vs image questions; transfer = image rate / text rate."), "",
           "| stage | behaviour | text | image | transfer |", "|---|---|---|---|---|"]
    for s in stages:
        for b in BEHAVIORS:
            t, i = _rate(summary, s, "synth_text", b), _rate(summary, s, "synth_images", b)
            tr = i / t if t and i is not None else None
            md.append(f"| {s} | {b} | {_fmt(t)} | {_fmt(i)} | {_fmt(tr, '{:.2f}')} |")
    md += ["", "![behaviours](plots/behaviors.png)", "", "## Behaviours and right answers on images", "",
           ("Held-out image reasoning: accuracy of the sampled answers that show a behaviour vs those that do not "
            "(samples in brackets), and the difference within tasks (per-task differences weighted by the samples "
            "showing it). A behaviour that goes with right answers gives RL a reason to keep it."), "",
           "| stage | behaviour | with | without | within tasks |", "|---|---|---|---|---|"]
    for s in stages:
        for b, row in ev[s].get("behaviour_accuracy", {}).get("synth_images", {}).items():
            if row["n_with"]:
                md.append(f"| {s} | {b} | {_fmt(row['with'])} ({row['n_with']}) | {_fmt(row['without'])} "
                          f"({row['n_without']}) | {_fmt(row['within_task'], '{:+.3f}')} |")
    md += ["", "## RL curves", ""]
    if records:
        first, last = _tenths(records)
        avg = lambda rows, k: sum(r.get(k, 0.0) for r in rows) / len(rows)
        md.append(f"Sampled reward (mean of the first / last 10% of {len(records)} steps): "
                  f"{avg(first, 'reward_mean'):.3f} -> {avg(last, 'reward_mean'):.3f}; image prompts "
                  f"{avg(first, 'reward_image'):.3f} -> {avg(last, 'reward_image'):.3f}; mean response length "
                  f"{avg(first, 'response_len'):.1f} -> {avg(last, 'response_len'):.1f} tokens.")
    md += ["", "![rl curves](plots/rl_curves.png)", "", "## Claims", ""] + claims(summary) + [""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


def _claims_over_runs(run_dirs, sums) -> list:
    """Per run and pooled: RL vs the cold start, the base model and the image-blind ceiling on held-out images,
    RL vs the cold start on text. Pooled = the mean difference over runs, its s.e. sqrt(sum of the runs' combined
    s.e.^2) / runs: the runs' errors taken as independent, though they answer the same questions, so it can
    understate the spread that question difficulty shares. 'above' means the difference exceeds 2 s.e."""
    rows = [("image: RL - cold start", "sft", "rl", "synth_images"), ("image: RL - base", "base", "rl", "synth_images"),
            ("text: RL - cold start", "sft", "rl", "synth_text")]
    md = [("Claims over runs (difference of held-out pass@1 +- combined s.e.; **above** = difference > 2 s.e., "
           "**not below** = difference > -2 s.e.):"), "",
          "| comparison | " + " | ".join(Path(d).name for d in run_dirs) + " | pooled | verdict |",
          "|---|" + "---|" * (len(run_dirs) + 2)]
    if all("synth_images" in x.get("blind", {}) for x in sums):
        rows.insert(2, ("image: RL - image-blind ceiling", "blind", "rl", "synth_images"))
    for title, a, b, set_name in rows:
        gains = [_gain(x, a, b, set_name) for x in sums]
        if any(g is None for g in gains):
            continue
        mean = statistics.mean(g for g, _ in gains)
        se = math.sqrt(sum(e * e for _, e in gains)) / len(gains)
        above, not_below = mean > 2 * se, mean > -2 * se
        verdict = "above" if above else ("not below" if not_below else "below")
        md.append(f"| {title} | " + " | ".join(f"{g:+.3f} +- {e:.3f}" for g, e in gains)
                  + f" | {mean:+.3f} +- {se:.3f} | **{verdict}** |")
    return md


def _behaviour_change_in_rl(run_dirs, sums) -> list:
    """Behaviour rates of the RL rollouts (image prompts, text prompts, transfer = image / text) in the first and
    last 10% of the RL steps, and of the held-out image answers of the cold-start and RL models; mean over runs.
    'amplified' = a behaviour whose held-out image rate rose from the cold start to RL in every run."""
    records = [read_metrics(Path(d) / "rl" / "metrics.jsonl") for d in run_dirs]
    if not all(records) or not all("sft" in x["evals"] and "rl" in x["evals"] for x in sums):
        return []

    def window(rows, key, last):
        vals = [r[key] for r in _tenths(rows)[last] if key in r and not math.isnan(r[key])]
        return statistics.mean(vals) if vals else float("nan")

    def mean_over_runs(vals):
        vals = [v for v in vals if v is not None and not math.isnan(v)]
        return statistics.mean(vals) if vals else None

    md = [("Behaviours during RL (mean over runs; rollouts: first -> last 10% of the RL steps; held-out: image "
           "answers of the cold-start -> RL model):"), "",
          "| behaviour | rollouts, image | rollouts, text | rollouts, transfer | held-out image | amplified by RL |",
          "|---|---|---|---|---|---|"]
    for b in BEHAVIORS:
        cells = []
        for kind in ("image", "text", "transfer"):
            first = mean_over_runs([window(r, f"behav/{kind}/{b}", False) for r in records])
            last = mean_over_runs([window(r, f"behav/{kind}/{b}", True) for r in records])
            cells.append(f"{_fmt(first)} -> {_fmt(last)}")
        held = [(_rate(x, "sft", "synth_images", b), _rate(x, "rl", "synth_images", b)) for x in sums]
        amplified = all(a is not None and r is not None and r > a for a, r in held)
        md.append(f"| {b} | " + " | ".join(cells) + f" | {_fmt(mean_over_runs([a for a, _ in held]))} -> "
                  f"{_fmt(mean_over_runs([r for _, r in held]))} | {'yes' if amplified else 'no'} |")
    return md


def _behaviour_accuracy_over_runs(sums, stages) -> list:
    """Per stage and behaviour shown on held-out image reasoning: accuracy with vs without it and the
    within-task difference, each the mean over the runs that have it; samples summed over runs."""
    rows = []
    for s in stages:
        per_run = [x["evals"][s].get("behaviour_accuracy", {}).get("synth_images", {}) for x in sums]
        for b in BEHAVIORS:
            cells = [r[b] for r in per_run if b in r and r[b]["n_with"]]
            if not cells:
                continue
            mean = {k: statistics.mean(v) if (v := [c[k] for c in cells if c[k] is not None]) else None
                    for k in ("with", "without", "within_task")}
            rows.append(f"| {s} | {b} | {_fmt(mean['with'])} ({sum(c['n_with'] for c in cells)}) | "
                        f"{_fmt(mean['without'])} ({sum(c['n_without'] for c in cells)}) | "
                        f"{_fmt(mean['within_task'], '{:+.3f}')} |")
    if not rows:
        return []
    return [("Behaviours and right answers on held-out images (accuracy of the answers showing a behaviour vs the "
             "rest, samples over all runs in brackets, difference within tasks; mean over runs):"), "",
            "| stage | behaviour | with | without | within tasks |", "|---|---|---|---|---|"] + rows


def aggregate(run_dirs: list) -> str:
    """Markdown tables from each run's summary.json and rl/metrics.jsonl (`python -m ovr_train.report RUN_DIR
    [RUN_DIR ...]`): per-stage held-out accuracy and behaviour rates (mean and spread over runs, e.g. seeds), the
    claims per run and pooled (RL vs cold start and base on images, RL vs cold start on text), the behaviour rates
    during RL, accuracy with vs without each behaviour on images, and the wall times."""
    if not run_dirs:
        raise ValueError("aggregate: no run directory given")
    missing = [str(d) for d in run_dirs if not (Path(d) / "summary.json").is_file()]
    if missing:
        raise ValueError(f"no summary.json (written at the end of a `--stage all` run) in: {', '.join(missing)}")
    sums = [json.loads((Path(d) / "summary.json").read_text()) for d in run_dirs]
    stages = _stages(sums[0])
    sets = list(sums[0]["evals"][stages[0]]["metrics"])
    spread = "sample std" if len(sums) > 1 else "single run"

    def ms(vals):
        return f"{statistics.mean(vals):.3f} +- {statistics.stdev(vals) if len(vals) > 1 else 0.0:.3f}"

    md = [(f"Runs: {', '.join(str(d) for d in run_dirs)} (seeds {[s['seed'] for s in sums]}); mean +- {spread} over "
          "runs."), "", "| stage | " + " | ".join(SET_TITLES.get(n, n) for n in sets) + " |",
          "|---|" + "---|" * len(sets)]
    for s in stages:
        md.append(f"| {s} | " + " | ".join(ms([x["evals"][s]["metrics"][n]["pass@1"] for x in sums]) for n in sets)
                  + " |")
    if all(x.get("blind") for x in sums):
        for key, title in (("prior", BLIND_ROW), ("ceiling", CEILING_ROW)):
            md.append(f"| {title} | " + " | ".join(
                ms([x["blind"][n][key] for x in sums]) if all(n in x["blind"] for x in sums) else "-" for n in sets)
                + " |")
        md += ["", BLIND_NOTE]
    md += ["", "| stage | behaviour | text | image |", "|---|---|---|---|"]
    for s in stages:
        for b in BEHAVIORS:
            t = [_rate(x, s, "synth_text", b) or 0.0 for x in sums]
            i = [_rate(x, s, "synth_images", b) or 0.0 for x in sums]
            md.append(f"| {s} | {b} | {ms(t)} | {ms(i)} |")
    md += [""] + _claims_over_runs(run_dirs, sums) + [""] + _behaviour_change_in_rl(run_dirs, sums)
    md += [""] + _behaviour_accuracy_over_runs(sums, stages)
    md += ["", "| run | " + " | ".join(f"{s} train / eval (s)" for s in stages) + " | total (min) |",
           "|---|" + "---|" * (len(stages) + 1)]
    for d, x in zip(run_dirs, sums):
        t = x["times"]
        md.append(f"| {Path(d).name} | " + " | ".join(f"{t[f'{s}_train_s']:.0f} / {t[f'{s}_eval_s']:.0f}"
                                                      for s in stages) + f" | {t['total_s'] / 60:.1f} |")
    return "\n".join(md)


def main(argv=None):
    """CLI: print `aggregate` of the given `--stage all` run directories."""
    parser = argparse.ArgumentParser(prog="python -m ovr_train.report", description=(
        "Per-stage held-out accuracy and behaviour rates of one or more `--stage all` runs (e.g. seeds), mean and "
        "spread over runs, as a Markdown table."))
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run.out_dir holding summary.json")
    args = parser.parse_args(argv)
    try:
        print(aggregate(args.run_dirs))
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
