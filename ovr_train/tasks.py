"""What a prompt is: an `Item` (chat messages ending with the user turn, the gold answer, multiple-choice options),
where items come from, and how one becomes a rollout prompt. RL trains on items, evaluation measures on them.

Sources, each written once:
- files (`load_items`): rows of JSONL / parquet files or HF datasets directories (`sources.iter_rows`, verl / EasyR1
  columns mapped) in the shapes of MathVista / MathVerse / MathVision / MATH500 / AIME exports
  (question|problem|query|prompt, answer|gt_answer|ground_truth|final_answer|label|solution, image|images|
  decoded_image|image_path as paths, base64 or bytes, choices|options as a list or a {letter: text} map) or chat
  rows (`messages` / `conversations`, as in the generated corpus's eval.jsonl). Malformed rows raise ValueError
  naming file and line/row. RL prompt files (rl.prompt_files) and benchmark sets (eval.sets) are read alike.
- `synth_text_items`: the generated text problems of a synth_text split.
- `synth_image_items`: the generated image questions of a synth_images split.
The embedded default composes them: `prompt_pool` (the RL prompts: train splits), `default_sets` (the held-out
sets: synth_text "eval", synth_images "test", disjoint from what the default pipeline trains on).

A prompt is built in the run's one `data.PromptFormat` (`build_prompt`; `prompt_length` counts its tokens without
computing pixels), and scored against `Item.gold` by `rewards.score`.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ovr_train import synth_images, synth_text
from ovr_train.data import ImageRef, PromptFormat, encode_messages, load_image, normalize_sample
from ovr_train.rewards import LETTERS, choice_letter, extract_boxed, gold_spec, normalize_answer
from ovr_train.rollout import Prompt, collapse_image_pads
from ovr_train.sources import canonical_row, iter_rows

QUESTION_KEYS = ("question", "problem", "query", "prompt")
ANSWER_KEYS = ("answer", "gt_answer", "ground_truth", "final_answer", "label", "solution")
IMAGE_KEYS = ("images", "image", "decoded_image", "image_path", "image_paths")
CHOICE_KEYS = ("choices", "options")
ID_KEYS = ("id", "pid", "idx", "problem_id", "unique_id", "sample_index", "index")

_CHOICE_LINE_RE = re.compile(r"^\s*\(?([A-J])\s*[).:：]\s*(.+?)\s*$", re.MULTILINE)
# base64 of the PNG, JPEG, GIF, WebP and BMP magic bytes: how a raw base64 image string starts
_BASE64_IMAGE_MAGIC = ("iVBORw0KGgo", "/9j/", "R0lGOD", "UklGR", "Qk")
_IMAGE_TAG_RE = re.compile(r"<image\s*\d*>", re.IGNORECASE)  # MathVision's "<image1>" placeholders


@dataclass
class Item:
    """One prompt: chat messages [(role, [str | ImageRef])] ending with the user turn, the gold answer, optional
    multiple-choice options (option i has letter LETTERS[i]), where it came from, and its content group: items of
    one group ask the same question about the same content (the generated digit tasks draw from only 100 digit
    pairs), so a standard error counts a group once (`pipeline.std_error`); empty = the item's own id."""

    id: str
    messages: list
    answer: str
    choices: list = field(default_factory=list)
    where: str = ""
    group: str = ""

    @property
    def has_image(self) -> bool:
        return any(not isinstance(p, str) for _, parts in self.messages for p in parts)  # parts: str | ImageRef

    @property
    def gold(self) -> str:
        """What `rewards.score` checks a response against (answer and options, as one string)."""
        return gold_spec(self.answer, self.choices)


# ----------------------------------------------------------------------------------------------------------------
# Files: benchmark rows and RL prompt files
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


def parse_row(obj, where: str, base_dir: str = "") -> Item:
    """One JSON row -> Item (see the module docstring for accepted keys); ValueError naming `where`."""
    if not isinstance(obj, dict):
        # ValueError, not TypeError, for every malformed row: callers catch one type for bad input
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")  # noqa: TRY004
    _, row_id = _first(obj, ID_KEYS)
    row_id = str(row_id) if row_id is not None else where
    if "messages" in obj or "conversations" in obj:  # chat rows: the conversation up to its last user turn
        sample = normalize_sample(obj, where, base_dir)
        last_user = max((i for i, (role, _) in enumerate(sample.messages) if role == "user"), default=None)
        if last_user is None:
            raise ValueError(f"{where}: no user message to ask")
        answer = sample.answer
        if answer is None:  # the gold answer is the boxed answer of the following assistant turn
            later = [p for _, parts in sample.messages[last_user + 1:] for p in parts if isinstance(p, str)]
            answer = extract_boxed(" ".join(later)) if later else None
        if answer is None or str(answer).strip() == "":
            raise ValueError(f"{where}: no reference answer ('answer' field or a boxed answer in the reply)")
        _, choices = _first(obj, CHOICE_KEYS)
        return Item(row_id, sample.messages[:last_user + 1], str(answer).strip(),
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
    return Item(row_id, [("user", refs + [text])], answer, choices, where)


def load_items(path, limit: int = 0) -> list:
    """All rows of a JSONL / parquet file or HF datasets directory -> [Item] (the first `limit` if > 0);
    ValueError naming file and line/row. Images stay references (paths, base64 data URLs): they are decoded when a
    prompt is built. The answer instruction is not added here: the prompt format adds it when the prompt is built."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"prompt file {str(path)!r} does not exist")
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
        raise ValueError(f"prompt file {str(path)!r} has no rows")
    return items


# ----------------------------------------------------------------------------------------------------------------
# The embedded default's generated tasks
# ----------------------------------------------------------------------------------------------------------------


def synth_text_items(num: int, seed: int, split: str) -> list:
    """The first `num` synth_text problems of `split` ("train" or "eval") as Items `text-{i}`."""
    rows = synth_text.generate_items(num, seed, split) if num else []
    return [Item(f"text-{i}", [("user", [r["messages"][0]["content"]])], r["answer"], where=f"synth_text:{split}:{i}")
            for i, r in enumerate(rows)]


def synth_image_items(num: int, seed: int, split: str, prefix: str = "image", tasks=synth_images.REASONING_TASKS,
                      image_size: int = 112) -> list:
    """Generated image questions 0 .. num-1 of a synth_images split as Items `{prefix}-{i}` (the image inline as a
    PNG data URL; the group is the content key, shared by repeats of a digit pair)."""
    rows = synth_images.make_dataset(num, seed, split, tasks=tasks, image_size=image_size)
    return [Item(f"{prefix}-{i}", [("user", [ImageRef(synth_images.png_data_url(r["image"])), r["question"]])], r["answer"],
                 where=f"synth_images:{split}:{r['task']}:{i}", group=r["key"]) for i, r in enumerate(rows)]


def prompt_pool(rcfg, seed: int) -> list:
    """The RL prompts: rows of rl.prompt_files, or the built-in task (generated image questions of rl.image_tasks
    from synth_images' train split, plus a `text_fraction` of synth_text train problems, text first)."""
    if rcfg.prompt_files:
        return [it for f in rcfg.prompt_files for it in load_items(f)]
    num_text = round(rcfg.num_prompts * rcfg.text_fraction)
    return synth_text_items(num_text, seed, "train") + synth_image_items(rcfg.num_prompts - num_text, seed, "train",
                                                                          tasks=tuple(rcfg.image_tasks))


def perception_tasks_of(tasks) -> tuple:
    """The verifiable perception tasks among `tasks` (all but `describe`; `count_color` if none is left)."""
    return tuple(t for t in tasks if t != "describe") or ("count_color",)


def default_sets(num_text: int, num_images: int, seed: int = 0, num_perception: int = 0,
                 perception_tasks=()) -> dict:
    """The embedded default's held-out sets, generated like its training data but from the held-out splits:
    {"synth_text": synth_text "eval" split, "synth_images": synth_images "test" split (reasoning tasks)} and, with
    num_perception > 0, "synth_perception": the "test" split of `perception_tasks` but `describe` (captions have
    no single verifiable answer)."""
    sets = {}
    if num_text > 0:
        sets["synth_text"] = synth_text_items(num_text, seed, "eval")
    if num_images > 0:
        sets["synth_images"] = synth_image_items(num_images, seed, "test")
    if num_perception > 0:
        sets["synth_perception"] = synth_image_items(num_perception, seed, "test", "percep",
                                                     perception_tasks_of(perception_tasks))
    return sets


def eval_sets(ecfg, seed: int) -> dict:
    """{set name: [Item]} for EvalCfg `ecfg`: the files of eval.sets (named by file stem), or the embedded
    default's held-out sets (eval.limit applied). Every rank reads them all: cheap, and every rank then knows
    every set's size."""
    if not ecfg.sets:
        sets = default_sets(ecfg.num_text, ecfg.num_images, seed)
        return {k: v[:ecfg.limit] for k, v in sets.items()} if ecfg.limit else sets
    sets = {}
    for f in (s.strip() for s in ecfg.sets.split(",") if s.strip()):
        name = Path(f).stem
        if name in sets:
            raise ValueError(f"eval.sets: two files named {name!r}; rename one")
        sets[name] = load_items(f, ecfg.limit)
    return sets


# ----------------------------------------------------------------------------------------------------------------
# Item -> rollout prompt
# ----------------------------------------------------------------------------------------------------------------


def build_prompt(item: Item, tok, ids: dict, image_proc, fmt: PromptFormat) -> Prompt:
    """Item -> rollout.Prompt in `fmt`: chat-templated ids with expanded image pads + pixel values (HF engine), and
    the text with one `<|image_pad|>` per image + PIL images (vLLM). Image errors name the item."""
    messages = fmt.apply(item.messages)
    try:
        enc = encode_messages(messages, tok, ids, image_proc, add_generation_prompt=True)
        images = [load_image(p) for _, parts in messages for p in parts if not isinstance(p, str)]
    except ValueError as e:
        raise ValueError(f"{item.where}: {e}") from None
    token_ids = enc.input_ids.tolist()
    text = tok.decode(collapse_image_pads(token_ids, ids["image_pad"]), skip_special_tokens=False)
    grid = enc.grid_thw.to(torch.long) if enc.grid_thw is not None else None
    image = None if not images else images[0] if len(images) == 1 else images
    return Prompt(token_ids, pixel_values=enc.pixel_values, image_grid_thw=grid, text=text, image=image)


def prompt_length(item: Item, tok, ids: dict, image_proc, fmt: PromptFormat) -> int:
    """Tokens of `build_prompt(item, ...)` without computing pixel values: the text is encoded as build_prompt
    encodes it (each part separately), each image adds its resized grid's tokens plus its two delimiters."""
    messages = fmt.apply(item.messages)
    images = [p for _, parts in messages for p in parts if not isinstance(p, str)]
    text_only = [(role, [p for p in parts if isinstance(p, str)]) for role, parts in messages]
    try:
        n = encode_messages(text_only, tok, ids, None, add_generation_prompt=True).length
        return n + sum(2 + image_proc.num_tokens_of_size(*load_image(ref).size) for ref in images)
    except ValueError as e:
        raise ValueError(f"{item.where}: {e}") from None


def fitting_prompts(items: list, lengths: list, limit: int) -> tuple:
    """The items of at most `limit` prompt tokens (so prompt + the longest response fits a micro-batch) and how
    many were dropped; ValueError when none is left."""
    kept = [it for it, n in zip(items, lengths) if n <= limit]
    if not kept:
        raise ValueError(f"every one of the {len(items)} RL prompts is longer than {limit} tokens (data.token_budget "
                         f"minus the longest rl.length_curriculum entry; shortest prompt: {min(lengths)} tokens)")
    return kept, len(items) - len(kept)
