"""The one prompt format of SFT, RL and eval: a policy must be trained on the prompts it is evaluated on.

`PromptFormat.apply` puts `data.system_prompt` in front of a conversation without a system turn and appends
`data.answer_instruction` to its last user turn unless that turn already mentions `\\boxed`. SFT encodes the formatted
conversation (data.load_sft_samples); RL rollouts and evaluation build their generation prompts with `build_prompt`,
and the RL pool drops prompts too long for the micro-batch budget by `prompt_length`.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptFormat:
    """What every stage adds to a conversation: a system message and the answer instruction (empty: none)."""

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


def build_prompt(item, tok, ids: dict, image_proc, fmt: PromptFormat):
    """evaluate.EvalItem -> rollout.Prompt in `fmt`: chat-templated ids with expanded image pads + pixel values (HF
    engine), and the text with one `<|image_pad|>` per image + PIL images (vLLM). Image errors name the item."""
    import torch

    from ovr_train.data import encode_messages, load_image
    from ovr_train.rollout import Prompt, collapse_image_pads

    messages = fmt.apply(item.messages)
    try:
        enc = encode_messages(messages, tok, ids, image_proc, add_generation_prompt=True)
        images = [load_image(p) for _, parts in messages for p in parts if not isinstance(p, str)]
    except ValueError as e:
        raise ValueError(f"{item.where}: {e}") from None
    token_ids = enc.input_ids.tolist()
    text = tok.decode(collapse_image_pads(token_ids, ids["image_pad"]), skip_special_tokens=False)
    grid = enc.grid_thw.to(torch.long) if enc.grid_thw is not None else None
    image = None if not images else images[0] if len(images) == 1 else images
    return Prompt(token_ids, pixel_values=enc.pixel_values, image_grid_thw=grid, text=text, image=image)


def prompt_length(item, tok, ids: dict, image_proc, fmt: PromptFormat) -> int:
    """Tokens of `build_prompt(item, ...)` without computing pixel values: the text is encoded as build_prompt
    encodes it (each part separately), each image adds its resized grid's tokens plus its two delimiters."""
    from ovr_train.data import encode_messages, load_image

    messages = fmt.apply(item.messages)
    images = [p for _, parts in messages for p in parts if not isinstance(p, str)]
    text_only = [(role, [p for p in parts if isinstance(p, str)]) for role, parts in messages]
    try:
        n = encode_messages(text_only, tok, ids, None, add_generation_prompt=True).length
        return n + sum(2 + image_proc.num_tokens_of_size(*load_image(ref).size) for ref in images)
    except ValueError as e:
        raise ValueError(f"{item.where}: {e}") from None
