"""The disk feature cache (features.py): the same H_v as in memory, read back instead of encoded,
never stale, recomputed when damaged; and a run with it equals a run without it."""
import os

import pytest
import torch

import backbone
import data
import features
import llava
import run
from config import Config


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PILOT_CACHE", str(tmp_path / "cache"))   # the backbone is passed by path; only features go here
    return tmp_path / "cache" / "features"


def _client(n_train=5, n_test=3):
    return data.make_scenario("A", 0, [2], n_train, n_test)[0]


def test_disk_cache_holds_the_same_features_and_is_read_back_without_encoding(small_backbone_dir, cache, monkeypatch):
    bb = backbone.load_backbone(str(small_backbone_dir))
    c = _client(n_train=70)           # more than one CHUNK of 64
    mem = features.prepare_client(bb, c, "cpu", mode="memory")
    said = []
    disk = features.prepare_client(bb, c, "cpu", mode="disk", log=said.append)
    assert len(list(cache.glob("*.safetensors"))) == 1 and any("encoding 73 images" in s for s in said)
    assert torch.equal(mem.h_train, disk.h_train) and torch.equal(mem.h_test, disk.h_test)
    assert disk.h_train.shape == (70, bb.n_image_tokens, bb.dims[0])
    # the text is what the backbone encodes, sample by sample, in order
    assert list(mem.items_train) == [tuple(bb.encode(s)[0]) for s in c.train]
    assert list(disk.items_test) == [tuple(bb.encode(s)[0]) for s in c.test]
    # a second preparation reads the file: the vision tower is not run again
    monkeypatch.setattr(features, "encode", lambda *a: pytest.fail("encoded again despite a warm cache"))
    again = features.prepare_client(bb, c, "cpu", mode="disk", log=said.append)
    assert torch.equal(again.h_train, mem.h_train) and torch.equal(again.h_test, mem.h_test)
    # the features come from the file (no copy in memory): the tensor's storage is the mapped file's
    assert again.h_train.untyped_storage().nbytes() == next(cache.glob("*.safetensors")).stat().st_size


def test_auto_goes_to_disk_above_the_threshold_only(small_backbone_dir, cache):
    bb = backbone.load_backbone(str(small_backbone_dir))
    c = _client()
    mb = 8 * bb.n_image_tokens * bb.dims[0] * 4 / 2**20
    features.prepare_client(bb, c, "cpu", mode="auto", max_mb=mb * 1.01)
    assert not cache.exists()
    features.prepare_client(bb, c, "cpu", mode="auto", max_mb=mb * 0.99)
    assert len(list(cache.glob("*.safetensors"))) == 1


def test_a_changed_image_or_backbone_is_never_served_from_a_stale_cache(small_backbone_dir, cache):
    bb = backbone.load_backbone(str(small_backbone_dir))
    c = _client()
    first = features.prepare_client(bb, c, "cpu", mode="disk")
    c.test[1].image = c.test[1].image.flip(-1)            # one test image changes
    said = []
    changed = features.prepare_client(bb, c, "cpu", mode="disk", log=said.append)
    assert said and len(list(cache.glob("*.safetensors"))) == 2
    assert torch.equal(changed.h_test[0], first.h_test[0]) and not torch.equal(changed.h_test[1], first.h_test[1])
    with torch.no_grad():                                   # the vision tower changes
        next(bb.model.model.vision_tower.parameters()).add_(1e-3)
    said.clear()
    features.prepare_client(bb, c, "cpu", mode="disk", log=said.append)
    assert said and len(list(cache.glob("*.safetensors"))) == 3


def test_a_truncated_cache_file_is_recomputed(small_backbone_dir, cache):
    bb = backbone.load_backbone(str(small_backbone_dir))
    c = _client()
    good = features.prepare_client(bb, c, "cpu", mode="disk")
    # copies: the file is cut in place below, under the mapping (the cache itself only ever replaces files)
    good_train, good_test = good.h_train.clone(), good.h_test.clone()
    path = next(cache.glob("*.safetensors"))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    said = []
    again = features.prepare_client(bb, c, "cpu", mode="disk", log=said.append)
    assert said and torch.equal(again.h_train, good_train) and torch.equal(again.h_test, good_test)


def test_a_missing_image_file_is_a_data_error_with_a_warm_cache_too(small_backbone_dir, cache, tmp_path):
    bb = backbone.load_backbone(str(small_backbone_dir))
    manifest = llava.export_scenario(tmp_path / "export", "A", 0, limit_clients=[2], n_train=3, n_test=2)
    _, (c,) = llava.load_manifest(manifest)
    features.prepare_client(bb, c, "cpu", mode="disk")
    os.remove(c.train[1].image)
    with pytest.raises(llava.DataError, match=r"client c2, record c2-1: cannot read image .*c2-1.png: No such file"):
        features.prepare_client(bb, c, "cpu", mode="disk")


def test_a_run_with_the_disk_cache_equals_one_in_memory(small_backbone_dir, cache, tmp_path):
    settings = dict(clients=[0, 2], n_train=8, n_test=3, batch_size=4, rounds_stage1=1, rounds_stage2=1, top_m=1,
                    backbone=str(small_backbone_dir))
    mem = run.run(Config(out=str(tmp_path / "mem"), features="memory", **settings), log=lambda *a: None)
    disk = run.run(Config(out=str(tmp_path / "disk"), features="disk", **settings), log=lambda *a: None)
    assert len(list(cache.glob("*.safetensors"))) == 2
    assert disk["clients"] == mem["clients"] and disk["average_ce"] == mem["average_ce"]
    for cid in (0, 2):
        read = lambda d: (tmp_path / d / f"predictions_client_{cid}.jsonl").read_text()
        assert read("disk") == read("mem")


def test_tokens_hold_each_samples_prompt_and_answer_ids_exactly():
    pairs = [([1, 5, 70000], [9, 2]), ([], [2]), ([3] * 40, [2**31 - 1, 2])]
    t = features.Tokens(pairs)
    assert len(t) == 3 and list(t) == pairs
    assert t[-1] == pairs[2] and t[1] == ([], [2])
    assert list(t[1:]) == pairs[1:] and list(t[::2]) == [pairs[0], pairs[2]]
    with pytest.raises(IndexError):
        t[3]
    with pytest.raises(IndexError):
        t[-4]
    assert list(features.Tokens()) == []
    turns = features.Tokens([([1], [2], [3, 4], [5]), ([6], [7])])     # a multi-turn item's four segments
    assert list(turns) == [([1], [2], [3, 4], [5]), ([6], [7])] and turns[0][2] == [3, 4]
    with pytest.raises(OverflowError):      # an id past int32 is refused, not wrapped
        features.Tokens([([2**31], [2])])


def test_streamed_features_are_the_cached_ones_bit_for_bit_and_a_streamed_run_equals_a_cached_one(
        small_backbone_dir, cache, tmp_path):
    """--features stream computes each batch's H_v when the batch is drawn and keeps nothing: the
    same bits as the cache, whatever the batch (an image's features do not depend on its batch), and
    so the same run, with nothing written to the cache."""
    bb = backbone.load_backbone(str(small_backbone_dir))
    c = _client(n_train=70)
    disk = features.prepare_client(bb, c, "cpu", mode="disk")
    stream = features.prepare_client(bb, c, "cpu", mode="stream")
    assert isinstance(stream.h_train, features.Streamed) and len(stream.h_train) == 70
    for idx in (torch.tensor([5, 3, 69, 12]), torch.tensor([0]), torch.arange(70).flip(0)[:33], slice(60, 70)):
        assert torch.equal(stream.h_train[idx], disk.h_train[idx])
    assert torch.equal(stream.h_test[0:3], disk.h_test) and stream.h_test[:0].shape == (0, *disk.h_test.shape[1:])
    pooled = features.pool([stream, stream], "all", -1)
    assert torch.equal(pooled.h_train[torch.tensor([69, 70, 139])], disk.h_train[torch.tensor([69, 0, 69])])
    base = dict(clients=[0, 2], n_train=8, n_test=3, batch_size=4, rounds_stage1=1, rounds_stage2=1, top_m=1,
                backbone=str(small_backbone_dir))
    a = run.run(Config(**base, features="disk", out=str(tmp_path / "disk")), log=lambda *x: None)
    files = sorted(cache.glob("*.safetensors"))
    b = run.run(Config(**base, features="stream", out=str(tmp_path / "stream")), log=lambda *x: None)
    assert a["clients"] == b["clients"] and sorted(cache.glob("*.safetensors")) == files
    # an unreadable image is found when the client is prepared, not in the middle of a round
    from PIL import Image
    png = tmp_path / "broken.png"
    Image.new("RGB", (8, 8)).save(png)
    png.write_bytes(png.read_bytes()[:20])
    c.train[3].image = str(png)
    with pytest.raises(llava.DataError, match=r"record c2-3: image .*broken\.png cannot be read"):
        features.prepare_client(bb, c, "cpu", mode="stream")
