"""Fixtures shared by the training tests."""

import pytest


@pytest.fixture(scope="session")
def hub_ckpt():
    """A hub-layout miniature of Qwen2.5-VL-7B-Instruct (tests/train/hub_fixture.py), built offline once and cached."""
    from hub_fixture import hub_miniature

    return hub_miniature()
