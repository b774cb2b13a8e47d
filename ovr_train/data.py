"""Chat data -> tokenized samples -> DP-balanced, token-budget micro-batches (packed varlen or padded).

Legend: L tokens of one sample, T packed tokens of a micro-batch, B samples, P image patches, N images.

Pipeline (every rank runs it identically, so every rank knows every sample's length without communicating):
1. `iter_chat_samples`: rows of JSONL / parquet / HF datasets directories (`ovr_train.sources`, verl and EasyR1
   columns mapped) in OpenAI style (`{"messages": [{"role", "content": str | [parts]}]}`, parts
   `{"type": "text", "text"}` (`"loss": false`: seen, not trained) / `{"type": "image", "image": path-or-base64}` /
   `{"type": "image_url", "image_url": {"url"}}`) or ShareGPT/ORZ style (`{"conversations": [{"from":
   "human"|"gpt"|..., "value"}], "images": [...]}`,
   `<image>` tags in values; an ORZ answer `{"from": "assistant", "ground_truth": {"value"}}` or a top-level
   `answer`). A malformed row raises ValueError naming file and line/row, or is skipped and counted (on_error=skip).
2. `encode_messages`: Qwen2.5-VL chat format with our own `<|image_pad|>` expansion (grid_thw.prod() // merge**2
   tokens per image), targets = next token on assistant tokens only (content + `<|im_end|>`), -100 elsewhere, and
   3-D mRoPE position ids computed per sample (`mrope_position_ids`, equal to HF's `get_rope_index`). Training
   encodes once into the token store (`ovr_train.store`) and reads samples back from it, computing targets and
   position ids (and decoding images) as each sample is read, i.e. at collate time.
3. `step_plan`: the global batch of a step (a pure function of (seed, step): resumable by step number), split over
   ranks balanced by tokens, then into token-budget micro-batches; every rank gets the same number of micro-batches
   (short ranks get loss-free filler ones) so FSDP's collectives always pair up.
4. `collate`: packed (batch 1, cu_seqlens, 4-row position ids: text row + mRoPE rows) or padded (B x Lmax + mask).
"""

import base64
import binascii
import io
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoConfig, Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from ovr_kernels.packing import balanced_partition, token_budget_microbatches
from ovr_train.sources import canonical_row, iter_rows

IGNORE = -100
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
          "bot": "assistant", "model": "assistant"}


# ----------------------------------------------------------------------------------------------------------------
# Reading and normalising chat samples
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptFormat:
    """What every stage adds to a conversation: a system message and the answer instruction (empty: none). One
    format for SFT, RL and eval: a policy must be trained on the prompts it is evaluated on. `apply` puts the
    system prompt in front of a conversation without a system turn and appends the instruction to its last user
    turn unless that turn already mentions `\\boxed`."""

    system_prompt: str = ""
    answer_instruction: str = ""

    @classmethod
    def of(cls, dcfg) -> "PromptFormat":
        """The format a DataCfg asks for."""
        return cls(dcfg.system_prompt, dcfg.answer_instruction)

    def apply(self, messages: list) -> list:
        """Chat messages [(role, [str | ImageRef])] -> a new list in this format (the input is not modified)."""
        out = [(role, list(parts)) for role, parts in messages]
        if self.system_prompt and out and out[0][0] != "system":
            out.insert(0, ("system", [self.system_prompt]))
        last_user = max((i for i, (role, _) in enumerate(out) if role == "user"), default=None)
        if self.answer_instruction and last_user is not None:
            parts = out[last_user][1]
            if not any(isinstance(p, str) and "\\boxed" in p for p in parts):
                if parts and isinstance(parts[-1], str):
                    parts[-1] = parts[-1] + "\n" + self.answer_instruction
                else:
                    parts.append(self.answer_instruction)
        return out


@dataclass
class ChatSample:
    """One conversation: messages [(role, [str | ImageRef, ...])], an optional reference answer, its origin."""

    messages: list
    answer: str | None = None
    where: str = ""


class NoLoss(str):
    """Assistant text that the model sees but is not trained to write (a content part `{"type": "text", "text":
    ..., "loss": false}`): context inside a reply, such as values the trace copies from elsewhere."""

    __slots__ = ()


@dataclass
class ImageRef:
    """An image given as a path (relative to `base_dir`) or base64 (optionally a data: URL)."""

    source: str
    base_dir: str = ""


@dataclass
class DataStats:
    """Counts of what was dropped or changed while loading (reported at start, logged with metrics)."""

    lines: int = 0
    samples: int = 0
    skipped_malformed: int = 0
    skipped_image: int = 0
    skipped_overlong: int = 0
    skipped_no_loss: int = 0
    truncated: int = 0
    errors: list = field(default_factory=list)

    def note(self, kind: str, msg: str):
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.errors) < 20:
            self.errors.append(msg)

    def merge(self, other: "DataStats"):
        """Add another's counts (a build worker's chunk) to these."""
        for key, value in other.__dict__.items():
            if key == "errors":
                self.errors += value[:20 - len(self.errors)]
            else:
                setattr(self, key, getattr(self, key) + value)


def _parts(content, where: str, base_dir: str) -> list:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise ValueError(f"{where}: message content must be a string or a list of parts, got {type(content).__name__}")  # noqa: TRY004 (bad user input is a ValueError here)
    out = []
    for part in content:
        if isinstance(part, str):
            out.append(part)
        elif not isinstance(part, dict):
            raise ValueError(f"{where}: content part must be an object, got {part!r:.60}")  # noqa: TRY004 (bad user input is a ValueError here)
        elif part.get("type") == "text" or ("text" in part and "type" not in part):
            loss = part.get("loss", True)
            if not isinstance(loss, bool):
                raise ValueError(  # noqa: TRY004 (bad user input is a ValueError here)
                    f"{where}: a text part's 'loss' must be true or false, got {loss!r:.60}")
            out.append(str(part.get("text", "")) if loss else NoLoss(part.get("text", "")))
        elif part.get("type") == "image" or "image" in part:
            out.append(ImageRef(str(part.get("image") or part.get("url") or ""), base_dir))
        elif part.get("type") == "image_url" or "image_url" in part:
            url = part.get("image_url")
            out.append(ImageRef(str(url.get("url", "") if isinstance(url, dict) else url), base_dir))
        else:
            raise ValueError(f"{where}: unknown content part type {part.get('type')!r}")
    return out


def normalize_sample(obj, where: str, base_dir: str = "") -> ChatSample:
    """A parsed JSON object (OpenAI or ShareGPT/ORZ style) -> ChatSample; ValueError naming `where` if malformed."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")  # noqa: TRY004 (bad user input is a ValueError here)
    turns = obj.get("messages", obj.get("conversations"))
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: needs a non-empty 'messages' or 'conversations' list")
    images = [ImageRef(str(s), base_dir) for s in obj.get("images", []) or []]
    answer = obj.get("answer")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise ValueError(f"{where}: each turn must be an object, got {turn!r:.60}")  # noqa: TRY004 (bad user input is a ValueError here)
        role = _ROLES.get(str(turn.get("role", turn.get("from", ""))).lower())
        if role is None:
            raise ValueError(f"{where}: unknown role {turn.get('role', turn.get('from'))!r}")
        if "ground_truth" in turn and "value" not in turn:  # ORZ: the assistant turn carries only the answer
            gt = turn["ground_truth"]
            answer = gt.get("value") if isinstance(gt, dict) else gt
            continue
        content = turn["content"] if "content" in turn else turn.get("value")
        parts = _parts(content, where, base_dir)
        if images and any(isinstance(p, str) and "<image>" in p for p in parts):
            expanded = []
            for p in parts:
                if not isinstance(p, str):
                    expanded.append(p)
                    continue
                pieces = p.split("<image>")
                for k, piece in enumerate(pieces):
                    if k:
                        if not images:
                            raise ValueError(f"{where}: more <image> tags than entries in 'images'")
                        expanded.append(images.pop(0))
                    if piece:
                        expanded.append(piece)
            parts = expanded
        messages.append((role, parts))
    if images:  # images without tags go in front of the first user message (LLaVA convention)
        for i, (role, parts) in enumerate(messages):
            if role == "user":
                messages[i] = (role, images + parts)
                break
        else:
            raise ValueError(f"{where}: 'images' given but there is no user message")
    if not messages:
        raise ValueError(f"{where}: no messages")
    return ChatSample(messages, None if answer is None else str(answer), where)


def chat_sample(where: str, obj, base_dir: str, on_error: str, stats: DataStats) -> ChatSample | None:
    """One row from `sources.iter_rows` (a dict, or the ValueError of a malformed line) -> ChatSample, or None when
    it is malformed and on_error="skip" (counted in `stats`)."""
    stats.lines += 1
    try:
        if isinstance(obj, ValueError):
            raise obj
        return normalize_sample(canonical_row(obj, where, sft=True), where, base_dir)
    except ValueError as e:
        if on_error == "raise":
            raise
        stats.note("skipped_malformed", str(e))
        return None


def iter_chat_samples(path, on_error: str = "raise", stats: DataStats | None = None):
    """The chat samples of a JSONL file, parquet file or HF datasets directory (see ovr_train.sources), streamed;
    malformed rows raise (naming file and line or row) or are skipped and counted."""
    stats = stats if stats is not None else DataStats()
    base_dir = str(Path(path).parent)
    for where, obj in iter_rows(path):
        sample = chat_sample(where, obj, base_dir, on_error, stats)
        if sample is not None:
            yield sample


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------


def load_image(ref: ImageRef, image_root: str = ""):
    """ImageRef -> RGB PIL image; ValueError naming the source if it is missing or not a decodable image."""
    src = ref.source
    inline = src.startswith("data:image") or (len(src) > 256 and "/" not in src[:64] and not src.endswith(
        (".png", ".jpg", ".jpeg")))
    if not inline:
        path = Path(src) if Path(src).is_absolute() else Path(image_root or ref.base_dir) / src
        if not path.is_file():
            raise ValueError(f"image {str(path)!r} does not exist")
    try:
        if inline:
            raw = base64.b64decode(src.split(",", 1)[1] if src.startswith("data:") else src, validate=False)
            img = Image.open(io.BytesIO(raw))
        else:
            img = Image.open(path)
        img.load()
    except (OSError, SyntaxError, binascii.Error, Image.DecompressionBombError) as e:  # what PIL raises on bad data
        raise ValueError(f"image {src[:80]!r} cannot be decoded: {type(e).__name__}: {e}") from None
    return img.convert("RGB")


class ImageProcessor:
    """Qwen2-VL preprocessing without torchvision: resize to multiples of patch*merge within [min, max] pixels,
    CLIP-normalise, cut into (P, 3 * temporal_patch * patch * patch) patch rows in the ViT's merge-aware order.
    Build it with `image_processor(cfg, model_path)` so every place an image becomes tokens agrees."""

    def __init__(self, min_pixels: int, max_pixels: int, patch_size: int = 14, merge_size: int = 2,
                 temporal_patch_size: int = 2, image_mean=None, image_std=None):
        self.min_pixels, self.max_pixels, self.patch_size = min_pixels, max_pixels, patch_size
        self.merge_size, self.temporal_patch_size = merge_size, temporal_patch_size
        norm = {k: v for k, v in (("image_mean", image_mean), ("image_std", image_std)) if v is not None}
        self._proc = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size,
                                              merge_size=merge_size, temporal_patch_size=temporal_patch_size, **norm)

    @property
    def pixels(self) -> tuple:
        """(min_pixels, max_pixels): what the vLLM engine is given as mm_processor_kwargs."""
        return self.min_pixels, self.max_pixels

    def save_pretrained(self, out_dir):
        """preprocessor_config.json with these settings, in both the `size` form and the older min/max_pixels keys
        (which transformers and vLLM let win over `size`), so any loader turns an image into the same tokens."""
        self._proc.save_pretrained(out_dir)
        f = Path(out_dir) / "preprocessor_config.json"
        pre = json.loads(f.read_text())
        pre.update(processor_class="Qwen2_5_VLProcessor", min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        f.write_text(json.dumps(pre, indent=2))

    def __call__(self, image) -> tuple:
        """PIL image -> (pixel_values (P, 1176) fp32, grid_thw (3,) int64)."""
        out = self._proc(images=[image], return_tensors="pt")
        return out["pixel_values"].float(), out["image_grid_thw"][0].long()

    def num_tokens(self, grid_thw) -> int:
        """LLM tokens of one image: grid_thw.prod() // merge**2."""
        return int(torch.as_tensor(grid_thw).prod()) // self.merge_size ** 2

    def num_tokens_of_size(self, width: int, height: int) -> int:
        """LLM tokens of a width x height image after resizing, without computing its pixels."""
        h, w = smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)
        return h * w // (self.patch_size * self.merge_size) ** 2


def image_processor(cfg, model_path: str | None = None) -> ImageProcessor:
    """The one ImageProcessor for a run (Config `cfg`) on the checkpoint `model_path` (default cfg.model.path; empty:
    a model built from cfg.model): SFT data, RL prompts, eval, both engines and the export all use its numbers.
    min/max pixels: data.min_pixels / data.max_pixels where set (> 0), else the checkpoint's
    preprocessor_config.json (`min_pixels`/`max_pixels` keys, which win as in transformers, or `size:
    {shortest_edge, longest_edge}`), else transformers' Qwen2-VL defaults. Patch, merge and temporal patch sizes
    are the model's (its vision_config); a preprocessor_config.json that disagrees with them is an error. The
    normalisation (image_mean / image_std) is the file's where it names one, as any loader of the checkpoint does."""
    path = cfg.model.path if model_path is None else str(model_path)
    default = Qwen2VLImageProcessorPil()
    pre, where = {}, "transformers' Qwen2-VL defaults"
    if path:
        vision = AutoConfig.from_pretrained(path).vision_config
        sizes = {"patch_size": vision.patch_size, "merge_size": vision.spatial_merge_size,
                 "temporal_patch_size": vision.temporal_patch_size}
        f = Path(path) / "preprocessor_config.json"
        if f.is_file():
            pre, where = json.loads(f.read_text()), str(f)
            for key, want in sizes.items():
                if key in pre and pre[key] != want:
                    raise ValueError(f"{f}: {key}={pre[key]!r} disagrees with the model's vision_config ({want}): "
                                     "the ViT would get patches of another size")
    else:
        sizes = {"patch_size": cfg.model.patch_size, "merge_size": cfg.model.spatial_merge_size,
                 "temporal_patch_size": default.temporal_patch_size}
    size = pre.get("size") or {}
    bounds = []
    for name, edge, fallback in (("min_pixels", "shortest_edge", default.size.shortest_edge),
                                 ("max_pixels", "longest_edge", default.size.longest_edge)):
        given = getattr(cfg.data, name)
        value = given or pre.get(name) or size.get(edge) or fallback
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{where}: {name}={value!r} must be a positive int")
        bounds.append(value)
    if bounds[0] > bounds[1]:
        raise ValueError(f"min_pixels={bounds[0]} > max_pixels={bounds[1]} (data.min_pixels={cfg.data.min_pixels}, "
                         f"data.max_pixels={cfg.data.max_pixels}; 0 takes it from {where})")
    return ImageProcessor(*bounds, **sizes, image_mean=pre.get("image_mean"), image_std=pre.get("image_std"))


# ----------------------------------------------------------------------------------------------------------------
# Encoding: chat template, image-pad expansion, loss targets, mRoPE ids
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """A tokenized sample: input_ids (L,), targets (L,) (next token on loss positions, else -100), mRoPE position
    ids (3, L), images as pixel_values (P, C) + grid_thw (N, 3) or None.

    `branches` (packed batches only): () for one causal sequence; else the lengths of the branches that end the
    sample, each of which sees the shared prefix before the first branch and itself (causally), not the other
    branches: a rollout prompt packed once with its n responses (rl.rollout_group)."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    mrope_ids: torch.Tensor
    pixel_values: torch.Tensor | None = None
    grid_thw: torch.Tensor | None = None
    answer: str | None = None
    branches: tuple = ()

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())


def mrope_position_ids(input_ids_L, grid_thw_N3, image_pad_id: int, merge_size: int):
    """3-D mRoPE position ids (3, L) of one sample, as HF's `get_rope_index` computes them for images.

    Text tokens advance all three rows by 1. An image block of t x (h/merge) x (w/merge) tokens starting at text
    position s gets (s + t_idx, s + h_idx, s + w_idx); the next text token starts at s + max(h, w) / merge.
    """
    length = int(input_ids_L.shape[0])
    is_img = input_ids_L == image_pad_id
    if grid_thw_N3 is None or not bool(is_img.any()):  # text only: 0..L-1 on all three rows
        return torch.arange(length).expand(3, length).clone()
    out = torch.empty(3, length, dtype=torch.long)
    starts = torch.nonzero(is_img & ~torch.cat([is_img.new_zeros(1), is_img[:-1]])).flatten().tolist()
    pos, i = 0, 0
    for img, start in enumerate(starts):
        out[:, i:start] = torch.arange(pos, pos + start - i)  # text before this image block
        pos += start - i
        t, h, w = (int(x) for x in grid_thw_N3[img])
        gh, gw = h // merge_size, w // merge_size
        n = t * gh * gw
        tt = torch.arange(t).view(-1, 1, 1).expand(t, gh, gw).reshape(-1)
        hh = torch.arange(gh).view(1, -1, 1).expand(t, gh, gw).reshape(-1)
        ww = torch.arange(gw).view(1, 1, -1).expand(t, gh, gw).reshape(-1)
        out[:, start:start + n] = torch.stack([tt, hh, ww]) + pos
        pos += max(gh, gw)  # as HF: the temporal extent does not advance text positions
        i = start + n
    out[:, i:] = torch.arange(pos, pos + length - i)
    return out


def encode_messages(messages: list, tok, ids: dict, image_proc: ImageProcessor | None, *, image_root: str = "",
                    add_generation_prompt: bool = False, answer: str | None = None) -> Encoded:
    """Chat messages [(role, parts)] -> Encoded in the Qwen2.5-VL chat format (system prompt and answer instruction
    are the caller's: PromptFormat).

    Loss targets cover assistant content (but its NoLoss parts) and its `<|im_end|>`. With add_generation_prompt the
    sequence ends with
    `<|im_start|>assistant\\n` (a rollout prompt). Image errors raise ValueError naming the image.

    Token ids equal the checkpoint's chat template's (rendered, then tokenised; each image's one `<|image_pad|>`
    expanded to its tokens) with two deliberate differences: without a system prompt (PromptFormat) a conversation that has no
    system turn gets none (the template adds "You are a helpful assistant."; the recipe configs set that prompt);
    and assistant content is tokenised apart from its `assistant\\n` header, exactly as the model produces it after
    a generation prompt, so content starting with whitespace ("\\n\\n...") does not merge into the header's newline.
    """
    # Segments first (token ids, or text to encode), then one batched tokenizer call for all text of the sample.
    segments, pixels, grids = [], [], []  # (ids | str, is_loss)

    def add(seg, is_loss):  # adjacent text on the same side of the loss mask is one string, as the template renders it
        if isinstance(seg, str) and segments and isinstance(segments[-1][0], str) and segments[-1][1] == is_loss:
            segments[-1] = (segments[-1][0] + seg, is_loss)
        else:
            segments.append((seg, is_loss))

    for role, parts in messages:
        add([ids["im_start"]], False)
        add(f"{role}\n", False)
        train = role == "assistant"
        for part in parts:
            if isinstance(part, ImageRef):
                if image_proc is None:
                    raise ValueError("sample has an image but the model has no image processor")
                pv, grid = image_proc(load_image(part, image_root))
                pixels.append(pv)
                grids.append(grid)
                add([ids["vision_start"]] + [ids["image_pad"]] * image_proc.num_tokens(grid) + [ids["vision_end"]],
                    False)
            elif part:
                add(str(part), train and not isinstance(part, NoLoss))
        add([ids["im_end"]], train)
        add("\n", False)
    if add_generation_prompt:
        add([ids["im_start"]], False)
        add("assistant\n", False)
    texts = [seg for seg, _ in segments if isinstance(seg, str)]
    encoded = iter(e.ids for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False))
    tokens, loss = [], []
    for seg, is_loss in segments:
        seg_ids = next(encoded) if isinstance(seg, str) else seg
        tokens.extend(seg_ids)
        loss.extend([is_loss] * len(seg_ids))
    input_ids = torch.tensor(tokens, dtype=torch.long)
    is_loss = torch.tensor(loss, dtype=torch.bool)
    # Position t predicts token t+1: a target exists where the NEXT token is a loss token.
    targets = torch.full_like(input_ids, IGNORE)
    targets[:-1] = torch.where(is_loss[1:], input_ids[1:], torch.full_like(input_ids[1:], IGNORE))
    grid_thw = torch.stack(grids) if grids else None
    merge = image_proc.merge_size if image_proc is not None else 2
    mrope = mrope_position_ids(input_ids, grid_thw, ids["image_pad"], merge)
    return Encoded(input_ids, targets, mrope, torch.cat(pixels) if pixels else None, grid_thw, answer)


def truncate(enc: Encoded, max_len: int) -> Encoded:
    """Cut a sample to its first max_len tokens (the caller checks no image token lies beyond the cut)."""
    targets = enc.targets[:max_len].clone()
    targets[-1] = IGNORE  # the last kept token's target lies beyond the cut
    return Encoded(enc.input_ids[:max_len], targets, enc.mrope_ids[:, :max_len], enc.pixel_values, enc.grid_thw,
                   enc.answer)


def encode_sft_sample(sample: ChatSample, tok, ids: dict, image_proc: ImageProcessor | None, cfg,
                      stats: DataStats) -> Encoded | None:
    """One training sample under DataCfg `cfg` -> Encoded, or None when it is skipped (counted in `stats`).

    Over-long samples raise or are truncated (counted; skipped if an image lies beyond the cut); image errors raise
    or skip; samples without loss tokens are skipped.
    """
    try:
        enc = encode_messages(PromptFormat.of(cfg).apply(sample.messages), tok, ids, image_proc,
                              image_root=cfg.image_root, answer=sample.answer)
    except ValueError as e:
        if cfg.on_error == "raise":
            raise ValueError(f"{sample.where}: {e}") from None
        stats.note("skipped_image", f"{sample.where}: {e}")
        return None
    if enc.length > cfg.max_seq_len:
        n_img = int((enc.input_ids[cfg.max_seq_len:] == ids["image_pad"]).sum())
        if cfg.overlong == "error":
            raise ValueError(f"{sample.where}: sample has {enc.length} tokens > data.max_seq_len="
                             f"{cfg.max_seq_len} (set data.overlong=truncate to cut it)")
        if n_img:  # cutting through or after an image would orphan its features
            stats.note("skipped_overlong", f"{sample.where}: {enc.length} tokens, image beyond the cut")
            return None
        enc = truncate(enc, cfg.max_seq_len)
        stats.truncated += 1
    if enc.num_loss_tokens == 0:
        stats.note("skipped_no_loss", f"{sample.where}: no assistant tokens to train on")
        return None
    return enc


def no_samples_error(files: list, stats: DataStats) -> ValueError:
    return ValueError(f"no usable training samples in {[str(f) for f in files]} ({stats.lines} rows; skipped: "
                      f"malformed {stats.skipped_malformed}, image {stats.skipped_image}, overlong "
                      f"{stats.skipped_overlong}, no loss tokens {stats.skipped_no_loss})")


def load_sft_samples(files: list, tok, ids: dict, image_proc: ImageProcessor | None, cfg) -> tuple:
    """Every training sample of `files` encoded in memory -> (list[Encoded], DataStats). Training reads the token
    store (ovr_train.store) instead; this is its reference (same samples, same order) for tests and benchmarks."""
    stats = DataStats()
    out = []
    for path in files:
        for sample in iter_chat_samples(path, cfg.on_error, stats):
            enc = encode_sft_sample(sample, tok, ids, image_proc, cfg, stats)
            if enc is not None:
                out.append(enc)
    stats.samples = len(out)
    if not out:
        raise no_samples_error(files, stats)
    return out, stats


# ----------------------------------------------------------------------------------------------------------------
# Step plan: global batch -> ranks (balanced) -> token-budget micro-batches
# ----------------------------------------------------------------------------------------------------------------


def _micro_batches(indices: list, lengths: list, budget: int, packing: bool) -> list:
    """Token-budget micro-batches of `indices` (packed: sum of lengths <= budget, first-fit decreasing from
    ovr_kernels.packing; padded: count x longest <= budget, greedy over lengths sorted longest first)."""
    if packing:
        return [[indices[k] for k in mb] for mb in token_budget_microbatches([lengths[i] for i in indices], budget)]
    bins, members = [], sorted(indices, key=lambda k: (-lengths[k], k))
    for i in members:  # longest first, so a bin's first member is its longest
        if bins and (len(bins[-1]) + 1) * lengths[bins[-1][0]] <= budget:
            bins[-1].append(i)
        else:
            bins.append([i])
    return bins


@dataclass
class StepSampler:
    """Deterministic, resumable sampler: the global batch of step s is a pure function of (seed, s).

    Each epoch is a fresh permutation (seeded by seed + epoch); a step takes the next `batch_size` indices; the
    last partial batch of an epoch is dropped. `state_dict()` is just the next step, so resume is exact.
    """

    num_samples: int
    batch_size: int
    seed: int
    step: int = 0
    data_key: str = ""
    """Identifies the data (the token store's key): a checkpoint taken on other data refuses to resume."""
    _epoch_order: tuple = field(default=(-1, None), repr=False, compare=False)

    def __post_init__(self):
        if self.num_samples < self.batch_size:
            raise ValueError(f"sft.batch_size={self.batch_size} exceeds the {self.num_samples} usable samples")

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def batch_indices(self, step: int) -> list:
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._epoch_order[0] != epoch:  # one permutation per epoch, not per step (2M samples: 8 MB, 30 ms)
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            # int32 draws the same permutation as the default int64 (tested), in half the memory
            self._epoch_order = (epoch, torch.randperm(self.num_samples, generator=g, dtype=torch.int32))
        return self._epoch_order[1][k * self.batch_size:(k + 1) * self.batch_size].tolist()

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "num_samples": self.num_samples, "batch_size": self.batch_size,
                "data_key": self.data_key}

    def load_state_dict(self, state: dict):
        for key in ("seed", "num_samples", "batch_size", "data_key"):
            if key == "data_key" and not (state.get(key) and self.data_key):
                continue  # checkpoints from before the token store carry no key
            if state[key] != getattr(self, key):
                raise ValueError(f"checkpoint sampler {key}={state[key]} differs from this run's {getattr(self, key)}"
                                 " (different data or config): refusing to resume")
        self.step = int(state["step"])


def step_plan(sample_ids: list, lengths: list, world_size: int, budget: int, packing: bool) -> list:
    """Split one global batch over ranks (balanced by tokens) and into micro-batches.

    Returns plan[rank] = list of micro-batches (lists of sample ids); every rank has the same number of
    micro-batches, the short ones padded with None (a loss-free filler micro-batch, see `filler`).
    """
    local_lengths = [int(lengths[i]) for i in sample_ids]  # lengths: a list or the store's index array
    per_rank, _ = balanced_partition(local_lengths, world_size)
    plan = []
    for part in per_rank:
        mbs = _micro_batches(part, local_lengths, budget, packing)
        plan.append([[sample_ids[k] for k in sorted(mb)] for mb in mbs])
    num_micro = max(len(p) for p in plan)
    return [p + [None] * (num_micro - len(p)) for p in plan]


# ----------------------------------------------------------------------------------------------------------------
# Collation
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One micro-batch, ready for `OvrVLM.forward(**batch.model_inputs())`.

    Packed: input_ids (1, T), position_ids (4, 1, T) (row 0: per-sample text positions, rows 1-3: mRoPE), cu_seqlens
    int32 (B+1,), max_seqlen int, attention_mask None. Padded: input_ids (B, L), position_ids (3, B, L),
    attention_mask (B, L). Both: targets (B*L,) with -100 on non-loss/pad positions; pixel_values (P, C) and
    image_grid_thw (N, 3) of the distinct images or None; image_feature_index: the ViT output row of each image
    token when samples share images, else None. Host-side counts need no device sync.

    Packed samples with branches (`Encoded.branches`): cu_seqlens are the query segments (the prefix with its first
    branch, then each further branch), key_cu_seqlens the key segments of the same count (a further branch's keys
    are the prefix's rows, then its own) and key_index the row in the packed tokens of each key (long (Tk,)), so
    the prefix is computed once and attended by every branch; None / 0 when no sample branches.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    attention_mask: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    image_feature_index: torch.Tensor | None = None
    key_cu_seqlens: torch.Tensor | None = None
    key_max_seqlen: int = 0
    key_index: torch.Tensor | None = None
    num_tokens: int = 0
    num_loss_tokens: int = 0
    num_samples: int = 0
    num_image_tokens: int = 0

    def to(self, device) -> "Batch":
        moved = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                 for k, v in self.__dict__.items()}
        return Batch(**moved)

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "cu_seqlens": self.cu_seqlens,
                "max_seqlen": self.max_seqlen, "attention_mask": self.attention_mask,
                "pixel_values": self.pixel_values, "image_grid_thw": self.image_grid_thw,
                "image_feature_index": self.image_feature_index, "num_image_tokens": self.num_image_tokens,
                "key_cu_seqlens": self.key_cu_seqlens, "key_max_seqlen": self.key_max_seqlen,
                "key_index": self.key_index}


def _images(samples: list, merge_size: int):
    """The micro-batch's images, each distinct pixel tensor once (the n samples of a rollout prompt share their
    prompt's tensor: one copy, one ViT pass), and, when some repeat, the ViT output row of each image token in
    token order (None: rows map one to one). Returns (pixel_values, grid_thw, feature_index, image tokens)."""
    slot, pixels, grids, per_sample = {}, [], [], []
    for s in samples:
        if s.pixel_values is not None:
            if id(s.pixel_values) not in slot:
                slot[id(s.pixel_values)] = len(pixels)
                pixels.append(s.pixel_values)
                grids.append(s.grid_thw)
            per_sample.append(slot[id(s.pixel_values)])
    if not pixels:
        return None, None, None, 0
    tokens = [int(g.prod(-1).sum()) // merge_size ** 2 for g in grids]
    index = None
    if len(per_sample) > len(pixels):
        starts = [0, *itertools.accumulate(tokens)]
        index = torch.cat([torch.arange(starts[i], starts[i] + tokens[i]) for i in per_sample])
    return torch.cat(pixels), torch.cat(grids), index, sum(tokens[i] for i in per_sample)


def _text_positions(s) -> torch.Tensor:
    """Row 0 of a packed sample's position ids: 0.. over the sample, each branch continuing from its prefix."""
    if not s.branches:
        return torch.arange(s.length)
    prefix = s.length - sum(s.branches)
    return torch.cat([torch.arange(prefix), *[torch.arange(prefix, prefix + n) for n in s.branches]])


def _branch_keys(samples: list) -> tuple:
    """(query segment lengths, key cu_seqlens int32, longest key segment, key rows long) of a packed micro-batch in
    which some samples branch (see `Batch`)."""
    q_lens, k_lens, rows, start = [], [], [], 0
    for s in samples:
        if not s.branches:
            q_lens.append(s.length)
            k_lens.append(s.length)
            rows.append(torch.arange(start, start + s.length))
        else:
            prefix = s.length - sum(s.branches)
            at = start + prefix
            for j, n in enumerate(s.branches):
                q_lens.append(n + (prefix if j == 0 else 0))
                k_lens.append(prefix + n)
                rows += [torch.arange(start, start + prefix), torch.arange(at, at + n)]
                at += n
        start += s.length
    cu_k = torch.zeros(len(k_lens) + 1, dtype=torch.int32)
    cu_k[1:] = torch.tensor(k_lens).cumsum(0)
    return q_lens, cu_k, max(k_lens), torch.cat(rows)


def collate(samples: list, packing: bool = True, pad_id: int = 0, merge_size: int = 2) -> Batch:
    """Encoded samples -> one packed (varlen) or padded Batch."""
    if not samples:
        raise ValueError("collate: empty micro-batch")
    pixel_values, grid_thw, feature_index, num_img = _images(samples, merge_size)
    lengths = [s.length for s in samples]
    counts = {"num_tokens": sum(lengths), "num_loss_tokens": sum(s.num_loss_tokens for s in samples),
              "num_samples": len(samples), "num_image_tokens": num_img}
    for s in samples:
        if s.branches and (min(s.branches) < 1 or sum(s.branches) > s.length):
            raise ValueError(f"collate: branches {s.branches} do not fit a sample of {s.length} tokens")
    if packing:
        text_pos = torch.cat([_text_positions(s) for s in samples])
        position_ids = torch.cat([text_pos[None], torch.cat([s.mrope_ids for s in samples], dim=1)])[:, None, :]
        keys = _branch_keys(samples) if any(s.branches for s in samples) else None
        q_lens = keys[0] if keys else lengths
        cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(q_lens).cumsum(0)
        return Batch(torch.cat([s.input_ids for s in samples])[None], torch.cat([s.targets for s in samples]),
                     position_ids, cu, max(q_lens), None, pixel_values, grid_thw, feature_index,
                     *(keys[1:] if keys else ()), **counts)
    if any(s.branches for s in samples):
        raise ValueError("collate: samples with branches (a prompt packed once with its responses) need packing=True")
    width = max(lengths)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    position_ids = torch.ones(3, len(samples), width, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for b, s in enumerate(samples):  # right padding: causal attention never sees the pads of its own row
        input_ids[b, :s.length], targets[b, :s.length] = s.input_ids, s.targets
        position_ids[:, b, :s.length], mask[b, :s.length] = s.mrope_ids, 1
    return Batch(input_ids, targets.reshape(-1), position_ids, None, width, mask, pixel_values, grid_thw,
                 feature_index, **counts)


def filler(samples: list, packing: bool = True, pad_id: int = 0, merge_size: int = 2) -> Batch:
    """A loss-free micro-batch (targets all -100) for ranks with fewer micro-batches than others: it runs the same
    FSDP collectives and contributes exactly zero loss and gradient."""
    batch = collate(samples[:1], packing, pad_id, merge_size)
    batch.targets = torch.full_like(batch.targets, IGNORE)
    batch.num_loss_tokens = 0
    return batch
