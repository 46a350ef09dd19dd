"""
Scenarios A and B from the official COCO, VQAv2, RefCOCO and TextVQA downloads: per-client
LLaVA-format train and test files and the manifest run.py reads.

    python prepare.py --scenario A --coco DIR --vqav2 DIR --refcoco DIR --out data/A
    python prepare.py --scenario B --coco DIR --vqav2 DIR --refcoco DIR --textvqa DIR --out data/B
    python run.py --data data/A/manifest.json --backbone llava-hf/llava-1.5-7b-hf --device cuda

What it reads, under the official names and layouts:
    COCO     DIR/annotations/captions_{train,val}2017.json, instances_{train,val}{2014,2017}.json;
             images DIR/{train,val}{2014,2017}/<file_name>
    VQAv2    DIR/v2_OpenEnded_mscoco_{train,val}2014_questions.json, v2_mscoco_{train,val}2014_annotations.json;
             images from COCO 2014
    RefCOCO  DIR/refs(unc).p and DIR/instances.json, as the refer toolkit lays them out; images from
             COCO train2014
    TextVQA  DIR/TextVQA_0.5.1_{train,val}.json; images DIR/train_images/<image_id>.jpg

The rules, each a [reading] of what the paper leaves open:
- Domains. A task's two clients hold two visual domains and share no image. A COCO image's domain is
  the COCO supercategory whose instances cover most of its area (instances files, summed 'area'):
  client 0 of a task holds people and the outdoors (DOMAINS[0]), client 1 animals, food and indoor
  scenes (DOMAINS[1]); an image without instances belongs to neither. A TextVQA image is a street or
  vehicle scene (client 0) when one of its image_classes is in SCENE_CLASSES, else an object or print
  close-up (client 1).
- Splits. Training records come from the official training splits, test records from the official
  validation splits of the same domain (RefCOCO: its refs' val, testA and testB splits).
- Prompts and targets as LLaVA-1.5 was instruction-tuned on these sources (PROMPTS): the short-answer
  instruction for VQAv2 and TextVQA with the most frequent human answer as the target, the one-sentence
  caption instruction with one of the image's captions, the referring-expression instruction with the
  box [x1, y1, x2, y2] normalised with two decimals. The box is relative to the image padded to a
  square around its centre (the padding LLaVA-1.5 trains with; backbone.py pads real images the
  same way before the checkpoint's processor, so the box frame is the frame the model sees).
- Test records keep every reference: VQAv2's and TextVQA's ten answers, COCO's five captions; RefCOCO's
  box is the answer.
- Sizes. --n-train and --n-test are per client, drawn with --seed from the client's candidates. In
  Scenario B the training sizes differ up to 4x (B_SIZES). The defaults (5,000 and 500) make a first
  Scenario A run of the paper's recipe (4 rounds of one epoch, 6 clients) about 3.5 hours on one
  H100 at 25% of its bf16 rate: 3.1 EFLOP of training from 640-token samples at 6 x 6.7e9 FLOP a
  token (README, "What a real run costs"; bench.py --rehearse computes it).

Real datasets are untrusted input: a missing file names the path where it was expected, a malformed
record names its file and record, missing images are counted (with the first few ids) and left out,
the RefCOCO pickle is read by an unpickler that refuses every global, and OUT is written in a
temporary directory beside it and renamed into place at the end: it never holds half a dataset.
"""
import argparse
import json
import pickle
import random
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

from llava import DataError

DOMAINS = (("person", "sports", "accessory", "vehicle", "outdoor"),
           ("animal", "food", "kitchen", "furniture", "electronic", "appliance", "indoor"))
DOMAIN_NAMES = ("people and outdoors", "animals, food and indoors")
SCENE_CLASSES = {"Vehicle", "Land vehicle", "Car", "Bus", "Truck", "Train", "Airplane", "Aircraft", "Boat", "Bicycle",
                 "Motorcycle", "Wheel", "Tire", "Building", "House", "Skyscraper", "Tower", "Street light",
                 "Traffic sign", "Traffic light", "Billboard", "Tree", "Plant", "Sky", "Road", "Stop sign"}
TEXT_DOMAIN_NAMES = ("streets and vehicles", "objects and print")
SHORT = "Answer the question using a single word or phrase."
PROMPTS = {"vqa": "{question}\n" + SHORT, "ocr": "{question}\n" + SHORT,
           "caption": "Provide a one-sentence caption for the provided image.",
           "grounding": "Please provide the bounding box coordinate of the region this sentence describes: {expression}"}
SCENARIOS = {"A": ("caption", "vqa", "grounding"), "B": ("caption", "vqa", "grounding", "ocr")}
CLIENT_NAMES = {"caption": "coco-cap", "vqa": "vqav2", "grounding": "refcoco", "ocr": "textvqa"}
# Scenario B's training sizes per client, as fractions of --n-train (sizes differing up to 4x, as B's)
B_SIZES = {"caption": (1.0, 0.25), "vqa": (0.25, 1.0), "grounding": (0.625, 0.375), "ocr": (1.0, 0.25)}
N_TRAIN, N_TEST = 5000, 500
SHOW = 5            # missing images named in the log, at most


# ----------------------------------------------------------------------------- reading untrusted files
def official(path: Path, what: str):
    """An official JSON file, or a DataError naming it and where it was expected."""
    if not path.is_file():
        raise DataError(f"{what}: {path.name} not found (expected at {path})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


class GlobalRefused(pickle.UnpicklingError):
    pass


class NoGlobals(pickle.Unpickler):
    """An unpickler that refuses every global: a refs file holds lists, dicts, strings and numbers,
    and a pickle that asks for a class or function could run anything when loaded."""

    def find_class(self, module, name):
        raise GlobalRefused(f"the pickle asks for the global {module}.{name}")


def _text(x):
    """Python 2 pickles' byte strings as text, in keys and values alike."""
    if isinstance(x, bytes):
        return x.decode("utf-8", errors="replace")
    if isinstance(x, list):
        return [_text(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_text(v) for v in x)
    if isinstance(x, dict):
        return {_text(k): _text(v) for k, v in x.items()}
    return x


def load_refs(path: Path):
    """The refer toolkit's refs(unc).p, read without running anything it asks for."""
    if not path.is_file():
        raise DataError(f"RefCOCO: {path.name} not found (expected at {path})")
    try:
        with open(path, "rb") as f:
            refs = _text(NoGlobals(f, encoding="bytes").load())
    except GlobalRefused as e:
        raise DataError(f"{path}: refused: {e}; a refs file holds only lists, dicts, strings and numbers") from None
    except (pickle.UnpicklingError, EOFError, ValueError, IndexError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
    if not isinstance(refs, list):
        raise DataError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


def field(record, key, kind, where):
    """record[key] of the given type, or a DataError naming the file and record."""
    if not isinstance(record, dict) or key not in record:
        raise DataError(f"{where}: no {key!r}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise DataError(f"{where}: {key!r} is {type(value).__name__}, expected {getattr(kind, '__name__', kind)}")
    return value


def listed(data, key, path):
    """data[key], a list, or a DataError naming the file."""
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DataError(f"{path}: expected an object with a list {key!r}")
    return data[key]


# ----------------------------------------------------------------------------- domains
def coco_domains(instances_path: Path):
    """{image_id: (domain index or None, file_name, width, height)} from an instances file: an
    image's domain is that of the supercategory whose instances cover most of its area."""
    data = official(instances_path, "COCO")
    cats = {}
    for i, c in enumerate(listed(data, "categories", instances_path)):
        where = f"{instances_path}, categories[{i}]"
        cats[field(c, "id", int, where)] = field(c, "supercategory", str, where)
    area = {}
    for i, a in enumerate(listed(data, "annotations", instances_path)):
        where = f"{instances_path}, annotations[{i}]"
        image, cat = field(a, "image_id", int, where), field(a, "category_id", int, where)
        if cat not in cats:
            raise DataError(f"{where}: category_id {cat} is not among the file's categories")
        by = area.setdefault(image, Counter())
        by[cats[cat]] += float(field(a, "area", (int, float), where))
    out = {}
    for i, im in enumerate(listed(data, "images", instances_path)):
        where = f"{instances_path}, images[{i}]"
        iid = field(im, "id", int, where)
        top = max(sorted(area[iid]), key=lambda s: area[iid][s]) if iid in area else None
        dom = next((d for d, names in enumerate(DOMAINS) if top in names), None)
        out[iid] = (dom, field(im, "file_name", str, where), field(im, "width", int, where), field(im, "height", int, where))
    return out


def text_domain(classes):
    return 0 if SCENE_CLASSES & set(classes) else 1


# ----------------------------------------------------------------------------- records
def record(rid, image, question, answer, answers=None):
    """One LLaVA-format record; answers: a test record's references."""
    r = {"id": rid, "image": image, "conversations": [{"from": "human", "value": "<image>\n" + question},
                                                       {"from": "gpt", "value": answer}]}
    return {**r, "answers": answers} if answers else r


def box_in_square(bbox, width, height):
    """A COCO box [x, y, w, h] (pixels of the original image) as [x1, y1, x2, y2] normalised to the
    image padded to a square around its centre (the padding's offset rounded down, as the padding
    itself), two decimals."""
    side = max(width, height)
    ox, oy = (side - width) // 2, (side - height) // 2
    x, y, w, h = bbox
    clip = lambda v: min(1.0, max(0.0, v / side))
    return "[" + ", ".join(f"{clip(v):.2f}" for v in (x + ox, y + oy, x + w + ox, y + h + oy)) + "]"


def most_frequent(answers):
    """The most frequent answer, the first given on a tie (as a training target)."""
    counts = Counter(answers)
    return max(answers, key=lambda a: (counts[a], -answers.index(a)))


def caption_candidates(coco: Path, split: str, seed: int):
    """{domain: [(image file, record)]} of COCO Captions 2017 `split`: training records name one of
    the image's captions (drawn with seed), test records keep all of them."""
    path = coco / "annotations" / f"captions_{split}2017.json"
    data, images = official(path, "COCO"), coco_domains(coco / "annotations" / f"instances_{split}2017.json")
    caps = {}
    for i, a in enumerate(listed(data, "annotations", path)):
        where = f"{path}, annotations[{i}]"
        caps.setdefault(field(a, "image_id", int, where), []).append(field(a, "caption", str, where).strip())
    rng, out = random.Random(seed), {0: [], 1: []}
    for iid in sorted(caps):
        if iid not in images or images[iid][0] is None:
            continue
        dom, name = images[iid][:2]
        file = f"{split}2017/{name}"
        if split == "train":
            out[dom].append((file, record(f"coco-{iid}", file, PROMPTS["caption"], rng.choice(caps[iid]))))
        else:
            out[dom].append((file, record(f"coco-{iid}", file, PROMPTS["caption"], caps[iid][0], caps[iid])))
    return out


def vqa_candidates(vqav2: Path, coco: Path, split: str):
    """{domain: [(image file, record)]} of VQAv2 `split` (train or val 2014): the short-answer prompt,
    the most frequent answer as target; test records keep the ten answers."""
    qpath = vqav2 / f"v2_OpenEnded_mscoco_{split}2014_questions.json"
    apath = vqav2 / f"v2_mscoco_{split}2014_annotations.json"
    questions = listed(official(qpath, "VQAv2"), "questions", qpath)
    annotations = listed(official(apath, "VQAv2"), "annotations", apath)
    images = coco_domains(coco / "annotations" / f"instances_{split}2014.json")
    answers, targets = {}, {}
    for i, a in enumerate(annotations):
        where = f"{apath}, annotations[{i}]"
        given = [field(x, "answer", str, f"{where}, answers[{j}]") for j, x in enumerate(field(a, "answers", list, where))]
        if not given:
            raise DataError(f"{where}: no answers")
        qid = field(a, "question_id", int, where)
        answers[qid] = given
        # the official most frequent answer when the file has it
        targets[qid] = a["multiple_choice_answer"] if isinstance(a.get("multiple_choice_answer"), str) else most_frequent(given)
    out = {0: [], 1: []}
    for i, q in enumerate(questions):
        where = f"{qpath}, questions[{i}]"
        qid, iid = field(q, "question_id", int, where), field(q, "image_id", int, where)
        if qid not in answers:
            raise DataError(f"{where}: question {qid} has no annotation in {apath.name}")
        if iid not in images or images[iid][0] is None:
            continue
        dom, name = images[iid][:2]
        file = f"{split}2014/{name}"
        prompt = PROMPTS["vqa"].format(question=field(q, "question", str, where).strip())
        target = targets[qid]
        out[dom].append((file, record(f"vqav2-{qid}", file, prompt, target, answers[qid] if split == "val" else None)))
    return out


def refcoco_candidates(refcoco: Path, seed: int):
    """({domain: [(image file, record)]} for training, the same for testing) of RefCOCO (UNC):
    training from the refs' train split (one of each ref's expressions, drawn with seed), testing
    from val, testA and testB (each ref's first expression)."""
    path = refcoco / "instances.json"
    data = official(path, "RefCOCO")
    images = coco_domains(path)
    boxes = {}
    for i, a in enumerate(listed(data, "annotations", path)):
        where = f"{path}, annotations[{i}]"
        bbox = field(a, "bbox", list, where)
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
            raise DataError(f"{where}: 'bbox' must be four numbers [x, y, w, h]")
        boxes[field(a, "id", int, where)] = bbox
    refs_path = refcoco / "refs(unc).p"
    rng, train, test = random.Random(seed), {0: [], 1: []}, {0: [], 1: []}
    for i, ref in enumerate(load_refs(refs_path)):
        where = f"{refs_path}, ref {i}"
        ann, iid, split = field(ref, "ann_id", int, where), field(ref, "image_id", int, where), field(ref, "split", str, where)
        sents = [field(s, "sent", str, f"{where}, sentences[{j}]").strip()
                 for j, s in enumerate(field(ref, "sentences", list, where))]
        if not sents:
            raise DataError(f"{where}: no sentences")
        if ann not in boxes:
            raise DataError(f"{where}: ann_id {ann} is not in {path.name}")
        if iid not in images or images[iid][0] is None:
            continue
        dom, name, width, height = images[iid]
        file = f"train2014/{name}"
        expression = rng.choice(sents) if split == "train" else sents[0]
        prompt = PROMPTS["grounding"].format(expression=expression + ("" if expression.endswith((".", "?", "!")) else "."))
        (train if split == "train" else test)[dom].append(
            (file, record(f"refcoco-{field(ref, 'ref_id', int, where)}", file, prompt, box_in_square(boxes[ann], width, height))))
    return train, test


def textvqa_candidates(textvqa: Path, split: str):
    """{domain: [(image file, record)]} of TextVQA 0.5.1 `split` (train or val): the short-answer
    prompt, the most frequent of the ten answers as target (in the case written); test records keep
    the ten answers."""
    path = textvqa / f"TextVQA_0.5.1_{split}.json"
    out = {0: [], 1: []}
    for i, q in enumerate(listed(official(path, "TextVQA"), "data", path)):
        where = f"{path}, data[{i}]"
        answers = [a for a in field(q, "answers", list, where) if isinstance(a, str)]
        if not answers:
            raise DataError(f"{where}: no answers")
        file = f"train_images/{field(q, 'image_id', str, where)}.jpg"
        prompt = PROMPTS["ocr"].format(question=field(q, "question", str, where).strip())
        out[text_domain(field(q, "image_classes", list, where))].append(
            (file, record(f"textvqa-{field(q, 'question_id', int, where)}", file, prompt, most_frequent(answers),
                          answers if split == "val" else None)))
    return out


# ----------------------------------------------------------------------------- choosing and writing
def choose(candidates, n, seed, folder: Path, who, log):
    """n records drawn with seed among those whose image exists under folder; the others are counted
    and the first few named."""
    pool = list(candidates)
    random.Random(seed).shuffle(pool)
    present = [(folder / file).is_file() for file, _ in pool]
    missing = [rec["id"] for (_, rec), ok in zip(pool, present) if not ok]
    chosen = [rec for (_, rec), ok in zip(pool, present) if ok][:n]
    if missing:
        log(f"{who}: {len(missing)} records left out, their images missing under {folder} (e.g. {', '.join(missing[:SHOW])})")
    if len(chosen) < n:
        log(f"{who}: {len(chosen)} records, fewer than the {n} asked for: the domain holds no more")
    if not chosen:
        raise DataError(f"{who}: no record has its image under {folder}")
    return chosen


def prepare(scenario, out, coco=None, vqav2=None, refcoco=None, textvqa=None, n_train=N_TRAIN, n_test=N_TEST, seed=0,
            log=print):
    """Build the scenario's clients into out (manifest.json, <client>/train.json, test.json); returns
    the manifest's path."""
    out = Path(out)
    if out.exists():
        raise DataError(f"--out {out}: already exists; prepare.py writes a new directory (remove it or pick another)")
    if not out.resolve().parent.is_dir():
        raise DataError(f"--out {out}: the parent directory {out.resolve().parent} does not exist")
    need = {"caption": ("--coco", coco), "vqa": ("--vqav2", vqav2), "grounding": ("--refcoco", refcoco), "ocr": ("--textvqa", textvqa)}
    for task in SCENARIOS[scenario]:
        flag, given = need[task]
        if not given:
            raise DataError(f"--scenario {scenario} needs {flag}")
        if not Path(given).is_dir():
            raise DataError(f"{flag} {given}: no such directory")
    if not coco or not Path(coco).is_dir():
        raise DataError("--coco: the COCO directory is needed for the images of every COCO-based task")
    coco = Path(coco).resolve()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))
    try:
        clients = []
        for task in SCENARIOS[scenario]:
            log(f"reading the {task} sources")
            if task == "caption":
                train, test, folder = caption_candidates(coco, "train", seed), caption_candidates(coco, "val", seed), coco
            elif task == "vqa":
                train, test, folder = vqa_candidates(Path(vqav2), coco, "train"), vqa_candidates(Path(vqav2), coco, "val"), coco
            elif task == "grounding":
                (train, test), folder = refcoco_candidates(Path(refcoco), seed), coco
            else:
                folder = Path(textvqa).resolve()
                train, test = textvqa_candidates(folder, "train"), textvqa_candidates(folder, "val")
            names = TEXT_DOMAIN_NAMES if task == "ocr" else DOMAIN_NAMES
            for j in (0, 1):
                cid = f"{CLIENT_NAMES[task]}-{j}"
                size = round(n_train * B_SIZES[task][j]) if scenario == "B" else n_train
                (tmp / cid).mkdir()
                parts = {}
                for split, pool, n in (("train", train[j], size), ("test", test[j], n_test)):
                    parts[split] = choose(pool, n, seed * 7919 + j * 2 + (split == "test"), folder, f"{cid} {split}", log)
                    (tmp / cid / f"{split}.json").write_text(json.dumps(parts[split], indent=1))
                clients.append({"id": cid, "task": task, "train": f"{cid}/train.json", "test": f"{cid}/test.json",
                                "image_folder": str(folder), "n_train": len(parts["train"]), "n_test": len(parts["test"]),
                                "domain": names[j]})
                log(f"{cid} ({task}, {names[j]}): {len(parts['train'])} train, {len(parts['test'])} test records")
        manifest = {"name": f"{scenario}-real", "clients": clients,
                    "prepared": {"scenario": scenario, "seed": seed, "n_train": n_train, "n_test": n_test,
                                 "command": "python prepare.py " + " ".join(sys.argv[1:])}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "manifest.json"


def main(argv=None):
    ap = argparse.ArgumentParser(description="Build Scenario A or B from the official COCO, VQAv2, RefCOCO and TextVQA "
                                             "files (see the docstring for the layout each directory needs).")
    ap.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    ap.add_argument("--coco", help="COCO: annotations/ and the image folders train2014/ val2014/ train2017/ val2017/")
    ap.add_argument("--vqav2", help="VQAv2's question and annotation files")
    ap.add_argument("--refcoco", help="RefCOCO as the refer toolkit lays it out: refs(unc).p, instances.json")
    ap.add_argument("--textvqa", help="TextVQA 0.5.1: the train and val files, train_images/ (Scenario B)")
    ap.add_argument("--out", required=True, help="a new directory for the manifest and the clients' files")
    ap.add_argument("--n-train", type=int, default=N_TRAIN, help=f"training records per client (default {N_TRAIN})")
    ap.add_argument("--n-test", type=int, default=N_TEST, help=f"test records per client (default {N_TEST})")
    ap.add_argument("--seed", type=int, default=0, help="draws the records of each client (default 0)")
    a = ap.parse_args(argv)
    if a.n_train < 1 or a.n_test < 1:
        ap.error("--n-train and --n-test: at least 1")
    try:
        path = prepare(a.scenario, a.out, a.coco, a.vqav2, a.refcoco, a.textvqa, a.n_train, a.n_test, a.seed)
    except DataError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"wrote {path}; train with: python run.py --data {path} --backbone <a LLaVA checkpoint> --device cuda")


if __name__ == "__main__":
    main()
