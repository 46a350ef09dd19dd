"""Shared fixtures: a tiny backbone pretrained for a few steps only, built once in a temp directory."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="session")
def small_backbone_dir(tmp_path_factory):
    """The tiny backbone's recipe with a 64-sample pretraining and 10 steps of vision pretraining (a
    different recipe than the shipped one), built once per test session in a temporary directory.
    PRETRAIN is changed for the build only: every test sees the shipped recipe."""
    import backbone
    import tiny
    saved = dict(backbone.PRETRAIN)
    backbone.PRETRAIN.update(n_samples=64, epochs=1, vision_steps=10)
    try:
        return tiny.build_tiny(tmp_path_factory.mktemp("backbone") / "tiny-small", log=lambda *a: None)
    finally:
        backbone.PRETRAIN.clear()
        backbone.PRETRAIN.update(saved)
