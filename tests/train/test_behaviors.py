"""Behaviour detection and rates (text vs image split, transfer ratio) on tables of responses."""

import math

import pytest

from ovr_train.behaviors import BEHAVIORS, behavior_rates, detect, plot_behaviors, rates, tally


@pytest.mark.parametrize("response, present", [
    ("2 + 3 = 5. \\boxed{5}", set()),
    ("2 + 3 = 6. Wait, that is wrong: 2 + 3 = 5.", {"reflection", "backtracking"}),
    ("Let me check: 5 - 3 = 2, correct.", {"verification"}),
    ("Let me RECHECK the sum.", {"reflection", "verification"}),
    ("However, the blue ones are smaller.", {"reflection"}),
    ("First, count the red shapes. Then the blue ones.", {"subgoal"}),
    ("Working backward from the total, the other part is 4.", {"backward_chaining"}),
    ("Let me look at the image again: there are 4 circles.", {"visual_reflection"}),
    ("I will re-examine the figure to be sure.", {"visual_reflection"}),
    ("Alternatively, recount the squares.", {"reflection", "backtracking", "visual_reflection"}),
    ("waiting for the answer", set()),  # "wait" without the comma is not the backtracking marker
])
def test_detect_table(response, present):
    hits = detect(response)
    assert set(hits) == set(BEHAVIORS)
    assert {name for name, hit in hits.items() if hit} == present


def test_rates_split_and_transfer():
    responses = [
        "Wait, no. Let me check it.",           # text
        "2 + 2 = 4.",                           # text
        "Let me check: yes.",                   # text
        "Wait, look at the image again.",       # image
        "There are 3 circles.",                 # image
        "There are 2 squares.",                 # image
        "let me verify the count",              # image
    ]
    is_image = [False, False, False, True, True, True, True]
    r = behavior_rates(responses, is_image)
    assert r["text/num"] == 3 and r["image/num"] == 4
    assert r["text/verification"] == pytest.approx(2 / 3)
    assert r["image/verification"] == pytest.approx(1 / 4)
    assert r["transfer/verification"] == pytest.approx((1 / 4) / (2 / 3))
    assert r["text/reflection"] == pytest.approx(1 / 3)
    assert r["image/reflection"] == pytest.approx(1 / 4)
    assert r["all/reflection"] == pytest.approx(2 / 7)
    assert r["image/visual_reflection"] == pytest.approx(1 / 4)
    assert r["text/visual_reflection"] == 0.0
    assert math.isnan(r["transfer/visual_reflection"])  # no text rate to divide by


def test_rates_empty_split_is_nan_not_zero():
    r = behavior_rates(["Wait, 3."], [True])
    assert r["text/num"] == 0 and math.isnan(r["text/reflection"]) and math.isnan(r["transfer/reflection"])
    assert r["image/reflection"] == 1.0
    with pytest.raises(ValueError, match="is_image"):
        behavior_rates(["a", "b"], [True])


def test_tallies_sum_over_shards_to_the_whole():
    """Counts add up across ranks (or batches): the rates of summed tallies are the rates of all responses."""
    responses = ["Wait, no.", "ok", "Let me check.", "look at the image again", "fine"]
    is_image = [False, True, False, True, True]
    halves = [tally([detect(r) for r in responses[s]], is_image[s]) for s in (slice(0, 2), slice(2, None))]
    summed = {k: halves[0][k] + halves[1][k] for k in halves[0]}
    assert summed == tally([detect(r) for r in responses], is_image)
    assert summed["text/num"] == 2 and summed["image/visual_reflection"] == 1
    whole = behavior_rates(responses, is_image)
    assert rates(summed).keys() == whole.keys()
    assert all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(rates(summed).values(), whole.values()))
    with pytest.raises(ValueError, match="is_image"):
        tally([detect("a")], [True, False])


def test_plot_writes_png(tmp_path):
    history = [(0, behavior_rates(["a", "Wait, b"], [False, True])),
               (1, behavior_rates(["Wait, a", "look at the image again"], [False, True]))]
    path = tmp_path / "behaviors.png"
    plot_behaviors(history, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
