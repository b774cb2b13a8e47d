"""Config: YAML + --section.field=value overrides, type coercion, validation errors naming the field."""

import pytest

from ovr_train.config import CONFIG_DIR, Config, RLCfg, dump_config, load_config, parse_overrides


def test_default_is_tiny_yaml_and_overrides_coerce_types():
    cfg = load_config(None, ["--sft.steps=7", "--optim.lr=1e-4", "--data.packing=false",
                             "--model.attn_implementation=sdpa", "--model.mrope_section=[4, 4, 8]",
                             "--data.train_files=[a.jsonl, b.jsonl]", "run.out_dir=/tmp/x"])
    assert isinstance(cfg, Config)
    assert cfg.sft.steps == 7 and isinstance(cfg.sft.steps, int)
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.data.packing is False
    assert cfg.model.mrope_section == [4, 4, 8]
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"]
    assert cfg.run.out_dir == "/tmp/x"
    assert cfg.model.hidden_size == 128  # from tiny.yaml


def test_dump_roundtrip(tmp_path):
    cfg = load_config(None, ["--sft.steps=3"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("override, message", [
    (["--sft.stepz=3"], "unknown config key(s) ['sft.stepz']"),
    (["--nosection.x=1"], "unknown config key(s) ['nosection']"),
    (["--sft.steps=abc"], "sft.steps='abc': expected int"),
    (["--sft.steps=-1"], "sft.steps=-1: must be >= 0"),
    (["--data.packing=maybe"], "data.packing='maybe': expected a boolean"),
    (["--optim.schedule=linear"], "optim.schedule='linear': must be one of"),
    (["--model.mrope_section=[1, 2, 3]"], "model.mrope_section=[1, 2, 3]: must be 3 ints summing to head_dim/2 = 16"),
    (["--model.num_kv_heads=3"], "model.num_kv_heads=3: must divide num_heads"),
    (["--data.token_budget=100"], "data.token_budget=100: must be >= data.max_seq_len"),
    (["--data.packing=false"], "data.packing=False needs model.attn_implementation=sdpa"),
    (["sft.steps"], "expected --section.field=value"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ValueError) as e:
        load_config(None, override)
    assert message in str(e.value)


def test_missing_file_and_parse_overrides():
    with pytest.raises(ValueError, match="does not exist"):
        load_config("/nonexistent.yaml")
    assert parse_overrides(["--a.b=1", "a.c=x=y"]) == {"a": {"b": "1", "c": "x=y"}}


@pytest.mark.parametrize("name", ["tiny.yaml", "ovr_7b_coldstart.yaml", "ovr_7b_rl.yaml", "multinode_example.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(str(CONFIG_DIR / name))
    if name.startswith("ovr_7b"):  # the paper's numbers
        assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.num_heads, cfg.model.num_kv_heads) == \
            (3584, 28, 28, 4)
        assert cfg.model.vocab_size == 152064 and cfg.model.vision_fullatt_blocks == [7, 15, 23, 31]
    if name == "ovr_7b_coldstart.yaml":
        assert (cfg.optim.lr, cfg.sft.epochs, cfg.sft.batch_size, cfg.data.max_seq_len) == (2e-4, 5, 640, 65536)
        assert cfg.model.freeze_vision
    if name == "ovr_7b_rl.yaml":
        rl = cfg.rl
        assert (rl.policy_lr, rl.critic_lr, rl.prompts_per_step, rl.samples_per_prompt) == (1e-6, 5e-6, 512, 16)
        assert (rl.clip_low, rl.clip_high, rl.gamma, rl.lam, rl.critic_updates_per_step) == (0.2, 0.2, 1.0, 1.0, 4)
        assert rl.length_curriculum == [[0, 24576], [300, 32768], [700, 49152]]


def test_rlcfg_defaults_follow_recipe():
    rl = RLCfg()  # a bare Config() pairs these with the tiny token budget, which they do not fit
    assert (rl.policy_lr, rl.critic_lr, rl.warmup_steps, rl.betas, rl.weight_decay) == (1e-6, 5e-6, 50, [0.9, 0.95], 0)
    assert (rl.kl_coef, rl.entropy_coef, rl.temperature, rl.top_p, rl.algo) == (0.0, 0.0, 1.0, 1.0, "ppo")


def test_launch_accepts_space_separated_overrides():
    from ovr_train.launch import parse_args

    args, overrides = parse_args(["--stage", "eval", "--eval.sets", "a.jsonl,b.jsonl", "--model.path=/ckpt",
                                  "--sft.steps", "3"])
    assert args.stage == "eval"
    assert overrides == ["--eval.sets=a.jsonl,b.jsonl", "--model.path=/ckpt", "--sft.steps=3"]


def test_launch_rejects_stray_arguments():
    import pytest

    from ovr_train.launch import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--stage", "sft", "stray"])
    with pytest.raises(SystemExit):
        parse_args(["--stage", "sft", "--sft.steps"])  # a key without a value


def test_a_stage_refuses_inputs_it_would_ignore(capsys):
    from ovr_train.launch import check_inputs, main

    for stage, flag in [("rl", "--data.train_files=[p.jsonl]"), ("eval", "--rl.prompt_files=[p.jsonl]"),
                        ("sft", "--eval.sets=a.jsonl"), ("base", "--data.train_files=[t.jsonl]"),
                        ("all", "--eval.sets=a.jsonl"), ("rl", "--model.path=/ckpt")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["--stage", stage, flag])
        assert exit_info.value.code == 2
        name = flag[2:].split("=")[0]
        assert f"config error: --stage {stage} does not read {name}" in capsys.readouterr().err
    # what each stage does read passes
    check_inputs("rl", load_config(None, ["--rl.prompt_files=[p.jsonl]", "--eval.sets=a.jsonl",
                                          "--eval.every_n_steps=2"]), None)
    check_inputs("sft", load_config(None, ["--data.train_files=[t.jsonl]"]), None)
    check_inputs("eval", load_config(None, ["--eval.sets=a.jsonl"]), None)
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \[.data.eval_files.\]"):  # read by nothing
        load_config(None, ["--data.eval_files=[e.jsonl]"])


def _checkpoint_config(path, **model):
    """config.json of a Qwen2.5-VL of the embedded default's shape but `model` overrides (no weights needed)."""
    from ovr_train.config import ModelCfg
    from ovr_train.model import hf_config
    from ovr_train.tokenizer import load_tokenizer, special_ids

    tok = load_tokenizer("", "bpe", 2048, str(path.parent / "cache"), 0)
    mcfg = ModelCfg(**model)
    hf_config(mcfg, 2048, special_ids(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_a_real_checkpoint_without_config_is_refused(tmp_path):
    from ovr_train.launch import check_inputs

    real = _checkpoint_config(tmp_path / "real", hidden_size=256, intermediate_size=512, num_layers=6, num_heads=4,
                              num_kv_heads=2, mrope_section=[8, 12, 12])
    with pytest.raises(ValueError, match=r"model.path=.*real is a 6-layer model of width 256, not the embedded tiny "
                                         r"model, and no --config was given: .*optim.lr=0.003.*ovr_7b_coldstart"):
        check_inputs("sft", load_config(None, [f"--model.path={real}"]), None)
    check_inputs("sft", load_config(str(CONFIG_DIR / "tiny.yaml"), [f"--model.path={real}"]), "configs/tiny.yaml")
    toy = _checkpoint_config(tmp_path / "toy")  # e.g. the pipeline's own <out_dir>/sft/hf
    check_inputs("eval", load_config(None, [f"--model.path={toy}"]), None)


def test_rl_length_has_one_source_of_truth():
    from ovr_train.rl import max_new_tokens_at

    with pytest.raises(ValueError, match=r"rl.max_new_tokens=1000: disagrees with rl.length_curriculum=\[\[0, 24576\]"):
        load_config(str(CONFIG_DIR / "ovr_7b_rl.yaml"), ["--rl.max_new_tokens=1000"])  # alone it did nothing
    rl = load_config(None, ["--rl.max_new_tokens=64"]).rl  # the embedded default has no curriculum
    assert [max_new_tokens_at(rl, s) for s in (0, 500)] == [64, 64]
    rl = load_config(None, ["--rl.max_new_tokens=64", "--rl.length_curriculum=[[10, 128]]"]).rl
    assert [max_new_tokens_at(rl, s) for s in (0, 9, 10)] == [64, 64, 128]


def test_dry_run_sizes_from_the_checkpoint_config(tmp_path, capsys):
    from ovr_train.launch import dry_run

    shape = {"hidden_size": 256, "intermediate_size": 768, "num_layers": 6, "num_heads": 4, "num_kv_heads": 2,
             "mrope_section": [8, 12, 12]}
    ckpt = _checkpoint_config(tmp_path / "ckpt", **shape)
    from_ckpt = dry_run(load_config(None, [f"--model.path={ckpt}"]))
    overrides = [f"--model.{k}={v}".replace(" ", "") for k, v in shape.items()]
    from_numbers = dry_run(load_config(None, overrides))
    assert from_ckpt == pytest.approx(from_numbers)
    assert from_ckpt["activations"] > dry_run(load_config(None, []))["activations"]
