"""
The federation's state on disk, written so that a kill at any moment loses nothing committed.

    OUT/state.json                  the commit point: the run's config, the loop's progress
                                    (federation.Progress), the RNG state, and the name, size and
                                    SHA-256 of every tensor file below that belongs to the state
    OUT/round-<w>.safetensors       written once per aggregation: every client's download and the
                                    fleet's shared state (the private states the clients settled on)
    OUT/turn-<w>-<k>.safetensors    written after client k's turn (--checkpoint client): only what
                                    that turn changed, its upload and its new private state
    <file>.safetensors              one client's own state on its own host (a Flower SuperNode's
                                    ψ_s, ψ^c, φ): save_state / load_state, metadata in the header

Every file is written to a temporary name, fsync'ed and renamed (atomic on POSIX); state.json is
written last and names the files it commits, so a reader sees the old state or the new one, never a
mix. A client's turn rewrites nothing of the other clients: at paper width a download is hundreds
of MB per client, and the round's shared state is written once, when the server aggregates. Files no
longer named by state.json are removed after it is written. Tensors are safetensors, metadata JSON:
nothing is ever unpickled.
"""
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save as save_bytes, save_file

FORMAT = "pilot-checkpoint-2"


class CheckpointError(RuntimeError):
    pass


def atomic_write(path: Path, write):
    """write(f) into a temporary file beside path (f.name is its path), fsync, rename over path."""
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


def _write_tensors(path: Path, flat: dict) -> dict:
    """Write flat tensors to path atomically, streamed to the file by safetensors (no second copy
    in memory); returns the entry state.json keeps of the file."""
    atomic_write(path, lambda f: save_file(flat, f.name))
    return {"file": path.name, "size": path.stat().st_size, "sha256": _sha256(path)}


def _last_write(out: Path) -> int:
    """The number of the last write in OUT (0 when there is none or its state.json is unreadable)."""
    try:
        return int(json.loads((out / "state.json").read_text()).get("write", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def _commit(out: Path, meta: dict, round_file: dict, turns: dict, sizes: dict, write: int):
    """Write state.json naming round_file and turns, then remove every state file it does not name."""
    meta = dict(meta, format=FORMAT, write=write, round_file=round_file, turns=turns, sizes=sizes,
                rng=torch.get_rng_state().tolist())
    atomic_write(out / "state.json", lambda f: f.write(json.dumps(meta).encode()))
    keep = {round_file["file"], *(t["file"] for t in turns.values())}
    for f in [*out.glob("round-*.safetensors"), *out.glob("turn-*.safetensors"), *out.glob("state-*.safetensors")]:
        if f.name not in keep:
            f.unlink(missing_ok=True)


def save_round(out: Path, meta: dict, groups: dict):
    """After an aggregation: the round's shared tensors (groups of per-client state dicts: each
    client's download, the fleet's shared state) in one new file, committed with meta; the turns of
    the finished round are dropped."""
    out.mkdir(parents=True, exist_ok=True)
    n = _last_write(out) + 1
    entry = _write_tensors(out / f"round-{n}.safetensors", flatten(groups))
    _commit(out, meta, entry, {}, {name: len(states) for name, states in groups.items()}, n)


def save_turn(out: Path, meta: dict, k: int, states: dict):
    """After client k's turn: {name: state dict} of that client alone (its upload, its new private
    state) in one new file, committed with meta beside the round's file and the earlier turns."""
    old = read_meta(out)
    n = old["write"] + 1
    flat = {f"{name}/{key}": v.detach().contiguous().cpu() for name, state in states.items() for key, v in state.items()}
    entry = _write_tensors(out / f"turn-{n}-{k}.safetensors", flat)
    _commit(out, meta, old["round_file"], {**old["turns"], str(k): entry}, old["sizes"], n)


def read_meta(out: Path, missing_ok=False):
    path = out / "state.json"
    if not path.exists():
        if missing_ok:
            return None
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupted checkpoint metadata ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: a checkpoint of another format ({meta.get('format', 'pilot-checkpoint-1')!r}, "
                              f"this version reads {FORMAT!r}): start the run again without --resume")
    return meta


def _read_checked(out: Path, entry: dict) -> dict:
    path = out / entry["file"]
    if not path.exists():
        raise CheckpointError(f"{path}: missing (named by {out / 'state.json'})")
    size = path.stat().st_size
    if size != entry["size"] or _sha256(path) != entry["sha256"]:
        raise CheckpointError(f"{path}: corrupted or truncated (size {size}, expected {entry['size']}; "
                              f"or SHA-256 mismatch): not loaded")
    return load_file(str(path))


def load(out: Path):
    """(meta, groups) after checking every named file's size and SHA-256 against state.json; a
    turn's tensors are placed at its client's position: groups[name][k]."""
    meta = read_meta(out)
    groups = unflatten(_read_checked(out, meta["round_file"]), meta["sizes"])
    for k, entry in meta["turns"].items():
        for fk, v in _read_checked(out, entry).items():
            name, key = fk.split("/", 1)
            states = groups.setdefault(name, [None] * len(groups["downloads"]))
            states[int(k)] = {**(states[int(k)] or {}), key: v}
    torch.set_rng_state(torch.tensor(meta["rng"], dtype=torch.uint8))
    return meta, groups


def tensor_files(out: Path) -> list:
    """The tensor files state.json commits (the round's, then each turn's), for accounting."""
    meta = read_meta(out)
    return [out / meta["round_file"]["file"], *(out / t["file"] for t in meta["turns"].values())]


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
