"""Rule-based rewards: the last `\\boxed{...}` answer checked against the reference, in a process pool.

Pure functions first: `extract_boxed`, `normalize_answer`, `choice_letter`, `is_equivalent`, and `score`, the one
reward of RL and evaluation (free-form and multiple-choice answers, optional format reward). Then `RewardPool`, which
runs a score function in worker processes with a hard per-item timeout: math-verify can hang on a pathological
expression (`9^{9^{9^{9}}}` never returns) and its own timeouts only work in a main thread (it uses signal.alarm),
so workers call it with its timeouts disabled and the pool kills and replaces a worker
whose item runs past the deadline. Timeouts and errors are returned as such, never as a silent 0.
"""

import json
import multiprocessing as mp
import os
import re
import time
from dataclasses import dataclass
from multiprocessing.connection import wait

_BOX_COMMANDS = ("\\boxed", "\\fbox")
LETTERS = "ABCDEFGHIJ"  # multiple-choice option letters: option i has letter LETTERS[i]
_MC_PREFIX = '{"answer": '  # how gold_spec's JSON of a multiple-choice answer starts
_LETTER_RE = re.compile(r"^\(?([A-J])\)?[.:]?$")
_LETTER_TEXT_RE = re.compile(r"^(?:option|choice|answer)?\s*:?\s*\(?([A-J])\)?(?:[.:)]|\s|$)", re.IGNORECASE)


def extract_boxed(text):
    """Content of the LAST `\\boxed{...}` (or `\\fbox{...}`) in text, with nested braces; None if there is none
    or its braces never close (a truncated answer)."""
    start = max(text.rfind(cmd + "{") for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def normalize_answer(s):
    """Loose string form for an exact-match fallback: no `$`, `\\text{}`/`\\mathrm{}` wrappers, spaces, thousands
    separators, trailing period; `\\dfrac`/`\\tfrac` -> `\\frac`; lower case."""
    s = s.strip().strip("$")
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("{,}", "").replace("\\!", "").replace("\\,", "").replace("\\ ", "")
    s = re.sub(r"(?<=\d),(?=\d{3}(?:\D|$))", "", s)
    s = re.sub(r"\s+", "", s).rstrip(".").strip("$").lower()
    return s


def choice_letter(s):
    """Multiple-choice letter A-J of an answer such as `B`, `(B)`, `B.`, `\\text{(B)}`, `Option B`; else None."""
    s = normalize_answer(s).upper()
    m = _LETTER_RE.match(s) or _LETTER_TEXT_RE.match(s)
    return m.group(1).upper() if m else None


def _math_verify(gold, pred):
    # Imported here so that importing this module stays cheap; timeouts disabled because math-verify's own ones
    # only work in a main thread: the pool's hard timeout is the guard.
    from math_verify import parse, verify

    gold_p = parse(f"${gold}$", parsing_timeout=None)
    pred_p = parse(f"${pred}$", parsing_timeout=None)
    if not gold_p or not pred_p:
        return False
    return bool(verify(gold_p, pred_p, timeout_seconds=None))


def is_equivalent(pred, gold):
    """True if the predicted answer matches the reference: normalised string, multiple-choice letter, or
    math-verify's numeric / symbolic / set / interval equality (`\\frac{1}{2}` == 0.5, `x=3` == 3, `1,000` == 1000,
    `5\\text{ cm}` == 5, `50\\%` == 0.5). May hang on pathological input: call it through `RewardPool`."""
    if normalize_answer(pred) == normalize_answer(gold):
        return True
    gold_letter = choice_letter(gold)
    if gold_letter is not None and len(normalize_answer(gold)) <= 3:
        return choice_letter(pred) == gold_letter
    return _math_verify(gold, pred)


def has_format(response):
    """Well-formed response: one final boxed answer and, if a `<think>` block is opened, it is closed."""
    if extract_boxed(response) is None:
        return False
    return "<think>" not in response or "</think>" in response


def gold_spec(answer, choices=()):
    """The gold answer of a prompt as the one string `score` takes (RewardPool passes answers as strings): the
    answer itself, or with multiple-choice options a JSON object of both."""
    return json.dumps({"answer": str(answer), "choices": list(choices)}) if choices else str(answer)


def _gold_choice(answer, choices):
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


def score_multiple_choice(pred, answer, choices):
    """A multiple-choice prediction is right if it names the correct letter (`B`, `(B)`, `B. 3 cm`), or, naming
    no letter, if its content equals the correct option's (`3 cm` for option B = `3\\,\\text{cm}`)."""
    gold = _gold_choice(answer, choices)
    if gold is None:  # the answer is none of the options: judge it as a free-form answer
        return is_equivalent(pred, answer)
    letter = choice_letter(pred)
    if letter is not None:
        return letter == LETTERS[gold]
    return is_equivalent(pred, choices[gold]) or is_equivalent(pred, answer)


def score(response, gold, truncated=False, format_reward=0.0):
    """Reward of one response, for RL and evaluation alike: 1 if its last boxed answer matches `gold` (from
    `gold_spec`: free-form by `is_equivalent`, multiple choice by `score_multiple_choice`), else 0; 0 when truncated
    (hit the length limit) or without a box. `format_reward` > 0 adds that much for a well-formed response (off by
    default, as in ORZ). Pure; may hang on pathological input (see `RewardPool`)."""
    if truncated:
        return 0.0
    pred = extract_boxed(response)
    if gold.startswith(_MC_PREFIX):
        spec = json.loads(gold)
        correct = bool(pred) and score_multiple_choice(pred, spec["answer"], spec["choices"])
    else:
        correct = bool(pred) and is_equivalent(pred, gold)
    bonus = format_reward if format_reward and has_format(response) else 0.0
    return float(correct) + bonus


# ----------------------------------------------------------------------------------------------------------------
# Process pool with a hard per-item timeout
# ----------------------------------------------------------------------------------------------------------------


def default_num_workers(requested: int = 0) -> int:
    """Verifier processes per rank: `requested`, or for 0 the CPU cores this process may run on divided by the
    ranks on its node (LOCAL_WORLD_SIZE), at least 1: each rank scores its own responses, so cores beyond one
    per rank would sit idle while a single worker scores ~1,024 long responses one after another."""
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


@dataclass
class RewardBatch:
    """Result of `RewardPool.score`: per-item rewards and status ('ok' | 'timeout' | 'error'), plus counts."""

    rewards: list
    status: list
    num_timeout: int = 0
    num_error: int = 0
    first_error: str = ""
    seconds: float = 0.0


def _worker_main(conn, score_fn):
    """Worker loop: load the imports, say ready, then score (idx, args, kwargs) items until told to stop (None)."""
    import math_verify  # noqa: F401  (sympy and latex2sympy load here, ~1 s, before the first timed item)

    conn.send(("ready", None, None))
    while True:
        msg = conn.recv()
        if msg is None:
            return
        idx, args, kwargs = msg
        try:
            conn.send((idx, "ok", float(score_fn(*args, **kwargs))))
        except Exception as e:  # noqa: BLE001 - every failure is counted and reported, never hidden
            conn.send((idx, "error", f"{type(e).__name__}: {e}"))


class _Worker:
    def __init__(self, ctx, score_fn):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, score_fn), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.item = None  # index of the item in flight
        self.deadline = 0.0

    def kill(self):
        self.proc.kill()
        self.proc.join()
        self.conn.close()


class RewardPool:
    """Scores items in `num_workers` spawned processes; an item running past `timeout_s` has its worker killed and
    replaced and is counted as a timeout (reward 0, status 'timeout').

    score_fn: a picklable module-level function `(response, answer, truncated=..., format_reward=...) -> float`
    (default `score`). Use as a context manager or call `close()`.
    """

    def __init__(self, num_workers=1, timeout_s=5.0, score_fn=score, format_reward=0.0):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        # spawn: the trainer process holds OpenMP / gloo threads, which fork would copy in an unknown state.
        self._ctx = mp.get_context("spawn")
        self._score_fn = score_fn
        self.timeout_s = float(timeout_s)
        self.format_reward = format_reward
        self._workers = [_Worker(self._ctx, score_fn) for _ in range(num_workers)]

    def score(self, responses, answers, truncated=None):
        """responses, answers: lists of str; truncated: list of bool (None = none truncated) -> RewardBatch."""
        if len(responses) != len(answers):
            raise ValueError(f"responses ({len(responses)}) and answers ({len(answers)}) differ in length")
        truncated = [False] * len(responses) if truncated is None else list(truncated)
        if len(truncated) != len(responses):
            raise ValueError(f"truncated ({len(truncated)}) and responses ({len(responses)}) differ in length")
        t0 = time.perf_counter()
        n = len(responses)
        rewards, status = [0.0] * n, [""] * n
        errors = []
        todo = list(range(n - 1, -1, -1))
        done = 0
        while done < n:
            for w in self._workers:
                if w.ready and w.item is None and todo:
                    i = todo.pop()
                    kwargs = {"truncated": truncated[i], "format_reward": self.format_reward}
                    w.conn.send((i, (responses[i], str(answers[i])), kwargs))
                    w.item, w.deadline = i, time.monotonic() + self.timeout_s
            busy = [w for w in self._workers if w.item is not None]
            timeout = max(0.0, min(w.deadline for w in busy) - time.monotonic()) if busy else None
            for conn in wait([w.conn for w in self._workers], timeout):
                w = next(w for w in self._workers if w.conn is conn)
                try:
                    idx, st, val = conn.recv()
                except (EOFError, OSError):  # the worker died (e.g. out of memory): count its item, replace it
                    if not w.ready:
                        raise RuntimeError(f"reward worker failed to start (exit code {w.proc.exitcode})") from None
                    if w.item is not None:
                        status[w.item] = "error"
                        errors.append(f"worker exited with code {w.proc.exitcode}")
                        done += 1
                    self._replace(w)
                    continue
                if idx == "ready":
                    w.ready = True
                    continue
                w.item = None
                status[idx] = st
                if st == "ok":
                    rewards[idx] = val
                else:
                    errors.append(val)
                done += 1
            now = time.monotonic()
            for w in list(self._workers):
                if w.item is not None and now >= w.deadline:
                    status[w.item] = "timeout"
                    done += 1
                    self._replace(w)
        return RewardBatch(rewards=rewards, status=status, num_timeout=status.count("timeout"), num_error=status.count("error"),
                           first_error=errors[0] if errors else "", seconds=time.perf_counter() - t0)

    def _replace(self, worker):
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self._ctx, self._score_fn)

    def close(self):
        for w in self._workers:
            try:
                w.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            w.proc.join(timeout=2.0)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
            w.conn.close()
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
