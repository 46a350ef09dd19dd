"""
Data for Pilot: a synthetic multimodal instruction world, the two scenarios, and the metrics.

    python data.py --scenario A            # print a few samples of every client
    python data.py --scenario A --export DIR   # write it in the LLaVA format (manifest.json + PNGs)
    python data.py --scenario A --constant 0,1,2,3,4   # each task's floor: what one fixed answer scores

The synthetic world is designed from three principles (PILOT_METHOD.md, "Task: FedMIT"), not tuned
until any method wins:
- task heterogeneity: every client holds ONE task type with its own instruction and answer format:
  captioning ("a large red circle left of a small blue square"), VQA about colour, shape, size,
  count and left/right relations (one-word answers), grounding (referring expression -> the
  object named and its normalised box, "large red circle at [0.58, 0.06, 0.93, 0.41]", scored on
  the box) and, in Scenario B, text reading (a digit drawn with a hand-made 3x5 pixel font). Their
  formats and rendering are calibration knobs (FORMATS, run.py --formats), and so is the training
  data's skew (train_omit). The benchmark's values are those a tiny model learns (RESULTS.md, step
  43, 45): a grounding scene holds one large object, the digit is one, of 6-pixel dots, in the centre,
  and each client's training scenes lack one colour or shape name that its test scenes draw and
  another client of its task holds. `constant_answer` gives each client's floor: what one fixed
  answer scores on its test set.
- client heterogeneity: each client draws its own visual domain (background level and tint, a
  background gradient, a palette shift of the object colours, pixel noise, object scale), so
  client-specific visual features matter.
- shared knowledge: every task rests on the same concepts (colour, shape, size, position), so what
  one task learns about them can help another, and one client's few hundred samples are too few to
  learn everything well alone.
Train and test splits of a client are disjoint draws from the same client distribution (train_omit
aside).

The embedded benchmark is this world, these scenarios and run.py's "tiny" preset, as one instrument:
- Scenario A: 6 clients (caption, caption, vqa, vqa, grounding, grounding), 150 training and 400
  test samples each; Scenario B: 8 clients, adds two text-reading clients, 100 to 400 training
  samples, 400 test samples each. 400 test samples put the binomial standard error of one client's
  accuracy at most sqrt(0.25 / 400) = 2.5 points.
- Schedule (run.PRESETS["tiny"]): R1 = 4 stage-1 rounds and R2 = 16 stage-2 rounds of 10 local
  AdamW steps per client (batch 8), one cosine learning-rate schedule over each client's 200 steps
  (3% warm-up, peak 3e-3 in both stages), gradient norm clipped at 1.0; Local takes the same 200
  steps, Centralized (one model on the union of the training data) the federation's total, K x 200.
- Scores: per client on its own test set, then per task and averaged over tasks (metrics below),
  and beside them the mean answer-token cross-entropy on the same test set (teacher-forced).
- Every table gives Local (lower bound of collaboration) and Centralized (what pooling the data
  gives) beside the federated methods, as mean ± std over seeds 0-4. The data are one draw of this
  world, make_scenario(name, 0), for every seed (run.Config.data_seed): a seed varies the training
  only, so the spread is the training's, not the draw's (RESULTS.md, step 46).

The embedded backbone is pretrained on a separate "describe the objects" corpus from a neutral
domain (plain grey backgrounds, no noise, unit scale; `pretraining_corpus`), disjoint from the
clients' data: it gives the vision tower and the LLM their concepts and names an object with its
box as grounding's answers do, but names only three colours and two shapes (backbone.PRETRAIN), and
never sees the clients' domains or instructions.

Metrics (hand-written, percent units): CIDEr-D for captions, normalised exact-match accuracy for VQA
and text reading, accuracy at IoU >= 0.5 for grounding (an unparsable box scores 0).
"""
import argparse
import json
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

# ----------------------------------------------------------------------------- the synthetic world
IMAGE_SIZE = 32          # pixels; the tiny backbone's vision tower sees 32x32 images in 4x4 patches
COLOURS = {"red": (0.90, 0.12, 0.10), "green": (0.10, 0.75, 0.20), "blue": (0.15, 0.30, 0.95),
           "yellow": (0.95, 0.85, 0.10), "purple": (0.65, 0.20, 0.85)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": (2.5, 3.5), "large": (5.0, 7.0)}   # half-extent in pixels, before the client's scale
COUNT_WORDS = ("zero", "one", "two", "three", "four")
DIGIT_FONT = {  # 3x5 pixel font, rows top to bottom
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111"}
# The answer formats and rendering of the two hardest tasks, and the training data's skew: the
# calibration's knobs (README, "The embedded benchmark"; RESULTS.md; run.py --formats
# changes some of them), at the benchmark's values.
# - box_grid 0: exact box coordinates; q > 0: the box snapped outward to a q x q grid (two decimals);
#   box_cell 1 (with q > 0): instead the grid cell holding the object's centre, one of q * q answers.
# - box_say 1: the answer names the object before its box as the alignment corpus does with
#   name_boxes ('<size> <colour> <shape> at [x1, y1, x2, y2]', two decimals; scored on the box
#   alone); 0: the box alone, one decimal.
# - box_objects n: a grounding scene draws 1 to n objects; box_large 1: only large ones (a rendering
#   knob: at IoU >= 0.5 a small object's box leaves about one pixel of error, which the vision
#   tower's 8-pixel patches do not resolve).
# - ocr_place "anywhere" or "centre": where the number is drawn; ocr_digits: its length range;
#   ocr_dot_px 0: 1.5 px a font dot up to 3 digits, 1.25 px for 4, else that size.
# - train_omit: groups of colour or shape names ("yellow+triangle"); client k's training scenes draw
#   no object of a name in group k % len, its test scenes draw every one, so what it lacks another
#   client holds (the label skew of the federated-learning literature); empty: no skew.
# The benchmark: one large object to ground, its box named first; one digit of 6 px dots in the
# centre (18 x 30 of the image's 32 x 32 pixels); each client lacking one of the four names the
# backbone's alignment leaves out (backbone.PRETRAIN), which the other client of its task holds.
FORMATS = dict(box_grid=0, box_cell=0, box_say=1, box_objects=1, box_large=1, ocr_place="centre", ocr_digits=(1, 1),
               ocr_dot_px=6.0, train_omit=(("yellow",), ("purple",), ("triangle",), ("cross",)))


def parse_formats(text: str) -> dict:
    """'box_grid=4,ocr_digits=1-2,ocr_dot_px=2' -> FORMATS with those values changed."""
    out = dict(FORMATS)
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key not in FORMATS:
            raise ValueError(f"unknown format {key!r}; expected one of {sorted(FORMATS)}")
        try:
            lo, _, hi = value.partition("-")
            out[key] = {"box_grid": int, "box_cell": int, "box_say": int, "box_objects": int, "box_large": int,
                        "ocr_place": str, "ocr_dot_px": float,
                        "ocr_digits": lambda v: (int(lo), int(hi or lo)),
                        "train_omit": lambda v: tuple(tuple(n.split("+")) for n in v.split("/")) if v else ()}[key](value)
        except ValueError:
            raise ValueError(f"format {part!r}: not a valid value") from None
        ok = {"box_grid": lambda v: v >= 0, "box_cell": lambda v: v in (0, 1), "box_say": lambda v: v in (0, 1),
              "box_objects": lambda v: 1 <= v <= 3, "box_large": lambda v: v in (0, 1),
              "ocr_place": lambda v: v in ("anywhere", "centre"),
              "ocr_digits": lambda v: 1 <= v[0] <= v[1] <= 4, "ocr_dot_px": lambda v: 0 <= v <= 6,
              "train_omit": lambda v: {n for grp in v for n in grp} <= set(COLOURS) | set(SHAPES)}[key]
        if not ok(out[key]):
            raise ValueError(f"format {part!r}: out of range (box_grid >= 0, box_cell, box_say and box_large 0|1, "
                             f"box_objects 1-3, "
                             f"ocr_place anywhere|centre, ocr_digits 1-4, ocr_dot_px 0-6, train_omit colour or "
                             f"shape names joined by '+' in groups joined by '/')")
    if out["box_cell"] and not out["box_grid"]:
        raise ValueError("formats: box_cell=1 needs a grid (box_grid > 0)")
    px, longest = out["ocr_dot_px"], out["ocr_digits"][1]
    if (4 * longest - 1) * px > IMAGE_SIZE or 5 * px > IMAGE_SIZE:
        raise ValueError(f"formats: {longest} digits of {px} px dots do not fit in the {IMAGE_SIZE}-pixel image")
    return out


TASKS = ("caption", "vqa", "grounding", "ocr")
METRICS = {"caption": "cider", "vqa": "vqa_acc", "grounding": "acc_iou50", "ocr": "vqa_acc"}


@dataclass
class Obj:
    colour: str
    shape: str
    size: str
    cx: float  # centre and half-extent in pixels
    cy: float
    r: float

    @property
    def box(self):  # normalised [x1, y1, x2, y2]
        s = IMAGE_SIZE
        return [max(0.0, (self.cx - self.r) / s), max(0.0, (self.cy - self.r) / s),
                min(1.0, (self.cx + self.r) / s), min(1.0, (self.cy + self.r) / s)]


@dataclass
class Domain:
    """One client's visual domain (or the neutral pretraining domain)."""
    bg: tuple = (0.45, 0.45, 0.45)
    gradient: tuple = (0.0, 0.0)      # background gradient amplitude along x and y
    palette_shift: tuple = (0.0, 0.0, 0.0)
    noise: float = 0.0
    scale: float = 1.0
    random_bg: bool = False           # neutral domain: a fresh grey level per image


def client_domain(g: torch.Generator) -> Domain:
    u = lambda lo, hi, n=1: (lo + (hi - lo) * torch.rand(n, generator=g)).tolist()
    level = u(0.12, 0.55)[0]
    return Domain(bg=tuple(level + t for t in u(-0.10, 0.10, 3)), gradient=tuple(u(-0.2, 0.2, 2)),
                  palette_shift=tuple(u(-0.12, 0.12, 3)), noise=u(0.0, 0.08)[0], scale=u(0.8, 1.25)[0])


NEUTRAL = Domain(random_bg=True)


@dataclass(slots=True)   # slots: a client of 50,000 records holds 50,000 of these
class Sample:
    image: object         # a [3, S, S] float tensor in [0, 1] (synthetic) or an image file's path
    question: str
    answer: str
    task: str
    id: str = ""
    extra: dict = field(default_factory=dict)


def _randint(g, lo, hi):  # inclusive
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def _choice(g, seq):
    return seq[_randint(g, 0, len(seq) - 1)]


def _place(g, objs, r, S=IMAGE_SIZE, tries=60):
    """A centre for a box of half-extent r inside the image, not overlapping objs (None if no room)."""
    for _ in range(tries):
        cx = r + 0.5 + float(torch.rand(1, generator=g)) * (S - 2 * r - 1)
        cy = r + 0.5 + float(torch.rand(1, generator=g)) * (S - 2 * r - 1)
        if all(abs(cx - o.cx) > r + o.r + 1 or abs(cy - o.cy) > r + o.r + 1 for o in objs):
            return cx, cy
    return None


def random_scene(g, domain, n_objects, colours=tuple(COLOURS), shapes=SHAPES, sizes=tuple(SIZES)):
    """n distinct (colour, shape) objects of the given size names, placed without overlap."""
    if n_objects > len(colours) * len(shapes):
        raise ValueError(f"{n_objects} distinct objects cannot be drawn from {len(colours)} colours x {len(shapes)} shapes")
    objs, used = [], set()
    while len(objs) < n_objects:
        colour, shape, size = _choice(g, list(colours)), _choice(g, shapes), _choice(g, list(sizes))
        if (colour, shape) in used:
            continue
        lo, hi = SIZES[size]
        r = (lo + (hi - lo) * float(torch.rand(1, generator=g))) * domain.scale
        pos = _place(g, objs, r)
        if pos is None:
            if not objs:
                continue
            break
        objs.append(Obj(colour, shape, size, pos[0], pos[1], r))
        used.add((colour, shape))
    return objs


def _shape_mask(shape, cx, cy, r, x, y):
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (dx.abs() <= r) & (dy.abs() <= r)
    if shape == "triangle":  # apex up, base at the bottom
        return (dy <= r) & (dy >= -r) & (dx.abs() <= (dy + r) / 2)
    if shape == "cross":
        w = 0.35 * r
        return ((dx.abs() <= w) & (dy.abs() <= r)) | ((dy.abs() <= w) & (dx.abs() <= r))
    raise ValueError(shape)


def render(g, domain, objs, text=None, S=IMAGE_SIZE, ss=2):
    """Draw the scene at ss-times supersampling, then average down (soft edges)."""
    n = S * ss
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / ss
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    bg = torch.full((3,), 0.3 + 0.3 * float(torch.rand(1, generator=g))) if domain.random_bg \
        else torch.tensor(domain.bg)
    img = bg[:, None, None] + domain.gradient[0] * (x / S - 0.5) + domain.gradient[1] * (y / S - 0.5)
    img = img.expand(3, n, n).clone()
    shift = torch.tensor(domain.palette_shift)
    for o in objs:
        colour = (torch.tensor(COLOURS[o.colour]) + shift).clamp(0, 1)
        m = _shape_mask(o.shape, o.cx, o.cy, o.r, x, y)
        img[:, m] = colour[:, None]
    if text is not None:  # (string, colour, x0, y0, pixel scale)
        digits, colour, x0, y0, px = text
        colour = (torch.tensor(COLOURS[colour]) + shift).clamp(0, 1)
        for i, d in enumerate(digits):
            for row in range(5):
                for col in range(3):
                    if DIGIT_FONT[d][row * 3 + col] == "1":
                        xa, ya = x0 + (i * 4 + col) * px, y0 + row * px
                        m = (x >= xa) & (x < xa + px) & (y >= ya) & (y < ya + px)
                        img[:, m] = colour[:, None]
    img = torch.nn.functional.avg_pool2d(img[None], ss)[0]
    if domain.noise > 0:
        img = img + domain.noise * torch.randn(img.shape, generator=g)
    return img.clamp(0, 1)


# ----------------------------------------------------------------------------- instructions per task
def _phrase(o):
    return f"{o.colour} {o.shape}"


def caption_text(objs):
    return " left of ".join(f"a {o.size} {_phrase(o)}" for o in sorted(objs, key=lambda o: o.cx))


def box_text(box, decimals=1):
    return "[" + ", ".join(f"{v:.{decimals}f}" for v in box) + "]"


def grid_box(box, q):
    """A normalised box snapped outward to a q x q grid: the grid cells it touches."""
    eps = 1e-9     # a side already on the grid stays there
    return [math.floor(box[0] * q + eps) / q, math.floor(box[1] * q + eps) / q,
            math.ceil(box[2] * q - eps) / q, math.ceil(box[3] * q - eps) / q]


def cell_box(box, q):
    """The cell of a q x q grid that holds a normalised box's centre, as a box."""
    i, j = (min(int((box[a] + box[a + 2]) / 2 * q), q - 1) for a in (0, 1))
    return [i / q, j / q, (i + 1) / q, (j + 1) / q]


def _vqa(g, objs):
    kinds = ["count", "size", "colour", "shape"] + (["relation"] * 2 if len(objs) > 1 else [])
    while True:
        kind, o = _choice(g, kinds), _choice(g, objs)
        if kind == "count":
            return "how many objects are there?", COUNT_WORDS[len(objs)]
        if kind == "size":
            return f"what size is the {_phrase(o)}?", o.size
        if kind == "colour" and sum(p.shape == o.shape for p in objs) == 1:
            return f"what colour is the {o.shape}?", o.colour
        if kind == "shape" and sum(p.colour == o.colour for p in objs) == 1:
            return f"what shape is the {o.colour} object?", o.shape
        if kind == "relation":
            p = _choice(g, [p for p in objs if p is not o])
            return f"is the {_phrase(o)} left of the {_phrase(p)}?", "yes" if o.cx < p.cx else "no"


def make_sample(g, task, domain, formats=FORMATS, omit=()):
    """One sample of `task` in `domain`; formats: the hardest tasks' formats (FORMATS); omit: colour
    or shape names its scene draws no object of."""
    names = dict(colours=[c for c in COLOURS if c not in omit], shapes=[s for s in SHAPES if s not in omit])
    if task == "ocr":
        objs = random_scene(g, domain, _randint(g, 0, 1), **names)
        digits = "".join(str(_randint(g, 0, 9)) for _ in range(_randint(g, *formats["ocr_digits"])))
        px = formats["ocr_dot_px"] or (1.5 if len(digits) <= 3 else 1.25)
        width, height = (4 * len(digits) - 1) * px, 5 * px
        if formats["ocr_place"] == "centre":
            x0, y0 = (IMAGE_SIZE - width) / 2, (IMAGE_SIZE - height) / 2
        else:
            x0 = float(torch.rand(1, generator=g)) * (IMAGE_SIZE - width)
            y0 = float(torch.rand(1, generator=g)) * (IMAGE_SIZE - height)
        colour = _choice(g, list(COLOURS))
        image = render(g, domain, objs, (digits, colour, x0, y0, px))
        return Sample(image, "what number is written?", digits, task)
    most, sizes = (formats["box_objects"], ("large",) if formats["box_large"] else tuple(SIZES)) \
        if task == "grounding" else (3, tuple(SIZES))
    objs = random_scene(g, domain, _randint(g, 1, most), sizes=sizes, **names)
    image = render(g, domain, objs)
    if task == "caption":
        return Sample(image, "describe the image briefly.", caption_text(objs), task)
    if task == "vqa":
        q, a = _vqa(g, objs)
        return Sample(image, q, a, task)
    if task == "grounding":
        o = _choice(g, objs)
        q = formats["box_grid"]
        box = (cell_box if formats["box_cell"] else grid_box)(o.box, q) if q else o.box
        answer = box_text(box, 2 if q or formats["box_say"] else 1)
        if formats["box_say"]:     # the alignment's own words for the object (name_boxes)
            answer = f"{o.size} {_phrase(o)} at {answer}"
        return Sample(image, f"where is the {_phrase(o)}?", answer, task)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def pretraining_corpus(n, seed, colours=tuple(COLOURS), shapes=SHAPES, boxes=False, text_share=0.3, text_px=(1.5, 1.5)):
    """The neutral 'describe the objects' alignment set the tiny backbone is pretrained on. Each
    description lists objects as '<size> <colour> <shape> at <x>, <y>' (centre, two decimals); the
    instruction asks for all objects, or those of one colour, or of one shape ('none' when there is
    none), so that the LLM learns to read the instruction as well as the image. Some images carry a
    number ('text 472 at ...'), so that digits mean something to the backbone too. colours / shapes:
    the only ones drawn (a calibration variant; every one by default). Calibration variants too:
    boxes names each object's box ('at [x1, y1, x2, y2]', two decimals) instead of its centre;
    text_share is the share of 'describe the objects.' images that carry a number, text_px the range
    of its dot size (capped so the number fits). Each sample's extra holds what is drawn ('objects',
    'text'), for the backbone's dense vision targets."""
    g = torch.Generator().manual_seed(10_000 + seed)
    at = lambda cx, cy: f"at {cx / IMAGE_SIZE:.2f}, {cy / IMAGE_SIZE:.2f}"
    out = []
    for i in range(n):
        objs = random_scene(g, NEUTRAL, _randint(g, 1, 3), colours, shapes)
        kind = _randint(g, 0, 2)
        if kind == 0:
            q, keep = "describe the objects.", objs
        elif kind == 1:
            colour = _choice(g, list(colours))
            q, keep = f"describe the {colour} objects.", [o for o in objs if o.colour == colour]
        else:
            shape = _choice(g, shapes)
            q, keep = f"describe the {shape} objects.", [o for o in objs if o.shape == shape]
        where = (lambda o: "at " + box_text(o.box, 2)) if boxes else (lambda o: at(o.cx, o.cy))
        parts = [f"{o.size} {_phrase(o)} {where(o)}" for o in sorted(keep, key=lambda o: o.cx)]
        text = None
        if kind == 0 and float(torch.rand(1, generator=g)) < text_share:
            digits = "".join(str(_randint(g, 0, 9)) for _ in range(_randint(g, 1, 4)))
            px, top = text_px[0], min(text_px[1], IMAGE_SIZE / (4 * len(digits) - 1))
            if text_px[1] > text_px[0]:   # drawn only for a range, so the default corpus stays as it was
                px += float(torch.rand(1, generator=g)) * max(0.0, top - px)
            w = (4 * len(digits) - 1) * px
            x0 = float(torch.rand(1, generator=g)) * (IMAGE_SIZE - w)
            y0 = float(torch.rand(1, generator=g)) * (IMAGE_SIZE - 5 * px)
            text = (digits, _choice(g, list(colours)), x0, y0, px)
            parts.append(f"text {digits} {at(x0 + w / 2, y0 + 2.5 * px)}")
        out.append(Sample(render(g, NEUTRAL, objs, text), q, " ; ".join(parts) or "none", "describe", id=f"pre{i}",
                          extra={"objects": objs, "text": text}))   # what is drawn: backbone's dense targets
    return out


# Every word the synthetic world and the tiny backbone's prompt template can produce.
VOCAB_WORDS = sorted(set(
    list(COLOURS) + list(SHAPES) + list(SIZES) + list(COUNT_WORDS) +
    "USER ASSISTANT describe the image briefly objects a left of at text none "
    "how many are there what size is colour shape object where number written yes no".split()))
VOCAB_SYMBOLS = list("0123456789") + list("[],.?:;")


# ----------------------------------------------------------------------------- scenarios
@dataclass
class ClientSpec:
    task: str
    n_train: int
    n_test: int


SCENARIOS = {  # [reading] PILOT_METHOD.md, "Scenarios": this project's definition of A and B
    # A's clients hold 150 training samples each, so that one client's data leave room for pooling
    # (RESULTS.md, steps 47, 50, 51)
    "A": [ClientSpec(t, 150, 400) for t in ("caption", "caption", "vqa", "vqa", "grounding", "grounding")],
    "B": [ClientSpec(t, n, 400) for t, n in zip(
        ("caption", "caption", "vqa", "vqa", "grounding", "grounding", "ocr", "ocr"),
        (400, 100, 100, 400, 250, 150, 400, 100))],   # sizes differ up to 4x
}


@dataclass
class ClientData:
    id: int
    task: str
    train: list
    test: list
    domain: Domain = None
    name: str = ""


def make_scenario(name, seed, limit_clients=None, n_train=None, n_test=None, formats=FORMATS):
    """Every client's train and test samples, deterministic in (name, seed, formats).

    limit_clients / n_train / n_test shrink the scenario (tests, quick runs); a client's samples do
    not depend on how many other clients are kept. A client's test samples are drawn after its
    training samples, so another n_train draws other test samples too (n_test keeps the first ones)."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; expected one of {sorted(SCENARIOS)}")
    specs = SCENARIOS[name]
    keep = range(len(specs)) if limit_clients is None else limit_clients
    clients, skew = [], formats["train_omit"]
    for k in keep:
        spec = specs[k]
        g = torch.Generator().manual_seed(1_000_003 * seed + 7919 * k + ord(name))
        domain = client_domain(g)
        ntr, nte = n_train or spec.n_train, n_test or spec.n_test
        omit = skew[k % len(skew)] if skew else ()    # the names client k's training scenes lack
        samples = [make_sample(g, spec.task, domain, formats, omit if i < ntr else ()) for i in range(ntr + nte)]
        for i, s in enumerate(samples):
            s.id = f"c{k}-{i}"
        clients.append(ClientData(k, spec.task, samples[:ntr], samples[ntr:], domain))
    return clients


# ----------------------------------------------------------------------------- metrics
_ARTICLES = {"a", "an", "the"}
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$|~':]")


def normalize_answer(s: str) -> str:
    """The standard VQA answer normalisation: lower case, punctuation out, number words to digits,
    articles out, whitespace collapsed (periods kept only inside numbers such as 0.5)."""
    s = s.lower().replace("\n", " ").replace("\t", " ").strip()
    s = _PUNCT.sub(" ", s)
    s = re.sub(r"(?<!\d)\.(?!\d)", " ", s)
    words = [_NUMBER_WORDS.get(w, w) for w in s.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(pred: str, answers) -> float:
    """1 for a match of the normalised answer; with several human answers, min(1, matches / 3)."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    p = normalize_answer(pred)
    matches = sum(p == normalize_answer(a) for a in answers)
    return float(matches >= 1) if len(answers) < 3 else min(1.0, matches / 3)


_NUM = r"(-?\d+(?:\.\d+)?)"
_BOX = re.compile(r"\[\s*" + r"\s*,\s*".join([_NUM] * 4) + r"\s*\]")


def parse_box(text: str):
    """The first '[x1, y1, x2, y2]' in text (spaces anywhere), or None when there is none."""
    m = _BOX.search(re.sub(r"(?<=\d)\s+(?=[\d.])|(?<=\.)\s+(?=\d)", "", text))
    return [float(v) for v in m.groups()] if m else None


def iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_accuracy(pred: str, answer: str) -> float:
    p, t = parse_box(pred), parse_box(answer)
    if t is None:
        raise ValueError(f"reference answer {answer!r} holds no box")
    return float(p is not None and p[2] > p[0] and p[3] > p[1] and iou(p, t) >= 0.5)


def _ngrams(words, n):
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def cider_d(candidates, references, n_max=4, sigma=6.0):
    """Corpus CIDEr-D (Vedantam et al. 2015, the coco-caption variant): TF-IDF n-gram vectors
    (n = 1..4, document frequency over the references of this corpus), clipped candidate counts, a
    Gaussian length penalty, x10. Returns the mean over images (raw scale; x100 for percent units).

    candidates: list of strings; references: list of lists of strings, one list per candidate."""
    scores = cider_d_items(candidates, references, n_max, sigma)
    return sum(scores) / len(scores)


def cider_d_items(candidates, references, n_max=4, sigma=6.0):
    """cider_d's score of each image (raw scale). An image's score depends on the others only
    through the document frequencies, which come from the references alone."""
    assert len(candidates) == len(references) and candidates
    tok = lambda s: s.lower().replace(".", " ").replace(",", " ").split()
    refs = [[tok(r) for r in rs] for rs in references]
    df = Counter()
    for rs in refs:
        df.update({g for r in rs for n in range(1, n_max + 1) for g in _ngrams(r, n)})
    log_n = math.log(float(len(refs)))

    def vec(words):
        v, norm = [], []
        for n in range(1, n_max + 1):
            counts = _ngrams(words, n)
            vn = {g: c * (log_n - math.log(max(1.0, df[g]))) for g, c in counts.items()}
            v.append(vn)
            norm.append(math.sqrt(sum(x * x for x in vn.values())))
        return v, norm, len(words)

    scores = []
    for cand, rs in zip(candidates, refs):
        vc, nc, lc = vec(tok(cand))
        total = 0.0
        for r in rs:
            vr, nr, lr = vec(r)
            sim = 0.0
            for n in range(n_max):
                val = sum(min(x, vr[n][g]) * vr[n][g] for g, x in vc[n].items() if g in vr[n])
                if nc[n] != 0 and nr[n] != 0:
                    val /= nc[n] * nr[n]
                sim += val * math.exp(-((lc - lr) ** 2) / (2 * sigma ** 2))
            total += sim / n_max
        scores.append(10.0 * total / len(rs))
    return scores


def item_scores(task, predictions, samples) -> list:
    """Each test sample's score, in percent units; a client's score (`score`) is their mean. They
    show how much of a score's spread over seeds the test set's size accounts for (compare.py)."""
    answers = [s.extra.get("answers", [s.answer]) for s in samples]
    if METRICS[task] == "cider":
        return [100.0 * x for x in cider_d_items(predictions, answers)]
    if METRICS[task] == "vqa_acc":
        return [100.0 * vqa_accuracy(p, a) for p, a in zip(predictions, answers)]
    if METRICS[task] == "acc_iou50":
        return [100.0 * grounding_accuracy(p, s.answer) for p, s in zip(predictions, samples)]
    raise ValueError(task)


def score(task, predictions, samples) -> float:
    """A client's score on its test samples, in percent units (CIDEr-D x 100)."""
    return sum(item_scores(task, predictions, samples)) / len(samples)


def constant_answer(task, samples, grid=0, top=20):
    """The single answer that, given to every sample, scores best: the floor a model must beat to
    have learned anything from the image. Candidates: the `top` most frequent answers, and for
    grounding every box of grid cells, on the answers' grid (grid = q > 0; one spanning two cells can
    beat any true answer) or on a 4 x 4 one for exact boxes. Returns (answer, score), scored as
    `score` does (on the test set in hindsight: at least what a fixed answer chosen beforehand gets)."""
    candidates = [a for a, _ in Counter(s.answer for s in samples).most_common(top)]
    if task == "grounding":
        v = [i / (grid or 4) for i in range((grid or 4) + 1)]
        candidates += [box_text([x1, y1, x2, y2], 2) for i, x1 in enumerate(v) for x2 in v[i + 1:]
                       for j, y1 in enumerate(v) for y2 in v[j + 1:]]
    return max(((a, score(task, [a] * len(samples), samples)) for a in candidates), key=lambda t: t[1])


# ----------------------------------------------------------------------------- LLaVA-format data
class DataError(ValueError):
    """Bad input data; the message names the file, the record and what is wrong."""


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def _json_records(path):
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
        got = _read_json(path)        # not a list: say what it is (or why it is not JSON)
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


def load_llava_records(path, image_folder, task, client=None):
    """Samples from a LLaVA instruction file: a JSON list of {"id", "image", "conversations":
    [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}.
    A multi-turn record becomes one sample per (human, gpt) pair, each with the record's image. An
    optional "answers" list (VQAv2's ten human answers) is used by the VQA metric of a 1-turn record.
    client: the manifest's client id, named in error messages."""
    out = []
    for i, r in enumerate(_json_records(path)):
        where = (f"{path}, " + (f"client {client!r}, " if client is not None else "") + f"record {i}"
                 + (f" (id {r.get('id')!r})" if isinstance(r, dict) and "id" in r else ""))
        if not isinstance(r, dict) or "image" not in r or "conversations" not in r:
            raise DataError(f"{where}: a record needs 'image' and 'conversations'")
        image = Path(image_folder) / r["image"]
        if not image.is_file():
            raise DataError(f"{where}: image file {image} not found")
        conv = r["conversations"]
        humans = [t for t in conv if t.get("from") == "human"]
        gpts = [t for t in conv if t.get("from") == "gpt"]
        if not gpts:
            raise DataError(f"{where}: the conversation has no 'gpt' turn")
        if not humans or "<image>" not in humans[0].get("value", ""):
            raise DataError(f"{where}: the first human turn has no '<image>' placeholder")
        extra = {"answers": list(r["answers"])} if isinstance(r.get("answers"), list) and len(humans) == 1 else {}
        for j, (h, g) in enumerate(zip(humans, gpts)):
            if not isinstance(g.get("value"), str) or not g["value"].strip():
                raise DataError(f"{where}: answer turn {j} (the 'gpt' turn after human turn {j}) is empty")
            q = h["value"].replace("<image>", "").strip()
            out.append(Sample(str(image), q, g["value"].strip(), task, id=f"{r.get('id', i)}#{j}", extra=extra))
    if not out:
        raise DataError(f"{path}: no records (an empty client)")
    return out


def load_manifest(path, keep=None):
    """Clients from a scenario manifest {"name", "clients": [{"id", "task", "train", "test",
    "image_folder", "n_train" (optional here, needed by a Flower server)}]} whose paths are
    relative to the manifest's folder. keep: the indices of the
    clients whose files are read (default all), so that a host holding one client's files (a
    Flower SuperNode) needs no other client's."""
    m = _read_json(path)
    root = Path(path).parent
    if not isinstance(m, dict) or not isinstance(m.get("clients"), list) or not m["clients"]:
        raise DataError(f"{path}: expected {{'name': ..., 'clients': [...]}} with at least one client")
    clients = []
    for k, c in enumerate(m["clients"]):
        cid = c.get("id", k)
        missing = [key for key in ("task", "train", "test", "image_folder") if key not in c]
        if missing:
            raise DataError(f"{path}, client {cid!r}: missing {', '.join(missing)}")
        if c["task"] not in TASKS:
            raise DataError(f"{path}, client {cid!r}: unknown task {c['task']!r}; expected one of {', '.join(TASKS)}")
        if keep is not None and k not in keep:
            continue
        folder = root / c["image_folder"]
        clients.append(ClientData(k, c["task"], load_llava_records(root / c["train"], folder, c["task"], cid),
                                  load_llava_records(root / c["test"], folder, c["task"], cid), name=str(cid)))
        if "n_train" in c and c["n_train"] != len(clients[-1].train):
            raise DataError(f"{path}, client {cid!r}: 'n_train' is {c['n_train']!r}, but {root / c['train']} holds "
                            f"{len(clients[-1].train)} training samples")
    return m.get("name", Path(path).stem), clients


def roster(scenario, manifest="", keep=None, n_train=None):
    """[(index, task, n_train)] of a run's clients, known without reading any client's data: what a
    server trusts (it weighs FedAvg, the task-aware average and ATA's λ_k by n_train), never what a
    node says. From the scenario's definition, or from the manifest's per-client "n_train" (its
    number of training samples, one per (human, gpt) pair; load_manifest checks it)."""
    if not manifest:
        specs = SCENARIOS[scenario]
        return [(k, specs[k].task, n_train or specs[k].n_train) for k in (keep if keep is not None else range(len(specs)))]
    m = _read_json(manifest)
    out = []
    for k, c in enumerate(m.get("clients", []) if isinstance(m, dict) else []):
        if keep is not None and k not in keep:
            continue
        if not isinstance(c.get("n_train"), int) or c["n_train"] < 1:
            raise DataError(f"{manifest}, client {c.get('id', k)!r}: no 'n_train' (its number of training samples), "
                            f"which the server needs to weigh its updates")
        out.append((k, c.get("task"), c["n_train"]))
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
    for c in make_scenario(name, seed, **shrink):
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--scenario", default="A", choices=sorted(SCENARIOS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--formats", default="", help="calibration knobs, as run.py --formats (default: the benchmark's)")
    ap.add_argument("--export", metavar="DIR", help="write the scenario in the LLaVA format (manifest + PNGs) to DIR")
    ap.add_argument("--constant", metavar="SEEDS", nargs="?", const="",
                    help="each client's best constant answer on its test set (at --seed, or at each of the "
                         "comma-separated SEEDS), then each task's floor: mean over its clients, mean ± std over seeds")
    args = ap.parse_args()
    formats = parse_formats(args.formats)
    if args.export:
        print(f"wrote {export_scenario(args.export, args.scenario, args.seed, formats=formats)}")
        raise SystemExit
    if args.constant is not None:
        floors = {}
        for seed in [int(v) for v in args.constant.split(",") if v.strip()] or [args.seed]:
            per_task = {}
            for c in make_scenario(args.scenario, seed, formats=formats):
                answer, value = constant_answer(c.task, c.test, formats["box_grid"])
                print(f"seed {seed} client {c.id} ({c.task}): {value:.1f} {METRICS[c.task]} answering {answer!r}")
                per_task.setdefault(c.task, []).append(value)
            for task, values in per_task.items():
                floors.setdefault(task, []).append(sum(values) / len(values))
        for task, v in floors.items():
            print(f"{task}: floor {statistics.mean(v):.1f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.1f} "
                  f"over {len(v)} seed(s)")
        raise SystemExit
    for c in make_scenario(args.scenario, args.seed, formats=formats):
        print(f"client {c.id} ({c.task}, {len(c.train)} train / {len(c.test)} test)")
        for s in c.train[:3]:
            print(f"   Q: {s.question:40s} A: {s.answer}")
