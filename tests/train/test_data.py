"""Data: JSONL styles, bad input, image-pad expansion, assistant-only targets, mRoPE ids vs HF, packing plans,
the resumable sampler, and the generated corpus."""

import base64
import io
import json
import re

import pytest
import torch
from PIL import Image

from ovr_train import synth_images
from ovr_train.behaviors import detect
from ovr_train.config import DataCfg
from ovr_train.data import (
    IGNORE,
    ImageProcessor,
    ImageRef,
    StepSampler,
    collate,
    encode_messages,
    filler,
    iter_chat_samples,
    load_sft_samples,
    step_plan,
)
from ovr_train.synth_text import BACKTRACK_PHRASES, LOOK_AGAIN_PHRASES, VERIFY_PHRASES, ensure_corpus, generate_items
from ovr_train.tokenizer import special_ids


@pytest.fixture(scope="module")
def proc():
    return ImageProcessor(112 * 112, 112 * 112)


def _png(path, size=(112, 112), color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path)
    return str(path)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_both_styles_images_and_assistant_only_targets(tmp_path, tok, proc):
    ids = special_ids(tok)
    _png(tmp_path / "a.png", size=(130, 100))
    buf = io.BytesIO()
    Image.new("RGB", (112, 112), (0, 0, 255)).save(buf, format="PNG")
    b64 = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    f = _write(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                   {"type": "text", "text": "How many?"}]},
                      {"role": "assistant", "content": "Two."}]},
        {"conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Blue."}],
         "images": [b64]},
        {"conversations": [{"from": "human", "value": "1+1?"}, {"from": "assistant", "ground_truth": {"value": "2"}}]},
    ])
    samples = list(iter_chat_samples(f))
    assert [len(s.messages) for s in samples] == [2, 2, 1] and samples[2].answer == "2"
    enc = encode_messages(samples[0].messages, tok, ids, proc)
    # 130x100 px -> smart resize within 112*112 pixels -> grid (1, h, w); tokens = h*w/4, all as <|image_pad|>
    t, h, w = enc.grid_thw[0].tolist()
    assert int((enc.input_ids == ids["image_pad"]).sum()) == t * h * w // 4
    assert enc.pixel_values.shape == (t * h * w, 3 * 2 * 14 * 14)
    # targets: exactly the assistant content + <|im_end|>, shifted by one
    text = tok.decode(enc.targets[enc.targets != IGNORE])
    assert text == "Two.<|im_end|>"
    enc2 = encode_messages(samples[1].messages, tok, ids, proc)
    assert enc2.grid_thw.tolist() == [[1, 8, 8]] and int((enc2.input_ids == ids["image_pad"]).sum()) == 16
    # the generation prompt ends with "<|im_start|>assistant\n" and has no targets
    prompt = encode_messages(samples[2].messages, tok, ids, None, add_generation_prompt=True)
    assert tok.decode(prompt.input_ids).endswith("<|im_start|>assistant\n")
    assert bool((prompt.targets == IGNORE).all())


def test_mrope_ids_match_hf_get_rope_index(tmp_path, tok, proc):
    from transformers import Qwen2_5_VLModel

    from ovr_train.config import ModelCfg
    from ovr_train.model import hf_config

    ids = special_ids(tok)
    msgs = [("user", ["Look: ", ImageRef(_png(tmp_path / "x.png", size=(224, 112))), " and ",
                      ImageRef(_png(tmp_path / "y.png")), " count."]), ("assistant", ["3"])]
    enc = encode_messages(msgs, tok, ids, ImageProcessor(112 * 112, 224 * 112))
    config = hf_config(ModelCfg(), 640, ids)
    with torch.device("meta"):
        hf = Qwen2_5_VLModel(config)  # only its config is used by get_rope_index
    mm = (enc.input_ids == ids["image_pad"]).int()[None]
    want, _ = Qwen2_5_VLModel.get_rope_index(hf, enc.input_ids[None], mm, image_grid_thw=enc.grid_thw)
    assert torch.equal(enc.mrope_ids, want[:, 0])


def test_bad_input(tmp_path, tok, proc):
    ids = special_ids(tok)
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    f = _write(tmp_path / "bad.jsonl", [good, "{not json", {"messages": []}, good])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        load_sft_samples([f], tok, ids, proc, DataCfg())
    samples, stats = load_sft_samples([f], tok, ids, proc, DataCfg(on_error="skip"))
    assert len(samples) == 2 and stats.skipped_malformed == 2 and "bad.jsonl:3" in stats.errors[1]
    # missing and corrupt images
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    f = _write(tmp_path / "img.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "missing.png"}]},
                      {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "corrupt.png"}]},
                      {"role": "assistant", "content": "a"}]}, good])
    with pytest.raises(ValueError, match=r"img.jsonl:1: image .*missing.png' does not exist"):
        load_sft_samples([f], tok, ids, proc, DataCfg())
    samples, stats = load_sft_samples([f], tok, ids, proc, DataCfg(on_error="skip"))
    assert len(samples) == 1 and stats.skipped_image == 2 and "cannot be decoded" in stats.errors[1]
    # over-long: error names the line, truncate counts and keeps max_seq_len tokens
    long = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 60}]}
    f = _write(tmp_path / "long.jsonl", [good, long])
    with pytest.raises(ValueError, match=r"long.jsonl:2: sample has \d+ tokens > data.max_seq_len=32"):
        load_sft_samples([f], tok, ids, proc, DataCfg(max_seq_len=32, answer_instruction=""))
    samples, stats = load_sft_samples([f], tok, ids, proc,
                                      DataCfg(max_seq_len=32, answer_instruction="", overlong="truncate"))
    assert stats.truncated == 1 and samples[1].length == 32 and samples[1].targets[-1] == IGNORE
    # empty dataset, and a dataset with no assistant tokens
    empty = _write(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="no usable training samples"):
        load_sft_samples([empty], tok, ids, proc, DataCfg())
    f = _write(tmp_path / "noloss.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(ValueError, match="no loss tokens 1"):
        load_sft_samples([f], tok, ids, proc, DataCfg())
    with pytest.raises(ValueError, match="does not exist"):
        list(iter_chat_samples(tmp_path / "nope.jsonl"))


def test_sampler_is_deterministic_and_resumable():
    s = StepSampler(103, 10, seed=3)
    first_epoch = [i for step in range(s.steps_per_epoch) for i in s.batch_indices(step)]
    assert len(set(first_epoch)) == 100  # no repeats within an epoch (3 dropped)
    assert s.batch_indices(10) != s.batch_indices(0)  # new epoch, new order
    s.step = 7
    t = StepSampler(103, 10, seed=3)
    t.load_state_dict(s.state_dict())
    assert t.step == 7 and t.batch_indices(7) == s.batch_indices(7)
    with pytest.raises(ValueError, match="batch_size=10 exceeds the 5 usable samples"):
        StepSampler(5, 10, seed=0)
    with pytest.raises(ValueError, match="refusing to resume"):
        StepSampler(104, 10, seed=3).load_state_dict(s.state_dict())


def test_step_plan_balances_and_aligns_micro_batch_counts():
    lengths = [100, 7, 60, 60, 5, 90, 33, 1, 77, 12]
    ids = list(range(10))
    plan = step_plan(ids, lengths, world_size=3, budget=120, packing=True)
    assert len({len(p) for p in plan}) == 1  # same number of micro-batches on every rank
    seen = sorted(i for p in plan for mb in p if mb is not None for i in mb)
    assert seen == ids
    for p in plan:
        for mb in p:
            assert mb is None or sum(lengths[i] for i in mb) <= 120
    loads = [sum(lengths[i] for mb in p if mb for i in mb) for p in plan]
    assert max(loads) - min(loads) <= max(lengths)
    padded = step_plan(ids, lengths, world_size=1, budget=200, packing=False)[0]
    for mb in padded:
        assert len(mb) * max(lengths[i] for i in mb) <= 200


def test_collate_packed_padded_and_filler(tok):
    ids = special_ids(tok)
    encs = [encode_messages([("user", ["q" * n]), ("assistant", ["a" * (n + 1)])], tok, ids, None) for n in (1, 5, 2)]
    packed = collate(encs, packing=True)
    lengths = [e.length for e in encs]
    assert packed.input_ids.shape == (1, sum(lengths)) and packed.position_ids.shape == (4, 1, sum(lengths))
    assert packed.cu_seqlens.dtype == torch.int32 and packed.cu_seqlens.tolist() == [0, lengths[0],
                                                                                     lengths[0] + lengths[1],
                                                                                     sum(lengths)]
    assert packed.position_ids[0, 0, lengths[0]] == 0  # text row restarts per sample
    assert packed.num_loss_tokens == sum(e.num_loss_tokens for e in encs)
    padded = collate(encs, packing=False, pad_id=ids["endoftext"])
    assert padded.input_ids.shape == (3, max(lengths)) and padded.attention_mask.sum() == sum(lengths)
    assert int((padded.targets != IGNORE).sum()) == packed.num_loss_tokens
    fill = filler(encs, packing=True)
    assert fill.num_loss_tokens == 0 and bool((fill.targets == IGNORE).all())


def test_synth_corpus_deterministic_disjoint_with_behaviours(tmp_path):
    train, held = ensure_corpus(str(tmp_path), 300, 100, seed=5)
    again = generate_items(300, 5, "train")
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    assert rows == again
    evals = [json.loads(line) for line in held.read_text().splitlines()]
    train_q = {r["messages"][0]["content"] for r in rows}
    eval_q = [r["messages"][0]["content"] for r in evals]
    assert len(set(eval_q)) == 100 and not train_q & set(eval_q)
    answers = [r["messages"][1]["content"] for r in rows]
    assert all(a.startswith("<think>") and "</think>" in a and a.endswith("\\boxed{" + r["answer"] + "}.")
               for a, r in zip(answers, rows))
    assert all(any(p in a for p in VERIFY_PHRASES) for a in answers)
    backtracks = sum(any(p in a for p in BACKTRACK_PHRASES) for a in answers)
    assert 0.2 < backtracks / len(answers) < 0.5


def _answer_of_described_picture(question):
    """The answer of a described-picture problem recomputed from its text alone (independent of the generator)."""
    digits = re.match(r"An image shows the digits (\d) and (\d)\. ", question)
    if digits:
        left, right = int(digits[1]), int(digits[2])
        return left + right if "sum of the two digits" in question else abs(left - right)
    counts = {color: int(n) for n, color in re.findall(r"(\d+) (red|blue|green|yellow) shapes?\b", question.split("?")[0])}
    more = re.search(r"How many more (\w+) shapes than (\w+) shapes are there\?", question)
    if more:
        return counts.get(more[1], 0) - counts.get(more[2], 0)
    total = re.search(r"How many (\w+) and (\w+) shapes are there in total\?", question)
    return counts.get(total[1], 0) + counts.get(total[2], 0)


def test_described_pictures_ask_the_image_questions(tmp_path):
    """A fraction of the training corpus are the image reasoning questions, word for word, about a scene told in
    text; the answers are right, every trace reads the scene first, a misread is corrected by a second look (a
    visual-reflection phrase), and the held-out split stays text problems only."""
    rows = generate_items(600, 5, "train", picture_fraction=0.4)
    pictures = [r for r in rows if r["messages"][0]["content"].startswith("An image shows ")]
    assert 0.3 < len(pictures) / len(rows) < 0.5
    image_questions = {r["question"] for r in synth_images.make_dataset(400, 0, "train")}
    slips = 0
    for r in pictures:
        question, trace = r["messages"][0]["content"], r["messages"][1]["content"]
        asked = question.split(". ", 1)[1]  # the scene is the first sentence
        assert asked in image_questions, question
        assert str(_answer_of_described_picture(question)) == r["answer"], question
        assert trace.endswith("\\boxed{" + r["answer"] + "}.") and any(p in trace for p in VERIFY_PHRASES)
        assert trace.startswith(("<think>First, count the ", "<think>First, read the left digit: ")), trace
        looked_again = [p for p in LOOK_AGAIN_PHRASES if p in trace]
        assert not any(p in trace for p in BACKTRACK_PHRASES)  # a picture trace slips only in a reading
        if looked_again:
            slips += 1
            assert detect(trace)["visual_reflection"]
            wrong, right = re.search(r": (\d+)\. " + re.escape(looked_again[0]) + r": (\d+)\.", trace).groups()
            assert wrong != right
    assert 0.2 < slips / len(pictures) < 0.5
    assert generate_items(200, 5, "eval", picture_fraction=0.4) == generate_items(200, 5, "eval")
    assert generate_items(200, 5, "train", picture_fraction=0.0) == generate_items(200, 5, "train")
    with_pictures, _ = ensure_corpus(str(tmp_path), 100, 10, seed=5, picture_fraction=0.4)
    without, _ = ensure_corpus(str(tmp_path), 100, 10, seed=5)
    assert with_pictures.parent != without.parent and "An image shows" in with_pictures.read_text()
    assert "An image shows" not in without.read_text()
    from ovr_train.sft import _corpus  # the cold start's corpus follows the config
    assert _corpus(DataCfg(cache_dir=str(tmp_path), synth_num_train=100, synth_num_eval=10, synth_seed=5,
                           synth_picture_fraction=0.4)) == with_pictures
    with pytest.raises(ValueError, match="picture_fraction=1.5: must be in"):
        generate_items(10, 5, "train", picture_fraction=1.5)
    with pytest.raises(ValueError, match="data.synth_picture_fraction"):
        DataCfg(synth_picture_fraction=-0.1)


def test_masked_reads_keep_the_tokens_and_drop_only_the_read_values_from_the_loss(tmp_path, tok):
    """data.synth_picture_mask_reads: the same problems and traces, a described picture's reply as content parts
    whose `"loss": false` parts are exactly the values read off the scene (misread and re-read ones too). Through
    the JSONL loader and encode_messages the token ids equal the unmasked reply's, and the targets differ only at
    those values' tokens, which get none."""
    ids = special_ids(tok)
    plain = generate_items(300, 5, "train", picture_fraction=0.4)
    masked = generate_items(300, 5, "train", picture_fraction=0.4, mask_reads=True)
    pictures = 0
    for a, b in zip(plain, masked):
        assert a["messages"][0] == b["messages"][0] and a["answer"] == b["answer"]
        reply, parts = a["messages"][1]["content"], b["messages"][1]["content"]
        if not a["messages"][0]["content"].startswith("An image shows "):
            assert parts == reply  # text problems are untouched
            continue
        pictures += 1
        assert "".join(p["text"] for p in parts) == reply
        untrained = [p["text"] for p in parts if p.get("loss") is False]
        # every value after a read ("...: 4.") and after a second look, and nothing else
        reads = re.findall(r"(?:count the [a-z ]+|read the (?:left|right) digit|" + "|".join(
            re.escape(p) for p in LOOK_AGAIN_PHRASES) + r"): (\d+)\.", reply)
        assert untrained == [f" {v}" for v in reads], (reply, untrained)
    assert pictures > 50
    f = _write(tmp_path / "m.jsonl", [masked[i] for i in range(len(masked))
                                      if isinstance(masked[i]["messages"][1]["content"], list)][:20])
    g = _write(tmp_path / "p.jsonl", [plain[i] for i in range(len(masked))
                                      if isinstance(masked[i]["messages"][1]["content"], list)][:20])
    for sm, sp in zip(iter_chat_samples(f), iter_chat_samples(g)):
        em, ep = encode_messages(sm.messages, tok, ids, None), encode_messages(sp.messages, tok, ids, None)
        assert torch.equal(em.input_ids, ep.input_ids)
        differ = em.targets != ep.targets
        assert bool((em.targets[differ] == IGNORE).all()) and int(differ.sum()) >= 2
        dropped = tok.decode(ep.targets[differ].tolist())
        assert re.fullmatch(r"[\d ]+", dropped), dropped  # only the read digits lost their targets
    with_masks, _ = ensure_corpus(str(tmp_path), 100, 10, seed=5, picture_fraction=0.4, mask_reads=True)
    assert with_masks.parent.name.endswith("_maskreads") and '"loss": false' in with_masks.read_text()
    from ovr_train.sft import _corpus
    assert _corpus(DataCfg(cache_dir=str(tmp_path), synth_num_train=100, synth_num_eval=10, synth_seed=5,
                           synth_picture_fraction=0.4, synth_picture_mask_reads=True)) == with_masks
    with pytest.raises(ValueError, match="data.synth_picture_mask_reads=True: .*needs data.synth_picture_fraction"):
        DataCfg(synth_picture_mask_reads=True)
    bad = _write(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant",
                                           "content": [{"type": "text", "text": "a", "loss": "no"}]}]}])
    with pytest.raises(ValueError, match="bad.jsonl.*'loss' must be true or false, got 'no'"):
        list(iter_chat_samples(bad))
