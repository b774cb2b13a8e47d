"""Fixtures shared by the training tests."""

import pytest


@pytest.fixture(scope="session")
def hub_ckpt():
    """A hub-layout miniature of Qwen2.5-VL-7B-Instruct (tests/train/hub_fixture.py), built offline once and cached."""
    from hub_fixture import hub_miniature

    return hub_miniature()


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """The tiny default's offline BPE tokenizer."""
    from ovr_train.tokenizer import load_tokenizer

    return load_tokenizer(kind="bpe", cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def proc():
    """An image processor with small bounds (112x112 .. 224x112 pixels)."""
    from ovr_train.data import ImageProcessor

    return ImageProcessor(112 * 112, 224 * 112)
