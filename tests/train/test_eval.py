"""Evaluation: benchmark-row parsing, the scoring table (multiple choice, units, LaTeX), pass@k, aggregation,
and an end-to-end eval of a tiny checkpoint with the HF rollout engine."""

import base64
import io
import itertools
import json

import pytest
from byte_tokenizer import byte_chat_tokenizer
from PIL import Image

from ovr_train.evaluate import (
    EvalItem,
    choices_in_question,
    default_sets,
    format_table,
    gold_spec,
    load_eval_set,
    pass_at_k,
    score_eval,
    summarize,
)
from ovr_train.prompts import PromptFormat

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
    item = EvalItem("x", [("user", ["q"])], answer, choices or [])
    assert score_eval(response, gold_spec(item)) == expected


def test_truncated_scores_zero():
    for choices in ([], MC):
        spec = gold_spec(EvalItem("x", [("user", ["q"])], "B" if choices else "5", choices))
        assert score_eval("\\boxed{B}" if choices else "\\boxed{5}", spec) == 1.0
        assert score_eval("\\boxed{B}" if choices else "\\boxed{5}", spec, truncated=True) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# pass@k
# ----------------------------------------------------------------------------------------------------------------


def test_pass_at_k_matches_brute_force():
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ValueError, match="k=5"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="c=5"):
        pass_at_k(4, 5, 1)


def test_summarize_and_table():
    def res(correct, has_image, text="ok"):
        n = len(correct)
        return {"correct": correct, "lengths": [10] * (n - 1) + [30], "truncated": [False] * (n - 1) + [True],
                "behaviors": [{"reflection": "wait," in text, "verification": False, "subgoal": False,
                               "backtracking": False, "backward_chaining": False, "visual_reflection": False}] * n,
                "has_image": has_image, "status": ["ok"] * n}

    results = [res([1, 0, 0, 0], False, "wait, no"), res([1, 1, 1, 1], True), res([0, 0, 0, 0], True)]
    m = summarize(results, ks=[1, 2, 4, 8])
    assert m["num_questions"] == 3 and m["num_samples"] == 4
    assert m["pass@1"] == pytest.approx((0.25 + 1 + 0) / 3)
    assert m["pass@2"] == pytest.approx((pass_at_k(4, 1, 2) + 1 + 0) / 3)
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert "pass@8" not in m  # k > n is undefined, not reported
    assert m["mean_length"] == pytest.approx(15.0) and m["max_length"] == 30
    assert m["truncated"] == pytest.approx(0.25)
    assert m["behavior/reflection"] == pytest.approx(1 / 3)
    assert m["text/behavior/reflection"] == 1.0 and m["image/behavior/reflection"] == 0.0
    table = format_table({"setA": m, "setB": m})
    lines = table.splitlines()
    assert len(lines) == 3 and lines[1].startswith("setA") and "pass@4" in lines[0] and "0.417" in lines[1]
    md = format_table({"setA": m}, markdown=True)
    assert md.splitlines()[0].startswith("| set |") and md.splitlines()[1].startswith("|---")


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
    items = load_eval_set(path)
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
    assert score_eval("\\boxed{4}", gold_spec(verse)) == 1.0 and score_eval("\\boxed{5}", gold_spec(verse)) == 0.0
    assert load_eval_set(path, limit=2) == items[:2]


def test_raw_base64_image_of_realistic_size(tmp_path):
    import random

    rnd = random.Random(0)
    img = Image.frombytes("RGB", (200, 200), bytes(rnd.getrandbits(8) for _ in range(200 * 200 * 3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()  # far longer than a file name may be
    path = _write_jsonl(tmp_path / "b64.jsonl", [{"question": "q", "answer": "1", "images": [b64]}])
    (item,) = load_eval_set(path)
    from ovr_train.data import load_image

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
        load_eval_set(path)


def test_duplicate_ids_and_missing_file(tmp_path):
    path = _write_jsonl(tmp_path / "dup.jsonl", ['{"id": 1, "question": "a", "answer": "1"}',
                                                 '{"id": 1, "question": "b", "answer": "2"}'])
    with pytest.raises(ValueError, match=r"dup.jsonl:2: duplicate id '1' \(first at .*dup.jsonl:1\)"):
        load_eval_set(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_eval_set(tmp_path / "nope.jsonl")


def test_default_sets_are_held_out():
    from ovr_train import synth_text

    sets = default_sets(num_text=40, num_images=6, seed=0)
    assert set(sets) == {"synth_text", "synth_images"}
    train_q = {r["messages"][0]["content"] for r in synth_text.generate_items(2000, 0, "train")}
    text_q = [it.messages[-1][1][-1] for it in sets["synth_text"]]
    assert len(set(text_q)) == 40 and not set(text_q) & train_q
    assert all(it.has_image and it.answer for it in sets["synth_images"])
    assert not any(it.has_image for it in sets["synth_text"])


# ----------------------------------------------------------------------------------------------------------------
# Generation + scoring in worker processes, then the whole eval stage on a tiny checkpoint
# ----------------------------------------------------------------------------------------------------------------


class ScriptedEngine:
    """An engine with the rollout contract that replays fixed responses: pins the aggregation (which sample counts
    for which question) to known answers, which a random model cannot produce."""

    def __init__(self, scripts):
        self.scripts = scripts  # question text -> list of (response text, finish_reason)

    def generate(self, prompts, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0, stop=(), seed=0):
        from ovr_train.rollout import Sample

        out = []
        for i, p in enumerate(prompts):
            script = next(v for k, v in self.scripts.items() if k in p.text)
            assert len(script) == n
            out += [Sample(i, list(range(len(t))), [0.0] * len(t), t, reason) for t, reason in script]
        return out



@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny random Qwen2.5-VL + byte tokenizer saved with save_pretrained (an HF dir `--model.path` accepts)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ovr_train.config import ModelCfg
    from ovr_train.model import hf_config
    from ovr_train.tokenizer import special_ids

    path = tmp_path_factory.mktemp("tiny_vl")
    tok = byte_chat_tokenizer(path)
    mcfg = ModelCfg(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                    mrope_section=[2, 3, 3], vision_depth=1, vision_hidden_size=32, vision_intermediate_size=64,
                    vision_num_heads=2, vision_fullatt_blocks=[0], attn_implementation="sdpa")
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(hf_config(mcfg, 320, special_ids(tok)))
    model.save_pretrained(path)
    return path


def _bench_file(tmp_path):
    Image.new("RGB", (112, 112), (200, 30, 30)).save(tmp_path / "red.png")
    rows = [{"id": "t1", "problem": "What is 2+3?", "answer": "5"},
            {"id": "t2", "question": "Pick the even number.", "choices": ["3", "4"], "answer": "B"},
            {"id": "i1", "question": "What colour is the image?", "image": "red.png", "answer": "red"}]
    return _write_jsonl(tmp_path / "mini.jsonl", rows)


def test_evaluate_items_scores_in_worker_pool(tiny_ckpt, tmp_path):
    from ovr_train.evaluate import evaluate_items
    from ovr_train.tokenizer import load_tokenizer, special_ids

    tok = load_tokenizer(str(tiny_ckpt))
    items = load_eval_set(_bench_file(tmp_path))
    scripts = {  # 4 samples per question: right, wrong, truncated-right, unboxed / content-matched
        "2+3": [("\\boxed{5}", "stop"), ("\\boxed{6}", "stop"), ("\\boxed{5}", "length"), ("5", "stop")],
        "even": [("\\boxed{4}", "stop"), ("\\boxed{(B)}", "stop"), ("\\boxed{A}", "stop"), ("wait, \\boxed{B}", "stop")],
        "colour": [("\\boxed{blue}", "stop")] * 4,
    }
    text_items = [it for it in items if not it.has_image]
    metrics, details = evaluate_items(ScriptedEngine(scripts), tok, special_ids(tok), {"mini": text_items,
                                                                                      "none": items[2:]},
                                      num_samples=4, ks=[1, 2, 4], max_new_tokens=8, image_proc=_image_proc(),
                                      return_details=True)
    got = {r["id"]: r["correct"] for r in details["mini"]}
    assert got == {"t1": [1, 0, 0, 0], "t2": [1, 1, 0, 1]}
    m = metrics["mini"]
    assert m["pass@1"] == pytest.approx((1 / 4 + 3 / 4) / 2)
    assert m["pass@2"] == pytest.approx((pass_at_k(4, 1, 2) + pass_at_k(4, 3, 2)) / 2)
    assert m["pass@4"] == 1.0 and m["truncated"] == pytest.approx(1 / 8)
    assert m["behavior/reflection"] == pytest.approx(1 / 8)
    assert metrics["none"]["pass@1"] == 0.0 and metrics["none"]["behavior/reflection"] == 0.0
    assert "image/behavior/reflection" not in m  # a split equal to the whole set is not repeated


def _image_proc():
    from ovr_train.data import ImageProcessor

    return ImageProcessor(112 * 112, 112 * 112)


def test_eval_stage_end_to_end(tiny_ckpt, tmp_path, capsys):
    """`--stage eval` on a tiny checkpoint: real HF engine (images included), real verifier pool; outputs agree."""
    from ovr_train.config import load_config
    from ovr_train.dist import DistInfo
    from ovr_train.evaluate import evaluate

    bench = _bench_file(tmp_path)
    report = tmp_path / "report.md"
    report.write_text("# run report\n")
    cfg = load_config(None, [f"--model.path={tiny_ckpt}", f"--eval.sets={bench}", "--eval.num_samples=2",
                             "--eval.ks=[1,2]", "--eval.max_new_tokens=6", "--eval.engine=hf",
                             "--eval.reward_workers=1", f"--run.out_dir={tmp_path / 'run'}",
                             f"--eval.report={report}", "--eval.label=tiny", "--data.min_pixels=12544",
                             "--data.max_pixels=12544"])
    import torch

    metrics = evaluate(cfg, DistInfo(0, 1, 0, torch.device("cpu"), "gloo"))
    out = capsys.readouterr().out
    assert "mini" in out and "pass@2" in out
    saved = json.loads((tmp_path / "run" / "eval" / "tiny.json").read_text())
    assert saved["metrics"] == metrics
    m = metrics["mini"]
    assert m["num_questions"] == 3 and m["num_samples"] == 2 and 0 < m["mean_length"] <= 6
    questions = saved["questions"]["mini"]
    assert [q["id"] for q in questions] == ["t1", "t2", "i1"] and [q["has_image"] for q in questions][-1]
    assert m["pass@1"] == pytest.approx(sum(sum(q["correct"]) for q in questions) / 6)
    items = {it.id: it for it in load_eval_set(bench)}
    for q in questions:  # the stored first response re-scores to the stored verdict
        assert score_eval(q["response"], gold_spec(items[q["id"]]), truncated=q["truncated"][0]) == q["correct"][0]
    text = report.read_text()
    assert text.startswith("# run report\n") and "## Eval: tiny" in text and "| mini |" in text
