"""Chat-template parity: the token ids of SFT samples and rollout prompts equal what the checkpoint's own chat
template gives (rendered with `apply_chat_template`, then tokenised, each image's one `<|image_pad|>` expanded to its
tokens), on the real Qwen2.5 BPE: text, image, multi-turn, with and without a system turn. The two documented
differences (no default system turn without data.system_prompt; assistant content tokenised apart from its header)
are tested as exactly what the docstring of data.encode_messages says."""

import base64
import io

import pytest
from PIL import Image

from ovr_train.data import ImageProcessor, ImageRef, PromptFormat, encode_messages
from ovr_train.tasks import Item, build_prompt
from ovr_train.tokenizer import load_tokenizer, special_ids

# Qwen2.5-VL-7B-Instruct's chat_template (as the hub ships it: videos and vision ids included).
HUB_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
DEFAULT_SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def qwen():
    tok = load_tokenizer("", "qwen")
    return tok, special_ids(tok), ImageProcessor(56 * 56, 56 * 56)  # a 56x56 image: 4 tokens


def _png():
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), (200, 30, 30)).save(buf, format="PNG")
    return ImageRef("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())


def _hf_messages(messages):
    return [{"role": role, "content": [{"type": "image"} if isinstance(p, ImageRef) else {"type": "text", "text": p}
                                       for p in parts]} for role, parts in messages]


def template_ids(tok, ids, image_proc, messages, template, add_generation_prompt=False):
    """What the checkpoint's template gives: render, tokenise, expand each image pad to the image's tokens."""
    text = tok.apply_chat_template(_hf_messages(messages), chat_template=template, tokenize=False,
                                   add_generation_prompt=add_generation_prompt)
    out, n = [], image_proc.num_tokens(image_proc(Image.new("RGB", (56, 56)))[1])
    for t in tok(text, add_special_tokens=False).input_ids:
        out += [t] * n if t == ids["image_pad"] else [t]
    return out, text


CONVERSATIONS = {
    "text": [("user", ["What is 2 + 3?"]), ("assistant", ["<think>2 + 3 = 5.</think> \\boxed{5}"])],
    "image": [("user", [_png(), "How many red squares?"]), ("assistant", ["\\boxed{1}"])],
    "multi_turn_image": [("user", ["Look:", _png(), " count them"]), ("assistant", ["Two."]),
                         ("user", ["  \n and now? (leading spaces)"]), ("assistant", ["Three.\n\n\\boxed{3}"])],
    "system": [("system", ["Think step by step."]), ("user", [" 12 * 12 ", "= ?"]), ("assistant", ["144"])],
}


@pytest.mark.parametrize("template", ["ours", "hub"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_samples_and_prompts_equal_the_checkpoint_template(qwen, name, template):
    tok, ids, image_proc = qwen
    template = tok.chat_template if template == "ours" else HUB_TEMPLATE
    messages = CONVERSATIONS[name]
    has_system = messages[0][0] == "system"
    system = "" if has_system else DEFAULT_SYSTEM  # the recipe configs' data.system_prompt
    want, _ = template_ids(tok, ids, image_proc, messages, template)
    fmt = PromptFormat(system_prompt=system)
    got = encode_messages(fmt.apply(messages), tok, ids, image_proc)
    assert got.input_ids.tolist() == want
    # the rollout prompt (up to the last user turn): HF engine ids and the vLLM prompt text
    prompt_msgs = messages[:-1]
    want_ids, want_text = template_ids(tok, ids, image_proc, prompt_msgs, template, add_generation_prompt=True)
    prompt = build_prompt(Item("q", prompt_msgs, "x"), tok, ids, image_proc, fmt)
    assert prompt.token_ids == want_ids
    assert prompt.text == want_text


def test_documented_differences(qwen):
    tok, ids, image_proc = qwen
    # 1. no data.system_prompt: no system turn, where the template adds its default one
    messages = [("user", ["Hi"]), ("assistant", ["Hello"])]
    with_default, _ = template_ids(tok, ids, image_proc, messages, HUB_TEMPLATE)
    system_turn = tok(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n", add_special_tokens=False).input_ids
    assert with_default[:len(system_turn)] == system_turn
    assert encode_messages(messages, tok, ids, None).input_ids.tolist() == with_default[len(system_turn):]
    # 2. assistant content starting with newlines is tokenised after the generation prompt, as the model emits it
    messages = [("user", ["Hi"]), ("assistant", ["\n\nHello"])]
    prompt, _ = template_ids(tok, ids, image_proc, messages[:1], HUB_TEMPLATE, add_generation_prompt=True)
    response = tok("\n\nHello", add_special_tokens=False).input_ids + [ids["im_end"]]
    got = encode_messages(PromptFormat(DEFAULT_SYSTEM).apply(messages), tok, ids, None).input_ids.tolist()
    assert got == prompt + response + tok("\n", add_special_tokens=False).input_ids
    one_shot, _ = template_ids(tok, ids, image_proc, messages, HUB_TEMPLATE)
    assert got != one_shot  # the template would merge the header's "\n" with the content's: a real difference
