"""Rows of training data, RL prompts and eval sets from JSONL, parquet or HF datasets directories, streamed.

`iter_rows(path)` yields (where, row) pairs, row a JSON-shaped dict, `where` naming the file and line (`f.jsonl:12`)
or row (`f.parquet:row 12`), without ever holding a whole file in memory:
- `*.jsonl` / `*.json` (one object per line), read line by line;
- `*.parquet`, read in record batches within row groups (pyarrow);
- a directory written by HF datasets' `save_to_disk`, opened with `datasets.load_from_disk` (memory-mapped Arrow,
  offline), read in record batches. A DatasetDict directory is refused: point at one split's subdirectory.
`canonical_row(row)` then maps the verl / EasyR1 column conventions onto the keys our readers understand:
- images: bytes, `{"bytes": b"...", "path": ...}` (the HF `Image` feature, verl's and EasyR1's parquet) become
  `data:image/unknown;base64,...` strings; paths and base64 strings are kept (paths resolve against the file's
  directory, or data.image_root); `image` / `images` hold one or a list;
- verl: a `prompt` that is a chat list (`[{"role", "content"}]`) becomes `messages` (plus a `response` column as the
  assistant turn, verl's SFT layout); `reward_model.ground_truth` becomes `answer`;
- EasyR1: `problem` (with `<image>` tags) and `answer` are already what the eval/RL reader takes;
- with `sft=True`, a question column (`problem` / `question` / `prompt` / `query`) and a response column
  (`response` / `solution` / `output` / `completion`) become a user + assistant conversation.
"""

import base64
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

_QUESTION_KEYS = ("problem", "question", "prompt", "query")
_RESPONSE_KEYS = ("response", "solution", "output", "completion")
_BATCH_ROWS = 512  # rows per Arrow record batch: bounds memory whatever the row-group size


def _jsonl_rows(path: Path):
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno})")


def _arrow_rows(path: Path, batches):
    row = 0
    for batch in batches:
        for obj in batch.to_pylist():
            yield f"{path}:row {row}", obj
            row += 1


def _parquet_batches(path: Path):
    try:
        pf = pq.ParquetFile(path)
        yield from pf.iter_batches(batch_size=_BATCH_ROWS)
    except (OSError, pa.ArrowException) as e:  # what pyarrow raises on a truncated / non-parquet file
        raise ValueError(f"{path}: unreadable parquet file: {type(e).__name__}: {e}") from None


def _hf_batches(path: Path):
    try:  # an optional extra (ovr[datasets]), ~1 s to import (measured): only for an HF datasets directory
        from datasets import Dataset, load_from_disk
    except ImportError:
        raise ValueError(f"{path} is an HF datasets directory but `datasets` is not installed "
                         "(pip install 'ovr[datasets]')") from None
    try:
        ds = load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as e:
        raise ValueError(f"{path}: not a readable HF datasets directory: {type(e).__name__}: {e}") from None
    if not isinstance(ds, Dataset):
        raise ValueError(f"{path} holds several splits {sorted(ds)}: point at one of its subdirectories")  # noqa: TRY004 (bad user input is a ValueError here)
    # Arrow batches: Image features arrive as {"bytes", "path"} structs, undecoded (no PIL at read time)
    yield from ds.with_format("arrow").iter(batch_size=_BATCH_ROWS)


def iter_rows(path):
    """(where, row) of every row of a JSONL file, parquet file or HF datasets directory, in file order.

    A malformed JSON line yields (where, ValueError) so the caller can raise it or count a skip; an unreadable file
    raises ValueError naming it.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
            raise ValueError(f"{path} is a directory but not an HF datasets directory (no dataset_info.json)")
        yield from _arrow_rows(path, _hf_batches(path))
    elif not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    elif path.suffix == ".parquet":
        yield from _arrow_rows(path, _parquet_batches(path))
    elif path.suffix in (".jsonl", ".json"):
        yield from _jsonl_rows(path)
    else:
        raise ValueError(f"data file {str(path)!r}: unknown format (expected .jsonl, .parquet or an HF datasets "
                         "directory)")


def _image_value(value, where: str):
    """One image cell -> a path or data-URL string (bytes are base64-encoded, not decoded)."""
    if isinstance(value, dict):  # HF Image feature / verl / EasyR1 parquet: {"bytes": ..., "path": ...}
        if isinstance(value.get("bytes"), str) and value["bytes"]:  # already base64 (a JSON export)
            return "data:image/unknown;base64," + value["bytes"]
        value = value.get("bytes") or value.get("path") or value.get("url") or value.get("image")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "data:image/unknown;base64," + base64.b64encode(bytes(value)).decode()
    if isinstance(value, str) and value:
        return value
    raise ValueError(f"{where}: image field must be bytes, a path, base64 or {{'bytes'|'path': ...}}, got "
                     f"{type(value).__name__} {value!r:.40}")


def _content_images(content, where: str):
    """Chat content parts with image bytes / {"bytes"} structs turned into data URLs."""
    if not isinstance(content, list):
        return content
    out = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "image" and not isinstance(part.get("image"), str):
            part = {"type": "image", "image": _image_value(part.get("image") or part, where)}
        out.append(part)
    return out


def canonical_row(row: dict, where: str, sft: bool = False) -> dict:
    """A verl / EasyR1 / HF row -> the keys `data.normalize_sample` and `tasks.parse_row` read (see the module
    docstring); other rows are returned unchanged. ValueError naming `where` and the field on a bad image cell."""
    if not isinstance(row, dict):
        return row
    row = dict(row)
    for key in ("images", "image"):
        value = row.get(key)
        if value is None or isinstance(value, str):
            continue
        values = value if isinstance(value, list) else [value]
        row[key] = [_image_value(v, f"{where}: field {key!r}") for v in values]
        if key == "image" and not isinstance(value, list):
            row[key] = row[key][0]
    if "images" not in row and isinstance(row.get("image"), (str, list)) and "messages" not in row and sft:
        row["images"] = row["image"] if isinstance(row["image"], list) else [row["image"]]
    gt = row.get("reward_model")
    if row.get("answer") is None and isinstance(gt, dict) and gt.get("ground_truth") is not None:
        row["answer"] = gt["ground_truth"]
    prompt = row.get("prompt")
    if "messages" not in row and isinstance(prompt, list) and all(isinstance(t, dict) for t in prompt):
        turns = [dict(t, content=_content_images(t.get("content"), where)) for t in prompt]
        if isinstance(row.get("response"), str):
            turns.append({"role": "assistant", "content": row["response"]})
        row["messages"] = turns
        del row["prompt"]
    elif sft and "messages" not in row and "conversations" not in row:
        question = next((row[k] for k in _QUESTION_KEYS if isinstance(row.get(k), str)), None)
        response = next((row[k] for k in _RESPONSE_KEYS if isinstance(row.get(k), str)), None)
        if question is not None and response is not None:
            row["messages"] = [{"role": "user", "content": question}, {"role": "assistant", "content": response}]
    return row
