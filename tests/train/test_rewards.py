"""Rewards: boxed-answer extraction, answer equivalence on tricky LaTeX, truncation, and the pool's hard timeout."""

import time

import pytest

from ovr_train.rewards import (
    RewardPool,
    choice_letter,
    extract_boxed,
    gold_spec,
    is_equivalent,
    normalize_answer,
    score,
)

# A verifier input that never returns: sympy evaluates the tower exactly (math-verify has no guard once its own
# timeouts are disabled, which they must be outside a main thread).
HANGING_ANSWER = "9^{9^{9^{9}}}"


def raise_on_bad(response, answer, truncated=False, format_reward=0.0):
    """Test score function: raises for one answer (an error must be counted, not turned into a silent 0)."""
    if answer == "bad":
        raise RuntimeError("broken verifier")
    return score(response, answer, truncated, format_reward)


def sleep_on_slow(response, answer, truncated=False, format_reward=0.0):
    """Test score function: never returns for one answer (a hung worker must be killed and replaced)."""
    if answer == "slow":
        time.sleep(3600)
    return score(response, answer, truncated, format_reward)


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{3}.", "3"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\{1, \\{2\\}\\}}", "\\{1, \\{2\\}\\}"),
    ("\\boxed{ x = 3 }", "x = 3"),
    ("\\fbox{7}", "7"),
    ("no box here: 3", None),
    ("cut off \\boxed{\\frac{1}{2", None),
    ("\\boxed{}", ""),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("pred, gold, expected", [
    ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac{1}{2}", "\\frac12", True),
    ("\\tfrac{3}{4}", "0.75", True),
    ("1,000", "1000", True),
    ("1{,}000", "1000", True),
    ("\\{2, 1\\}", "\\{1,2\\}", True),
    ("(0, 1]", "(0,1]", True),
    ("[0, 1]", "(0,1]", False),
    ("5\\text{ cm}", "5", True),
    ("50\\%", "0.5", True),
    ("x=3", "3", True),
    ("(B)", "B", True),
    ("\\text{(B)}", "B", True),
    ("B.", "B", True),
    ("C", "B", False),
    ("(C)", "(B)", False),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2", True),
    ("(x+1)^2", "x^2+2x+1", True),
    ("3.0", "3", True),
    ("\\text{Red}", "red", True),
    ("blue", "red", False),
    ("12", "2", False),
    ("-1", "1", False),
    ("0.333", "\\frac{1}{3}", False),
    ("\\pi", "3.14159", False),
])
def test_is_equivalent_table(pred, gold, expected):
    assert is_equivalent(pred, gold) is expected


def test_normalize_and_letters():
    assert normalize_answer(" $\\text{ 1,234 }$. ") == "1234"
    assert normalize_answer("\\dfrac{1}{2}") == "\\frac{1}{2}"
    assert choice_letter("Option (D)") == "D"
    assert choice_letter("\\text{B}") == "B"
    assert choice_letter("12") is None


@pytest.mark.parametrize("response, answer, truncated, fmt, expected", [
    ("I think... \\boxed{4}", "4", False, 0.0, 1.0),
    ("I think... \\boxed{4}", "5", False, 0.0, 0.0),
    ("I think... \\boxed{4}", "4", True, 0.0, 0.0),        # truncated: 0 even when the answer is right
    ("the answer is 4", "4", False, 0.0, 0.0),            # no box
    ("\\boxed{}", "4", False, 0.0, 0.0),                  # empty box
    ("\\boxed{3} wait, no: \\boxed{4}", "4", False, 0.0, 1.0),  # the last box counts
    ("\\boxed{4} wait, no: \\boxed{3}", "4", False, 0.0, 0.0),
    ("<think>2+2</think> \\boxed{5}", "4", False, 0.1, 0.1),   # format reward only when asked for
    ("<think>2+2 \\boxed{4}", "4", False, 0.1, 1.0),           # unclosed think: no format bonus
    ("\\boxed{4}", "4", False, 0.1, 1.1),
])
def test_score_table(response, answer, truncated, fmt, expected):
    assert score(response, answer, truncated, fmt) == pytest.approx(expected)


def test_pool_matches_pure_function_and_counts_errors():
    responses = ["\\boxed{\\frac{1}{2}}", "\\boxed{3}", "\\boxed{1}", "\\boxed{7}", "\\boxed{7}"]
    answers = ["0.5", "4", "bad", "7", "7"]
    truncated = [False, False, False, False, True]
    with RewardPool(num_workers=2, timeout_s=20.0, score_fn=raise_on_bad) as pool:
        out = pool.score(responses, answers, truncated)
    assert out.status == ["ok", "ok", "error", "ok", "ok"]
    assert out.rewards == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert out.num_error == 1 and out.num_timeout == 0
    assert "broken verifier" in out.first_error


def test_pool_hard_timeout_kills_and_replaces_worker():
    """A hung item (a test hook that sleeps, then a real pathological expression) is cut by the timeout, counted,
    and the replaced worker keeps scoring the remaining items."""
    responses = ["\\boxed{2}", "\\boxed{1}", f"\\boxed{{{HANGING_ANSWER}}}", "\\boxed{5}", "\\boxed{6}"]
    answers = ["2", "slow", "1", "5", "7"]
    with RewardPool(num_workers=1, timeout_s=1.5, score_fn=sleep_on_slow) as pool:
        first_pid = pool._workers[0].proc.pid
        t0 = time.monotonic()
        out = pool.score(responses, answers)
        elapsed = time.monotonic() - t0
        assert pool._workers[0].proc.pid != first_pid
        again = pool.score(["\\boxed{2}"], ["2"])  # the pool still works afterwards
    assert out.status == ["ok", "timeout", "timeout", "ok", "ok"]
    assert out.rewards == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert out.num_timeout == 2 and out.num_error == 0
    assert elapsed < 30.0
    assert again.rewards == [1.0] and again.status == ["ok"]


def test_pool_bad_arguments():
    with pytest.raises(ValueError, match="timeout_s"):
        RewardPool(timeout_s=0)
    with pytest.raises(ValueError, match="num_workers"):
        RewardPool(num_workers=0)


# ----------------------------------------------------------------------------------------------------------------
# Scoring table: (response, answer, choices, expected)
# ----------------------------------------------------------------------------------------------------------------

MC = ["3 cm", "5 cm", "7 cm", "9 cm"]
SCORING = [
    # free form: LaTeX, units, numbers, the last box wins, no box / empty box / truncated score 0
    ("so \\boxed{\\frac{1}{2}}", "0.5", None, 1),
    ("\\boxed{\\dfrac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", None, 1),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", None, 1),
    ("\\boxed{5\\text{ cm}}", "5", None, 1),
    ("\\boxed{5 cm}", "5", None, 1),
    ("\\boxed{12 \\mathrm{m}^2}", "12", None, 1),
    ("\\boxed{30^\\circ}", "30", None, 1),
    ("\\boxed{50\\%}", "0.5", None, 1),
    ("\\boxed{1,000}", "1000", None, 1),
    ("\\boxed{x = 3}", "3", None, 1),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", None, 1),
    ("first \\boxed{4}, wait, \\boxed{5}", "5", None, 1),
    ("first \\boxed{4}, wait, \\boxed{5}", "4", None, 0),
    ("\\boxed{6}", "5", None, 0),
    ("the answer is 5", "5", None, 0),
    ("\\boxed{}", "5", None, 0),
    ("\\boxed{5", "5", None, 0),
    # multiple choice, gold given as a letter: right by letter or by the option's content
    ("\\boxed{B}", "B", MC, 1),
    ("\\boxed{(B)}", "B", MC, 1),
    ("\\boxed{\\text{(B)}}", "B", MC, 1),
    ("\\boxed{B. 5 cm}", "B", MC, 1),
    ("\\boxed{5 cm}", "B", MC, 1),
    ("\\boxed{5}", "B", MC, 1),
    ("\\boxed{5\\,\\text{cm}}", "B", MC, 1),
    ("\\boxed{A}", "B", MC, 0),
    ("\\boxed{3 cm}", "B", MC, 0),
    ("\\boxed{A. 5 cm}", "B", MC, 0),  # a named letter decides, even with the right content
    # multiple choice, gold given as the option's content (MathVista exports)
    ("\\boxed{B}", "5 cm", MC, 1),
    ("\\boxed{5}", "5 cm", MC, 1),
    ("\\boxed{C}", "5 cm", MC, 0),
    # numeric options: a number is content, a letter is a letter
    ("\\boxed{4}", "4", ["2", "4", "6"], 1),
    ("\\boxed{B}", "4", ["2", "4", "6"], 1),
    ("\\boxed{2}", "4", ["2", "4", "6"], 0),
    ("\\boxed{A}", "4", ["2", "4", "6"], 0),
    # an answer that is none of the options is judged free-form
    ("\\boxed{11}", "11", ["2", "4"], 1),
]


@pytest.mark.parametrize("response,answer,choices,expected", SCORING)
def test_scoring_table(response, answer, choices, expected):
    assert score(response, gold_spec(answer, choices)) == expected


def test_truncated_scores_zero():
    for choices in ([], MC):
        spec = gold_spec("B" if choices else "5", choices)
        assert score("\\boxed{B}" if choices else "\\boxed{5}", spec) == 1.0
        assert score("\\boxed{B}" if choices else "\\boxed{5}", spec, truncated=True) == 0.0



def test_format_reward_counts_for_multiple_choice_too():
    """One score for every answer kind: the format reward is added for a well-formed multiple-choice response
    exactly as for a free-form one (it was dropped for multiple-choice prompts)."""
    for gold in (gold_spec("B", MC), gold_spec("5")):
        right = "<think>ok</think> \\boxed{B}" if gold.startswith("{") else "<think>ok</think> \\boxed{5}"
        assert score(right, gold, format_reward=0.5) == 1.5
        assert score("<think>ok</think> \\boxed{C}", gold, format_reward=0.5) == 0.5
        assert score("<think>unclosed \\boxed{C}", gold, format_reward=0.5) == 0.0
        assert score(right, gold, truncated=True, format_reward=0.5) == 0.0
