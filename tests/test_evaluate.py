"""The metrics, on hand-computed cases: the official VQA v2 evaluation's normalisation and
leave-one-out accuracy, the COCO caption evaluation's PTB tokenisation and CIDEr-D, grounding."""
import math

import pytest

import data
import evaluate as ev


# ----------------------------------------------------------------------------- VQA, as vqaEval.py scores
@pytest.mark.parametrize("pred, answers, official", [
    # leave-one-out over the ten answers: each left-out subset of nine scores min(1, matches / 3)
    ("yes", ["yes"] * 3 + ["no"] * 7, 0.9),           # 3 x 2/3 + 7 x 1, over 10
    ("yes", ["yes"] * 4 + ["no"] * 6, 1.0),
    ("yes", ["yes"] * 2 + ["no"] * 8, 0.6),           # 2 x 1/3 + 8 x 2/3
    ("yes", ["yes"] + ["no"] * 9, 0.3),
    ("maybe", ["yes"] * 5 + ["no"] * 5, 0.0),
    # answers that differ: the answers and the prediction all get the whole processing (the 2021 fix):
    # "two" is "2", so six of ten answers match
    ("2", ["two"] * 4 + ["2"] * 2 + ["3"] * 4, 1.0),
    ("2", ["two"] * 3 + ["blue"] * 7, 0.9),
    ("yes", ["Yes"] * 9 + ["yes"], 1.0),                    # case
    ("red", ["red."] * 3 + ["blue"] * 7, 0.9),              # the final period goes
    ("red", ["red!"] * 3 + ["blue"] * 7, 0.9),              # '!' becomes a space, and the words are re-joined
    ("dont", ["don't"] * 3 + ["no"] * 7, 0.9),             # an apostrophe-less contraction gets its apostrophe
    ("Two dogs.", ["2 dogs"] * 4 + ["dogs"] * 6, 1.0),     # case, number words, the final period
    ("1,000 ft-lb", ["1000 ftlb"] * 3 + ["no"] * 7, 0.9),  # a comma between digits: every mark deleted
    # ten equal answers: nothing but newlines, tabs and outer spaces is done to either side
    ("1,000", ["1000"] * 10, 0.0),
    ("the red one", ["red 1"] * 10, 0.0),
    ("yes", ["Yes"] * 10, 0.0),
    ("0.5", ["0.5"] * 10, 1.0),
    (" yes\n", ["yes"] * 10, 1.0),
    ("yes", ["\tyes "] * 10, 1.0),
])
def test_vqa_accuracy_equals_the_official_evaluation(pred, answers, official):
    assert ev.vqa_accuracy(pred, answers) == pytest.approx(official)


def test_vqa_normalisation_rule_by_rule():
    assert ev.vqa_punctuation("red-ish") == "red ish"          # a mark inside a word becomes a space
    assert ev.vqa_punctuation("red - ish") == "red  ish"       # a mark touching a space is deleted
    assert ev.vqa_punctuation("3,5 a-b") == "35 ab"            # a comma between digits: every mark deleted
    assert ev.vqa_punctuation("e.g.") == "eg" and ev.vqa_punctuation("1.5.") == "1.5"
    assert ev.vqa_punctuation("x." * 40) == "x" * 32 + "x." * 8   # at most 32 periods go (count=re.UNICODE)
    assert ev.vqa_digits_articles("An Apple isnt none") == "apple isn't 0"
    assert ev.normalize_answer("  a  yellow circle! ") == "yellow circle"
    # one reference answer (the synthetic benchmark): both normalised, an exact match
    assert ev.vqa_accuracy("two", "two") == ev.vqa_accuracy("Two.", ["2"]) == 1.0
    assert ev.vqa_accuracy("blue", "red") == 0.0


# ----------------------------------------------------------------------------- CIDEr-D, as coco-caption scores
@pytest.mark.parametrize("text, tokens", [
    ("A man's dog.", ["a", "man", "'s", "dog"]),
    ("It isn't red!", ["it", "is", "n't", "red"]),
    ("can't won't", ["ca", "n't", "wo", "n't"]),
    ('a "big" dog; two cats: yes? - no', ["a", "big", "dog", "two", "cats", "yes", "no"]),
    ("a black-and-white cat, 1,000 ft 3.5 m...", ["a", "black-and-white", "cat", "1,000", "ft", "3.5", "m"]),
    # an abbreviation keeps its period as the Stanford tokenizer's lists have it; another word's goes
    ("Mr. Smith walks on St. Mark street. A dog sleeps.", ["mr.", "smith", "walks", "on", "st.", "mark", "street", "a",
                                                          "dog", "sleeps"]),
    ("apples, pears etc. and U.S. flags", ["apples", "pears", "etc.", "and", "u.s.", "flags"]),
    ("a cat (sleeping) on a [mat]", ["a", "cat", "-lrb-", "sleeping", "-rrb-", "on", "a", "-lsb-", "mat", "-rsb-"]),
    ("a large red circle left of a small blue square", "a large red circle left of a small blue square".split()),
])
def test_ptb_tokenisation(text, tokens):
    assert ev.ptb_tokenize(text) == tokens


def test_cider_d_hand_computed():
    # Two images, references "a b" and "c d": every n-gram has df = 1, idf = log 2.
    # Image 1, candidate = its reference: n = 1 and n = 2 have cosine 1, n = 3, 4 have no n-grams:
    # (1 + 1 + 0 + 0) / 4 * 10 = 5. Image 2, no shared n-gram: 0. Corpus mean 2.5.
    assert ev.cider_d(["a b", "x y"], [["a b"], ["c d"]]) == pytest.approx(2.5)
    assert ev.cider_d_items(["a b", "x y"], [["a b"], ["c d"]]) == pytest.approx([5.0, 0.0])
    # "a b b" against "a b": n = 1: vc = (1, 2) idf, vr = (1, 1) idf, clipped dot 2, norms √5 √2;
    # n = 2: "a b" shared, norms √2 and 1; Gaussian length penalty exp(-1 / 72).
    expected = 10 * (2 / math.sqrt(10) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert ev.cider_d(["a b b", "c d"], [["a b"], ["c d"]]) == pytest.approx((expected + 5.0) / 2)
    # tokenised as the COCO evaluation does: case, the final period and quotes do not count
    assert ev.cider_d_items(['A "b".', "x y"], [["a b"], ["c d"]]) == pytest.approx([5.0, 0.0])


def test_cider_d_common_words_carry_no_weight():
    assert ev.cider_d(["a", "a"], [["a"], ["a"]]) == 0.0       # a word in every reference has idf 0


# ----------------------------------------------------------------------------- grounding, and scores per item
def test_box_parsing_iou_and_grounding_accuracy():
    assert ev.parse_box("[0.10, 0.20, 0.50, 0.60]") == [0.1, 0.2, 0.5, 0.6]
    assert ev.parse_box("it is at [ 0 . 1 0 , 0 . 2 0 , 0 . 5 0 , 0 . 6 0 ]") == [0.1, 0.2, 0.5, 0.6]
    assert ev.parse_box("[0.1, 0.2, 0.5]") is None and ev.parse_box("top left") is None
    assert ev.iou([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    assert ev.iou([0, 0, 2, 1], [1, 0, 3, 1]) == pytest.approx(1 / 3)
    ref = "large red circle at [0.00, 0.00, 0.40, 0.40]"
    assert ev.grounding_accuracy("small blue square at [0.00, 0.00, 0.40, 0.40]", ref) == 1.0   # scored on the box
    assert ev.grounding_accuracy("[0.00, 0.00, 0.40, 0.20]", ref) == 1.0      # IoU exactly 0.5
    assert ev.grounding_accuracy("[0.00, 0.00, 0.40, 0.19]", ref) == 0.0
    assert ev.grounding_accuracy("no box", ref) == 0.0
    assert ev.grounding_accuracy("[0.5, 0.5, 0.1, 0.1]", ref) == 0.0            # degenerate box


def test_item_scores_in_percent_units():
    samples = [data.Sample(None, "q", a, "vqa") for a in ("red", "two")]
    assert ev.item_scores("vqa", ["red", "3"], samples) == [100.0, 0.0]
    captions = [data.Sample(None, "q", a, "caption") for a in ("a b", "c d")]
    assert ev.item_scores("caption", ["a b", "x y"], captions) == pytest.approx([500.0, 0.0])
    five = data.Sample(None, "q", "a b", "caption", extra={"answers": ["a b", "a c"]})   # several references
    assert ev.item_scores("caption", ["a b", "x y"], [five, captions[1]])[0] < 500.0


def test_a_tasks_floor_is_the_best_single_answer():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import floors
    vqa = [data.Sample(None, "q", a, "vqa") for a in ("yes", "no", "yes")]
    assert floors.constant_answer("vqa", vqa) == ("yes", 200 / 3)
    # two answers a half-image apart: the box spanning both halves has IoU 0.5 with each, so a
    # fixed answer scores 100 that no true answer reaches (each scores 50)
    boxes = [data.Sample(None, "q", a, "grounding") for a in ("[0.00, 0.00, 0.50, 0.50]", "[0.50, 0.00, 1.00, 0.50]")]
    assert floors.constant_answer("grounding", boxes) == ("[0.00, 0.00, 1.00, 0.50]", 100.0)
