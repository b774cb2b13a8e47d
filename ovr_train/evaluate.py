"""Evaluation: pass@1 / pass@k, behaviour rates and response length of a checkpoint on benchmark files.

    torchrun -m ovr_train.launch --stage eval --eval.sets a.jsonl,b.jsonl --model.path CKPT

Legend: Q questions of a set, n samples per question (`eval.num_samples`), c correct samples of a question.

1. `evaluate_items` (in-process: the eval stage, the pipeline and rl.py's periodic eval): n samples per question
   (`tasks.Item`s, from `tasks.eval_sets`) from a rollout engine, scored by `rewards.score` (the RL reward itself)
   in a `rewards.RewardPool` with the RL reward's timeouts, multiple choice matched by letter or by content;
   metrics per set: pass@1 = mean c/n, pass@k = mean of 1 - C(n-c, k)/C(n, k), mean response length, truncation
   rate, behaviour rates (`behaviors`).
2. `evaluate(cfg)` (the stage): loads the checkpoint, shards questions over ranks, gathers on rank 0, prints a
   per-set table, writes JSON and appends a results section to the run report (markdown).
"""

import json
import math
import time
from pathlib import Path

import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader

from ovr_train import behaviors
from ovr_train.checkpoint import ModelState, export_hf, load_checkpoint
from ovr_train.config import load_config
from ovr_train.data import PromptFormat, image_processor
from ovr_train.dist import compute_dtype, init_distributed
from ovr_train.model import build_sharded_model
from ovr_train.rewards import RewardPool, score
from ovr_train.rollout import rollout
from ovr_train.runlock import lock_run_dir
from ovr_train.tasks import build_prompt, eval_sets
from ovr_train.tokenizer import load_tokenizer, special_ids

# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one question from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021),
    as a running product (no huge binomials)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def summarize(results: list, ks: list) -> dict:
    """Metrics of one set from per-question results (dicts with "correct": [0/1] * n, "lengths", "truncated",
    "behaviors": [{name: bool}] * n, "has_image", "status"). pass@k only for k <= n."""
    if not results:
        raise ValueError("summarize: no results")
    n = len(results[0]["correct"])
    out = {"num_questions": len(results), "num_samples": n}
    out["pass@1"] = sum(sum(r["correct"]) / n for r in results) / len(results)
    for k in ks:
        if 1 < k <= n:
            out[f"pass@{k}"] = sum(pass_at_k(n, int(sum(r["correct"])), k) for r in results) / len(results)
    lengths = [x for r in results for x in r["lengths"]]
    out["mean_length"] = sum(lengths) / len(lengths)
    out["max_length"] = max(lengths)
    out["truncated"] = sum(x for r in results for x in r["truncated"]) / len(lengths)
    statuses = [s for r in results for s in r["status"]]
    out["verifier_timeouts"] = statuses.count("timeout")
    out["verifier_errors"] = statuses.count("error")
    rates = behaviors.rates(behaviors.tally([b for r in results for b in r["behaviors"]],
                                            [r["has_image"] for r in results for _ in r["behaviors"]]))
    for name in behaviors.BEHAVIORS:
        out[f"behavior/{name}"] = rates[f"all/{name}"]
    for split in ("text", "image"):
        if 0 < rates[f"{split}/num"] < len(lengths):  # a split equal to "all" or empty adds nothing
            out.update({f"{split}/behavior/{name}": rates[f"{split}/{name}"] for name in behaviors.BEHAVIORS})
    return out


_TABLE_COLUMNS = (("pass@1", "{:.3f}"), ("mean_length", "{:.0f}"), ("truncated", "{:.3f}"),
                  ("behavior/reflection", "{:.3f}"), ("behavior/verification", "{:.3f}"),
                  ("behavior/visual_reflection", "{:.3f}"))


def _columns(metrics: dict) -> list:
    ks = sorted({int(k.split("@")[1]) for m in metrics.values() for k in m if k.startswith("pass@")} - {1})
    cols = [("num_questions", "{:d}"), ("num_samples", "{:d}"), ("pass@1", "{:.3f}")]
    cols += [(f"pass@{k}", "{:.3f}") for k in ks]
    return cols + list(_TABLE_COLUMNS[1:])


def format_table(metrics: dict, markdown: bool = False) -> str:
    """{set: summarize(...)} -> a fixed-width text table (or a markdown table), one row per set."""
    cols = _columns(metrics)
    header = ["set"] + [c.replace("behavior/", "").replace("num_questions", "Q").replace("num_samples", "n")
                        .replace("mean_length", "len").replace("visual_reflection", "vis_refl") for c, _ in cols]
    rows = [[name] + [fmt.format(m[c]) if c in m else "-" for c, fmt in cols] for name, m in metrics.items()]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths)))
             for r in [header] + rows]
    return "\n".join(lines)


def append_report(path, title: str, metrics: dict, details: dict) -> None:
    """Append a results section (markdown table + settings) to the run report `path` (created if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"\n## Eval: {title}\n", f"_{time.strftime('%Y-%m-%d %H:%M:%S')}_ — "
             + ", ".join(f"{k}: {v}" for k, v in details.items()) + "\n", format_table(metrics, markdown=True), ""]
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Generation + scoring (in-process: the eval stage and rl.py's periodic eval)
# ----------------------------------------------------------------------------------------------------------------


def run_items(engine, tok, ids: dict, items: list, *, num_samples: int, max_new_tokens: int, temperature: float,
              top_p: float = 1.0, seed: int = 0, image_proc=None, pool=None, batch_size: int = 32,
              fmt=None, reward_timeout_s: float = 5.0, keep_chars: int = 2000) -> list:
    """Generate `num_samples` responses per item with `engine` (rollout.HFEngine / VLLMEngine) and score them.

    Returns one dict per item: id, where, group (Item.group, else the id), answer, correct [0/1] * n, lengths
    (response tokens) * n, truncated * n, status (verifier 'ok' | 'timeout' | 'error') * n, behaviors
    [{name: bool}] * n, has_image, response (the first sample, cut to `keep_chars`). `pool`: a rewards.RewardPool running `rewards.score` (made here if None). `fmt`:
    the data.PromptFormat (None: no system prompt, no instruction).
    """
    fmt = fmt or PromptFormat()
    own_pool = pool is None
    pool = RewardPool(num_workers=1, timeout_s=reward_timeout_s, score_fn=score) if own_pool else pool
    out = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            prompts = [build_prompt(it, tok, ids, image_proc, fmt) for it in chunk]
            samples = engine.generate(prompts, n=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_p=top_p, seed=seed + start)
            specs = [chunk[s.prompt_index].gold for s in samples]
            scored = pool.score([s.text for s in samples], specs, [s.truncated for s in samples])
            for j, item in enumerate(chunk):
                mine = range(j * num_samples, (j + 1) * num_samples)  # samples are prompt-major
                assert all(samples[i].prompt_index == j for i in mine)
                out.append({"id": item.id, "where": item.where, "group": item.group or item.id,
                            "answer": item.answer, "has_image": item.has_image,
                            "correct": [int(scored.rewards[i] >= 1.0) for i in mine],
                            "lengths": [len(samples[i].token_ids) for i in mine],
                            "truncated": [bool(samples[i].truncated) for i in mine],
                            "status": [scored.status[i] for i in mine],
                            "behaviors": [behaviors.detect(samples[i].text) for i in mine],
                            "response": samples[mine[0]].text[:keep_chars]})
    finally:
        if own_pool:
            pool.close()
    return out


def _gather(results: list, world: int) -> list:
    """Every rank's per-question results, concatenated in rank order (all ranks get them)."""
    if world == 1:
        return results
    parts = [None] * world
    dist.all_gather_object(parts, results)
    return [r for part in parts for r in part]


def evaluate_items(engine, tok, ids: dict, sets: dict, *, num_samples: int = 4, ks=(1, 4), max_new_tokens: int = 256,
                   temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, image_proc=None, pool=None,
                   batch_size: int = 32, fmt=None, reward_timeout_s: float = 5.0, rank: int = 0,
                   world: int = 1, return_details: bool = False):
    """Evaluate an already-built engine on `sets` ({name: [tasks.Item]}) -> {name: summarize(...) metrics}.

    For rl.py's periodic eval as much as for the eval stage. With world > 1 every rank must call it: questions are
    sharded round-robin over ranks, each rank generates and scores its share, results are all-gathered, and every
    rank returns the same metrics. With return_details, returns (metrics, {name: per-question results}).
    """
    metrics, details = {}, {}
    for name, items in sets.items():
        mine = items[rank::world]
        res = run_items(engine, tok, ids, mine, num_samples=num_samples, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, seed=seed + 100_003 * rank, image_proc=image_proc,
                        pool=pool, batch_size=batch_size, fmt=fmt,
                        reward_timeout_s=reward_timeout_s) if mine else []
        res = _gather(res, world)
        order = {item.id: i for i, item in enumerate(items)}
        res.sort(key=lambda r: order[r["id"]])  # file order, whatever the sharding
        metrics[name] = summarize(res, list(ks))
        details[name] = res
    return (metrics, details) if return_details else metrics


# ----------------------------------------------------------------------------------------------------------------
# The eval stage
# ----------------------------------------------------------------------------------------------------------------


def _is_dcp(path: Path) -> bool:
    return (path / ".metadata").is_file()


def dcp_to_hf(path, out_dir, info) -> Path:
    """Collective: an ovr DCP checkpoint (SFT's "model" or RL's "policy" entry) -> an HF dir under `out_dir`,
    built with the run config saved in the checkpoint (config.yaml) and checkpoint.export_hf."""
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise ValueError(f"model.path={str(path)!r} is a DCP checkpoint without the config.yaml it was saved with")
    ccfg = load_config(str(path / "config.yaml"))
    keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    entry = "policy" if any(k.startswith("policy.") for k in keys) else "model"
    tok = load_tokenizer(ccfg.model.path, ccfg.model.tokenizer, ccfg.model.bpe_vocab_size, ccfg.data.cache_dir,
                         ccfg.data.synth_seed)
    ids = special_ids(tok)
    ccfg.model.attn_implementation = "sdpa"  # loading and exporting only: no kernel needed
    model = build_sharded_model(ccfg, info, ids, len(tok))
    load_checkpoint(path, {entry: ModelState(model)}, info.rank)
    out = Path(out_dir) / f"hf_{path.parent.parent.name}_{path.name}"
    export_hf(model, tok, out, info.rank, compute_dtype(ccfg.model, info.device), image_processor(ccfg))
    return out


def evaluate_with_config(cfg, engine, tok, ids: dict, sets: dict, image_proc, info) -> tuple:
    """`evaluate_items` with cfg.eval's sampling settings and a verifier pool with the RL reward's timeout; returns
    (metrics, per-question details). Collective: every rank calls it."""
    ecfg = cfg.eval
    with RewardPool(num_workers=ecfg.reward_workers, timeout_s=cfg.rl.reward_timeout_s, score_fn=score) as pool:
        return evaluate_items(
            engine, tok, ids, sets, num_samples=ecfg.num_samples, ks=ecfg.ks, max_new_tokens=ecfg.max_new_tokens,
            temperature=ecfg.temperature, top_p=ecfg.top_p, seed=ecfg.seed, image_proc=image_proc, pool=pool,
            batch_size=ecfg.batch_size, fmt=PromptFormat.of(cfg.data), reward_timeout_s=cfg.rl.reward_timeout_s,
            rank=info.rank, world=info.world_size, return_details=True)


def evaluate(cfg, info=None) -> dict:
    """The eval stage: `cfg.model.path` (HF or DCP dir) on `cfg.eval.sets` (or the embedded default's held-out
    sets). Prints the per-set table, writes JSON and appends to the run report on rank 0; returns the metrics."""
    if info is None:
        info = init_distributed(cfg.dist)
    ecfg = cfg.eval
    if not cfg.model.path:
        raise ValueError("the eval stage needs --model.path=CKPT (an HF dir, e.g. <run>/sft/hf, or a DCP "
                         "checkpoint dir, e.g. <run>/rl/checkpoints/step_00000090)")
    model_path = Path(cfg.model.path)
    if not model_path.is_dir():
        raise ValueError(f"model.path={cfg.model.path!r} is not a directory")
    out_dir = Path(cfg.run.out_dir) / "eval"
    lock_run_dir(info, out_dir)  # before any file is touched: one live run per directory
    if _is_dcp(model_path):
        model_path = dcp_to_hf(model_path, out_dir, info)
    label = ecfg.label or (model_path.name.removeprefix("hf_") if _is_dcp(Path(cfg.model.path))
                           else "-".join(Path(cfg.model.path).resolve().parts[-2:]))

    sets = eval_sets(ecfg, cfg.data.synth_seed)
    tok = load_tokenizer(str(model_path))
    ids = special_ids(tok)
    image_proc = image_processor(cfg, str(model_path))
    engine = rollout(ecfg.engine, model_path, tok, ids, info.device, cfg.rollout, image_proc.pixels,
                     seed=ecfg.seed + info.rank, max_batch_size=ecfg.batch_size * ecfg.num_samples)
    if info.is_main:
        print(f"[eval] {label}: {', '.join(f'{k} ({len(v)} questions)' for k, v in sets.items())}; n="
              f"{ecfg.num_samples}, max_new_tokens={ecfg.max_new_tokens}, temperature={ecfg.temperature}, "
              f"{info.world_size} rank(s), engine {type(engine).__name__}")
    t0 = time.perf_counter()
    metrics, details = evaluate_with_config(cfg, engine, tok, ids, sets, image_proc, info)
    seconds = time.perf_counter() - t0
    if info.is_main:
        print(format_table(metrics))
        json_path = Path(ecfg.out) if ecfg.out else out_dir / f"{label}.json"
        json_path.parent.mkdir(parents=True, exist_ok=True)
        settings = {"model": cfg.model.path, "n": ecfg.num_samples, "max_new_tokens": ecfg.max_new_tokens,
                    "temperature": ecfg.temperature, "top_p": ecfg.top_p, "seconds": round(seconds, 1)}
        with open(json_path, "w") as f:
            json.dump({"label": label, "settings": settings, "metrics": metrics, "questions": details}, f, indent=1)
        report = Path(ecfg.report) if ecfg.report else Path(cfg.run.out_dir) / "report.md"
        append_report(report, label, metrics, settings)
        print(f"[eval] done in {seconds:.1f}s: {json_path}, results appended to {report}")
    return metrics
