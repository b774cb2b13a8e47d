"""ovr_train: the lean FSDP2 trainer (cold-start SFT, multimodal PPO) on top of ovr_kernels.

Entry point: `torchrun [--nproc_per_node N] -m ovr_train.launch --stage {sft,rl,all}`. Modules: config (dataclasses
+ YAML/CLI), dist (process group, FSDP2), model (Qwen2.5-VL with the varlen attention and fused log-prob head),
tokenizer, data (chat JSONL -> packed micro-batches, the one prompt format), tasks (prompt items with their gold
answers), rollout (the engine factory), rewards (the one score), synth_text / synth_images (the default data), sft,
rl, evaluate, checkpoint (DCP + HF export), metrics. Importing the package has no side effects.
"""
