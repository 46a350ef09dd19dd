"""
The federation's state on disk, written so that a crash at any moment loses nothing committed.

    OUT/state.json                 round, stage, clients done this round, config, results so far,
                                   RNG state, and the size and SHA-256 of the tensor file
    OUT/state-<n>.safetensors      every tensor: each client's download and private state, and
                                   this round's uploads so far
    <file>.safetensors             one client's own state on its own host (a Flower SuperNode's
                                   ψ_s, ψ^c, φ): save_state / load_state, metadata in the header

A write goes to a temporary file, is fsync'ed, then renamed over the old name (atomic on POSIX);
the JSON is written last and is the commit point, so a reader sees either the old state or the
new one. Tensors are safetensors, metadata JSON: nothing is ever unpickled.
"""
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save as save_bytes


class CheckpointError(RuntimeError):
    pass


def atomic_write(path: Path, write):
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def flatten(groups: dict) -> dict:
    """{'downloads': [dict, ...], ...} -> one flat {'downloads/3/lora.x': tensor} dict."""
    flat, seen = {}, set()
    for name, states in groups.items():
        for k, state in enumerate(states):
            for key, v in (state or {}).items():
                v = v.detach().contiguous().cpu()
                # safetensors stores no aliases: a tensor shared between clients is written per client
                flat[f"{name}/{k}/{key}"] = v.clone() if v.data_ptr() in seen else v
                seen.add(v.data_ptr())
    return flat


def unflatten(flat: dict, sizes: dict) -> dict:
    groups = {name: [None] * n for name, n in sizes.items()}
    for fk, v in flat.items():
        name, k, key = fk.split("/", 2)
        if groups[name][int(k)] is None:
            groups[name][int(k)] = {}
        groups[name][int(k)][key] = v
    return groups


def save(out: Path, meta: dict, groups: dict):
    """Write the tensors (groups of per-client state dicts) and then meta, atomically."""
    out.mkdir(parents=True, exist_ok=True)
    old = read_meta(out, missing_ok=True)
    n = (old or {}).get("write", 0) + 1
    tensors = out / f"state-{n}.safetensors"
    data = save_bytes(flatten(groups))
    atomic_write(tensors, lambda f: f.write(data))
    meta = dict(meta, write=n, tensors=tensors.name, tensors_size=tensors.stat().st_size,
                tensors_sha256=_sha256(tensors), sizes={k: len(v) for k, v in groups.items()},
                rng=torch.get_rng_state().tolist())
    atomic_write(out / "state.json", lambda f: f.write(json.dumps(meta).encode()))
    if old and old.get("tensors") and old["tensors"] != tensors.name:
        (out / old["tensors"]).unlink(missing_ok=True)


def read_meta(out: Path, missing_ok=False):
    path = out / "state.json"
    if not path.exists():
        if missing_ok:
            return None
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupted checkpoint metadata ({e})") from None


def load(out: Path):
    """(meta, groups) after checking the tensor file's size and SHA-256 against the metadata."""
    meta = read_meta(out)
    tensors = out / meta["tensors"]
    if not tensors.exists():
        raise CheckpointError(f"{tensors}: missing (named by {out / 'state.json'})")
    size = tensors.stat().st_size
    if size != meta["tensors_size"] or _sha256(tensors) != meta["tensors_sha256"]:
        raise CheckpointError(f"{tensors}: corrupted or truncated (size {size}, expected {meta['tensors_size']}; "
                              f"or SHA-256 mismatch): not loaded")
    torch.set_rng_state(torch.tensor(meta["rng"], dtype=torch.uint8))
    return meta, unflatten(load_file(str(tensors)), meta["sizes"])


def save_state(path: Path, groups: dict, meta: dict):
    """One file of named state dicts ({'private': {...}, 'pending': {...}}) and string metadata,
    written atomically: a reader finds the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {f"{name}/{key}": v.detach().contiguous().cpu().clone()
            for name, state in groups.items() for key, v in state.items()}
    data = save_bytes(flat, metadata={k: str(v) for k, v in meta.items()})
    atomic_write(path, lambda f: f.write(data))


def load_state(path: Path):
    """(groups, meta) of a save_state file; a file that is not valid safetensors is a CheckpointError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:   # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"{path}: not a readable state file ({e})") from None
    groups = {}
    for key, v in flat.items():
        name, k = key.split("/", 1)
        groups.setdefault(name, {})[k] = v
    return groups, meta
