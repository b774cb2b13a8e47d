"""Rewards: boxed-answer extraction, answer equivalence on tricky LaTeX, truncation, and the pool's hard timeout."""

import time

import pytest

from ovr_train.rewards import (
    RewardPool,
    choice_letter,
    extract_boxed,
    is_equivalent,
    normalize_answer,
    score_response,
)

# A verifier input that never returns: sympy evaluates the tower exactly (math-verify has no guard once its own
# timeouts are disabled, which they must be outside a main thread).
HANGING_ANSWER = "9^{9^{9^{9}}}"


def raise_on_bad(response, answer, truncated=False, format_reward=0.0):
    """Test score function: raises for one answer (an error must be counted, not turned into a silent 0)."""
    if answer == "bad":
        raise RuntimeError("broken verifier")
    return score_response(response, answer, truncated, format_reward)


def sleep_on_slow(response, answer, truncated=False, format_reward=0.0):
    """Test score function: never returns for one answer (a hung worker must be killed and replaced)."""
    if answer == "slow":
        time.sleep(3600)
    return score_response(response, answer, truncated, format_reward)


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
def test_score_response_table(response, answer, truncated, fmt, expected):
    assert score_response(response, answer, truncated, fmt) == pytest.approx(expected)


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
