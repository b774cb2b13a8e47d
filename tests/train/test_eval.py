"""Evaluation: pass@k, aggregation and the table, and an end-to-end eval of a tiny checkpoint with the HF rollout
engine."""

import itertools
import json

import pytest
from byte_tokenizer import byte_chat_tokenizer
from PIL import Image

from ovr_train.evaluate import format_table, pass_at_k, summarize
from ovr_train.rewards import score
from ovr_train.tasks import load_items

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
    path = tmp_path / "mini.jsonl"
    Image.new("RGB", (112, 112), (200, 30, 30)).save(tmp_path / "red.png")
    rows = [{"id": "t1", "problem": "What is 2+3?", "answer": "5"},
            {"id": "t2", "question": "Pick the even number.", "choices": ["3", "4"], "answer": "B"},
            {"id": "i1", "question": "What colour is the image?", "image": "red.png", "answer": "red"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_evaluate_items_scores_in_worker_pool(tiny_ckpt, tmp_path):
    from ovr_train.evaluate import evaluate_items
    from ovr_train.tokenizer import load_tokenizer, special_ids

    tok = load_tokenizer(str(tiny_ckpt))
    items = load_items(_bench_file(tmp_path))
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
    items = {it.id: it for it in load_items(bench)}
    for q in questions:  # the stored first response re-scores to the stored verdict
        assert score(q["response"], items[q["id"]].gold, truncated=q["truncated"][0]) == q["correct"][0]
    text = report.read_text()
    assert text.startswith("# run report\n") and "## Eval: tiny" in text and "| mini |" in text
