"""
H_v = f(X_v), the frozen vision tower's features of a client's images: computed once per image and
kept in memory or in a memory-mapped disk cache, or computed batch by batch whenever a batch needs
them. A client with more images than memory trains and is evaluated batch by batch either way; a
Flower SuperNode (a new ClientApp process per message) reads its cache instead of encoding again.

    --features auto      (default) in memory when the client's H_v fits in --features-max-mb,
                         else on disk
    --features memory    in memory, nothing written
    --features disk      $PILOT_CACHE/features/<key>.safetensors, memory-mapped on read
    --features stream    nothing kept: each batch's H_v is computed by the frozen tower when the
                         batch is drawn (at paper width H_v is 1.2 MB an image in fp16, about 94 GB
                         for 8 clients of 10,000 images; streaming trades that disk for one vision
                         forward per sample and epoch, a small part of a step's compute)

The key is a SHA-256 of everything H_v depends on: the vision tower's weights, the feature layer and
selection, the image processor's settings, dtype and device type, and every image (the file's bytes,
or a synthetic image's pixels) in order. A changed image, backbone or setting gives another key, so a
stale cache is never read; a damaged or truncated file is recomputed.
"""
import hashlib
import json
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import backbone as bbmod
import checkpoint
import data
import llava
import pilot

CHUNK = 64              # images encoded at once
FORMAT = "pilot-features-1"
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class Tokens(Sequence):
    """A client's encoded text: item i is its segments (prompt ids, answer ids, ...: one pair per
    turn; backbone.encode), as a tuple of lists. The ids of all items live in one flat int32 array
    with the segment boundaries beside it, about 140 bytes a sample where Python lists of ints take
    about 450, so that the text, not only H_v, stays small for a client of 100,000 samples."""

    def __init__(self, items=()):
        self.ids, self.ends, self.first = array("i"), array("q", [0]), array("q", [0])   # first: an item's first segment
        for segments in items:
            self.append(*segments)

    def append(self, *segments):
        for seg in segments:
            self.ids.extend(seg)
            self.ends.append(len(self.ids))
        self.first.append(len(self.ends) - 1)

    def __len__(self):
        return len(self.first) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Tokens(self[j] for j in range(*i.indices(len(self))))
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} of {len(self)}")
        i %= len(self)
        bounds = self.ends[self.first[i]:self.first[i + 1] + 1]
        return tuple(self.ids[s:e].tolist() for s, e in zip(bounds[:-1], bounds[1:]))


class Streamed:
    """H_v of a list of samples, computed when indexed: features[idx] (a tensor or list of indices,
    or a slice) encodes those samples' images with the frozen vision tower and returns
    [len(idx), tokens, C_v], as a cached tensor indexed the same way would. An image's features do
    not depend on the other images of its batch (per-sample attention, row-wise products), which
    tests/test_features.py checks bit for bit on the CPU against the cache."""

    def __init__(self, bb, samples, device, where=""):
        self.bb, self.samples, self.device, self.where = bb, list(samples), device, where
        self.shape = (len(self.samples), bb.n_image_tokens, bb.dims[0])
        self.dtype = bb.model.dtype

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, idx):
        chosen = self.samples[idx] if isinstance(idx, slice) else [self.samples[i] for i in torch.as_tensor(idx).tolist()]
        if not chosen:
            return torch.zeros(0, *self.shape[1:], dtype=self.dtype)
        return torch.cat(list(encode(self.bb, chosen, self.device, self.where)))


def pool(clients, task, id):
    """One client holding the union of several clients' training data (the pooled bounds'
    trainer), with no test set of its own."""
    hs = [c.h_train for c in clients]
    h = Streamed(hs[0].bb, [s for x in hs for s in x.samples], hs[0].device, f"pooled {task}") \
        if isinstance(hs[0], Streamed) else torch.cat(hs)
    return ClientTensors(id, task, h, Tokens(i for c in clients for i in c.items_train), clients[0].h_test[:0], Tokens(), [])


@dataclass
class ClientTensors:
    """What a client holds: its task, frozen image features H_v (on its device, memory-mapped from
    the disk cache on the CPU, or Streamed) and encoded text (Tokens). Its training samples' text
    is not kept once encoded, nor their images unless H_v is streamed from them."""
    id: int
    task: str
    h_train: torch.Tensor
    items_train: Sequence     # each sample's segments (prompt ids, answer ids, ...): Tokens
    h_test: torch.Tensor
    items_test: Sequence      # (prompt ids, answer ids), for the generated answers and the teacher-forced test loss
    test: list = field(repr=False)    # the test samples, whose answers score the predictions
    # its position in the scenario or manifest, which seeds its connector and batch order; id names it
    # (the scenario index, or a manifest's own id: "coco-cap-0")
    index: int = None

    def __post_init__(self):
        if self.index is None:
            self.index = self.id


def prepare_client(bb, c: data.ClientData, device, max_length=None, log=print, mode="memory", max_mb=1024.0):
    """Encode a client's data once. The vision tower is frozen, so H_v never changes: computing it
    once per image, not once per epoch, is the same model at a fraction of the cost. Every image
    file is read here, before any training: an unreadable one is a DataError naming the client, the
    record and the file. mode / max_mb: where H_v lives (module docstring)."""
    where = f"client {c.name or c.id}"
    train, test, cut = Tokens(), Tokens(), 0
    for items, samples in ((train, c.train), (test, c.test)):
        for s in samples:
            segments, truncated = bb.encode(s, max_length)
            items.append(*segments)
            cut += truncated
    if cut:
        log(f"warning: {where}: {cut} of {len(train) + len(test)} samples longer than {max_length} tokens lost "
            f"instruction words or later turns (answers are kept whole or dropped with their turn)")
    mb = (len(c.train) + len(c.test)) * bb.n_image_tokens * bb.dims[0] * bb.model.dtype.itemsize / 2**20
    if mode == "stream":
        for s in c.train + c.test:     # every image file decodes now, not in the middle of a round
            if isinstance(s.image, (str, Path)):
                llava.open_image(s.image, f"{where}, record {s.id}")
        h_train, h_test = Streamed(bb, c.train, device, where), Streamed(bb, c.test, device, where)
    elif mode == "disk" or mode == "auto" and mb > max_mb:
        h_train, h_test = cached(bb, c, device, log)
    else:
        h_train, h_test = (torch.cat(list(encode(bb, s, device, where))) for s in (c.train, c.test))
    return ClientTensors(c.name or c.id, c.task, h_train, train, h_test, test, c.test, index=c.id)


def encode(bb, samples, device, where=""):
    """H_v of samples' images (tensors, PIL images or image files), CHUNK at a time (a generator:
    nothing holds them all). where: who holds them, for the error of an unreadable file."""
    for i in range(0, len(samples), CHUNK):
        images = [llava.open_image(s.image, f"{where}, record {s.id}" if where else f"record {s.id}")
                  if isinstance(s.image, (str, Path)) else s.image for s in samples[i:i + CHUNK]]
        yield pilot.image_features(bb.model, bb.pixels(images).to(device))


def cache_key(bb, c: data.ClientData, device, where) -> str:
    h = hashlib.sha256(FORMAT.encode())
    conf = bb.model.config
    h.update(json.dumps([conf.vision_feature_layer, conf.vision_feature_select_strategy, str(bb.model.dtype),
                         torch.device(device).type, bb.image_processor.to_dict()], sort_keys=True, default=str).encode())
    for name, t in bb.model.model.vision_tower.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy())
    for split in (c.train, c.test):
        h.update(f"split {len(split)}".encode())
        for s in split:
            if isinstance(s.image, torch.Tensor):
                h.update(s.image.detach().cpu().reshape(-1).view(torch.uint8).numpy())
            else:
                try:
                    h.update(Path(s.image).read_bytes())
                except OSError as e:
                    raise llava.DataError(f"{where}, record {s.id}: cannot read image {s.image}: {e.strerror}") from None
    return h.hexdigest()


def cached(bb, c: data.ClientData, device, log=print):
    """(h_train, h_test) memory-mapped from the client's cache file, written first if missing."""
    where = f"client {c.name or c.id}"
    key = cache_key(bb, c, device, where)
    path = bbmod.cache_root() / "features" / f"{key[:32]}.safetensors"
    got = read(path, key)
    if got is None:
        log(f"{where}: encoding {len(c.train) + len(c.test)} images into the feature cache {path}")
        write(path, key, bb, [c.train, c.test], device, where)
        got = read(path, key)
    return got


def write(path: Path, key, bb, splits, device, where):
    """A safetensors file ('train', 'test': [N, tokens, C_v]) streamed chunk by chunk, atomically."""
    shape = [bb.n_image_tokens, bb.dims[0]]
    dtype, size = bb.model.dtype, bb.model.dtype.itemsize
    header, offset = {"__metadata__": {"format": FORMAT, "key": key}}, 0
    for name, split in zip(("train", "test"), splits):
        n = len(split) * shape[0] * shape[1] * size
        header[name] = {"dtype": _DTYPES[dtype], "shape": [len(split), *shape], "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)       # the data starts 8-byte aligned, so every view below is aligned

    def stream(f):
        f.write(struct.pack("<Q", len(text)) + text)
        for split in splits:
            for h in encode(bb, split, device, where):
                f.write(h.to("cpu", dtype).contiguous().view(torch.uint8).numpy().tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write(path, stream)


def read(path: Path, key):
    """(h_train, h_test) as views of the memory-mapped file (pages are read when a batch touches
    them), or None when the file is missing, of another key, or damaged."""
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        if header.get("__metadata__", {}).get("key") != key:
            return None
        start, size = 8 + n, path.stat().st_size
        if size != start + max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"):
            return None
        buf = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
        dtypes = {v: k for k, v in _DTYPES.items()}
        return tuple(buf[start + header[s]["data_offsets"][0]:start + header[s]["data_offsets"][1]]
                     .view(dtypes[header[s]["dtype"]]).view(header[s]["shape"]) for s in ("train", "test"))
    except (OSError, ValueError, KeyError, struct.error):
        return None
