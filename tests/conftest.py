"""Shared fixtures: a tiny backbone pretrained for a few steps only, cached in a temp directory."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="session")
def small_backbone_dir(tmp_path_factory):
    """The tiny backbone recipe with a 64-sample pretraining and 10 steps of vision pretraining (a
    different cache key than the real one), built once per test session under a temporary PILOT_CACHE."""
    import backbone
    cache = tmp_path_factory.mktemp("pilot-cache")
    old_env, old_pre = os.environ.get("PILOT_CACHE"), dict(backbone.PRETRAIN)
    os.environ["PILOT_CACHE"] = str(cache)
    backbone.PRETRAIN.update(n_samples=64, epochs=1, vision_steps=10)
    path = backbone.tiny_backbone_dir(log=lambda *a: None)
    yield path
    backbone.PRETRAIN.clear()
    backbone.PRETRAIN.update(old_pre)
    if old_env is None:
        os.environ.pop("PILOT_CACHE", None)
    else:
        os.environ["PILOT_CACHE"] = old_env
