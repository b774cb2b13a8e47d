"""The embedded default text corpus: verifiable reasoning problems with R1-style traces.

Each item is a user question and an assistant answer `<think>...</think>` + `The answer is \\boxed{N}.` whose trace
shows the linguistic behaviours the cold start should teach (the paper's linguistic cold start): verification ("Let me verify", "Wait, let
me check") and backtracking (a slip, "Wait, that's wrong", the fix). Problems: two-step arithmetic on single-digit
operands, linear equations, and comparisons. Everything is deterministic per seed; held-out questions come from a
disjoint part of the question space (chosen by a hash of the question), so no eval question is ever trained on.

Described pictures (optional, a fraction of the training split): the image questions of synth_images' reasoning
tasks, asked word for word about a scene told in text ("An image shows 4 red shapes and 1 blue shape. How many
more red shapes than blue shapes are there?"). Their traces read the scene first ("First, count the red shapes: 4.")
and a misread is corrected by looking again ("Wait, let me look at the image again: 4."), so the text-only cold
start teaches the shape of an image answer: read, then compute, then verify. The held-out split has none.

`ensure_corpus(cache_dir, num_train, num_eval, seed, picture_fraction)` writes `train.jsonl` / `eval.jsonl` (OpenAI
`messages` style, plus an `answer` field) on first use and returns their paths.
"""

import hashlib
import json
import os
import random
import re
from collections import Counter
from pathlib import Path

VERIFY_PHRASES = ("Let me verify", "Wait, let me check", "Let me double-check")
"""Phrases every trace uses to verify its result (behaviours.py counts these)."""
BACKTRACK_PHRASES = ("Wait, that's wrong", "Wait, that is not right", "Hmm, let me recheck")
"""Phrases that open a correction after a deliberate slip."""
LOOK_AGAIN_PHRASES = ("Wait, let me look at the image again", "Hmm, let me check the image again", "Wait, let me recount")
"""Phrases that open the correction of a misread picture (visual reflection in behaviours.py)."""

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_WORDS = {"+": "plus", "-": "minus", "*": "times"}


def reply(result, lines=()) -> str:
    """An assistant reply: the reasoning `lines` inside <think> tags (none: no tags), then the boxed answer, the form
    the verifier reads. The corpus traces and the base stage's perception replies are both written by it."""
    boxed = "The answer is \\boxed{" + str(result) + "}."
    return "<think>" + " ".join(lines) + "</think>\n" + boxed if lines else boxed


def read_line(word: str, what: str, value) -> str:
    """One reading step of a trace: "First, count the red shapes: 4." (`what` from synth_images.READS)."""
    return f"{word}, {what}: {value}."


def step_line(word: str, step: tuple, value=None) -> str:
    """One step of a trace, opened by `word` ("First", "Then"): a read ("read", what, value) as `read_line`, an
    operation (expression, value) as "Then, 4 - 1 = 3."; `value` given: that value written instead (a slip)."""
    value = step[-1] if value is None else value
    return read_line(word, step[1], value) if step[0] == "read" else f"{word}, {step[0]} = {value}."


def step_lines(steps) -> list:
    """The lines of a trace that works `steps` with no slip: "First, ..." then "Then, ..." (see `step_line`)."""
    return [step_line("First" if i == 0 else "Then", step) for i, step in enumerate(steps)]


def _is_eval_question(question: str) -> bool:
    """1 question in 8 (by hash) belongs to the held-out split: eval and train never share a question."""
    return hashlib.sha1(question.encode()).digest()[0] % 8 == 0


def _arith(rng: random.Random) -> tuple:
    a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
    op1, op2 = rng.choice("+-*"), rng.choice("+-*")
    first = _OPS[op1](a, b)
    result = _OPS[op2](first, c)
    question = f"Compute ({a} {op1} {b}) {op2} {c}."
    steps = [(f"{a} {op1} {b}", first), (f"{first} {op2} {c}", result)]
    # Verification by an inverse operation where one exists, else by recomputing the first step differently.
    if op2 == "+":
        check = f"{result} - {c} = {first}, which matches the first step"
    elif op2 == "-":
        check = f"{result} + {c} = {first}, which matches the first step"
    else:
        check = f"{first} * {c} = " + " + ".join([str(first)] * c) + f" = {result}" if c <= 4 else \
            f"{c} * {first} = {result} as well"
    return question, steps, check, result


def _equation(rng: random.Random) -> tuple:
    x, a = rng.randint(0, 20), rng.randint(1, 9)
    op = rng.choice("+-*")
    if op == "*":
        x = rng.randint(1, 9)
    rhs = _OPS[op](x, a)
    question = f"Solve for x: x {op} {a} = {rhs}."
    inverse = {"+": "-", "-": "+", "*": "/"}[op]
    steps = [(f"x = {rhs} {inverse} {a}", x)]
    check = f"{x} {op} {a} = {rhs}, so x = {x} satisfies the equation"
    return question, steps, check, x


def _compare(rng: random.Random) -> tuple:
    a, b, c, d = (rng.randint(1, 9) for _ in range(4))
    left, right = a * b, c + d
    question = f"What is the larger of {a} * {b} and {c} + {d}? Give the larger value."
    result = max(left, right)
    steps = [(f"{a} * {b}", left), (f"{c} + {d}", right)]
    check = f"{left} {'>=' if left >= right else '<'} {right}, so the larger value is {result}"
    return question, steps, check, result


def _picture(rng: random.Random) -> tuple:
    """A reasoning task of synth_images told in words: the image question word for word after a description of the
    scene. Steps that read the picture are ("read", what, value); the first look may be wrong (see `_trace`)."""
    from ovr_train import synth_images  # here, not at the top: synth_images imports this module

    task = rng.choice(synth_images.REASONING_TASKS)
    if task.startswith("digit"):
        content, question, answer, asked = synth_images.digit_task(task, rng)
        scene = f"An image shows the digits {content[0]} and {content[1]}."
    else:
        content, question, answer, asked = synth_images.shape_task(task, rng)
        counts = Counter(s.color for s in content)  # colours in the order they were drawn
        told = [f"{n} {color} shape" + ("s" if n > 1 else "") for color, n in counts.items()]
        scene = "An image shows " + (", ".join(told[:-1]) + " and " + told[-1] if len(told) > 1 else told[0]) + "."
    steps, check = synth_images.reasoning_steps(task, content, asked)
    assert str(steps[-1][1]) == answer, (task, steps, answer)
    return f"{scene} {question}{synth_images.ANSWER_FORMAT}", steps, check, int(answer)


_TEXT_MAKERS = (_arith, _arith, _equation, _compare)  # arithmetic twice as often: it carries the 2-step reasoning
_OPEN, _CLOSE = "\x00", "\x01"  # around a read value while a masked trace is built; never left in the corpus


def _masked_parts(text: str) -> list:
    """A trace with marked read values -> content parts: the values (each with the space before it, so that the
    tokens are those of the unmarked text) as `"loss": false` parts, the rest as trained text."""
    parts, pos = [], 0
    for m in re.finditer(f" ?{_OPEN}([^{_CLOSE}]*){_CLOSE}", text):
        if m.start() > pos:
            parts.append({"type": "text", "text": text[pos:m.start()]})
        parts.append({"type": "text", "text": m.group(0).replace(_OPEN, "").replace(_CLOSE, ""), "loss": False})
        pos = m.end()
    if pos < len(text):
        parts.append({"type": "text", "text": text[pos:]})
    return parts


def _trace(rng: random.Random, steps: list, check: str, result: int, mask_reads: bool = False) -> str:
    """Reasoning with a verification phrase; in ~1/3 of traces a slip on one step, then backtracking. A trace that
    reads a picture slips only in a reading ("count the red shapes: 5"), which a second look corrects. With
    `mask_reads` the values read off the picture come marked (see `_masked_parts`); the draws are the same."""
    mark = (lambda v: f"{_OPEN}{v}{_CLOSE}") if mask_reads else (lambda v: v)
    lines = []
    reads = [i for i, step in enumerate(steps) if step[0] == "read"]
    if rng.random() < 0.35:
        slip_at = rng.choice(reads) if reads else rng.randrange(len(steps))
    else:
        slip_at = -1
    for i, step in enumerate(steps):
        word, value = "First" if i == 0 else "Then", step[-1]
        if i != slip_at:
            lines.append(step_line(word, step, mark(value) if step[0] == "read" else None))
        elif step[0] == "read":
            wrong = rng.choice([v for v in (value - 2, value - 1, value + 1, value + 2) if v >= 0])
            lines.append(f"{step_line(word, step, mark(wrong))} {rng.choice(LOOK_AGAIN_PHRASES)}: {mark(value)}.")
        else:
            wrong = value + rng.choice([-2, -1, 1, 2])
            lines.append(f"{step_line(word, step, wrong)} {rng.choice(BACKTRACK_PHRASES)}: {step[0]} = {value}.")
    lines.append(f"{rng.choice(VERIFY_PHRASES)}: {check}.")
    return reply(result, lines)


def generate_items(num: int, seed: int, split: str, picture_fraction: float = 0.0, mask_reads: bool = False) -> list:
    """`num` distinct problems of `split` ("train" or "eval"), each {"messages": [...], "answer": str}; in "train",
    a `picture_fraction` of them (in expectation) are described pictures. The text problems drawn do not depend on
    the fraction being 0 or not given. With `mask_reads` a described picture's reply is a list of content parts in
    which the values its trace reads off the scene are `"loss": false` (seen, not trained: the cold start then
    teaches the read's frame, not copying a value from the scene's words); the same problems and traces."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: must be 'train' or 'eval'")
    if not 0.0 <= picture_fraction <= 1.0:
        raise ValueError(f"picture_fraction={picture_fraction}: must be in [0, 1]")
    if split == "eval":
        picture_fraction = 0.0  # the held-out text set measures text reasoning; the image sets measure pictures
    rng = random.Random(f"{seed}-{split}")
    items, seen = [], set()
    attempts = 0
    while len(items) < num:
        attempts += 1
        if attempts > 50 * num + 10000:
            raise ValueError(f"cannot draw {num} distinct {split} problems (question space exhausted)")
        maker = _picture if picture_fraction and rng.random() < picture_fraction else rng.choice(_TEXT_MAKERS)
        question, steps, check, result = maker(rng)
        if _is_eval_question(question) != (split == "eval"):
            continue
        if split == "eval" and question in seen:
            continue  # held-out questions are distinct; training may repeat a question with a different trace
        seen.add(question)
        answer = _trace(rng, steps, check, result, mask_reads)
        content = _masked_parts(answer) if _OPEN in answer else answer
        items.append({"messages": [{"role": "user", "content": question},
                                   {"role": "assistant", "content": content}], "answer": str(result)})
    return items


def plain_items(num: int, seed: int) -> list:
    """`num` text problems of the "train" split (arithmetic, equations, comparisons; never a held-out question) with
    plain worked replies: the steps, no verification, no slip ("<think>First, 3 + 4 = 7. Then, 7 * 2 = 14.</think>
    The answer is \\boxed{14}."): a base model that can do the sums but shows none of the cold start's behaviours
    (the base stage's `base.text_items`). Drawn from their own stream, not the cold start's problems and traces."""
    rng = random.Random(f"{seed}-plain")
    items = []
    while len(items) < num:
        question, steps, _, result = rng.choice(_TEXT_MAKERS)(rng)
        if _is_eval_question(question):
            continue
        items.append({"messages": [{"role": "user", "content": question},
                                   {"role": "assistant", "content": reply(result, step_lines(steps))}],
                      "answer": str(result)})
    return items


def ensure_plain_corpus(cache_dir: str, num: int, seed: int) -> Path:
    """Write (once) and return the JSONL of `plain_items(num, seed)` under the cache directory."""
    path = default_cache_dir(cache_dir) / "synth_text" / f"plain_seed{seed}_n{num}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, plain_items(num, seed))
    return path


def default_cache_dir(cache_dir: str = "") -> Path:
    """`cache_dir`, else $OVR_CACHE, else ~/.cache/ovr."""
    return Path(cache_dir or os.environ.get("OVR_CACHE", "") or Path.home() / ".cache" / "ovr")


def _write_atomic(path: Path, items: list):
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(item) + "\n" for item in items)
    os.replace(tmp, path)  # concurrent ranks may race: each writes the same bytes, the rename is atomic


def ensure_corpus(cache_dir: str, num_train: int, num_eval: int, seed: int, picture_fraction: float = 0.0,
                  mask_reads: bool = False) -> tuple:
    """Write (once) and return (train_path, eval_path) of the generated corpus under the cache directory (a
    `picture_fraction` of described pictures in the training file, their read values untrained with `mask_reads`:
    see `generate_items`)."""
    name = f"seed{seed}_train{num_train}_eval{num_eval}" + (f"_pictures{picture_fraction:g}" if picture_fraction else "")
    name += "_maskreads" if picture_fraction and mask_reads else ""
    root = default_cache_dir(cache_dir) / "synth_text" / name
    root.mkdir(parents=True, exist_ok=True)
    train, held = root / "train.jsonl", root / "eval.jsonl"
    if not train.exists():
        _write_atomic(train, generate_items(num_train, seed, "train", picture_fraction, mask_reads))
    if not held.exists():
        _write_atomic(held, generate_items(num_eval, seed, "eval"))
    return train, held


def tokenizer_training_text(num: int = 4000, seed: int = 0) -> list:
    """Text the small BPE is trained on: corpus problems plus words the image tasks and behaviours use."""
    words = ("red green blue yellow purple orange black white gray brown pink circle circles square squares "
             "triangle triangles shape shapes star stars dot dots image picture figure count counted how many more "
             "fewer than largest smallest colour color left right top bottom number digit digits there are is the "
             "of and in a an answer look at the image again re-examine let me look closer see I need to "
             "alternatively, however, wait, recheck retry first then so total describe shows")
    texts = [words] * 20
    for item in generate_items(num, seed, "train"):
        texts.extend(m["content"] for m in item["messages"])
    return texts
