"""One image processor per run: the checkpoint's preprocessor_config.json unless data.min_pixels / data.max_pixels
override it, the model's patch and merge sizes, and the same numbers in the trainer's samples and in the export."""

import json

import pytest
import torch
from hub_fixture import CONFIG, PREPROCESSOR_CONFIG
from PIL import Image

from ovr_train.config import CONFIG_DIR, load_config
from ovr_train.data import image_processor

TINY = str(CONFIG_DIR / "tiny.yaml")


def _ckpt(tmp_path, pre):
    """A checkpoint dir with the hub's config.json and the given preprocessor_config.json (None: no file)."""
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    if pre is not None:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    return str(tmp_path)


def _cfg(path, *overrides):
    return load_config(TINY, [f"--model.path={path}", "--data.min_pixels=0", "--data.max_pixels=0", *overrides])


@pytest.mark.parametrize("pre, want", [
    ({"min_pixels": 3136, "max_pixels": 50176, "patch_size": 14, "merge_size": 2}, (3136, 50176)),  # hub form
    ({"size": {"shortest_edge": 6272, "longest_edge": 40000}}, (6272, 40000)),  # newer transformers form
    ({"min_pixels": 3136, "max_pixels": 50176, "size": {"shortest_edge": 1, "longest_edge": 2}}, (3136, 50176)),
    (None, (3136, 1003520)),  # no file: what transformers (and vLLM) would use
])
def test_pixel_bounds_come_from_the_checkpoint(tmp_path, pre, want):
    proc = image_processor(_cfg(_ckpt(tmp_path, pre)))
    assert proc.pixels == want
    assert (proc.patch_size, proc.merge_size, proc.temporal_patch_size) == (14, 2, 2)


def test_explicit_config_wins_per_field(tmp_path):
    path = _ckpt(tmp_path, PREPROCESSOR_CONFIG)
    assert image_processor(_cfg(path, "--data.max_pixels=12544")).pixels == (3136, 12544)
    assert image_processor(_cfg(path, "--data.min_pixels=12544", "--data.max_pixels=12544")).pixels == (12544, 12544)
    assert image_processor(load_config(TINY, [f"--model.path={path}"])).pixels == (12544, 12544)  # tiny.yaml sets them
    # no checkpoint: the config's numbers, and the model's patch/merge from cfg.model
    assert image_processor(load_config(TINY, ["--model.patch_size=16"])).patch_size == 16


def test_normalisation_follows_the_checkpoint(tmp_path):
    from transformers import AutoImageProcessor

    path = _ckpt(tmp_path, dict(PREPROCESSOR_CONFIG, image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25]))
    proc, image = image_processor(_cfg(path)), Image.effect_noise((60, 90), 50).convert("RGB")
    want = AutoImageProcessor.from_pretrained(path)(images=[image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(proc(image)[0], want.float(), rtol=0, atol=1e-6)


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="patch_size=16 disagrees with the model's vision_config"):
        image_processor(_cfg(_ckpt(tmp_path, dict(PREPROCESSOR_CONFIG, patch_size=16))))
    with pytest.raises(ValueError, match="min_pixels=20000 > max_pixels=12544"):
        image_processor(_cfg(_ckpt(tmp_path, dict(PREPROCESSOR_CONFIG, max_pixels=12544)), "--data.min_pixels=20000"))
    with pytest.raises(ValueError, match="max_pixels=-1"):
        image_processor(_cfg(_ckpt(tmp_path, dict(PREPROCESSOR_CONFIG, max_pixels=-1))))
    with pytest.raises(ValueError, match="data.min_pixels=-1"):
        load_config(TINY, ["--data.min_pixels=-1"])
    with pytest.raises(ValueError, match="data.min_pixels=200"):
        load_config(TINY, ["--data.min_pixels=200", "--data.max_pixels=100"])


def test_trainer_tokens_follow_the_checkpoint_and_the_export_writes_them(hub_ckpt, tmp_path):
    from transformers import AutoImageProcessor

    from ovr_train.dist import DistInfo
    from ovr_train.sft import setup_tokenizer_and_data

    Image.new("RGB", (200, 200), (10, 200, 30)).save(tmp_path / "a.png")
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                       {"type": "text", "text": "Colour?"}]},
                          {"role": "assistant", "content": "Green."}]}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = DistInfo(0, 1, 0, torch.device("cpu"), "gloo")

    def image_tokens(*overrides):
        cfg = _cfg(hub_ckpt, f"--data.train_files=[{data}]", *overrides)
        _, ids, store = setup_tokenizer_and_data(cfg, info)
        return int((store.read(0).input_ids == ids["image_pad"]).sum()), cfg

    # the hub's 3136..12845056 keeps 200x200 at 196x196 = 14x14 patches = 49 tokens; tiny.yaml's 12544 gives 16
    n, cfg = image_tokens()
    assert n == 49
    assert image_tokens("--data.max_pixels=12544")[0] == 16

    out = tmp_path / "export"
    image_processor(cfg).save_pretrained(out)  # what checkpoint.export_hf writes beside the weights
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert (pre["min_pixels"], pre["max_pixels"], pre["size"]) == (3136, 12845056, {"shortest_edge": 3136,
                                                                                    "longest_edge": 12845056})
    reloaded = AutoImageProcessor.from_pretrained(out)
    grid = reloaded(images=[Image.open(tmp_path / "a.png")], return_tensors="pt")["image_grid_thw"][0]
    assert int(grid.prod()) // 4 == 49
    (out / "config.json").write_text(json.dumps(CONFIG))
    assert image_processor(_cfg(str(out))).pixels == (3136, 12845056)  # the next stage reads back the same
