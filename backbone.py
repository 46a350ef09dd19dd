"""
The LLaVA backbone: the embedded "tiny" one (shipped in tiny-backbone/, rebuildable from its recipe)
or any LLaVA checkpoint in Hugging Face format, loaded the same way; plus prompt encoding and batching.

    python backbone.py                         # check the shipped tiny backbone against its recipe
    python backbone.py --build tiny-backbone   # rebuild it from its recipe (about 2.5 min on 2 cores)

The tiny backbone is a real LlavaForConditionalGeneration (a small CLIP vision tower, a small Llama,
the LLaVA-1.5 two-layer projector), a word-level PreTrainedTokenizerFast over the synthetic world's
vocabulary, and a CLIP image processor, saved with save_pretrained (safetensors). It was pretrained
briefly and deterministically, so that the frozen parts mean something: the vision tower alone on a
dense per-patch objective (pretrain_vision), then in full (vision tower, projector, LLM) on
data.pretraining_corpus, a neutral "describe the objects" set disjoint from every client's data.
The shipped files are the benchmark's instrument: every run loads them, nothing is built at run
time. Their pilot_backbone.json names the recipe they were built from (tiny_backbone_key, a hash of
the shape, pretraining settings, prompt and vocabulary); loading refuses files of another recipe.
A rebuild is deterministic on one machine (the same bytes); another machine's arithmetic may round
differently, which is why the files, not the recipe, define the benchmark.
"""
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import data
import llava
import pilot

TINY = dict(  # the embedded backbone; about 0.6M parameters
    image_size=data.IMAGE_SIZE, patch_size=8, vision_hidden=64, vision_layers=3, vision_heads=4,
    text_hidden=128, text_layers=2, text_heads=4, text_intermediate=256, max_positions=160)
# The recipe (RESULTS.md, "How the benchmark was calibrated", says why each part): vision_steps of
# dense vision pretraining first (pretrain_vision), on every colour and shape; then the alignment on
# data.pretraining_corpus, which draws and names only these colours and shapes, so that the other two
# colours and two shapes are learnt from the clients' data, and names each object's box (name_boxes).
# Any change here changes tiny_backbone_key, and the shipped files must be rebuilt.
PRETRAIN = dict(n_samples=8000, epochs=4, batch_size=32, lr=1e-3, warmup=50, seed=0,
                vision_steps=2000, colours=("red", "green", "blue"), shapes=("circle", "square"), name_boxes=True)
TINY_PROMPT = "USER: <image> {question} ASSISTANT:"
LLAVA_PROMPT = "USER: <image>\n{question} ASSISTANT:"  # Vicuna v1, LLaVA-1.5's conversation format
FORMAT_VERSION = 1   # bump when the tiny backbone's recipe changes, so old caches are not reused


TINY_DIR = Path(__file__).resolve().parent / "tiny-backbone"   # the shipped tiny backbone


def cache_root() -> Path:
    """Where derived files live (the feature cache, a Flower node's state): $PILOT_CACHE, default
    ~/.cache/pilot-fedmit."""
    return Path(os.environ.get("PILOT_CACHE") or Path.home() / ".cache" / "pilot-fedmit")


# ----------------------------------------------------------------------------- the tiny backbone
def tiny_tokenizer():
    """Word-level tokenizer: words carry a leading '▁' (Metaspace), digits and punctuation are
    single tokens, so numbers and boxes are spelled digit by digit and decode back exactly."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    vocab = specials + ["▁"] + ["▁" + w for w in data.VOCAB_WORDS] + data.VOCAB_SYMBOLS
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace("\n", " ")   # LLaVA prompts put a newline after <image>
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        pre_tokenizers.Split(Regex(r"[0-9]|[^\w▁]"), behavior="isolated")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


def tiny_model(tokenizer, seed):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    t = TINY
    vision = CLIPVisionConfig(hidden_size=t["vision_hidden"], intermediate_size=4 * t["vision_hidden"],
                              num_hidden_layers=t["vision_layers"], num_attention_heads=t["vision_heads"],
                              image_size=t["image_size"], patch_size=t["patch_size"], projection_dim=t["vision_hidden"])
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=t["text_hidden"], intermediate_size=t["text_intermediate"],
                       num_hidden_layers=t["text_layers"], num_attention_heads=t["text_heads"],
                       num_key_value_heads=t["text_heads"], max_position_embeddings=t["max_positions"],
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    n_tokens = (t["image_size"] // t["patch_size"]) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=n_tokens, vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)


def tiny_image_processor():
    # The PIL backend on purpose: the synthetic images are already at the model's resolution, and
    # it needs only Pillow (the torchvision backend would pull in torchvision).
    from transformers import CLIPImageProcessorPil
    s = TINY["image_size"]
    return CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})


def tiny_recipe() -> dict:
    """What the tiny backbone is built from: its shape, pretraining, prompt and vocabulary."""
    return {"tiny": TINY, "pretrain": PRETRAIN, "prompt": TINY_PROMPT, "vocab": data.VOCAB_WORDS,
            "version": FORMAT_VERSION}


def tiny_backbone_key() -> str:
    """'tiny-<hash of its recipe>', the cached tiny backbone's directory name: another recipe is
    another backbone, cached and checkpointed apart."""
    return "tiny-" + hashlib.sha256(json.dumps(tiny_recipe(), sort_keys=True).encode()).hexdigest()[:12]


def tiny_backbone_dir(log=print) -> Path:
    """The shipped tiny backbone's directory, after checking that it was built from this recipe."""
    meta = TINY_DIR / "pilot_backbone.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{TINY_DIR}: the tiny backbone is missing; rebuild it with "
                                f"'python backbone.py --build {TINY_DIR.name}'")
    built = json.loads(meta.read_text()).get("key")
    if not (TINY_DIR / "model.safetensors").is_file():   # e.g. a Flower App Bundle, which carries no weights
        raise FileNotFoundError(f"{TINY_DIR}/model.safetensors is missing: name the tiny backbone by the path of a "
                                f"checkout's tiny-backbone directory (--backbone /path/to/pilot-fedmit/tiny-backbone)")
    if built != tiny_backbone_key():
        raise ValueError(f"{TINY_DIR} holds the tiny backbone {built}, but backbone.py's recipe is "
                         f"{tiny_backbone_key()}: rebuild it with 'python backbone.py --build {TINY_DIR.name}'")
    return TINY_DIR


def build_tiny(path, log=print) -> Path:
    """Build and pretrain the tiny backbone from its recipe (TINY, PRETRAIN) into path. Written to a
    temporary directory beside it and renamed into place, so a crash never leaves half a backbone.
    Deterministic: the same machine writes the same bytes."""
    path = Path(path).resolve()
    t0 = time.time()
    log(f"building the tiny backbone {tiny_backbone_key()} in {path}")
    tokenizer, processor = tiny_tokenizer(), tiny_image_processor()
    model = tiny_model(tokenizer, PRETRAIN["seed"])
    bb = Backbone(model, tokenizer, processor, "tiny", TINY_PROMPT)
    stats = pretrain(bb, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    # no build time here: a rebuild on the same machine writes the same bytes in every file
    meta = {"key": tiny_backbone_key(), "prompt": TINY_PROMPT, "recipe": tiny_recipe(), "pretrain_stats": stats,
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "model_sha256": hashlib.sha256((tmp / "model.safetensors").read_bytes()).hexdigest()}
    (tmp / "pilot_backbone.json").write_text(json.dumps(meta, indent=1) + "\n")
    for f in [tmp, *tmp.iterdir()]:
        f.chmod(0o755 if f.is_dir() else 0o644)
    if path.exists():
        shutil.rmtree(path)
    os.rename(tmp, path)
    log(f"tiny backbone built in {path} ({meta['n_parameters']:,} parameters, {time.time() - t0:.0f} s)")
    return path


def dense_targets(sample, grid):
    """Per-patch targets of what is drawn in a pretraining image (its extra 'objects' and 'text'):
    indices per patch into the (colour, shape, size) classes of the object whose centre falls in it
    (-1: none), that object's centre offset in the patch and half-extent (patch units), and the
    digit whose centre falls in it (-1: none). The first object or digit in a patch wins."""
    S, n = data.IMAGE_SIZE, grid * grid
    cls, geo, digit = torch.full((n, 3), -1), torch.zeros(n, 3), torch.full((n,), -1)
    cell = lambda x, y: min(grid - 1, int(y * grid / S)) * grid + min(grid - 1, int(x * grid / S))
    for o in sample.extra["objects"]:
        k = cell(o.cx, o.cy)
        if cls[k, 0] < 0:
            cls[k] = torch.tensor([list(data.COLOURS).index(o.colour), data.SHAPES.index(o.shape),
                                   list(data.SIZES).index(o.size)])
            geo[k] = torch.tensor([o.cx * grid / S % 1, o.cy * grid / S % 1, o.r * grid / S])
    if sample.extra["text"] is not None:
        digits, _, x0, y0, px = sample.extra["text"]
        for i, d in enumerate(digits):
            k = cell(x0 + (4 * i + 1.5) * px, y0 + 2.5 * px)
            if digit[k] < 0:
                digit[k] = int(d)
    return cls, geo, digit


def pretrain_vision(model, corpus, pixels, log=print):
    """[reading] not in the paper, a recipe of the embedded backbone only: before the LLaVA
    alignment, the vision tower alone learns, patch by patch, what is drawn there (object colour,
    shape, size, centre and extent; digits), read by a linear head from the layer LLaVA uses. At
    32x32 pixels the alignment alone leaves the shape of a small object unreadable in H_v
    (RESULTS.md, the calibration); a dense objective is the cheap way to put it there (the vision tower
    is a small part of the model's compute). The head is thrown away."""
    p = PRETRAIN
    tower = model.model.vision_tower
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    cls, geo, digit = map(torch.stack, zip(*[dense_targets(s, grid) for s in corpus]))
    cls[..., 0][cls[..., 0] < 0] = len(data.COLOURS)      # colour head: one more class, "no object here"
    digit[digit < 0] = 10                                  # digit head: likewise
    sizes = (len(data.COLOURS) + 1, len(data.SHAPES), len(data.SIZES))
    head = torch.nn.Linear(model.config.vision_config.hidden_size, sum(sizes) + 3 + 11)
    params = list(tower.parameters()) + list(head.parameters())
    # foreach, as in run.client_round: the same weights bit for bit, fewer calls per step
    opt = torch.optim.AdamW(params, lr=p["lr"], weight_decay=0.0, foreach=True)
    sched = cosine_schedule(opt, p["vision_steps"], p["warmup"])
    g = torch.Generator().manual_seed(p["seed"] + 1)
    tower.train()
    def ce(logits, y):   # cross-entropy over the patches that have a target (shape, size: -1 where no object)
        return torch.nn.functional.cross_entropy(logits[y >= 0], y[y >= 0]) if (y >= 0).any() else logits.sum() * 0
    for step in range(p["vision_steps"]):
        idx = torch.randint(len(corpus), (p["batch_size"],), generator=g)
        out = head(pilot.image_features(model, pixels[idx], grad=True))     # [B, grid*grid, heads]
        c, y, gt, d = out.flatten(0, 1), cls[idx].flatten(0, 1), geo[idx].flatten(0, 1), digit[idx].flatten(0, 1)
        parts = c[:, :sum(sizes)].split(sizes, 1)
        has = y[:, 0] < len(data.COLOURS)   # never empty: every pretraining image has an object
        loss = sum(ce(part, y[:, j]) for j, part in enumerate(parts)) + ce(c[:, -11:], d)
        # x10: the geometry (patch units) errs by tenths, so its squared error would count for little
        loss = loss + torch.nn.functional.mse_loss(c[has, sum(sizes):sum(sizes) + 3], gt[has]) * 10
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        sched.step()
        if step % 500 == 0 or step == p["vision_steps"] - 1:
            log(f"vision pretraining step {step}: loss {loss.item():.3f}")


def pretrain(bb, log=print):
    """Full-parameter training of the tiny LLaVA on the neutral describe-the-objects corpus."""
    p = PRETRAIN
    corpus = data.pretraining_corpus(p["n_samples"], p["seed"], p["colours"], p["shapes"])
    pixels = bb.pixels([s.image for s in corpus])
    seen = data.pretraining_corpus(p["n_samples"], p["seed"])   # the vision tower sees every colour and shape
    pretrain_vision(bb.model, seen, bb.pixels([s.image for s in seen]), log)
    items = [bb.encode(s)[0] for s in corpus]
    model = bb.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=0.0, foreach=True)
    steps = p["epochs"] * math.ceil(len(corpus) / p["batch_size"])
    sched = cosine_schedule(opt, steps, p["warmup"])
    g = torch.Generator().manual_seed(p["seed"])
    losses = []
    for _ in range(p["epochs"]):
        for idx in torch.randperm(len(corpus), generator=g).split(p["batch_size"]):
            h_v = pilot.image_features(model, pixels[idx], grad=True)
            x_img = model.model.multi_modal_projector(h_v)
            ids, mask, labels = collate([items[i] for i in idx], bb.tokenizer.pad_token_id)
            loss = pilot.lm_loss(model, x_img, ids, mask, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    log(f"pretrained {steps} steps, loss {losses[0]:.3f} -> {sum(losses[-20:]) / 20:.3f}")
    model.eval()
    return {"steps": steps, "loss_first": losses[0], "loss_last20": sum(losses[-20:]) / 20}


def cosine_schedule(opt, total_steps, warmup_steps, offset=0):
    """Linear warm-up, then cosine decay to zero (the paper's schedule). offset: the steps already
    taken, so that a schedule over a whole federated run continues across rounds."""
    def f(step):
        step += offset
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))))
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


# ----------------------------------------------------------------------------- loading any LLaVA
@dataclass
class Backbone:
    model: object
    tokenizer: object
    image_processor: object
    name: str
    prompt: str

    @property
    def n_image_tokens(self):
        vc = self.model.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        return n if self.model.config.vision_feature_select_strategy == "default" else n + 1

    @property
    def dims(self):
        """(C_v, C): the connector's input and output widths, from the checkpoint's config."""
        return self.model.config.vision_config.hidden_size, self.model.config.text_config.hidden_size

    def pixels(self, images):
        """Images through the backbone's own image processor: float tensors [3, S, S] in [0, 1]
        (synthetic), or RGB PIL images or image file paths (real data, read with Pillow)."""
        if all(isinstance(im, torch.Tensor) for im in images):
            out = self.image_processor(images=list(images), return_tensors="pt", do_rescale=False)
        else:
            out = self.image_processor(images=[llava.open_image(im) if isinstance(im, (str, Path)) else im
                                               for im in images], return_tensors="pt")
        return out["pixel_values"]

    def encode(self, sample, max_length=None):
        """(segments, truncated): the sample as token ids in alternating segments, prompt, answer,
        prompt, answer, ... (one pair per turn; answers end in EOS), and whether it was shortened to
        max_length. The first prompt holds BOS, the template and the image placeholder expanded to
        the image tokens; a later turn's prompt is the template's user and assistant parts around its
        question, without the image (LLaVA-1.5's conversation format: every answer closed by EOS, the
        next turn after it). Past max_length, later turns are dropped whole, then the first question
        is cut: never an answer, the image tokens or the template."""
        pre, rest = self.prompt.split("<image>")
        mid, post = rest.split("{question}")
        tok = lambda s: self.tokenizer(s, add_special_tokens=False)["input_ids"] if s.strip() else []
        head = [self.tokenizer.bos_token_id] + tok(pre) + [self.model.config.image_token_id] * self.n_image_tokens
        question, tail = tok(mid + sample.question), tok(post)
        answer = lambda a: tok(a) + [self.tokenizer.eos_token_id]
        first = answer(sample.answer)
        room = (max_length or 1 << 30) - len(head) - len(tail) - len(first)
        if room < 0:
            raise ValueError(f"sample {sample.id!r}: its answer ({len(first)} tokens) with the image and the "
                             f"template ({len(head) + len(tail)} tokens) exceeds the maximum length {max_length}")
        segments, used = [head + question[:room] + tail, first], len(head) + len(question[:room]) + len(tail) + len(first)
        for q, a in sample.more:
            turn = [tok(pre) + tok(q) + tail, answer(a)]
            if used + len(turn[0]) + len(turn[1]) > (max_length or 1 << 30):
                return segments, True
            segments += turn
            used += len(turn[0]) + len(turn[1])
        return segments, len(question) > room


def collate(items, pad_id):
    """Right-padded training batch: (input_ids, attention_mask, labels). Each item is its segments
    (prompt, answer, prompt, answer, ...): labels hold the answers' tokens, -100 everywhere else."""
    n = max(sum(len(seg) for seg in item) for item in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    labels = torch.full((len(items), n), -100, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for i, item in enumerate(items):
        at = 0
        for j, seg in enumerate(item):
            ids[i, at:at + len(seg)] = torch.tensor(seg, dtype=torch.long)
            if j % 2:
                labels[i, at:at + len(seg)] = ids[i, at:at + len(seg)]
            at += len(seg)
        mask[i, :at] = 1
    return ids, mask, labels


def collate_prompts(prompts, pad_id):
    """Left-padded prompts for generation: (input_ids, attention_mask)."""
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):] = torch.tensor(p)
        mask[i, n - len(p):] = 1
    return ids, mask


def chat_prompt(path, tokenizer):
    """The prompt template from the checkpoint's chat template when it has one (LLaVA-1.5's is the
    Vicuna v1 format), else LLaVA-1.5's format written out."""
    try:
        from transformers import AutoProcessor
        proc = AutoProcessor.from_pretrained(path)
    except Exception:  # a checkpoint without a processor config: use the tokenizer's template
        proc = tokenizer
    if getattr(proc, "chat_template", None):
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "{question}"}]}]
        text = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        if text.count("<image>") == 1 and text.count("{question}") == 1:
            bos = tokenizer.bos_token or ""
            return (text[len(bos):] if bos and text.startswith(bos) else text).strip()
    return LLAVA_PROMPT


def load_backbone(name="tiny", device="cpu", dtype=torch.float32, log=print) -> Backbone:
    """'tiny' (built and cached on first use) or a directory / hub id of a LLaVA checkpoint in
    Hugging Face format; the same from_pretrained path serves both. Everything is frozen here."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration
    path = tiny_backbone_dir(log) if name == "tiny" else name
    if name != "tiny" and Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise ValueError(f"--backbone {path}: no config.json there; expected a LLaVA checkpoint in Hugging Face format")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # The PIL backend on purpose (it needs only Pillow); the torchvision one would add torchvision.
    processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    meta = Path(path) / "pilot_backbone.json"
    prompt = json.loads(meta.read_text())["prompt"] if meta.exists() else chat_prompt(path, tokenizer)
    return Backbone(model, tokenizer, processor, str(name), prompt)


if __name__ == "__main__":
    import argparse
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    ap = argparse.ArgumentParser(description="Check the shipped tiny backbone against its recipe, or rebuild it.")
    ap.add_argument("--build", metavar="DIR", help="build the tiny backbone from its recipe into DIR "
                    f"(the shipped one: {TINY_DIR.name})")
    args = ap.parse_args()
    path = build_tiny(args.build) if args.build else tiny_backbone_dir()
    print(f"{path}: the tiny backbone {tiny_backbone_key()}")
