"""Generated image tasks: answers read back from the pixels, determinism, disjoint held-out split."""

import hashlib
from collections import deque

import numpy as np
import pytest

from ovr_train.synth_images import (
    _DIGIT_SEGMENTS,
    _SEGMENTS,
    COLORS,
    PERCEPTION_TASKS,
    REASONING_TASKS,
    SPLITS,
    TASKS,
    make_dataset,
    make_item,
    to_messages,
)


def _blobs(img):
    """Connected components (4-neighbour) of each palette colour -> {color: [pixel counts]}."""
    a = np.asarray(img)
    out = {}
    for name, rgb in COLORS.items():
        mask = np.all(a == np.array(rgb, dtype=a.dtype), axis=-1)
        seen = np.zeros_like(mask)
        sizes = []
        for y, x in zip(*np.nonzero(mask)):
            if seen[y, x]:
                continue
            seen[y, x] = True
            queue, n = deque([(y, x)]), 0
            while queue:
                cy, cx = queue.popleft()
                n += 1
                for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            sizes.append(n)
        out[name] = sizes
    return out


def _read_digits(img, num=2):
    """Decode seven-segment digits by sampling each segment's midpoint (mirrors the renderer's layout)."""
    a = np.asarray(img)
    size = a.shape[0]
    cell_w = size // (num + 1)
    seg = cell_w * 0.6
    top = size / 2 - seg
    digits = []
    for i in range(num):
        left = cell_w * (i + 0.5) + (cell_w - seg) / 2
        lit = ""
        for name, ((x0, y0), (x1, y1)) in _SEGMENTS.items():
            px, py = left + (x0 + x1) / 2 * seg, top + (y0 + y1) / 2 * seg
            if a[round(py), round(px)].sum() < 100:
                lit += name
        digits.append(next(d for d, s in enumerate(_DIGIT_SEGMENTS) if sorted(s) == sorted(lit)))
    return digits


def _answer_from_pixels(item):
    q = item["question"]
    if item["task"].startswith("digit"):
        d0, d1 = _read_digits(item["image"])
        if item["task"] == "digit_read":
            return str(d0 if " left " in q else d1)
        return str(d0 + d1) if item["task"] == "digit_sum" else str(abs(d0 - d1))
    blobs = _blobs(item["image"])
    counts = {c: len(s) for c, s in blobs.items()}
    words = q.split()
    if item["task"] == "count_all":
        return str(sum(counts.values()))
    if item["task"] == "count_color":
        return str(counts[words[2]])
    if item["task"] == "more_than":
        return str(counts[words[3]] - counts[words[6]])
    if item["task"] == "total_two":
        return str(counts[words[2]] + counts[words[4]])
    if item["task"] == "color_largest":
        return max(((s, c) for c, sizes in blobs.items() for s in sizes))[1]
    return None


@pytest.mark.parametrize("image_size", [112, 56])
def test_answers_match_the_pixels(image_size):
    items = make_dataset(48, seed=3, split="train", tasks=TASKS, image_size=image_size)
    assert {it["task"] for it in items} == set(TASKS)
    checked = 0
    for it in items:
        assert it["image"].size == (image_size, image_size) and it["image"].mode == "RGB"
        assert it["question"].endswith("\\boxed{}.")
        want = _answer_from_pixels(it)
        if want is not None:
            assert it["answer"] == want, (it["task"], it["question"], it["description"])
            checked += 1
        else:  # describe: the caption lists every shape
            assert len(it["answer"].split(", ")) == sum(len(s) for s in _blobs(it["image"]).values())
    assert checked >= 40


def test_more_than_answers_are_positive():
    items = make_dataset(30, seed=1, tasks=("more_than",))
    assert all(int(it["answer"]) >= 1 for it in items)


def test_deterministic_and_random_access():
    a = make_dataset(6, seed=7, split="test", start=10)
    b = [make_item(i, seed=7, split="test") for i in range(10, 16)]
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and x["answer"] == y["answer"]
        assert np.array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
    c = make_dataset(6, seed=8, split="test", start=10)
    assert [x["key"] for x in a] != [x["key"] for x in c]


def test_held_out_and_validation_splits_are_disjoint():
    train = {it["key"] for it in make_dataset(400, seed=0, split="train")}
    val = {it["key"] for it in make_dataset(200, seed=0, split="val")}
    test = {it["key"] for it in make_dataset(200, seed=0, split="test")}
    assert not train & test and not train & val and not val & test
    assert len(test) > 50 and len(val) > 50  # many distinct held-out items, not a handful repeated
    digits = [{it["key"] for it in make_dataset(200, seed=0, split=s, tasks=("digit_read",))} for s in SPLITS]
    assert not any(a & b for i, a in enumerate(digits) for b in digits[i + 1:])  # a small content space, still split


def test_test_split_unchanged_by_the_validation_split():
    # the held-out "test" items (every stage's eval) are those of the code before "val" existed: same digest
    keys = "\n".join(it["key"] for tasks in (REASONING_TASKS, PERCEPTION_TASKS)
                     for it in make_dataset(40, seed=0, split="test", tasks=tasks))
    assert hashlib.sha256(keys.encode()).hexdigest() == \
        "0101f1b89f8de866ae27b18fe55137acec4dd667298bc17b40eee4112e432c3c"


def test_messages_and_bad_arguments():
    msgs = to_messages(make_item(0))
    assert msgs[0]["content"][0] == {"type": "image"} and msgs[0]["content"][1]["type"] == "text"
    with pytest.raises(ValueError, match="split"):
        make_item(0, split="dev")
    with pytest.raises(ValueError, match="tasks"):
        make_item(0, tasks=("sudoku",))
    with pytest.raises(ValueError, match="image_size"):
        make_item(0, image_size=100)
