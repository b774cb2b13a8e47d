"""Checkpoint averaging: the average of tiny Qwen2.5-VL checkpoints is the parameter mean, and mismatches raise."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ovr_train.average import CheckpointMismatch, average_checkpoints, main


def _tiny_config(hidden=32, layers=2, intermediate=64):
    return Qwen2_5_VLConfig(
        text_config={"vocab_size": 300, "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": [1, 1, hidden // 8 - 2]}},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                       "out_hidden_size": hidden, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "window_size": 56, "fullatt_block_indexes": [1]},
        image_token_id=295, video_token_id=296, vision_start_token_id=297, vision_end_token_id=298,
        eos_token_id=299, pad_token_id=0,
    )


def _save_tiny(path, seed, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(_tiny_config(**kw)).to(dtype)
    with torch.no_grad():  # random norms/biases too, so a wrong average cannot hide behind equal init values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def two_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("avg")
    a, b = str(root / "a"), str(root / "b")
    ma, mb = _save_tiny(a, 1), _save_tiny(b, 2)
    return a, b, ma, mb


def test_uniform_average_is_parameter_mean_and_loads(two_ckpts, tmp_path):
    a, b, ma, mb = two_ckpts
    out = str(tmp_path / "avg")
    summary = average_checkpoints([a, b], out)
    assert summary["weights"] == [0.5, 0.5]
    avg = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    sa, sb, sv = ma.state_dict(), mb.state_dict(), avg.state_dict()
    assert set(sv) == set(sa)
    for name in sa:
        torch.testing.assert_close(sv[name], (sa[name] + sb[name]) / 2, rtol=0, atol=1e-6, msg=name)
    assert os.path.isfile(os.path.join(out, "generation_config.json"))  # aux files travel with the weights


def test_weighted_average_sharded_output_and_cli(two_ckpts, tmp_path):
    a, b, _, _ = two_ckpts
    out = str(tmp_path / "w")
    # tiny shards force the sharded layout (index + several files), which from_pretrained must also load
    main([a, b, "--out", out, "--weights", "1,3", "--max-shard-gb", str(20_000 / 2**30)])
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) > 1
    fa, fb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    got = {}
    for fn in set(weight_map.values()):
        got.update(load_file(os.path.join(out, fn)))
    assert set(got) == set(fa)
    for name in fa:
        torch.testing.assert_close(got[name], 0.25 * fa[name] + 0.75 * fb[name], rtol=0, atol=1e-6, msg=name)
    Qwen2_5_VLForConditionalGeneration.from_pretrained(out)


def test_bf16_average_accumulates_in_fp32(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _save_tiny(a, 3, torch.bfloat16)
    _save_tiny(b, 4, torch.bfloat16)
    out = str(tmp_path / "avg")
    average_checkpoints([a, b, a], out)
    got = load_file(os.path.join(out, "model.safetensors"))
    fa, fb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    for name in fa:
        assert got[name].dtype == torch.bfloat16
        truth = (2 * fa[name].double() + fb[name].double()) / 3
        # fp32 accumulation then one rounding to bf16: within half a bf16 ulp (<= 2^-8 relative) of the exact
        # mean, plus fp32 cancellation error (~2^-23 of the operands); bf16 accumulation would be ~2^-8 of them
        err = (got[name].double() - truth).abs()
        bound = truth.abs() * 2.0**-8 + (2 * fa[name].double().abs() + fb[name].double().abs()) * 2.0**-20
        assert bool((err <= bound).all()), (name, float((err - bound).max()))


def test_config_mismatch_names_the_key(two_ckpts, tmp_path):
    a = two_ckpts[0]
    c = str(tmp_path / "c")
    _save_tiny(c, 5, intermediate=48)
    with pytest.raises(CheckpointMismatch, match=r"config mismatch .*: text_config.intermediate_size = 64 vs 48"):
        average_checkpoints([a, c], str(tmp_path / "out"))


def _copy_with_edit(src, dst, edit):
    os.makedirs(dst)
    for fn in os.listdir(src):
        if fn != "model.safetensors":
            with open(os.path.join(src, fn), "rb") as f, open(os.path.join(dst, fn), "wb") as g:
                g.write(f.read())
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})


def test_name_and_shape_mismatch_raise(two_ckpts, tmp_path):
    a = two_ckpts[0]
    name = "lm_head.weight"
    missing, reshaped = str(tmp_path / "missing"), str(tmp_path / "reshaped")
    _copy_with_edit(a, missing, lambda t: t.pop(name))
    _copy_with_edit(a, reshaped, lambda t: t.__setitem__(name, t[name][:-1].clone()))
    with pytest.raises(CheckpointMismatch, match=rf"parameter names differ .*'{name}' only in"):
        average_checkpoints([a, missing], str(tmp_path / "o1"))
    with pytest.raises(CheckpointMismatch, match=rf"shape mismatch for '{name}': \(300, 32\) .* vs \(299, 32\)"):
        average_checkpoints([a, reshaped], str(tmp_path / "o2"))


def test_bad_arguments(two_ckpts, tmp_path):
    a, b, _, _ = two_ckpts
    with pytest.raises(ValueError, match="weights: got 1 values for 2 checkpoints"):
        average_checkpoints([a, b], str(tmp_path / "o"), weights=[1.0])
    with pytest.raises(ValueError, match="weights must be finite"):
        average_checkpoints([a, b], str(tmp_path / "o"), weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="no config.json"):
        average_checkpoints([a, str(tmp_path)], str(tmp_path / "o"))
    with open(os.path.join(a, "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    with pytest.raises(ValueError, match="no model.safetensors or model.safetensors.index.json"):
        average_checkpoints([a, str(tmp_path)], str(tmp_path / "o"))
    with pytest.raises(ValueError, match="is one of the inputs"):
        average_checkpoints([a, b], a)
    dcp = tmp_path / "step_00000010"
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(b"")
    with pytest.raises(ValueError, match="is a DCP dir: average HF exports"):
        average_checkpoints([a, str(dcp)], str(tmp_path / "o"))
    with pytest.raises(SystemExit, match="not a comma-separated list"):
        main([a, b, "--out", str(tmp_path / "o"), "--weights", "1,x"])
