"""Built-in multimodal task: generated images with verifiable answers (the miniature OVR's task).

A scene is a few coloured shapes (circle / square / triangle in red / blue / green / yellow) or two seven-segment
digits, drawn with PIL on a white square (112 px by default = 16 Qwen2.5-VL image tokens after the 2x2 merge).
Tasks:
  perception (the base stage gives the tiny model these): count_color, count_all, color_largest, describe,
  digit_read ("what is the left digit?")
  reasoning (the RL stage: perception plus one step): more_than ("how many more red shapes than blue?"),
  total_two ("how many red and blue shapes in total?"), digit_sum, digit_diff (arithmetic on rendered digits).
Every answer is an integer or a colour word, checked by `ovr_train.rewards`. Items are a pure function of
(seed, split, index): `make_item` gives random access (a resumed run re-reads the same items), and each item lands
in "train", "val" or "test" by a hash of its content, so the held-out split never shares a scene+question with training
and "val" (for choosing settings) shares one with neither.
Digits are drawn as seven segments (no font files: identical on every machine and Pillow version).
"""

import base64
import hashlib
import io
import json
import os
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from ovr_train.synth_text import default_cache_dir, reply, step_lines

COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (30, 160, 60), "yellow": (235, 190, 20)}
KINDS = ("circle", "square", "triangle")
PERCEPTION_TASKS = ("count_color", "count_all", "color_largest", "describe", "digit_read")
REASONING_TASKS = ("more_than", "total_two", "digit_sum", "digit_diff")
TASKS = PERCEPTION_TASKS + REASONING_TASKS
SPLITS = ("train", "val", "test")
TEST_FRACTION = 0.2
VAL_FRACTION = 0.1  # carved from what was "train": the "test" split is the same with or without it
ANSWER_FORMAT = " Put the final answer in \\boxed{}."
READS = {"count_color": "count the {} shapes", "count_all": "count the shapes", "color_largest": "find the largest shape",
         "digit_read": "read the {} digit"}
"""How a trace reads the image for a perception task ("First, count the red shapes: 4."), the blank filled with the
colour or side the question asks about: one wording for the base stage's read-first answers and the described
pictures of the text corpus (ovr_train/synth_text.py)."""

# Seven-segment layout: segment -> ((x0, y0), (x1, y1)) in a 0..1 x 0..2 cell; digit -> lit segments.
_SEGMENTS = {"a": ((0, 0), (1, 0)), "b": ((1, 0), (1, 1)), "c": ((1, 1), (1, 2)), "d": ((0, 2), (1, 2)),
             "e": ((0, 1), (0, 2)), "f": ((0, 0), (0, 1)), "g": ((0, 1), (1, 1))}
_DIGIT_SEGMENTS = ("abcdef", "bc", "abdeg", "abcdg", "bcfg", "acdfg", "acdefg", "abc", "abcdefg", "abcdfg")


@dataclass(frozen=True)
class Shape:
    """One shape: kind in KINDS, color in COLORS, centre (x, y) and half-size r, in pixels."""

    kind: str
    color: str
    x: int
    y: int
    r: int


def _place_shapes(rng, num, image_size, colors):
    """num non-overlapping shapes with random kinds/sizes; colours drawn from `colors` (a list, one per shape)."""
    shapes = []
    r_min, r_max = max(4, image_size // 16), max(6, image_size // 7)
    while len(shapes) < num:
        r = rng.randint(r_min, r_max)
        x, y = rng.randint(r + 1, image_size - r - 2), rng.randint(r + 1, image_size - r - 2)
        # 1.42 r bounds a square's or triangle's corners: shapes never touch, so each is one blob of colour
        if all((x - s.x) ** 2 + (y - s.y) ** 2 > (1.42 * (r + s.r) + 2) ** 2 for s in shapes):
            shapes.append(Shape(rng.choice(KINDS), colors[len(shapes)], x, y, r))
        elif len(shapes) and rng.random() < 0.01:  # crowded: start over rather than loop forever
            shapes = []
    return shapes


def render_shapes(shapes, image_size=112):
    """shapes -> RGB PIL image (white background)."""
    img = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for s in shapes:
        box = (s.x - s.r, s.y - s.r, s.x + s.r, s.y + s.r)
        if s.kind == "circle":
            draw.ellipse(box, fill=COLORS[s.color])
        elif s.kind == "square":
            draw.rectangle(box, fill=COLORS[s.color])
        else:
            draw.polygon([(s.x, s.y - s.r), (s.x - s.r, s.y + s.r), (s.x + s.r, s.y + s.r)], fill=COLORS[s.color])
    return img


def render_digits(digits, image_size=112):
    """Digits (list of int 0-9) drawn side by side as black seven-segment glyphs -> RGB PIL image."""
    img = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    cell_w = image_size // (len(digits) + 1)
    seg = cell_w * 0.6
    width = max(2, image_size // 28)
    top = image_size / 2 - seg
    for i, d in enumerate(digits):
        left = cell_w * (i + 0.5) + (cell_w - seg) / 2
        for name in _DIGIT_SEGMENTS[d]:
            (x0, y0), (x1, y1) = _SEGMENTS[name]
            draw.line([(left + x0 * seg, top + y0 * seg), (left + x1 * seg, top + y1 * seg)], fill=(0, 0, 0),
                      width=width)
    return img


def _area(s):
    """Drawn area in pixels^2 (square 4r^2, circle pi r^2, triangle 2r^2): "largest" means the most ink."""
    return {"square": 4.0, "circle": 3.14159, "triangle": 2.0}[s.kind] * s.r * s.r


def _count(shapes, color):
    return sum(s.color == color for s in shapes)


def describe_shapes(shapes):
    """Canonical caption: shapes in reading order (top to bottom, left to right), e.g. 'red circle, blue square'."""
    ordered = sorted(shapes, key=lambda s: (s.y // 16, s.x))
    return ", ".join(f"{s.color} {s.kind}" for s in ordered)


def shape_task(task, rng, image_size=112, max_shapes=6):
    """(shapes, question, answer, asked) of a shape task drawn from `rng` (random.Random); `asked` is the colours
    the question names, in its order. Colours are chosen so that every answer is well defined."""
    names = list(COLORS)
    if task in ("more_than", "total_two"):
        a, b = rng.sample(names, 2)
        if task == "more_than":  # a strictly outnumbers b, so the answer is a positive count
            n_b = rng.randint(0, (max_shapes - 1) // 2)
            n_a = rng.randint(n_b + 1, max_shapes - n_b)
        else:
            n_b = rng.randint(0, max_shapes // 2)
            n_a = rng.randint(0, max_shapes - n_b)
        distractors = [c for c in names if c not in (a, b)]
        colors = [a] * n_a + [b] * n_b + [rng.choice(distractors) for _ in range(rng.randint(0, max_shapes - n_a - n_b))]
        if not colors:  # an empty image would say nothing: show one distractor
            colors = [rng.choice(distractors)]
        rng.shuffle(colors)
        shapes = _place_shapes(rng, len(colors), image_size, colors)
        if task == "more_than":
            q, ans = f"How many more {a} shapes than {b} shapes are there?", n_a - n_b
        else:
            q, ans = f"How many {a} and {b} shapes are there in total?", n_a + n_b
        return shapes, q, str(ans), (a, b)
    n = rng.randint(1, max_shapes)
    colors = [rng.choice(names) for _ in range(n)]
    shapes = _place_shapes(rng, n, image_size, colors)
    while task == "color_largest" and n > 1 and sorted(map(_area, shapes))[-2] * 1.5 > max(map(_area, shapes)):
        shapes = _place_shapes(rng, n, image_size, colors)  # redraw until the largest is clearly the largest
    if task == "count_color":
        c = rng.choice(names)
        return shapes, f"How many {c} shapes are there?", str(_count(shapes, c)), (c,)
    if task == "count_all":
        return shapes, "How many shapes are there?", str(n), ()
    if task == "color_largest":
        return shapes, "What is the colour of the largest shape?", max(shapes, key=_area).color, ()
    assert task == "describe", task
    return shapes, "Describe the image.", describe_shapes(shapes), ()


def digit_task(task, rng):
    """(digits [left, right], question, answer, asked) of a digit task drawn from `rng` (random.Random); `asked` is
    ("left",) or ("right",) for digit_read, else ()."""
    d0, d1 = rng.randint(0, 9), rng.randint(0, 9)
    if task == "digit_read":  # perception only: read one glyph
        side = rng.choice(("left", "right"))
        return [d0, d1], f"What is the {side} digit in the image?", str(d0 if side == "left" else d1), (side,)
    if task == "digit_sum":
        return [d0, d1], "What is the sum of the two digits in the image?", str(d0 + d1), ()
    hi, lo = max(d0, d1), min(d0, d1)
    return [d0, d1], "What is the larger digit minus the smaller digit in the image?", str(hi - lo), ()


def reasoning_steps(task, content, asked=()):
    """The worked steps of a reasoning task's answer, and a sentence that verifies the result: two reads of the
    picture, then one operation, as [("read", what, value), ("read", what, value), (expression, result)].
    `content` is the item's shapes (more_than, total_two; `asked` the two colours the question names) or its
    [left, right] digits (digit_sum, digit_diff). The text corpus's described pictures and the base stage's
    read-first replies both write their traces from these steps."""
    if task in ("digit_sum", "digit_diff"):
        left, right = content
        read = READS["digit_read"]
        steps = [("read", read.format("left"), left), ("read", read.format("right"), right)]
        if task == "digit_sum":
            return steps + [(f"{left} + {right}", left + right)], \
                f"{left + right} - {right} = {left}, which matches the left digit"
        hi, lo = max(left, right), min(left, right)
        return steps + [(f"{hi} - {lo}", hi - lo)], f"{hi - lo} + {lo} = {hi}, which matches the larger digit"
    if task not in ("more_than", "total_two"):
        raise ValueError(f"reasoning_steps: task must be one of {REASONING_TASKS}, got {task!r}")
    a, b = asked
    n_a, n_b = _count(content, a), _count(content, b)
    read = READS["count_color"]
    steps = [("read", read.format(a), n_a), ("read", read.format(b), n_b)]
    if task == "more_than":
        return steps + [(f"{n_a} - {n_b}", n_a - n_b)], f"{n_a - n_b} + {n_b} = {n_a}, which matches the {a} count"
    return steps + [(f"{n_a} + {n_b}", n_a + n_b)], f"{n_a + n_b} - {n_b} = {n_a}, which matches the {a} count"


def _split_of(key):
    """'test' for a TEST_FRACTION of content keys (a stable hash), 'val' for the next VAL_FRACTION, else 'train'."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % 1000
    if h < TEST_FRACTION * 1000:
        return "test"
    return "val" if h < (TEST_FRACTION + VAL_FRACTION) * 1000 else "train"


def make_item(index, seed=0, split="train", tasks=REASONING_TASKS, image_size=112, max_shapes=6):
    """Item `index` of a split: {"question", "image" (PIL RGB), "answer" (str), "task", "description", "key",
    "read", "steps"}.

    `question` ends with the boxed-answer instruction; `description` is the scene caption (for perception
    pretraining); `key` identifies the content (the split is a hash of it); `read` is the perception task's reading
    step (READS; "" for the others); `steps` the worked answer: [("read", read, answer)] for a perception task
    with a read, `reasoning_steps` for a reasoning task, [] for describe. Deterministic in all arguments.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    bad = [t for t in tasks if t not in TASKS]
    if not tasks or bad:
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {tasks!r}")
    if image_size < 28 or image_size % 28:
        raise ValueError(f"image_size must be a positive multiple of 28 (patch 14 x merge 2), got {image_size}")
    if max_shapes < 2:
        raise ValueError(f"max_shapes must be >= 2, got {max_shapes}")
    task = tasks[index % len(tasks)]
    for attempt in range(1000):  # redraw the content until its hash falls in this split
        rng = random.Random(f"ovr-synth-images:{seed}:{split}:{index}:{attempt}")
        if task.startswith("digit"):
            digits, question, answer, asked = digit_task(task, rng)
            key = f"{task}|{digits}|{image_size}" + (f"|{question}" if task == "digit_read" else "")
            desc = " ".join(map(str, digits))
            make_image = (lambda d=digits: render_digits(d, image_size))
        else:
            shapes, question, answer, asked = shape_task(task, rng, image_size, max_shapes)
            key = f"{task}|{question}|{sorted((s.kind, s.color, s.x, s.y, s.r) for s in shapes)}|{image_size}"
            desc = describe_shapes(shapes)
            make_image = (lambda s=shapes: render_shapes(s, image_size))
        if _split_of(key) == split:
            read = READS[task].format(*asked) if task in READS else ""
            if task in REASONING_TASKS:
                steps = reasoning_steps(task, digits if task.startswith("digit") else shapes, asked)[0]
            else:
                steps = [("read", read, answer)] if read else []
            return {"question": question + ANSWER_FORMAT, "image": make_image(), "answer": answer, "task": task,
                    "description": desc, "key": key, "read": read, "steps": steps}
    raise RuntimeError("no item found for this split in 1000 attempts")  # unreachable: each split holds >= 10%


def make_dataset(num, seed=0, split="train", tasks=REASONING_TASKS, image_size=112, max_shapes=6, start=0):
    """Items start .. start+num-1 of a split (see `make_item`)."""
    return [make_item(i, seed, split, tasks, image_size, max_shapes) for i in range(start, start + num)]


def to_messages(item):
    """A record -> HF chat messages with one image placeholder before the question (user turn only)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item["question"]}]}]


def png_data_url(image):
    """A generated image inline as a PNG data URL: items and corpora need no image files."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def base_reply(item, read_first=False):
    """The base stage's reply to `item` (make_item): only the answer in the same `\\boxed{}` form the cold start and
    the verifier use (bare-word replies would leave nothing for the text-only SFT to bridge to); with `read_first`,
    the item's steps first, in a trace as the cold start writes one, without its slips and verification:
    "<think>First, count the red shapes: 4.</think>" for a perception task, two reads and the operation for a
    reasoning task ("First, count the red shapes: 4. Then, count the blue shapes: 1. Then, 4 - 1 = 3.")."""
    return reply(item["answer"], step_lines(item["steps"]) if read_first else ())


def ensure_perception_corpus(cache_dir, num, seed=0, tasks=("count_color", "count_all", "color_largest",
                                                            "digit_read"), image_size=112, max_shapes=6,
                             read_first=False):
    """Write (once) and return the base stage's training JSONL: `num` items of the "train" split of `tasks`, each
    {"messages": [user: image + question, assistant: base_reply], "answer", "task"}, images inline as PNG
    data URLs; `read_first`: replies work the item's steps first (`base_reply`). Cached under
    <cache>/synth_images/ by every argument; written atomically (ranks may race)."""
    # the split fractions are in the name: a cache written under other splits would hold another "train" set
    name = (f"seed{seed}_n{num}_{'-'.join(tasks)}_{image_size}px_max{max_shapes}_test{TEST_FRACTION}"
            f"_val{VAL_FRACTION}{'_reads' if read_first else ''}.jsonl")
    path = default_cache_dir(cache_dir) / "synth_images" / name
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        for i in range(num):
            item = make_item(i, seed, "train", tuple(tasks), image_size, max_shapes)
            user = [{"type": "image", "image": png_data_url(item["image"])}, {"type": "text", "text": item["question"]}]
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": base_reply(item, read_first)}],
                                "answer": item["answer"], "task": item["task"]}) + "\n")
    os.replace(tmp, path)
    return path
