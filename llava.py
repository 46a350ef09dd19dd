"""
LLaVA-format data: real instruction data for run.py --data, and the synthetic scenarios written in
that format, so that one loader serves both.

    python llava.py --scenario A --export DIR     # the synthetic Scenario A as DIR/manifest.json + PNGs

A scenario manifest: {"name", "clients": [{"id", "task", "train", "test", "image_folder",
"n_train" (optional for run.py, needed by a Flower server)}]}, paths relative to the manifest's
folder. Each train / test file is a JSON list of LLaVA records {"id", "image", "conversations":
[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}, with an
optional "answers" list (VQAv2's ten human answers, a caption's references) on one-turn records.
A training record is one sample, all its turns in one sequence (as LLaVA trains); a test record is
one sample per question (scored one question at a time). Bad input is a DataError naming the file,
the client and the record.
"""
import argparse
import json
import re
from pathlib import Path

import data
from data import ClientData, Sample


class DataError(ValueError):
    """Bad input data; the message names the file, the record and what is wrong."""


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def json_records(path):
    """The elements of a JSON list file, decoded one at a time: a client of 100,000 records never
    holds them all as Python objects at once, only the file's text and the samples made so far."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    space, decoder = re.compile(r"\s*"), json.JSONDecoder()
    i = space.match(text).end()
    if not text.startswith("[", i):
        got = read_json(path)        # not a list: say what it is (or why it is not JSON)
        raise DataError(f"{path}: expected a JSON list of records, got {type(got).__name__}")
    i = space.match(text, i + 1).end()
    while not text.startswith("]", i):
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        yield record
        i = space.match(text, i).end()
        if text.startswith(",", i):
            i = space.match(text, i + 1).end()
        elif not text.startswith("]", i):
            raise DataError(f"{path}: not valid JSON (expected ',' or ']' at character {i})")
    if text[i + 1:].strip():
        raise DataError(f"{path}: not valid JSON (extra data after the list at character {i + 1})")


def open_image(path, where=""):
    """An image file as an RGB PIL image (greyscale, RGBA and palette images are converted), decoded
    now, so that a truncated or unreadable file is a DataError naming it rather than a traceback."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:   # PIL.UnidentifiedImageError is an OSError
        raise DataError(f"{where}{': ' if where else ''}image {path} cannot be read "
                        f"({type(e).__name__}: {e})") from None


def _turns(r, where):
    """A record's (question, answer) turns: the i-th human turn with the gpt turn after it."""
    conv = r["conversations"]
    if not isinstance(conv, list) or not all(isinstance(t, dict) for t in conv):
        raise DataError(f"{where}: 'conversations' must be a list of {{'from', 'value'}} turns")
    humans = [t for t in conv if t.get("from") == "human"]
    gpts = [t for t in conv if t.get("from") == "gpt"]
    if not gpts:
        raise DataError(f"{where}: the conversation has no 'gpt' turn")
    if not humans or "<image>" not in humans[0].get("value", ""):
        raise DataError(f"{where}: the first human turn has no '<image>' placeholder")
    turns = []
    for j, (h, g) in enumerate(zip(humans, gpts)):
        if not isinstance(g.get("value"), str) or not g["value"].strip():
            raise DataError(f"{where}: answer turn {j} (the 'gpt' turn after human turn {j}) is empty")
        turns.append((str(h.get("value", "")).replace("<image>", "").strip(), g["value"].strip()))
    return turns


def load_llava_records(path, image_folder, task, client=None, split="train"):
    """Samples from a LLaVA instruction file. split "train": one sample per record, its first turn
    as question and answer and the later ones in `more`, trained as one sequence (the image once,
    every answer supervised, later turns seeing the earlier ones). split "test": one sample per
    (human, gpt) pair, each with the record's image. An "answers" list on a one-turn record is the
    metric's references. client: the manifest's client id, named in error messages."""
    out = []
    for i, r in enumerate(json_records(path)):
        where = (f"{path}, " + (f"client {client!r}, " if client is not None else "") + f"record {i}"
                 + (f" (id {r.get('id')!r})" if isinstance(r, dict) and "id" in r else ""))
        if not isinstance(r, dict) or "image" not in r or "conversations" not in r:
            raise DataError(f"{where}: a record needs 'image' and 'conversations'")
        image = Path(image_folder) / r["image"]
        if not image.is_file():
            raise DataError(f"{where}: image file {image} not found")
        turns = _turns(r, where)
        extra = {"answers": list(r["answers"])} if isinstance(r.get("answers"), list) and len(turns) == 1 else {}
        rid = r.get("id", i)
        if split == "train":
            (q, a), *more = turns
            out.append(Sample(str(image), q, a, task, id=f"{rid}", extra=extra, more=tuple(more)))
        else:
            out += [Sample(str(image), q, a, task, id=f"{rid}#{j}", extra=extra) for j, (q, a) in enumerate(turns)]
    if not out:
        raise DataError(f"{path}: no records (an empty client)")
    return out


def load_manifest(path, keep=None):
    """(name, clients) of a scenario manifest. keep: the indices of the clients whose files are
    read (default all), so that a host holding one client's files (a Flower SuperNode) needs no
    other client's."""
    m = read_json(path)
    root = Path(path).parent
    if not isinstance(m, dict) or not isinstance(m.get("clients"), list) or not m["clients"]:
        raise DataError(f"{path}: expected {{'name': ..., 'clients': [...]}} with at least one client")
    clients = []
    for k, c in enumerate(m["clients"]):
        cid = c.get("id", k)
        missing = [key for key in ("task", "train", "test", "image_folder") if key not in c]
        if missing:
            raise DataError(f"{path}, client {cid!r}: missing {', '.join(missing)}")
        if c["task"] not in data.TASKS:
            raise DataError(f"{path}, client {cid!r}: unknown task {c['task']!r}; expected one of {', '.join(data.TASKS)}")
        if keep is not None and k not in keep:
            continue
        folder = root / c["image_folder"]
        clients.append(ClientData(k, c["task"], load_llava_records(root / c["train"], folder, c["task"], cid, "train"),
                                  load_llava_records(root / c["test"], folder, c["task"], cid, "test"), name=str(cid)))
        if "n_train" in c and c["n_train"] != len(clients[-1].train):
            raise DataError(f"{path}, client {cid!r}: 'n_train' is {c['n_train']!r}, but {root / c['train']} holds "
                            f"{len(clients[-1].train)} training records")
    return m.get("name", Path(path).stem), clients


def roster(scenario, manifest="", keep=None, n_train=None):
    """[(index, id, task, n_train)] of a run's clients, known without reading any client's data: what
    a server trusts (it weighs FedAvg, the task-aware average and ATA's λ_k by n_train), never what a
    node says. From the scenario's definition (id = index), or from the manifest (its client ids and
    per-client "n_train", its number of training records; load_manifest checks it)."""
    if not manifest:
        specs = data.SCENARIOS[scenario]
        return [(k, k, specs[k].task, n_train or specs[k].n_train) for k in (keep if keep is not None else range(len(specs)))]
    m = read_json(manifest)
    out = []
    for k, c in enumerate(m.get("clients", []) if isinstance(m, dict) else []):
        if keep is not None and k not in keep:
            continue
        if not isinstance(c.get("n_train"), int) or c["n_train"] < 1:
            raise DataError(f"{manifest}, client {c.get('id', k)!r}: no 'n_train' (its number of training records), "
                            f"which the server needs to weigh its updates")
        out.append((k, str(c.get("id", k)), c.get("task"), c["n_train"]))
    return out


def llava_record(s: Sample, folder: Path, file: str) -> dict:
    """A synthetic sample as a LLaVA record, its image written to folder/file as an 8-bit PNG."""
    from PIL import Image
    Image.fromarray((s.image.permute(1, 2, 0) * 255).round().byte().numpy()).save(folder / file)
    return {"id": s.id, "image": file, "conversations": [
        {"from": "human", "value": "<image>\n" + s.question}, {"from": "gpt", "value": s.answer}]}


def export_scenario(out_dir, name, seed, **shrink):
    """Write a synthetic scenario in the LLaVA format (PNG images, one manifest), so that the
    loader for real data serves it too. Returns the manifest's path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    manifest = {"name": f"synthetic-{name}-seed{seed}", "clients": []}
    for c in data.make_scenario(name, seed, **shrink):
        cdir = out / f"c{c.id}"
        cdir.mkdir(exist_ok=True)
        for split, samples in (("train", c.train), ("test", c.test)):
            records = [llava_record(s, out / "images", f"{s.id}.png") for s in samples]
            (cdir / f"{split}.json").write_text(json.dumps(records, indent=1))
        manifest["clients"].append({"id": f"c{c.id}", "task": c.task, "train": f"c{c.id}/train.json",
                                    "test": f"c{c.id}/test.json", "image_folder": "images", "n_train": len(c.train)})
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1))
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Write a synthetic scenario in the LLaVA format.")
    ap.add_argument("--scenario", default="A", choices=sorted(data.SCENARIOS))
    ap.add_argument("--data-seed", type=int, default=0, help="the draw of the synthetic world (0: the benchmark's)")
    ap.add_argument("--export", metavar="DIR", required=True, help="where to write manifest.json, the records and PNGs")
    a = ap.parse_args()
    print(f"wrote {export_scenario(a.export, a.scenario, a.data_seed)}")
