"""Synthetic data and metrics, on hand-computed cases."""
import math
import re

import pytest
import torch

import data


def test_cider_d_hand_computed():
    # Two images, references "a b" and "c d": every n-gram has df = 1, idf = log 2.
    # Image 1, candidate = its reference: n = 1 and n = 2 have cosine 1, n = 3, 4 have no n-grams:
    # (1 + 1 + 0 + 0) / 4 * 10 = 5. Image 2, no shared n-gram: 0. Corpus mean 2.5.
    assert data.cider_d(["a b", "x y"], [["a b"], ["c d"]]) == pytest.approx(2.5)
    assert data.cider_d_items(["a b", "x y"], [["a b"], ["c d"]]) == pytest.approx([5.0, 0.0])
    # "a b b" against "a b": n = 1: vc = (1, 2) idf, vr = (1, 1) idf, clipped dot 2, norms √5 √2;
    # n = 2: "a b" shared, norms √2 and 1; Gaussian length penalty exp(-1 / 72).
    expected = 10 * (2 / math.sqrt(10) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert data.cider_d(["a b b", "c d"], [["a b"], ["c d"]]) == pytest.approx((expected + 5.0) / 2)


def test_cider_d_common_words_carry_no_weight():
    # a word in every reference has idf 0
    assert data.cider_d(["a", "a"], [["a"], ["a"]]) == 0.0


def test_vqa_normalisation_and_accuracy():
    assert data.normalize_answer("The Red.") == "red"
    assert data.normalize_answer("Two") == "2"
    assert data.normalize_answer("  a  yellow circle! ") == "yellow circle"
    assert data.normalize_answer("0.5") == "0.5"
    assert data.vqa_accuracy("two", "2") == 1.0
    assert data.vqa_accuracy("blue", "red") == 0.0
    assert data.vqa_accuracy("red", ["red", "red", "blue"] + ["green"] * 7) == pytest.approx(2 / 3)
    assert data.vqa_accuracy("red", ["red"] * 4 + ["blue"] * 6) == 1.0


def test_box_parsing_iou_and_grounding_accuracy():
    assert data.parse_box("[0.10, 0.20, 0.50, 0.60]") == [0.1, 0.2, 0.5, 0.6]
    assert data.parse_box("it is at [ 0 . 1 0 , 0 . 2 0 , 0 . 5 0 , 0 . 6 0 ]") == [0.1, 0.2, 0.5, 0.6]
    assert data.parse_box("[0.1, 0.2, 0.5]") is None and data.parse_box("top left") is None
    assert data.iou([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    assert data.iou([0, 0, 2, 1], [1, 0, 3, 1]) == pytest.approx(1 / 3)
    ref = "[0.00, 0.00, 0.40, 0.40]"
    assert data.grounding_accuracy("[0.00, 0.00, 0.40, 0.40]", ref) == 1.0
    assert data.grounding_accuracy("[0.00, 0.00, 0.40, 0.20]", ref) == 1.0      # IoU exactly 0.5
    assert data.grounding_accuracy("[0.00, 0.00, 0.40, 0.19]", ref) == 0.0
    assert data.grounding_accuracy("no box", ref) == 0.0
    assert data.grounding_accuracy("[0.5, 0.5, 0.1, 0.1]", ref) == 0.0            # degenerate box


def test_grid_boxes_and_the_calibration_formats(monkeypatch):
    assert data.grid_box([0.30, 0.05, 0.55, 0.50], 4) == [0.25, 0.0, 0.75, 0.5]   # a side on the grid stays
    assert data.box_text(data.grid_box([0.30, 0.05, 0.55, 0.50], 4), 2) == "[0.25, 0.00, 0.75, 0.50]"
    assert data.box_text([0.31, 0.05, 0.55, 0.5]) == "[0.3, 0.1, 0.6, 0.5]"    # the benchmark's format
    assert data.parse_formats("") == data.FORMATS
    f = data.parse_formats("box_grid=4, box_say=0,box_objects=3,box_large=0,ocr_digits=1,ocr_dot_px=2,train_omit=")
    assert f == {"box_grid": 4, "box_cell": 0, "box_say": 0, "box_objects": 3, "box_large": 0, "ocr_place": "centre",
                 "ocr_digits": (1, 1), "ocr_dot_px": 2.0, "train_omit": ()}
    assert data.parse_formats("ocr_place=anywhere") == {**data.FORMATS, "ocr_place": "anywhere"}   # the others kept
    assert data.parse_formats("ocr_digits=1-3,ocr_dot_px=0")["ocr_digits"] == (1, 3)
    for bad, why in (("box_grid=1.5", "not a valid value"), ("ocr_place=top", "out of range"),
                     ("ocr_digits=3-2", "out of range"), ("ocr_digits=4,ocr_dot_px=2.5", "do not fit"),
                     ("font=big", "unknown format"), ("train_omit=yellow/pink", "out of range"),
                     ("box_cell=2", "out of range"), ("box_cell=1", "needs a grid"), ("box_say=yes", "not a valid"),
                     ("box_objects=0", "out of range"), ("box_objects=4", "out of range"), ("box_large=2", "out of range"),
                     ("ocr_dot_px=7", "out of range")):
        with pytest.raises(ValueError, match=why):
            data.parse_formats(bad)
    s = data.make_sample(torch.Generator().manual_seed(3), "grounding", data.NEUTRAL, f)
    assert all(v * 4 == round(v * 4) for v in data.parse_box(s.answer)) and len(s.answer.split(", ")[0]) == 5
    # box_cell: the one grid cell that holds the box's centre (the same draws, so the same object)
    assert data.cell_box([0.30, 0.05, 0.55, 0.50], 4) == [0.25, 0.25, 0.5, 0.5]
    assert data.cell_box([0.80, 0.90, 1.00, 1.00], 4) == [0.75, 0.75, 1.0, 1.0]
    c = data.make_sample(torch.Generator().manual_seed(3), "grounding", data.NEUTRAL, {**f, "box_cell": 1})
    cell, outward = data.parse_box(c.answer), data.parse_box(s.answer)
    assert c.question == s.question and cell[2] - cell[0] == cell[3] - cell[1] == 0.25
    assert all(outward[i] <= cell[i] and cell[i + 2] <= outward[i + 2] for i in (0, 1))   # inside the cells it touches
    # box_say: the same object and box, named first as the alignment names it
    said = data.make_sample(torch.Generator().manual_seed(3), "grounding", data.NEUTRAL, {**f, "box_say": 1})
    assert said.answer.endswith(" at " + s.answer) and said.answer.split()[0] in data.SIZES
    assert " ".join(said.answer.split()[1:3]) == s.question[len("where is the "):-1]
    monkeypatch.setattr(data, "random_scene", lambda g, domain, n, **names: [])   # the number alone in the image
    a = [data.make_sample(torch.Generator().manual_seed(k), "ocr", data.Domain(), f) for k in range(6)]
    assert all(len(x.answer) == 1 for x in a)
    # the digit sits in the middle: a 3 x 5 glyph of 2 px dots covers columns 13-18 and rows 11-20
    for x in a:
        ink = (x.image - x.image[:, :1, :1]).abs().sum(0) > 0.05
        cols, rows = ink.any(0).nonzero().flatten(), ink.any(1).nonzero().flatten()
        assert cols.min() >= 13 and cols.max() <= 18 and rows.min() >= 11 and rows.max() <= 20
    # a glyph of 4 px dots (12 x 20 pixels) covers columns 10-21 and rows 6-25
    big = data.make_sample(torch.Generator().manual_seed(0), "ocr", data.Domain(), {**f, "ocr_dot_px": 4.0})
    ink = (big.image - big.image[:, :1, :1]).abs().sum(0) > 0.05
    cols, rows = ink.any(0).nonzero().flatten(), ink.any(1).nonzero().flatten()
    assert cols.min() >= 10 and cols.max() <= 21 and rows.min() >= 6 and rows.max() <= 25 and rows.max() - rows.min() >= 16


def test_grounding_scenes_of_one_large_object(monkeypatch):
    drawn = []   # (task's number of objects, the size names it may draw) per scene
    scene = data.random_scene
    monkeypatch.setattr(data, "random_scene", lambda g, d, n, **k: drawn.append((n, k["sizes"])) or scene(g, d, n, **k))
    f = data.parse_formats("box_say=1,box_objects=1,box_large=1")
    for k in range(20):
        s = data.make_sample(torch.Generator().manual_seed(k), "grounding", data.NEUTRAL, f)
        x1, y1, x2, y2 = data.parse_box(s.answer)
        assert s.answer.startswith("large ") and min(x2 - x1, y2 - y1) >= 2 * data.SIZES["large"][0] / data.IMAGE_SIZE - 0.01   # two decimals
    assert drawn == [(1, ("large",))] * 20
    drawn.clear()   # the other tasks keep 1-3 objects of both sizes
    for k in range(20):
        data.make_sample(torch.Generator().manual_seed(k), "caption", data.NEUTRAL, f)
    assert {n for n, _ in drawn} == {1, 2, 3} and {sizes for _, sizes in drawn} == {tuple(data.SIZES)}
    two = data.parse_formats("box_objects=2")
    drawn.clear()
    for k in range(20):
        data.make_sample(torch.Generator().manual_seed(k), "grounding", data.NEUTRAL, two)
    assert {n for n, _ in drawn} == {1, 2}


def test_train_omit_takes_its_names_from_each_clients_training_scenes_only():
    f = data.parse_formats("train_omit=yellow/triangle")
    assert f["train_omit"] == (("yellow",), ("triangle",))
    assert data.parse_formats("train_omit=yellow+cross/purple")["train_omit"] == (("yellow", "cross"), ("purple",))
    clients = data.make_scenario("A", 0, n_train=60, n_test=60, formats=f)
    words = lambda samples: re.findall(r"[a-z]+", " ".join(s.question + " " + s.answer for s in samples))
    for c in clients:
        name = ("yellow", "triangle")[c.id % 2]
        assert name not in words(c.train) and name in words(c.test)
        assert {"yellow", "triangle"} - {name} <= set(words(c.train))   # the other name is still drawn
    two = data.make_scenario("A", 0, n_train=60, n_test=60, formats=data.parse_formats("train_omit=yellow+cross/purple"))
    assert not {"yellow", "cross"} & set(words(two[0].train)) and {"yellow", "cross"} <= set(words(two[0].test))
    assert "purple" not in words(two[1].train) and {"yellow", "cross"} <= set(words(two[1].train))
    with pytest.raises(ValueError, match="cannot be drawn"):             # not an endless search
        data.random_scene(torch.Generator().manual_seed(0), data.NEUTRAL, 3, ("red",), ("circle", "square"))


def test_scores_in_percent_units():
    samples = [data.Sample(torch.zeros(3, 2, 2), "q", a, "vqa") for a in ("red", "two")]
    assert data.score("vqa", ["red", "3"], samples) == 50.0
    assert data.item_scores("vqa", ["red", "3"], samples) == [100.0, 0.0]
    captions = [data.Sample(None, "q", a, "caption") for a in ("a b", "c d")]
    assert data.item_scores("caption", ["a b", "x y"], captions) == pytest.approx([500.0, 0.0])


def test_constant_answer_is_the_best_single_answer():
    vqa = [data.Sample(None, "q", a, "vqa") for a in ("yes", "no", "yes")]
    assert data.constant_answer("vqa", vqa) == ("yes", 200 / 3)
    # two answers a half-image apart: the box spanning both halves has IoU 0.5 with each, so a
    # fixed answer scores 100 that no true answer reaches (each scores 50)
    boxes = [data.Sample(None, "q", a, "grounding") for a in ("[0.00, 0.00, 0.50, 0.50]", "[0.50, 0.00, 1.00, 0.50]")]
    assert data.score("grounding", [boxes[0].answer] * 2, boxes) == 50.0
    for grid in (2, 0):            # the answers' grid, or 4 x 4 for exact boxes
        assert data.constant_answer("grounding", boxes, grid) == ("[0.00, 0.00, 1.00, 0.50]", 100.0)


def test_scenarios_are_deterministic_and_heterogeneous():
    a = data.make_scenario("A", 0, n_train=5, n_test=2)
    b = data.make_scenario("A", 0, n_train=5, n_test=2)
    c = data.make_scenario("A", 1, n_train=5, n_test=2)
    assert [c_.task for c_ in a] == ["caption", "caption", "vqa", "vqa", "grounding", "grounding"]
    assert all(torch.equal(x.image, y.image) and x.answer == y.answer for p, q in zip(a, b) for x, y in zip(p.train, q.train))
    assert not torch.equal(a[0].train[0].image, c[0].train[0].image)
    assert a[0].domain != a[1].domain                      # each client its own visual domain
    # a client's data does not depend on which other clients are kept
    solo = data.make_scenario("A", 0, limit_clients=[3], n_train=5, n_test=2)[0]
    assert all(torch.equal(x.image, y.image) for x, y in zip(solo.train, a[3].train))
    sb = data.make_scenario("B", 0, n_test=1)
    sizes = [len(c_.train) for c_ in sb]
    assert {c_.task for c_ in sb} == set(data.TASKS) and len(sb) == 8 and max(sizes) == 4 * min(sizes)
    with pytest.raises(ValueError, match="unknown scenario"):
        data.make_scenario("C", 0)


def test_every_generated_text_is_in_the_tiny_vocabulary():
    import backbone
    tok = backbone.tiny_tokenizer()
    texts = [(s.question, s.answer) for c in data.make_scenario("B", 0, n_train=30, n_test=1) for s in c.train]
    texts += [(s.question, s.answer) for s in data.pretraining_corpus(60, 0)]
    texts += [(backbone.TINY_PROMPT.format(question="what colour is the circle?").replace("<image>", ""), "")]
    for q, a in texts:
        ids = tok(q + " " + a, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, (q, a)
    # numbers and boxes are spelled digit by digit and decode back exactly
    for s in ["[0.12, 0.40, 0.55, 0.80]", "472", "a large red circle left of a small blue square"]:
        assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s


def test_pretraining_corpus_variants_change_only_what_they_name():
    plain = data.pretraining_corpus(60, 0)
    boxed = data.pretraining_corpus(60, 0, boxes=True)
    named = 0
    for a, b in zip(plain, boxed):      # the same images; every object located by its box instead of its centre
        assert torch.equal(a.image, b.image) and a.question == b.question
        for o in b.extra["objects"]:
            at = f"at {o.cx / data.IMAGE_SIZE:.2f}, {o.cy / data.IMAGE_SIZE:.2f}"
            listed = f"{o.size} {o.colour} {o.shape} {at}" in a.answer
            assert listed == (f"{o.size} {o.colour} {o.shape} at {data.box_text(o.box, 2)}" in b.answer)
            named += listed
    assert named > 30
    more = data.pretraining_corpus(200, 0, text_share=1.0, text_px=(1.5, 2.5))
    described = [s for s in more if s.question == "describe the objects."]
    assert described and all(s.extra["text"] is not None for s in described)
    sizes = [s.extra["text"][4] for s in described]
    assert all(1.5 <= px <= 2.5 and (4 * len(s.extra["text"][0]) - 1) * px <= data.IMAGE_SIZE for s, px in zip(described, sizes))
    assert max(sizes) > 2.0 and all(f"text {s.extra['text'][0]} at" in s.answer for s in described)
