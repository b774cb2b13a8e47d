"""Prompt items: benchmark-row parsing (MathVista / MathVerse / MATH shapes, chat rows, images, choices), clear errors
on malformed rows, and the embedded default's generated items (RL pool and held-out sets)."""

import base64
import io
import json

import pytest
from PIL import Image

from ovr_train import synth_images, synth_text
from ovr_train.config import EvalCfg, RLCfg
from ovr_train.data import PromptFormat, load_image
from ovr_train.rewards import score
from ovr_train.tasks import (
    choices_in_question,
    default_sets,
    eval_sets,
    load_items,
    prompt_pool,
    synth_image_items,
    synth_text_items,
)

# ----------------------------------------------------------------------------------------------------------------
# Reading benchmark files
# ----------------------------------------------------------------------------------------------------------------


def _png_b64(color=(255, 0, 0)):
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_load_benchmark_shapes(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (28, 28)).save(tmp_path / "images" / "1.png")
    b64 = _png_b64()
    rows = [
        # MathVista: choices list, answer = option content, relative image path, pid
        {"pid": "1", "question": "Which length?", "choices": ["3 cm", "5 cm"], "answer": "5 cm",
         "image": "images/1.png", "query": "Hint: ... Question: Which length?"},
        # MathVerse: options inside the question, letter answer
        {"sample_index": "7", "question": "Find x.\nChoices:\nA:3\nB:4\nC:5", "answer": "B",
         "image": "images/1.png"},
        # MathVision: <image1> placeholder, options list, letter answer, image as an HF Image dict with base64
        {"id": "mv", "question": "<image1>\nHow many?", "options": ["1", "2", "3"], "answer": "C",
         "decoded_image": {"bytes": b64, "path": None}},
        # MATH500: problem + solution + answer
        {"unique_id": "test/x.json", "problem": "What is $1+1$?", "solution": "So \\boxed{2}.", "answer": "2"},
        # AIME: integer answer, no id -> file:line
        {"problem": "Compute N.", "answer": 204},
        # MATH-style without an answer field: the solution's boxed answer
        {"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
        # chat row (the generated corpus's eval.jsonl) with a data-URL image part
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "data:image/png;base64," + b64},
                                                   {"type": "text", "text": "Count."}]},
                      {"role": "assistant", "content": "<think>...</think> \\boxed{3}"}]},
    ]
    path = _write_jsonl(tmp_path / "bench.jsonl", rows)
    items = load_items(path)
    assert [it.id for it in items] == ["1", "7", "mv", "test/x.json", f"{path}:5", f"{path}:6", f"{path}:7"]
    vista, verse, vision, math500, aime, mathsol, chat = items
    assert vista.choices == ["3 cm", "5 cm"] and vista.answer == "5 cm" and vista.has_image
    assert "(A) 3 cm\n(B) 5 cm" in vista.messages[-1][1][-1]
    assert verse.choices == ["3", "4", "5"] and verse.messages[-1][1][-1].count("A:3") == 1  # not listed twice
    assert vision.choices == ["1", "2", "3"] and "<image1>" not in vision.messages[-1][1][-1]
    assert vision.has_image and vision.messages[-1][1][0].source.startswith("data:image")
    assert math500.answer == "2" and not math500.has_image
    # the answer instruction is the prompt format's (added when the prompt is built), not the loader's
    assert math500.messages[-1][1][-1] == "What is $1+1$?"
    fmt = PromptFormat(answer_instruction="Put the final answer in \\boxed{}.")
    assert fmt.apply(math500.messages)[-1][1][-1] == "What is $1+1$?\nPut the final answer in \\boxed{}."
    assert aime.answer == "204" and mathsol.answer == "\\frac{1}{2}"
    assert chat.answer == "3" and chat.has_image and [r for r, _ in chat.messages] == ["user"]
    assert score("\\boxed{4}", verse.gold) == 1.0 and score("\\boxed{5}", verse.gold) == 0.0
    assert load_items(path, limit=2) == items[:2]


def test_raw_base64_image_of_realistic_size(tmp_path):
    import random

    rnd = random.Random(0)
    img = Image.frombytes("RGB", (200, 200), bytes(rnd.getrandbits(8) for _ in range(200 * 200 * 3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()  # far longer than a file name may be
    path = _write_jsonl(tmp_path / "b64.jsonl", [{"question": "q", "answer": "1", "images": [b64]}])
    (item,) = load_items(path)
    assert load_image(item.messages[0][1][0]).size == (200, 200)


def test_choices_in_question():
    assert choices_in_question("Q?\nChoices:\n(A) 1\n(B) 2\n(C) 3") == ["1", "2", "3"]
    assert choices_in_question("Q?\nA. red\nB. blue") == ["red", "blue"]
    assert choices_in_question("A. only one option") == []
    assert choices_in_question("plain question with no options") == []


@pytest.mark.parametrize("row,message", [
    ('{"question": "q", "answer": 1', "malformed JSON"),
    ('{"answer": "1"}', "no question"),
    ('{"question": "q"}', "no answer"),
    ('{"question": "q", "answer": {"a": 1}}', "answer must be a string or number"),
    ('{"question": "q", "answer": "1", "image": "missing.png"}', "image 'missing.png' does not exist"),
    ('{"question": "q", "answer": "1", "choices": {"B": "x", "C": "y"}}', "choices map keys must be the letters"),
    ('{"question": "q", "answer": "1", "choices": [[1]]}', "choices must be a list of strings"),
    ('{"problem": "q", "solution": "no box here"}', "'solution' has no \\\\boxed"),
    ('[1, 2]', "expected a JSON object"),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}', "no user message"),
])
def test_malformed_rows_name_file_and_line(tmp_path, row, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", ['{"question": "ok?", "answer": "1", "id": "a"}', "", row])
    with pytest.raises(ValueError, match=rf"bad.jsonl:3: .*{message}"):
        load_items(path)


def test_duplicate_ids_and_missing_file(tmp_path):
    path = _write_jsonl(tmp_path / "dup.jsonl", ['{"id": 1, "question": "a", "answer": "1"}',
                                                 '{"id": 1, "question": "b", "answer": "2"}'])
    with pytest.raises(ValueError, match=r"dup.jsonl:2: duplicate id '1' \(first at .*dup.jsonl:1\)"):
        load_items(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_items(tmp_path / "nope.jsonl")


def test_default_sets_are_held_out():
    sets = default_sets(num_text=40, num_images=6, seed=0)
    assert set(sets) == {"synth_text", "synth_images"}
    train_q = {r["messages"][0]["content"] for r in synth_text.generate_items(2000, 0, "train")}
    text_q = [it.messages[-1][1][-1] for it in sets["synth_text"]]
    assert len(set(text_q)) == 40 and not set(text_q) & train_q
    assert all(it.has_image and it.answer for it in sets["synth_images"])
    assert not any(it.has_image for it in sets["synth_text"])




def test_generated_items_are_the_generators_rows():
    """Each generated source is written once: the RL pool and the held-out sets are its rows, ids and answers."""
    text, rows = synth_text_items(3, 0, "eval"), synth_text.generate_items(3, 0, "eval")
    assert [it.id for it in text] == ["text-0", "text-1", "text-2"] and text[0].where == "synth_text:eval:0"
    assert [(it.messages[0][1][0], it.answer) for it in text] == [(r["messages"][0]["content"], r["answer"])
                                                                  for r in rows]
    images, rows = synth_image_items(4, 1, "test", "percep", ("count_color",)), synth_images.make_dataset(
        4, 1, "test", tasks=("count_color",))
    assert [it.id for it in images] == [f"percep-{i}" for i in range(4)] and images[2].where.endswith("count_color:2")
    for it, r in zip(images, rows):
        assert it.answer == r["answer"] and it.messages[0][1][1] == r["question"]
        assert load_image(it.messages[0][1][0]).tobytes() == r["image"].tobytes()  # the PNG round-trips exactly
    pool = prompt_pool(RLCfg(num_prompts=10, text_fraction=0.3), 0)
    assert [it.id for it in pool] == [f"text-{i}" for i in range(3)] + [f"image-{i}" for i in range(7)]
    assert pool[:3] == synth_text_items(3, 0, "train") and pool[3:] == synth_image_items(7, 0, "train")
    assert all(it.group == r["key"] for it, r in zip(images, rows))  # the content key: repeats share it
    mixed = prompt_pool(RLCfg(num_prompts=4, text_fraction=0.0, image_tasks=["count_color", "total_two"]), 0)
    assert [it.where.split(":")[2] for it in mixed] == ["count_color", "total_two"] * 2


def test_eval_sets_default_files_and_perception(tmp_path):
    sets = default_sets(2, 2, 0, num_perception=3, perception_tasks=("describe", "count_all"))
    assert list(sets) == ["synth_text", "synth_images", "synth_perception"]
    assert all(it.where.split(":")[2] == "count_all" for it in sets["synth_perception"])  # describe has no answer
    assert {k: len(v) for k, v in eval_sets(EvalCfg(num_text=3, num_images=2, limit=1), 0).items()} == {
        "synth_text": 1, "synth_images": 1}
    a = _write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "1"}, {"question": "r", "answer": "2"}])
    assert [it.answer for it in eval_sets(EvalCfg(sets=f"{a}, "), 0)["a"]] == ["1", "2"]
    (tmp_path / "b").mkdir()
    b = _write_jsonl(tmp_path / "b" / "a.jsonl", [{"question": "q", "answer": "1"}])
    with pytest.raises(ValueError, match="two files named 'a'"):
        eval_sets(EvalCfg(sets=f"{a},{b}"), 0)


def test_plain_text_items_for_the_base_stage(tmp_path):
    """base.text_items: training-split problems, right answers, the steps only (no behaviour but the "First,"
    subgoal the worked image replies share), deterministic, and a second base-stage file beside the images."""
    from ovr_train import behaviors
    from ovr_train.config import load_config
    from ovr_train.sft import perception_files

    items = synth_text.plain_items(300, 0)
    assert items == synth_text.plain_items(300, 0) and len({it["messages"][0]["content"] for it in items}) > 250
    held = {r["messages"][0]["content"] for r in synth_text.generate_items(1000, 0, "eval")}
    assert not held & {it["messages"][0]["content"] for it in items}
    for it in items:
        answer = it["messages"][1]["content"]
        assert score(answer, it["answer"]) == 1.0, answer
        hits = behaviors.detect(answer)
        assert not any(v for k, v in hits.items() if k != "subgoal"), answer
    cfg = load_config(None, [f"--data.cache_dir={tmp_path}", "--base.num_train=4", "--base.text_items=5"])
    files = perception_files(cfg)
    assert len(files) == 2 and len(files[1].read_text().splitlines()) == 5
    assert len(perception_files(load_config(None, [f"--data.cache_dir={tmp_path}", "--base.num_train=4"]))) == 1
    with pytest.raises(ValueError, match="base.text_items=-1: must be >= 0"):
        load_config(None, ["--base.text_items=-1"])
