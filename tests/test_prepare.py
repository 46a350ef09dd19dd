"""prepare.py on fixtures in the official schemas and layouts, made here: COCO (captions and
instances, 2014 and 2017), VQAv2, RefCOCO (a protocol-2 refs pickle and its instances file) and
TextVQA 0.5.1, with images of odd sizes and greyscale ones, captions with capitals and periods, VQA
answers that need normalising, TextVQA answers in mixed case, a missing image. The scenarios it
writes, its rules, its bad-input errors, and a run of its output through run.py."""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate
import llava
import prepare

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"}, {"id": 18, "name": "dog", "supercategory": "animal"},
              {"id": 3, "name": "car", "supercategory": "vehicle"}, {"id": 52, "name": "banana", "supercategory": "food"}]
SIZES = [(37, 23), (23, 41), (50, 50), (64, 30)]       # odd sizes, portrait and landscape


def _image(path: Path, k: int):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = SIZES[k % len(SIZES)]
    mode = "L" if k % 3 == 0 else "RGB"                 # greyscale among them
    Image.new(mode, (w, h), 90 if mode == "L" else (20 * k % 255, 90, 160)).save(path, format="JPEG")


def _coco_split(coco: Path, split: str, year: int, ids, missing=()):
    """Images of one COCO split and their instances: odd ids a person (with a smaller dog), even ids
    a dog (with a smaller person): domains 0 and 1; id 999 has no instance (no domain)."""
    images, anns = [], []
    for i in [*ids, 999]:
        name = f"COCO_{split}{year}_{i:012d}.jpg" if year == 2014 else f"{i:012d}.jpg"
        w, h = SIZES[i % len(SIZES)]
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        if i not in missing:
            _image(coco / f"{split}{year}" / name, i)
        if i == 999:
            continue
        big, small = (1, 18) if i % 2 else (18, 1)
        anns += [{"id": 10 * i, "image_id": i, "category_id": big, "area": 300.0, "bbox": [2, 3, 10, 8]},
                 {"id": 10 * i + 1, "image_id": i, "category_id": small, "area": 40.5, "bbox": [0, 0, 4, 4]}]
    (coco / "annotations").mkdir(parents=True, exist_ok=True)
    (coco / "annotations" / f"instances_{split}{year}.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return images, anns


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    coco, vqa, ref, text = root / "coco", root / "vqav2", root / "refcoco", root / "textvqa"
    # COCO 2017 (captions) and 2014 (VQAv2, RefCOCO); image 8 of train2017 is missing on disk
    for split, ids, missing in (("train", range(1, 13), (8,)), ("val", range(101, 109), ())):
        _coco_split(coco, split, 2017, ids, missing)
        caps = [{"id": 5 * i + j, "image_id": i, "caption": f"A {'Dog' if i % 2 == 0 else 'Man'} number {i} take {j}. "}
                for i in ids for j in range(5)]
        (coco / "annotations" / f"captions_{split}2017.json").write_text(json.dumps({"annotations": caps}))
    for split, ids in (("train", range(201, 213)), ("val", range(301, 309))):
        _coco_split(coco, split, 2014, ids)
    # VQAv2: two questions an image; ten answers needing the official normalisation
    vqa.mkdir()
    for split, ids in (("train", range(201, 213)), ("val", range(301, 309))):
        qs = [{"question_id": 10 * i + j, "image_id": i, "question": f"How many dogs are there {j}?"} for i in ids for j in (0, 1)]
        anns = [{"question_id": q["question_id"], "image_id": q["image_id"], "multiple_choice_answer": "2",
                 "answers": [{"answer": a, "answer_id": n + 1} for n, a in enumerate(["Two"] * 4 + ["2"] * 3 + ["two dogs"] * 3)]}
                for q in qs]
        (vqa / f"v2_OpenEnded_mscoco_{split}2014_questions.json").write_text(json.dumps({"questions": qs}))
        (vqa / f"v2_mscoco_{split}2014_annotations.json").write_text(json.dumps({"annotations": anns}))
    # RefCOCO: its instances file (train2014 images) and a protocol-2 refs pickle, as the refer toolkit has them
    ref.mkdir()
    images, anns = _coco_split(coco, "train", 2014, range(201, 213))
    (ref / "instances.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    splits = ["train"] * 8 + ["val", "testA", "testB", "val"]
    refs = [{"ref_id": n, "ann_id": 10 * i, "image_id": i, "split": s, "category_id": 1, "file_name": f"x_{n}.jpg",
             "sentences": [{"sent": f"the left thing {n}", "raw": "The left thing."}, {"sent": f"object {n}"}]}
            for n, (i, s) in enumerate(zip(range(201, 213), splits))]
    (ref / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    # TextVQA 0.5.1: answers in mixed case; image classes decide the domain
    text.mkdir()
    for split, base in (("train", 400), ("val", 500)):
        rows = [{"question_id": base + n, "image_id": f"{base + n:016x}", "question": "what brand is this?",
                 "image_classes": ["Car", "Wheel"] if n % 2 else ["Bottle"], "answers": ["Coca Cola"] * 6 + ["coca cola"] * 4,
                 "image_width": 30, "image_height": 20} for n in range(8)]
        for r in rows:
            _image(text / "train_images" / f"{r['image_id']}.jpg", r["question_id"])
        (text / f"TextVQA_0.5.1_{split}.json").write_text(json.dumps({"dataset_version": "0.5.1", "data": rows}))
    return {"coco": coco, "vqav2": vqa, "refcoco": ref, "textvqa": text}


def _records(out, cid, split):
    return json.loads((out / cid / f"{split}.json").read_text())


def test_scenario_a_from_the_official_layouts(official, tmp_path):
    logs = []
    manifest = prepare.prepare("A", tmp_path / "A", official["coco"], official["vqav2"], official["refcoco"],
                               n_train=4, n_test=3, log=logs.append)
    m = json.loads(manifest.read_text())
    out = manifest.parent
    assert [c["id"] for c in m["clients"]] == ["coco-cap-0", "coco-cap-1", "vqav2-0", "vqav2-1", "refcoco-0", "refcoco-1"]
    assert [c["task"] for c in m["clients"]] == ["caption"] * 2 + ["vqa"] * 2 + ["grounding"] * 2
    # a task's two clients: their own domains, no image shared; image 999 (no instance) in neither
    for task in ("coco-cap", "vqav2", "refcoco"):
        a, b = ({r["image"] for s in ("train", "test") for r in _records(out, f"{task}-{j}", s)} for j in (0, 1))
        assert a and b and not a & b and not any("999" in x for x in a | b)
    # captions: odd images (a person covers most of them) are client 0's; tests from val2017, all five kept
    train0 = _records(out, "coco-cap-0", "train")
    assert all(int(r["image"].split("/")[1][:12]) % 2 == 1 for r in train0) and len(train0) == 4
    test1 = _records(out, "coco-cap-1", "test")
    assert all(r["image"].startswith("val2017/") for r in test1) and len(test1[0]["answers"]) == 5
    assert test1[0]["conversations"][0]["value"] == "<image>\nProvide a one-sentence caption for the provided image."
    assert test1[0]["conversations"][1]["value"].startswith("A Dog number ") and test1[0]["answers"][1].endswith("take 1.")
    # the missing image of train2017 is counted and named
    assert any("coco-cap-1 train: 1 records left out, their images missing" in line and "coco-8" in line for line in logs)
    # VQAv2: the short-answer prompt, the official most frequent answer, the ten answers scored officially
    vqa = _records(out, "vqav2-0", "test")[0]
    assert vqa["conversations"][0]["value"].endswith("?\nAnswer the question using a single word or phrase.")
    assert vqa["conversations"][1]["value"] == "2" and len(vqa["answers"]) == 10
    assert evaluate.vqa_accuracy("two", vqa["answers"]) == 1.0         # "Two" and "2" both read as "2": 7 of 10
    # RefCOCO: train refs for training, val / testA / testB for testing; the box in the padded square
    test = _records(out, "refcoco-0", "test") + _records(out, "refcoco-1", "test")
    assert {r["id"] for r in test} == {"refcoco-8", "refcoco-9", "refcoco-10", "refcoco-11"}
    r = next(x for x in _records(out, "refcoco-1", "train") if x["image"].endswith("000000000202.jpg"))
    # image 202 is 50 x 50 (no padding): the box [2, 3, 10, 8] is [0.04, 0.06, 0.24, 0.22]
    assert r["conversations"][1]["value"] == "[0.04, 0.06, 0.24, 0.22]"
    assert r["conversations"][0]["value"].startswith(
        "<image>\nPlease provide the bounding box coordinate of the region this sentence describes: ")
    r = next(x for x in _records(out, "refcoco-0", "train") if x["image"].endswith("000000000201.jpg"))
    # image 201 is 23 x 41: padded to 41 x 41, 9 pixels added left ((41 - 23) // 2): x 2 + 9 = 11, 11 / 41 = 0.27
    assert r["conversations"][1]["value"] == "[0.27, 0.07, 0.51, 0.27]"
    # it loads as run.py loads it, the manifest's sizes right
    name, clients = llava.load_manifest(manifest)
    assert name == "A-real" and [len(c.train) for c in clients] == [4, 4, 4, 4, 4, 4]


def test_scenario_b_adds_text_reading_with_sizes_differing_up_to_4x(official, tmp_path):
    manifest = prepare.prepare("B", tmp_path / "B", official["coco"], official["vqav2"], official["refcoco"],
                               official["textvqa"], n_train=4, n_test=2, log=lambda *a: None)
    m = json.loads(manifest.read_text())
    assert [c["id"] for c in m["clients"]][-2:] == ["textvqa-0", "textvqa-1"]
    assert [c["n_train"] for c in m["clients"]] == [4, 1, 1, 4, 2, 2, 4, 1]
    ocr = _records(manifest.parent, "textvqa-0", "test")[0]        # a car: the street scenes' client
    assert ocr["image"].startswith("train_images/") and ocr["conversations"][1]["value"] == "Coca Cola"
    assert evaluate.vqa_accuracy("coca cola", ocr["answers"]) == 1.0       # answers that differ: case folded
    assert all(int(r["id"].split("-")[1]) % 2 == 1 for r in _records(manifest.parent, "textvqa-0", "train"))


def test_prepares_output_trains_end_to_end_through_run_py(official, tmp_path, small_backbone_dir):
    manifest = prepare.prepare("A", tmp_path / "A", official["coco"], official["vqav2"], official["refcoco"],
                               n_train=3, n_test=2, log=lambda *a: None)
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "run.py", "--data", str(manifest), "--backbone", str(small_backbone_dir),
                        "--rounds-stage1", "1", "--rounds-stage2", "1", "--local-steps", "2", "--batch-size", "2",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [c["id"] for c in res["clients"]] == ["coco-cap-0", "coco-cap-1", "vqav2-0", "vqav2-1", "refcoco-0", "refcoco-1"]
    assert set(res["per_task"]) == {"caption", "vqa", "grounding"} and (out / "client_refcoco-1.safetensors").is_file()


def test_the_refs_pickle_is_read_without_running_anything(tmp_path):
    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "ran",))
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps([{"ref_id": 1, "x": Evil()}], protocol=2))
    with pytest.raises(llava.DataError, match=r"refs\(unc\)\.p: refused: the pickle asks for the global \w+\.\w+"):
        prepare.load_refs(tmp_path / "refs(unc).p")
    assert not (tmp_path / "ran").exists()
    # a Python 2 pickle (the refer toolkit's): byte strings as keys and values, read as text
    py2 = b"\x80\x02]q\x00}q\x01(U\x05splitq\x02U\x05trainq\x03U\x06ref_idq\x04K\x07ua."
    (tmp_path / "refs(unc).p").write_bytes(py2)
    assert prepare.load_refs(tmp_path / "refs(unc).p") == [{"split": "train", "ref_id": 7}]
    (tmp_path / "refs(unc).p").write_bytes(py2[:20])
    with pytest.raises(llava.DataError, match="not a readable pickle"):
        prepare.load_refs(tmp_path / "refs(unc).p")


def test_bad_input_names_the_file_and_record_and_leaves_no_half_written_output(official, tmp_path):
    import shutil
    args = lambda out, **kw: dict(scenario="A", out=out, coco=official["coco"], vqav2=official["vqav2"],
                                  refcoco=official["refcoco"], n_train=2, n_test=1, log=lambda *a: None) | kw
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(llava.DataError, match=r"VQAv2: v2_OpenEnded_mscoco_train2014_questions\.json not found "
                                              r"\(expected at .*empty/v2_OpenEnded_mscoco_train2014_questions\.json\)"):
        prepare.prepare(**args(tmp_path / "x", vqav2=empty))
    with pytest.raises(llava.DataError, match="--scenario B needs --textvqa"):
        prepare.prepare(**args(tmp_path / "x", scenario="B"))
    # a malformed record in the last task read: the error names file and record, OUT is not there
    broken = tmp_path / "refcoco"
    shutil.copytree(official["refcoco"], broken)
    inst = json.loads((broken / "instances.json").read_text())
    inst["annotations"][3]["bbox"] = [1, 2, "wide", 4]
    (broken / "instances.json").write_text(json.dumps(inst))
    with pytest.raises(llava.DataError, match=r"instances\.json, annotations\[3\]: 'bbox' must be four numbers"):
        prepare.prepare(**args(tmp_path / "out", refcoco=broken))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    (tmp_path / "out").mkdir()
    with pytest.raises(llava.DataError, match="already exists"):
        prepare.prepare(**args(tmp_path / "out"))
    # the command line: one line, exit 2
    p = subprocess.run([sys.executable, "prepare.py", "--scenario", "A", "--coco", str(official["coco"]), "--vqav2",
                        str(official["vqav2"]), "--refcoco", str(broken), "--out", str(tmp_path / "cli")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "annotations[3]" in p.stderr, p.stderr
