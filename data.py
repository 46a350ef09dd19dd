"""
The synthetic multimodal instruction world, the two scenarios, and the tiny backbone's pretraining
corpus. Nothing is downloaded: every image is drawn here, deterministically from a seed.

    python data.py --scenario A            # print a few samples of every client

The world is designed from three principles (docs/METHOD.md, "The task: FedMIT"), not tuned until
any method wins:
- task heterogeneity: every client holds ONE task type with its own instruction and answer format:
  captioning ("a large red circle left of a small blue square"), VQA about colour, shape, size,
  count and left/right relations (one-word answers), grounding (one large object; the answer names
  it and gives its normalised box, "large red circle at [0.58, 0.06, 0.93, 0.41]", scored on the
  box) and, in Scenario B, text reading (one digit of a hand-made 3x5 font, 6-pixel dots, in the
  centre);
- client heterogeneity: each client draws its own visual domain (background level and tint, a
  background gradient, a palette shift of the object colours, pixel noise, object scale), and each
  client's training scenes lack one colour or shape name (TRAIN_OMIT) that its test scenes draw and
  the other client of its task holds (the label skew of the federated-learning literature);
- shared knowledge: every task rests on the same concepts (colour, shape, size, position), so what
  one task learns about them can help another, and one client's few hundred samples are too few to
  learn everything well alone.
These formats are the benchmark's definition, calibrated on the bounds alone (RESULTS.md, "How the
benchmark was calibrated"). Train and test splits of a client are disjoint draws from the same
client distribution (TRAIN_OMIT aside).

The tiny backbone is pretrained on a separate "describe the objects" corpus from a neutral domain
(plain grey backgrounds, no noise, unit scale; `pretraining_corpus`), disjoint from the clients'
data: it names each object with its box, as grounding's answers do, but draws and names only three
colours and two shapes (backbone.PRETRAIN), and never sees the clients' domains or instructions.
"""
import argparse
from dataclasses import dataclass, field

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
# Each client's training scenes draw no object of one name (client k: group k % 4); its test scenes
# draw every name, and the other client of its task holds the missing one. The four names are those
# the tiny backbone's alignment leaves out (backbone.PRETRAIN), so they are learnt from the clients.
TRAIN_OMIT = (("yellow",), ("purple",), ("triangle",), ("cross",))
OCR_DOT_PX = 6.0         # text reading: one digit of 6-pixel font dots (18 x 30 pixels), in the centre


TASKS = ("caption", "vqa", "grounding", "ocr")   # each task's metric: evaluate.METRICS


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
    extra: dict = field(default_factory=dict)   # "answers": the metric's references (VQAv2's ten, captions)
    more: tuple = ()      # a multi-turn training record's later (question, answer) turns, in order


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


def box_text(box):
    return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"


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


def make_sample(g, task, domain, omit=()):
    """One sample of `task` in `domain`; omit: colour or shape names its scene draws no object of.
    Every draw from g is part of the benchmark's definition (the same seed, the same world), the
    one-valued ones included (one digit, one grounding object)."""
    names = dict(colours=[c for c in COLOURS if c not in omit], shapes=[s for s in SHAPES if s not in omit])
    if task == "ocr":
        objs = random_scene(g, domain, _randint(g, 0, 1), **names)
        digits = "".join(str(_randint(g, 0, 9)) for _ in range(_randint(g, 1, 1)))
        width, height = (4 * len(digits) - 1) * OCR_DOT_PX, 5 * OCR_DOT_PX
        x0, y0 = (IMAGE_SIZE - width) / 2, (IMAGE_SIZE - height) / 2
        colour = _choice(g, list(COLOURS))
        image = render(g, domain, objs, (digits, colour, x0, y0, OCR_DOT_PX))
        return Sample(image, "what number is written?", digits, task)
    # a grounding scene holds one large object: at IoU >= 0.5 a small one's box leaves about a pixel
    # of error, which the vision tower's 8-pixel patches do not resolve
    most, sizes = (1, ("large",)) if task == "grounding" else (3, tuple(SIZES))
    objs = random_scene(g, domain, _randint(g, 1, most), sizes=sizes, **names)
    image = render(g, domain, objs)
    if task == "caption":
        return Sample(image, "describe the image briefly.", caption_text(objs), task)
    if task == "vqa":
        q, a = _vqa(g, objs)
        return Sample(image, q, a, task)
    if task == "grounding":    # the object named as the alignment corpus names it, then its box
        o = _choice(g, objs)
        return Sample(image, f"where is the {_phrase(o)}?", f"{o.size} {_phrase(o)} at {box_text(o.box)}", task)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def pretraining_corpus(n, seed, colours=tuple(COLOURS), shapes=SHAPES):
    """The neutral 'describe the objects' alignment set the tiny backbone is pretrained on. Each
    description lists objects as '<size> <colour> <shape> at [x1, y1, x2, y2]' (the box, two
    decimals); the instruction asks for all objects, or those of one colour, or of one shape
    ('none' when there is none), so that the LLM learns to read the instruction as well as the
    image. 3 in 10 'describe the objects.' images carry a number of 1-4 digits of 1.5-pixel dots
    ('text 472 at <x>, <y>', its centre), so that digits mean something to the backbone too.
    colours / shapes: the only ones drawn. Each sample's extra holds what is drawn ('objects',
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
        parts = [f"{o.size} {_phrase(o)} at {box_text(o.box)}" for o in sorted(keep, key=lambda o: o.cx)]
        text = None
        if kind == 0 and float(torch.rand(1, generator=g)) < 0.3:
            digits = "".join(str(_randint(g, 0, 9)) for _ in range(_randint(g, 1, 4)))
            px = 1.5
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


SCENARIOS = {  # [reading] docs/METHOD.md, "Scenarios": this project's definition of A and B
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


def make_scenario(name, seed, limit_clients=None, n_train=None, n_test=None):
    """Every client's train and test samples, deterministic in (name, seed).

    limit_clients / n_train / n_test shrink the scenario (tests, quick runs); a client's samples do
    not depend on how many other clients are kept. A client's test samples are drawn after its
    training samples, so another n_train draws other test samples too (n_test keeps the first ones)."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; expected one of {sorted(SCENARIOS)}")
    specs = SCENARIOS[name]
    keep = range(len(specs)) if limit_clients is None else limit_clients
    clients = []
    for k in keep:
        spec = specs[k]
        g = torch.Generator().manual_seed(1_000_003 * seed + 7919 * k + ord(name))
        domain = client_domain(g)
        ntr, nte = n_train or spec.n_train, n_test or spec.n_test
        omit = TRAIN_OMIT[k % len(TRAIN_OMIT)]    # the names client k's training scenes lack
        samples = [make_sample(g, spec.task, domain, omit if i < ntr else ()) for i in range(ntr + nte)]
        for i, s in enumerate(samples):
            s.id = f"c{k}-{i}"
        clients.append(ClientData(k, spec.task, samples[:ntr], samples[ntr:], domain))
    return clients




if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Print a few samples of every client of a synthetic scenario.")
    ap.add_argument("--scenario", default="A", choices=sorted(SCENARIOS))
    ap.add_argument("--data-seed", type=int, default=0, help="the draw of the world (0: the benchmark's)")
    a = ap.parse_args()
    for c in make_scenario(a.scenario, a.data_seed):
        print(f"client {c.id} ({c.task}, {len(c.train)} train / {len(c.test)} test)")
        for s in c.train[:3]:
            print(f"   Q: {s.question:40s} A: {s.answer}")
