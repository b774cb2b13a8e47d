"""Reasoning-behaviour rates in responses (the paper's "cognitive behaviours"), by keyword proxy.

The paper counts behaviours with an LLM judge; ORZ's cheap, reproducible proxy counts responses containing
`wait,`, `recheck`, `retry`, `alternatively,`, `however,`. We extend it with short phrase lists per behaviour and
the visual forms (visual reflection: "look at the image again", ...), detect each per response (case-insensitive
substring), and report the fraction of responses showing it, split by text vs image prompts, with the transfer
ratio rate(image responses) / rate(text responses) (the paper's BTR, computed on the proxy).
"""

import math

from ovr_train.metrics import pyplot

ORZ_KEYWORDS = ("wait,", "recheck", "retry", "alternatively,", "however,")

# behaviour -> phrases (lower case). Substring matches: keep phrases specific enough not to fire on plain prose.
PHRASES = {
    "reflection": ORZ_KEYWORDS,
    "backtracking": ("wait,", "alternatively,", "retry", "let me try again", "let me reconsider", "i made a mistake",
                     "that's not right", "that is not right", "that's wrong", "that is wrong", "let me redo"),
    "verification": ("recheck", "let me check", "let's check", "let me verify", "let's verify", "double-check",
                     "double check", "to verify", "check:", "verify:"),
    "subgoal": ("first,", "step 1", "break this down", "break it down", "break the problem", "subgoal",
                "sub-problem", "subproblem"),
    "backward_chaining": ("work backward", "working backward", "work back from", "working back from",
                          "in order to find", "to find this, we need"),
    "visual_reflection": ("look at the image again", "looking at the image again", "look at the figure again",
                          "looking at the figure again", "look at the picture again", "look again at the image",
                          "re-examine the figure", "re-examine the image", "reexamine the image",
                          "check the image again", "check the figure again", "back to the image", "recount"),
}
BEHAVIORS = tuple(PHRASES)


def detect(response):
    """response (str) -> {behaviour: bool} for every name in BEHAVIORS."""
    text = response.lower()
    return {name: any(p in text for p in phrases) for name, phrases in PHRASES.items()}


def tally(hits, is_image):
    """Counts that sum over ranks and batches: responses per prompt kind ("text/num", "image/num") and, per
    behaviour, how many of them show it ("text/<name>", "image/<name>").

    hits: `detect` results, one per response; is_image: list of bool (True when the prompt had an image).
    """
    if len(hits) != len(is_image):
        raise ValueError(f"hits ({len(hits)}) and is_image ({len(is_image)}) differ in length")
    out = {"text/num": is_image.count(False), "image/num": is_image.count(True)}
    for split, want in (("text", False), ("image", True)):
        for name in BEHAVIORS:
            out[f"{split}/{name}"] = sum(h[name] for h, img in zip(hits, is_image) if img == want)
    return out


def rates(counts):
    """`tally` counts (summed as they may be) -> {f"{split}/{behaviour}": rate} for split in ("all", "text",
    "image"), {f"transfer/{behaviour}": image rate / text rate} (NaN when no text response shows it or a split is
    empty), and the response counts "text/num" and "image/num". Rates of an empty split are NaN (not 0: "no data"
    is not "never")."""
    num = {"text": counts["text/num"], "image": counts["image/num"]}
    num["all"] = num["text"] + num["image"]
    out = {}
    for split in ("all", "text", "image"):
        for name in BEHAVIORS:
            shown = counts[f"text/{name}"] + counts[f"image/{name}"] if split == "all" else counts[f"{split}/{name}"]
            out[f"{split}/{name}"] = shown / num[split] if num[split] else math.nan
    for name in BEHAVIORS:
        text_rate, image_rate = out[f"text/{name}"], out[f"image/{name}"]
        out[f"transfer/{name}"] = image_rate / text_rate if text_rate > 0 else math.nan
    out["text/num"], out["image/num"] = num["text"], num["image"]
    return out


def behavior_rates(responses, is_image):
    """`rates` of `responses` (list of str) with `is_image` (list of bool, same length)."""
    if len(responses) != len(is_image):
        raise ValueError(f"responses ({len(responses)}) and is_image ({len(is_image)}) differ in length")
    return rates(tally([detect(r) for r in responses], list(is_image)))


def plot_behaviors(history, path, names=("reflection", "verification", "visual_reflection")):
    """Write a PNG of behaviour rates over steps, text vs image responses.

    history: list of (step, rates) with rates from `behavior_rates`; path: output file. Needs matplotlib.
    """
    plt = pyplot()
    steps = [s for s, _ in history]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        for split in ("text", "image"):
            ax.plot(steps, [r.get(f"{split}/{name}", math.nan) for _, r in history], label=split)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylim(-0.02, 1.02)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
