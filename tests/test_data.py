"""The synthetic world and its scenarios: what each task draws, the skew, determinism."""
import re

import pytest
import torch

import data


def _ink(image):
    """Columns and rows whose pixels differ from the background's top-left pixel."""
    ink = (image - image[:, :1, :1]).abs().sum(0) > 0.05
    return ink.any(0).nonzero().flatten(), ink.any(1).nonzero().flatten()


def test_grounding_scenes_hold_one_large_object_named_before_its_box(monkeypatch):
    drawn = []   # (number of objects, the size names it may draw) per scene
    scene = data.random_scene
    monkeypatch.setattr(data, "random_scene", lambda g, d, n, **k: drawn.append((n, k["sizes"])) or scene(g, d, n, **k))
    for k in range(20):
        s = data.make_sample(torch.Generator().manual_seed(k), "grounding", data.NEUTRAL)
        named, box = s.answer.split(" at ")
        assert named.startswith("large ") and s.question == f"where is the {named[len('large '):]}?"
        assert re.fullmatch(r"\[\d\.\d\d, \d\.\d\d, \d\.\d\d, \d\.\d\d\]", box)      # two decimals
    assert drawn == [(1, ("large",))] * 20
    drawn.clear()   # the other tasks draw 1-3 objects of both sizes
    for k in range(20):
        data.make_sample(torch.Generator().manual_seed(k), "caption", data.NEUTRAL)
    assert {n for n, _ in drawn} == {1, 2, 3} and {sizes for _, sizes in drawn} == {tuple(data.SIZES)}


def test_text_reading_draws_one_digit_of_6_pixel_dots_in_the_centre(monkeypatch):
    monkeypatch.setattr(data, "random_scene", lambda g, domain, n, **names: [])   # the number alone in the image
    for k in range(6):
        s = data.make_sample(torch.Generator().manual_seed(k), "ocr", data.Domain())
        assert len(s.answer) == 1 and s.answer.isdigit() and s.question == "what number is written?"
        cols, rows = _ink(s.image)   # a 3 x 5 glyph of 6-pixel dots: 18 x 30 pixels, columns 7-24, rows 1-30
        assert cols.min() >= 7 and cols.max() <= 24 and rows.min() >= 1 and rows.max() <= 30
        assert rows.max() - rows.min() >= 24     # every digit spans at least its top and bottom rows


def test_each_clients_training_scenes_lack_one_name_its_partner_holds():
    clients = data.make_scenario("A", 0, n_train=60, n_test=60)
    words = lambda samples: set(re.findall(r"[a-z]+", " ".join(s.question + " " + s.answer for s in samples)))
    for c in clients:
        (name,) = data.TRAIN_OMIT[c.id % len(data.TRAIN_OMIT)]
        assert name not in words(c.train) and name in words(c.test)
    # the two caption clients: each holds the name the other lacks
    assert "purple" in words(clients[0].train) and "yellow" in words(clients[1].train)
    with pytest.raises(ValueError, match="cannot be drawn"):             # not an endless search
        data.random_scene(torch.Generator().manual_seed(0), data.NEUTRAL, 3, ("red",), ("circle", "square"))


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
    assert [len(c_.train) for c_ in data.make_scenario("A", 0, n_test=1)] == [150] * 6
    with pytest.raises(ValueError, match="unknown scenario"):
        data.make_scenario("C", 0)


def test_every_generated_text_is_in_the_tiny_vocabulary():
    import backbone
    import tiny
    tok = tiny.tiny_tokenizer()
    texts = [(s.question, s.answer) for c in data.make_scenario("B", 0, n_train=30, n_test=1) for s in c.train]
    texts += [(s.question, s.answer) for s in data.pretraining_corpus(60, 0)]
    texts += [(backbone.TINY_PROMPT.format(question="what colour is the circle?").replace("<image>", ""), "")]
    for q, a in texts:
        ids = tok(q + " " + a, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, (q, a)
    # numbers and boxes are spelled digit by digit and decode back exactly
    for s in ["[0.12, 0.40, 0.55, 0.80]", "472", "a large red circle left of a small blue square"]:
        assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s


def test_the_pretraining_corpus_names_boxes_numbers_and_only_the_names_it_is_given():
    corpus = data.pretraining_corpus(200, 0)
    named = 0
    for s in corpus:
        for o in s.extra["objects"]:
            named += f"{o.size} {o.colour} {o.shape} at {data.box_text(o.box)}" in s.answer
    assert named > 100
    numbers = [s for s in corpus if s.extra["text"] is not None]
    assert numbers and all(s.question == "describe the objects." and s.extra["text"][4] == 1.5 for s in numbers)
    assert all(f"text {s.extra['text'][0]} at" in s.answer for s in numbers)
    few = data.pretraining_corpus(200, 0, ("red", "blue"), ("circle", "square"))
    assert {(o.colour, o.shape) for s in few for o in s.extra["objects"]} <= {(c, h) for c in ("red", "blue")
                                                                             for h in ("circle", "square")}
