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
    if name.startswith("ovr_7b"):  # RECIPE.md numbers
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
