"""Evaluation: pass@1 / pass@k, behaviour rates and response length of a checkpoint on benchmark files.

    torchrun -m ovr_train.launch --stage eval --eval.sets a.jsonl,b.jsonl --model.path CKPT

Legend: Q questions of a set, n samples per question (`eval.num_samples`), c correct samples of a question.

1. `load_eval_set`: rows of JSONL / parquet files or HF datasets directories (`sources`, verl / EasyR1 columns
   mapped) in the shapes of MathVista / MathVerse / MathVision / MATH500 / AIME exports
   (question|problem|query|prompt, answer|gt_answer|ground_truth|final_answer|label|solution, image|images|
   decoded_image|image_path as paths, base64 or bytes, choices|options as a list or a {letter: text} map) or chat
   rows (`messages` / `conversations`, as in the generated corpus's eval.jsonl) -> `EvalItem`s. Malformed rows
   raise ValueError naming file and line/row. With no files, `default_sets` generates the embedded default's
   held-out sets (synth_text "eval" split, synth_images "test" split: disjoint from what the default pipeline
   trains on).
2. `evaluate_items` (in-process, rl.py calls it): n samples per question from a rollout engine, scored by
   `score_eval` in `rewards.RewardPool` (the RL reward's verifier, same timeouts), multiple choice matched by
   letter or by content; metrics per set: pass@1 = mean c/n, pass@k = mean of 1 - C(n-c, k)/C(n, k), mean response
   length, truncation rate, behaviour rates (`behaviors.detect`).
3. `evaluate(cfg)` (the stage): loads the checkpoint, shards questions over ranks, gathers on rank 0, prints a
   per-set table, writes JSON and appends a results section to the run report (markdown).

torch-importing modules (ovr_train.data, model, rollout) are imported inside functions: reward worker processes
import this module to unpickle `score_eval`, and that import must stay light (0.3 s instead of ~4 s per worker).
"""

import base64
import io
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ovr_train.behaviors import BEHAVIORS, detect
from ovr_train.rewards import choice_letter, extract_boxed, is_equivalent, normalize_answer, score_response
from ovr_train.sources import canonical_row, iter_rows

QUESTION_KEYS = ("question", "problem", "query", "prompt")
ANSWER_KEYS = ("answer", "gt_answer", "ground_truth", "final_answer", "label", "solution")
IMAGE_KEYS = ("images", "image", "decoded_image", "image_path", "image_paths")
CHOICE_KEYS = ("choices", "options")
ID_KEYS = ("id", "pid", "idx", "problem_id", "unique_id", "sample_index", "index")
LETTERS = "ABCDEFGHIJ"

_CHOICE_LINE_RE = re.compile(r"^\s*\(?([A-J])\s*[).:：]\s*(.+?)\s*$", re.MULTILINE)
# base64 of the PNG, JPEG, GIF, WebP and BMP magic bytes: how a raw base64 image string starts
_BASE64_IMAGE_MAGIC = ("iVBORw0KGgo", "/9j/", "R0lGOD", "UklGR", "Qk")
_IMAGE_TAG_RE = re.compile(r"<image\s*\d*>", re.IGNORECASE)  # MathVision's "<image1>" placeholders


@dataclass
class EvalItem:
    """One question: chat messages [(role, [str | ImageRef])] ending with the user turn, the reference answer,
    optional multiple-choice options (option i has letter LETTERS[i]), and where it came from."""

    id: str
    messages: list
    answer: str
    choices: list = field(default_factory=list)
    where: str = ""

    @property
    def has_image(self) -> bool:
        return any(not isinstance(p, str) for _, parts in self.messages for p in parts)  # parts: str | ImageRef


# ----------------------------------------------------------------------------------------------------------------
# Reading benchmark files
# ----------------------------------------------------------------------------------------------------------------


def _first(obj: dict, keys: tuple):
    """(key, value) of the first key present with a non-empty value, else (None, None)."""
    for k in keys:
        v = obj.get(k)
        if v is not None and v != "" and v != [] and v != {}:
            return k, v
    return None, None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a base64 string is too long to be a file name
        return False


def _image_refs(value, where: str, base_dir: str) -> list:
    """An image field (path, base64, data URL, {"bytes"|"path"|"url": ...}, or a list of those) -> [ImageRef]."""
    from ovr_train.data import ImageRef

    values = value if isinstance(value, list) else [value]
    refs = []
    for v in values:
        if isinstance(v, dict):  # HF datasets' Image feature exported as {"bytes": base64, "path": ...}
            v = "data:image/unknown;base64," + v["bytes"] if v.get("bytes") else v.get("path") or v.get("url") or ""
        if not isinstance(v, str) or not v:
            raise ValueError(f"{where}: image must be a path or base64 string, got {type(v).__name__} {v!r:.40}")
        if not v.startswith("data:image") and not _is_file(Path(base_dir) / v):
            if not v.startswith(_BASE64_IMAGE_MAGIC):
                raise ValueError(f"{where}: image {v[:80]!r} does not exist (relative paths resolve against "
                                 f"{base_dir!r})")
            v = "data:image/unknown;base64," + v  # raw base64: a data URL leaves data.load_image no doubt
        refs.append(ImageRef(v, base_dir))
    return refs


def _parse_choices(value, where: str) -> list:
    if isinstance(value, dict):  # {"A": "3 cm", "B": ...}
        keys = sorted(value, key=str)
        if [str(k).strip().upper() for k in keys] != list(LETTERS[:len(keys)]):
            raise ValueError(f"{where}: choices map keys must be the letters A, B, ... in order, got {keys}")
        return [str(value[k]) for k in keys]
    if isinstance(value, str):  # some exports serialise the list
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{where}: choices must be a list, got the string {value!r:.60}") from None
    if not isinstance(value, list) or not all(isinstance(c, (str, int, float)) for c in value):
        raise ValueError(f"{where}: choices must be a list of strings, got {value!r:.80}")
    if len(value) > len(LETTERS):
        raise ValueError(f"{where}: at most {len(LETTERS)} choices supported, got {len(value)}")
    return [str(c) for c in value]


def choices_in_question(question: str) -> list:
    """Options listed in the question text as lines `A: ...` / `(A) ...` / `A. ...` (MathVerse puts them there),
    if they run A, B, C, ... consecutively (at least two); else []."""
    found = _CHOICE_LINE_RE.findall(question)
    out = []
    for letter, text in found:
        if len(out) < len(LETTERS) and letter == LETTERS[len(out)]:
            out.append(text)
        elif letter == "A":  # a second list restarts: keep the last one
            out = [text]
    return out if len(out) >= 2 else []


def _format_question(question: str, choices: list) -> str:
    question = _IMAGE_TAG_RE.sub("", question).strip()
    if choices and not choices_in_question(question):
        question += "\nChoices:\n" + "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
    return question


def parse_row(obj, where: str, base_dir: str = "") -> EvalItem:
    """One JSON row -> EvalItem (see the module docstring for accepted keys); ValueError naming `where`."""
    if not isinstance(obj, dict):
        # ValueError, not TypeError, for every malformed row: callers catch one type (STYLE: bad input -> ValueError)
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")  # noqa: TRY004
    _, row_id = _first(obj, ID_KEYS)
    row_id = str(row_id) if row_id is not None else where
    if "messages" in obj or "conversations" in obj:  # chat rows: evaluate the conversation up to its last user turn
        from ovr_train.data import normalize_sample

        sample = normalize_sample(obj, where, base_dir)
        last_user = max((i for i, (role, _) in enumerate(sample.messages) if role == "user"), default=None)
        if last_user is None:
            raise ValueError(f"{where}: no user message to ask")
        answer = sample.answer
        if answer is None:  # the reference answer is the boxed answer of the following assistant turn
            later = [p for _, parts in sample.messages[last_user + 1:] for p in parts if isinstance(p, str)]
            answer = extract_boxed(" ".join(later)) if later else None
        if answer is None or str(answer).strip() == "":
            raise ValueError(f"{where}: no reference answer ('answer' field or a boxed answer in the reply)")
        _, choices = _first(obj, CHOICE_KEYS)
        return EvalItem(row_id, sample.messages[:last_user + 1], str(answer).strip(),
                        _parse_choices(choices, where) if choices is not None else [], where)
    qkey, question = _first(obj, QUESTION_KEYS)
    if question is None:
        raise ValueError(f"{where}: no question (expected one of {list(QUESTION_KEYS)}); keys: {sorted(obj)}")
    if not isinstance(question, str):
        raise ValueError(f"{where}: {qkey} must be a string, got {type(question).__name__}")  # noqa: TRY004
    akey, answer = _first(obj, ANSWER_KEYS)
    if answer is None:
        raise ValueError(f"{where}: no answer (expected one of {list(ANSWER_KEYS)}); keys: {sorted(obj)}")
    if isinstance(answer, list) and len(answer) == 1:  # some exports wrap the answer in a list
        answer = answer[0]
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        raise ValueError(f"{where}: {akey} must be a string or number, got {answer!r:.60}")  # noqa: TRY004
    answer = str(answer).strip()
    if akey == "solution":  # MATH-style: the answer is the solution's last boxed expression
        answer = extract_boxed(answer)
        if not answer:
            raise ValueError(f"{where}: 'solution' has no \\boxed{{...}} answer and no 'answer' field is given")
    _, choices = _first(obj, CHOICE_KEYS)
    choices = _parse_choices(choices, where) if choices is not None else []
    if not choices and choice_letter(answer) is not None and len(normalize_answer(answer)) <= 3:
        choices = choices_in_question(question)  # letter answer with options in the text: match content too
    _, images = _first(obj, IMAGE_KEYS)
    refs = _image_refs(images, where, base_dir) if images is not None else []
    text = _format_question(question, choices)
    return EvalItem(row_id, [("user", refs + [text])], answer, choices, where)


def load_eval_set(path, limit: int = 0) -> list:
    """All rows of a benchmark JSONL / parquet file or HF datasets directory (`sources.iter_rows`, verl and EasyR1
    columns mapped) -> [EvalItem] (first `limit` rows if > 0); ValueError naming file and line/row. Images stay
    references (paths, base64 data URLs): they are decoded when a prompt is built. The answer instruction is not
    added here: prompts.PromptFormat adds it when the prompt is built."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"eval set {str(path)!r} does not exist")
    items, seen = [], {}
    for where, obj in iter_rows(path):
        if isinstance(obj, ValueError):  # a malformed JSON line
            raise obj
        item = parse_row(canonical_row(obj, where), where, str(path.parent))
        if item.id in seen:
            raise ValueError(f"{where}: duplicate id {item.id!r} (first at {seen[item.id]})")
        seen[item.id] = where
        items.append(item)
        if limit and len(items) >= limit:
            break
    if not items:
        raise ValueError(f"eval set {str(path)!r} has no rows")
    return items


def _png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def default_sets(num_text: int, num_images: int, seed: int = 0, image_size: int = 112) -> dict:
    """The embedded default's held-out sets, generated exactly like its training data but from the held-out splits:
    {"synth_text": synth_text "eval" split, "synth_images": synth_images "test" split (reasoning tasks)}.
    Their prompts are built in the run's one prompt format, as training's are."""
    from ovr_train import synth_images, synth_text
    from ovr_train.data import ImageRef

    sets = {}
    if num_text > 0:
        rows = synth_text.generate_items(num_text, seed, "eval")
        sets["synth_text"] = [EvalItem(f"text-{i}", [("user", [r["messages"][0]["content"]])], r["answer"],
                                       where=f"synth_text:eval:{i}") for i, r in enumerate(rows)]
    if num_images > 0:
        rows = synth_images.make_dataset(num_images, seed, "test", image_size=image_size)
        sets["synth_images"] = [EvalItem(f"image-{i}", [("user", [ImageRef(_png_data_url(r["image"])),
                                                                  r["question"]])], r["answer"],
                                         where=f"synth_images:test:{i}") for i, r in enumerate(rows)]
    return sets


# ----------------------------------------------------------------------------------------------------------------
# Scoring (runs in reward worker processes)
# ----------------------------------------------------------------------------------------------------------------


def gold_spec(item: EvalItem) -> str:
    """What `score_eval` needs about an item, as one string (RewardPool passes answers as strings)."""
    return json.dumps({"answer": item.answer, "choices": item.choices}) if item.choices else item.answer


def _gold_choice(answer: str, choices: list):
    """Index of the correct option: the answer's letter, else the option whose content equals the answer."""
    letter = choice_letter(answer)
    if letter is not None and len(normalize_answer(answer)) <= 3 and LETTERS.index(letter) < len(choices):
        return LETTERS.index(letter)
    for i, c in enumerate(choices):
        if normalize_answer(c) == normalize_answer(answer):
            return i
    for i, c in enumerate(choices):
        if is_equivalent(c, answer):
            return i
    return None


def score_multiple_choice(pred: str, answer: str, choices: list) -> bool:
    """A multiple-choice prediction is right if it names the correct letter (`B`, `(B)`, `B. 3 cm`), or, naming
    no letter, if its content equals the correct option's (`3 cm` for option B = `3\\,\\text{cm}`)."""
    gold = _gold_choice(answer, choices)
    if gold is None:  # the answer is none of the options: judge it as a free-form answer
        return is_equivalent(pred, answer)
    letter = choice_letter(pred)
    if letter is not None:
        return letter == LETTERS[gold]
    return is_equivalent(pred, choices[gold]) or is_equivalent(pred, answer)


def score_eval(response: str, spec: str, truncated: bool = False, format_reward: float = 0.0) -> float:
    """1.0 if the last boxed answer of `response` is right for `spec` (from `gold_spec`), else 0.0; 0.0 when
    truncated. Free-form items are scored by `rewards.score_response` (the RL reward itself); `format_reward`
    is accepted for RewardPool's interface and ignored (evaluation measures correctness only)."""
    if spec.startswith("{"):
        gold = json.loads(spec)
        if truncated:
            return 0.0
        pred = extract_boxed(response)
        return float(bool(pred) and score_multiple_choice(pred, gold["answer"], gold["choices"]))
    return score_response(response, spec, truncated=truncated)


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
    for split, keep in (("", None), ("text/", False), ("image/", True)):
        rows = [b for r in results if keep is None or r["has_image"] == keep for b in r["behaviors"]]
        if split and (not rows or len(rows) == len(lengths)):
            continue  # a split equal to "all" or empty adds nothing
        for name in BEHAVIORS:
            out[f"{split}behavior/{name}"] = sum(b[name] for b in rows) / len(rows)
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

    Returns one dict per item: id, where, answer, correct [0/1] * n, lengths (response tokens) * n, truncated * n,
    status (verifier 'ok' | 'timeout' | 'error') * n, behaviors [{name: bool}] * n, has_image, response (the first
    sample, cut to `keep_chars`). `pool`: a rewards.RewardPool running `score_eval` (made here if None). `fmt`: the
    prompts.PromptFormat (None: no system prompt, no instruction).
    """
    from ovr_train.prompts import PromptFormat, build_prompt
    from ovr_train.rewards import RewardPool

    fmt = fmt or PromptFormat()
    own_pool = pool is None
    pool = RewardPool(num_workers=1, timeout_s=reward_timeout_s, score_fn=score_eval) if own_pool else pool
    out = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            prompts = [build_prompt(it, tok, ids, image_proc, fmt) for it in chunk]
            samples = engine.generate(prompts, n=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_p=top_p, seed=seed + start)
            specs = [gold_spec(chunk[s.prompt_index]) for s in samples]
            scored = pool.score([s.text for s in samples], specs, [s.truncated for s in samples])
            for j, item in enumerate(chunk):
                mine = range(j * num_samples, (j + 1) * num_samples)  # samples are prompt-major
                assert all(samples[i].prompt_index == j for i in mine)
                out.append({"id": item.id, "where": item.where, "answer": item.answer, "has_image": item.has_image,
                            "correct": [int(scored.rewards[i] >= 1.0) for i in mine],
                            "lengths": [len(samples[i].token_ids) for i in mine],
                            "truncated": [bool(samples[i].truncated) for i in mine],
                            "status": [scored.status[i] for i in mine],
                            "behaviors": [detect(samples[i].text) for i in mine],
                            "response": samples[mine[0]].text[:keep_chars]})
    finally:
        if own_pool:
            pool.close()
    return out


def _gather(results: list, world: int) -> list:
    """Every rank's per-question results, concatenated in rank order (all ranks get them)."""
    if world == 1:
        return results
    import torch.distributed as dist

    parts = [None] * world
    dist.all_gather_object(parts, results)
    return [r for part in parts for r in part]


def evaluate_items(engine, tok, ids: dict, sets: dict, *, num_samples: int = 4, ks=(1, 4), max_new_tokens: int = 256,
                   temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, image_proc=None, pool=None,
                   batch_size: int = 32, fmt=None, reward_timeout_s: float = 5.0, rank: int = 0,
                   world: int = 1, return_details: bool = False):
    """Evaluate an already-built engine on `sets` ({name: [EvalItem]}) -> {name: summarize(...) metrics}.

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
    from torch.distributed.checkpoint import FileSystemReader

    from ovr_train.checkpoint import ModelState, export_hf, load_checkpoint
    from ovr_train.config import load_config
    from ovr_train.data import image_processor
    from ovr_train.dist import compute_dtype
    from ovr_train.sft import build_sharded_model
    from ovr_train.tokenizer import load_tokenizer, special_ids

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


def resolve_sets(cfg) -> dict:
    """{set name: [EvalItem]}: the files of eval.sets, or the embedded default's held-out sets (eval.limit applied).
    Every rank reads them all: cheap, and every rank then knows every set's size."""
    ecfg = cfg.eval
    if not ecfg.sets:
        sets = default_sets(ecfg.num_text, ecfg.num_images, cfg.data.synth_seed)
        return {k: v[:ecfg.limit] for k, v in sets.items()} if ecfg.limit else sets
    sets = {}
    for f in (s.strip() for s in ecfg.sets.split(",") if s.strip()):
        name = Path(f).stem
        if name in sets:
            raise ValueError(f"eval.sets: two files named {name!r}; rename one")
        sets[name] = load_eval_set(f, ecfg.limit)
    return sets


def evaluate_with_config(cfg, engine, tok, ids: dict, sets: dict, image_proc, info) -> tuple:
    """`evaluate_items` with cfg.eval's sampling settings and a verifier pool with the RL reward's timeout; returns
    (metrics, per-question details). Collective: every rank calls it."""
    from ovr_train.prompts import PromptFormat
    from ovr_train.rewards import RewardPool

    ecfg = cfg.eval
    with RewardPool(num_workers=ecfg.reward_workers, timeout_s=cfg.rl.reward_timeout_s, score_fn=score_eval) as pool:
        return evaluate_items(
            engine, tok, ids, sets, num_samples=ecfg.num_samples, ks=ecfg.ks, max_new_tokens=ecfg.max_new_tokens,
            temperature=ecfg.temperature, top_p=ecfg.top_p, seed=ecfg.seed, image_proc=image_proc, pool=pool,
            batch_size=ecfg.batch_size, fmt=PromptFormat.of(cfg.data), reward_timeout_s=cfg.rl.reward_timeout_s,
            rank=info.rank, world=info.world_size, return_details=True)


def evaluate(cfg, info=None) -> dict:
    """The eval stage: `cfg.model.path` (HF or DCP dir) on `cfg.eval.sets` (or the embedded default's held-out
    sets). Prints the per-set table, writes JSON and appends to the run report on rank 0; returns the metrics."""
    from ovr_train.data import image_processor
    from ovr_train.rollout import rollout
    from ovr_train.runlock import lock_run_dir
    from ovr_train.tokenizer import load_tokenizer, special_ids

    if info is None:
        from ovr_train.dist import init_distributed

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

    sets = resolve_sets(cfg)
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
