"""Row readers: parquet (several row groups) and HF datasets directories in verl / EasyR1 layouts, text and image rows,
for SFT (through the token store), RL prompt pools and eval sets; bad files and rows named in clear errors."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ovr_train.config import DataCfg, RLCfg
from ovr_train.data import ImageRef, load_image, load_sft_samples
from ovr_train.sources import iter_rows
from ovr_train.store import open_store
from ovr_train.tasks import load_items, prompt_pool
from ovr_train.tokenizer import special_ids


def _png(size, color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _verl_rl_rows(n: int) -> list:
    """verl's RL layout (its geo3k / gsm8k preprocessing): a chat `prompt`, `images` as {bytes, path} structs,
    `reward_model.ground_truth`; odd rows are text only."""
    rows = []
    for i in range(n):
        image = i % 2 == 0
        rows.append({"data_source": "geo3k" if image else "gsm8k", "ability": "math",
                     "prompt": [{"role": "user", "content": ("<image>" if image else "") + f"What is {i} + 1?"}],
                     "images": [{"bytes": _png((112 + 8 * i, 112), (i * 20, 0, 0)), "path": None}] if image else [],
                     "reward_model": {"style": "rule", "ground_truth": str(i + 1)},
                     "extra_info": {"split": "train", "index": i}})
    return rows


def _easyr1_rows(n: int) -> list:
    """EasyR1's layout (hiyouga/geometry3k): `problem` with an `<image>` tag, `answer`, `images` as raw bytes."""
    return [{"problem": f"<image>Find x if x = {i} * 2.", "answer": str(2 * i),
             "images": [_png((112, 112 + 8 * i), (0, i * 20, 0))]} for i in range(n)]


def _sft_rows(n: int) -> list:
    """verl's SFT layout (`prompt` / `response` strings) with EasyR1-style image rows (`images` bytes, `<image>`)."""
    rows = []
    for i in range(n):
        image = i % 3 == 0
        rows.append({"prompt": ("<image>" if image else "") + f"Compute {i} * 3.",
                     "response": f"<think>{i} * 3 = {3 * i}</think> \\boxed{{{3 * i}}}",
                     "images": [{"bytes": _png((112, 112), (i * 10, 0, 0)), "path": None}] if image else []})
    return rows


def _parquet(path, rows, row_group_size=3):
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def _hf_dir(path, rows, image_column="images"):
    from datasets import Dataset, Sequence
    from datasets import Image as HFImage

    ds = Dataset.from_list(rows)
    if image_column in ds.column_names:
        ds = ds.cast_column(image_column, Sequence(HFImage()))
    ds.save_to_disk(str(path))
    return path


def test_parquet_row_groups_stream_in_order(tmp_path):
    f = _parquet(tmp_path / "a.parquet", [{"x": i} for i in range(10)], row_group_size=3)
    assert pq.ParquetFile(f).num_row_groups == 4
    rows = list(iter_rows(f))
    assert [r["x"] for _, r in rows] == list(range(10)) and rows[7][0] == f"{f}:row 7"


@pytest.mark.parametrize("fmt", ["parquet", "hf"])
def test_rl_and_eval_rows_verl_and_easyr1(tmp_path, fmt):
    write = _parquet if fmt == "parquet" else _hf_dir
    verl = write(tmp_path / ("verl.parquet" if fmt == "parquet" else "verl"), _verl_rl_rows(6))
    easy = write(tmp_path / ("easyr1.parquet" if fmt == "parquet" else "easyr1"), _easyr1_rows(4))
    items = load_items(verl)
    assert [it.answer for it in items] == [str(i + 1) for i in range(6)]
    assert [it.has_image for it in items] == [i % 2 == 0 for i in range(6)]
    first = items[0].messages[-1][1]
    assert isinstance(first[0], ImageRef) and first[1] == "What is 0 + 1?"
    items = load_items(easy)
    assert [it.answer for it in items] == ["0", "2", "4", "6"]
    text = items[3].messages[0][1][-1]
    assert "<image>" not in text and text == "Find x if x = 3 * 2."  # the instruction is added at prompt build
    # the RL pool reads the same files; its images stay encoded until a prompt is built
    pool = prompt_pool(RLCfg(prompt_files=[str(verl), str(easy)]), 0)
    assert len(pool) == 10
    refs = [p for it in pool for _, parts in it.messages for p in parts if isinstance(p, ImageRef)]
    assert len(refs) == 7 and all(r.source.startswith("data:image") for r in refs)
    assert load_image(refs[1]).size == (128, 112) and load_image(refs[-1]).size == (112, 136)


@pytest.mark.parametrize("fmt", ["parquet", "hf", "jsonl"])
def test_sft_rows_through_the_store(tmp_path, tok, proc, fmt):
    ids = special_ids(tok)
    rows = _sft_rows(7)
    if fmt == "parquet":
        f = _parquet(tmp_path / "sft.parquet", rows)
    elif fmt == "hf":
        f = _hf_dir(tmp_path / "sft", rows)
    else:  # the same rows as JSON: images as base64 {bytes} structs, what a JSON export of the parquet holds
        import base64

        f = tmp_path / "sft.jsonl"
        f.write_text("".join(json.dumps(dict(r, images=[{"bytes": base64.b64encode(i["bytes"]).decode()}
                                                        for i in r["images"]])) + "\n" for r in rows))
    cfg = DataCfg(cache_dir=str(tmp_path / "cache"))
    want, _ = load_sft_samples([f], tok, ids, proc, cfg)
    store = open_store([f], tok, ids, proc, cfg)
    assert len(store) == len(want) == 7 and store.meta["image_samples"] == 3
    for i, w in enumerate(want):
        got = store.read(i)
        assert torch.equal(got.input_ids, w.input_ids) and torch.equal(got.targets, w.targets)
        assert (got.grid_thw is not None) == (i % 3 == 0)
        if got.grid_thw is not None:
            assert torch.equal(got.pixel_values, w.pixel_values) and got.grid_thw.tolist() == [[1, 8, 8]]
    text = tok.decode(store.read(1).input_ids.tolist())
    assert "Compute 1 * 3." in text and "\\boxed{3}" in text


def test_bad_files_and_rows_are_named(tmp_path, tok, proc):
    ids = special_ids(tok)
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=r"broken.parquet: unreadable parquet file"):
        load_items(bad)
    with pytest.raises(ValueError, match=r"broken.parquet: unreadable parquet file"):
        load_sft_samples([bad], tok, ids, proc, DataCfg())
    # a missing column names the file, the row and the columns it has
    f = _parquet(tmp_path / "noanswer.parquet", [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?"}])
    with pytest.raises(ValueError, match=r"noanswer.parquet:row 1: no answer .*keys: \['answer', 'problem'\]"):
        load_items(f)
    # a corrupt image cell: named at build time, or skipped and counted
    rows = _sft_rows(3)
    rows[1]["images"], rows[1]["prompt"] = [{"bytes": b"\x89PNG broken", "path": None}], "<image>" + rows[1]["prompt"]
    f = _parquet(tmp_path / "img.parquet", rows)
    with pytest.raises(ValueError, match=r"img.parquet:row 1: image .* cannot be decoded"):
        open_store([f], tok, ids, proc, DataCfg(cache_dir=str(tmp_path / "c")))
    store = open_store([f], tok, ids, proc, DataCfg(cache_dir=str(tmp_path / "c"), on_error="skip"))
    assert len(store) == 2 and store.stats.skipped_image == 1
    # an RL pool keeps images encoded: a corrupt one loads, and fails naming itself only when its prompt is drawn
    f = _parquet(tmp_path / "pool.parquet", [{"problem": "<image>q", "answer": "1", "images": [b"\x89PNG broken"]},
                                             {"problem": "<image>r", "answer": "2", "images": [_png((112, 112), 0)]}])
    pool = prompt_pool(RLCfg(prompt_files=[str(f)]), 0)
    assert len(pool) == 2 and load_image(pool[1].messages[0][1][0]).size == (112, 112)
    with pytest.raises(ValueError, match="cannot be decoded"):
        load_image(pool[0].messages[0][1][0])
    # an image cell of the wrong type names the field
    f = _parquet(tmp_path / "num.parquet", [{"problem": "q", "answer": "1", "images": [3]}])
    with pytest.raises(ValueError, match=r"num.parquet:row 0: field 'images': image field must be"):
        load_items(f)
    # a DatasetDict directory, a plain directory and an unknown extension
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([{"problem": "q", "answer": "1"}])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"holds several splits \['train'\]: point at one of its subdirectories"):
        load_items(tmp_path / "dd")
    assert len(load_items(tmp_path / "dd" / "train")) == 1
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not an HF datasets directory"):
        load_items(tmp_path / "plain")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown format"):
        load_items(tmp_path / "x.csv")
