"""
The LLaVA backbone: any LLaVA checkpoint in Hugging Face format, or the embedded "tiny" one shipped in
tiny-backbone/, loaded the same way (load_backbone); plus prompt encoding and batching.

    load_backbone("tiny")                          # the shipped tiny backbone, checked against its recipe
    load_backbone("llava-hf/llava-1.5-7b-hf")      # a directory, or a hub id already in the local cache

A checkpoint is checked before it is loaded (its config, tokenizer, image processor and safetensors
weights), and a broken one is a BackboneError naming what is missing or damaged; nothing is
downloaded unless asked (--allow-download). H_v follows the checkpoint's config (its feature layers
and whether the class token is kept), and the number of image tokens is read off one image.

The tiny backbone's recipe is written here (TINY, PRETRAIN, its prompt and vocabulary, hashed into
tiny_backbone_key), so that loading can refuse files of another recipe; tiny.py builds it. The shipped
files are the benchmark's instrument: every run loads them, nothing is built at run time.
"""
import functools
import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

import data
import llava
import pilot

TINY = dict(  # the embedded backbone; about 0.6M parameters
    image_size=data.IMAGE_SIZE, patch_size=8, vision_hidden=64, vision_layers=3, vision_heads=4,
    text_hidden=128, text_layers=2, text_heads=4, text_intermediate=256, max_positions=160)
# The recipe (RESULTS.md, "How the benchmark was calibrated", says why each part; tiny.py builds it): vision_steps of
# dense vision pretraining first (pretrain_vision), on every colour and shape; then the alignment on
# data.pretraining_corpus, which draws and names only these colours and shapes, so that the other two
# colours and two shapes are learnt from the clients' data, and names each object's box (name_boxes).
# Any change here changes tiny_backbone_key, and the shipped files must be rebuilt.
PRETRAIN = dict(n_samples=8000, epochs=4, batch_size=32, lr=1e-3, warmup=50, seed=0,
                vision_steps=2000, colours=("red", "green", "blue"), shapes=("circle", "square"), name_boxes=True)
TINY_PROMPT = "USER: <image> {question} ASSISTANT:"
LLAVA_PROMPT = "USER: <image>\n{question} ASSISTANT:"  # Vicuna v1, LLaVA-1.5's conversation format
FORMAT_VERSION = 1   # part of the recipe key: bump it to make a change outside the recipe's fields a new backbone


TINY_DIR = Path(__file__).resolve().parent / "tiny-backbone"   # the shipped tiny backbone


def cache_root() -> Path:
    """Where derived files live (the feature cache, a Flower node's private state): $PILOT_CACHE,
    default ~/.cache/pilot-fedmit. The tiny backbone is not among them: it ships in tiny-backbone/."""
    return Path(os.environ.get("PILOT_CACHE") or Path.home() / ".cache" / "pilot-fedmit")


# ----------------------------------------------------------------------------- the tiny backbone
def tiny_recipe() -> dict:
    """What the tiny backbone is built from: its shape, pretraining, prompt and vocabulary."""
    return {"tiny": TINY, "pretrain": PRETRAIN, "prompt": TINY_PROMPT, "vocab": data.VOCAB_WORDS,
            "version": FORMAT_VERSION}


def tiny_backbone_key() -> str:
    """'tiny-<hash of its recipe>', recorded in the shipped files' pilot_backbone.json and in every
    checkpoint of a run on 'tiny': another recipe is another backbone, which loading and --resume
    refuse."""
    return "tiny-" + hashlib.sha256(json.dumps(tiny_recipe(), sort_keys=True).encode()).hexdigest()[:12]


def tiny_backbone_dir(log=print) -> Path:
    """The shipped tiny backbone's directory, after checking that it was built from this recipe."""
    meta = TINY_DIR / "pilot_backbone.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{TINY_DIR}: the tiny backbone is missing; rebuild it with "
                                f"'python tiny.py --build {TINY_DIR.name}'")
    built = json.loads(meta.read_text()).get("key")
    if not (TINY_DIR / "model.safetensors").is_file():   # e.g. a Flower App Bundle, which carries no weights
        raise FileNotFoundError(f"{TINY_DIR}/model.safetensors is missing: name the tiny backbone by the path of a "
                                f"checkout's tiny-backbone directory (--backbone /path/to/pilot-fedmit/tiny-backbone)")
    if built != tiny_backbone_key():
        raise ValueError(f"{TINY_DIR} holds the tiny backbone {built}, but backbone.py's recipe is "
                         f"{tiny_backbone_key()}: rebuild it with 'python tiny.py --build {TINY_DIR.name}'")
    return TINY_DIR


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
class BackboneError(ValueError):
    """A --backbone that cannot be loaded (missing, not in the local cache, incomplete or damaged);
    the message names what is missing or damaged."""


@dataclass
class Backbone:
    model: object
    tokenizer: object
    image_processor: object
    name: str
    prompt: str

    @functools.cached_property
    def feature_shape(self):
        """(N, C_v): the image tokens and width of H_v as this checkpoint and its processor give them
        (the vision tower's patches, the class token kept or dropped, the feature layers), read off
        one image, so that any tower, resolution and selection is counted as it is."""
        from PIL import Image
        with torch.no_grad():
            h = pilot.image_features(self.model, self.pixels([Image.new("RGB", (32, 32), (128, 128, 128))])
                                     .to(self.model.device))
        return h.shape[1], h.shape[2]

    @property
    def n_image_tokens(self):
        return self.feature_shape[0]

    @property
    def dims(self):
        """(C_v, C): the connector's input and output widths."""
        return self.feature_shape[1], self.model.config.text_config.hidden_size

    @property
    def pad_id(self):
        """The padding token, the end-of-sequence token for a tokenizer without one (as Qwen2's)."""
        t = self.tokenizer
        return t.pad_token_id if t.pad_token_id is not None else t.eos_token_id

    def square(self, image):
        """[reading] A real image padded to a square around its centre with the processor's mean colour
        (LLaVA-1.5 trains with this padding, and so the whole image reaches the vision tower whatever
        the processor's crop); a box normalised to this square (prepare.py) is in the frame the model
        sees. A square image is left as it is."""
        from PIL import Image
        w, h = image.size
        if w == h:
            return image
        mean = getattr(self.image_processor, "image_mean", None) or (0.0, 0.0, 0.0)
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), tuple(int(x * 255) for x in mean))
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        return canvas

    def pixels(self, images):
        """Images through the backbone's own image processor: float tensors [3, S, S] in [0, 1]
        (synthetic), or RGB PIL images or image file paths (real data, read with Pillow and padded
        to a square)."""
        if all(isinstance(im, torch.Tensor) for im in images):
            out = self.image_processor(images=list(images), return_tensors="pt", do_rescale=False)
        else:
            out = self.image_processor(images=[self.square(llava.open_image(im) if isinstance(im, (str, Path)) else im)
                                               for im in images], return_tensors="pt")
        return out["pixel_values"]

    def encode(self, sample, max_length=None):
        """(segments, truncated): the sample as token ids in alternating segments, prompt, answer,
        prompt, answer, ... (one pair per turn; answers end in EOS), and whether it was shortened to
        max_length. The first prompt holds BOS (when the tokenizer has one), the template and the
        image placeholder expanded to the image tokens; a later turn's prompt is the template's user
        and assistant parts around its question, without the image (LLaVA-1.5's conversation format:
        every answer closed by EOS, the next turn after it). Past max_length, later turns are dropped
        whole, then the first question is cut: never an answer, the image tokens or the template."""
        pre, rest = self.prompt.split("<image>")
        mid, post = rest.split("{question}")
        tok = lambda s: self.tokenizer(s, add_special_tokens=False)["input_ids"] if s.strip() else []
        bos = [] if self.tokenizer.bos_token_id is None else [self.tokenizer.bos_token_id]
        head = bos + tok(pre) + [self.model.config.image_token_id] * self.n_image_tokens
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
        proc = AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception:  # a checkpoint without a processor config: use the tokenizer's template
        proc = tokenizer
    if getattr(proc, "chat_template", None):
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "{question}"}]}]
        text = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        if text.count("<image>") == 1 and text.count("{question}") == 1:
            bos = tokenizer.bos_token or ""
            return (text[len(bos):] if bos and text.startswith(bos) else text).strip()
    return LLAVA_PROMPT


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def checkpoint_dir(name, allow_download=False) -> Path:
    """The local directory of --backbone: the directory itself, or a hub id's snapshot in the local
    Hugging Face cache. Nothing is downloaded unless allow_download."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise BackboneError(f"--backbone {name}: not a directory")
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise BackboneError(f"--backbone {name}: no such directory")
    from huggingface_hub import constants, snapshot_download
    try:
        return Path(snapshot_download(name, local_files_only=not allow_download))
    except Exception as e:          # not cached, not a valid id, or (with allow_download) the hub's answer
        if allow_download:
            raise BackboneError(f"--backbone {name}: could not be downloaded ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
        raise BackboneError(f"--backbone {name}: no such directory, and no hub id {name!r} in the local Hugging Face "
                            f"cache ({constants.HF_HUB_CACHE}); nothing is downloaded unless --allow-download is given") from None


def check_checkpoint(path: Path, name=None):
    """Raise a BackboneError naming what a checkpoint directory lacks or what is damaged in it: its
    config, tokenizer files, image processor config, or safetensors weights (a truncated file, a
    damaged header, a shard the index names but the directory lacks). Weights are read as safetensors
    only: a .bin checkpoint is a pickle, which this project never loads."""
    where = f"--backbone {name or path}"
    if not (path / "config.json").is_file():
        raise BackboneError(f"{where}: no config.json there; expected a LLaVA checkpoint in Hugging Face format")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise BackboneError(f"{where}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {path}")
    if not any((path / f).is_file() for f in PROCESSOR_FILES):
        raise BackboneError(f"{where}: no image processor config ({PROCESSOR_FILES[0]}) in {path}")
    index = path / "model.safetensors.index.json"
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
            [f.name for f in sorted(path.glob("*.safetensors"))]
    except (ValueError, KeyError, AttributeError) as e:
        raise BackboneError(f"{where}: {index.name} is damaged ({type(e).__name__}: {e})") from None
    if not files:
        raise BackboneError(f"{where}: no *.safetensors weights in {path} (.bin weights are pickles: not loaded)")
    for name_ in files:
        f = path / name_
        if not f.is_file():
            raise BackboneError(f"{where}: {name_} is missing (named by {index.name})")
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > size:
                    raise ValueError(f"a header of {n} bytes")
                header = json.loads(fh.read(n))
            end = 8 + n + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (struct.error, ValueError, KeyError, TypeError, AttributeError) as e:
            raise BackboneError(f"{where}: {name_} is not a readable safetensors file ({type(e).__name__}: {e})") from None
        if size < end:
            raise BackboneError(f"{where}: {name_} is truncated ({size:,} bytes, its header needs {end:,})")


def load_backbone(name="tiny", device="cpu", dtype=torch.float32, log=print, allow_download=False) -> Backbone:
    """'tiny' (the shipped tiny-backbone/ directory, checked against its recipe) or a directory /
    hub id of a LLaVA checkpoint in Hugging Face format; the same from_pretrained path serves both.
    A checkpoint is checked before loading (check_checkpoint), and nothing is downloaded unless
    allow_download. Everything is frozen here."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration
    path = tiny_backbone_dir(log) if name == "tiny" else checkpoint_dir(name, allow_download)
    check_checkpoint(Path(path), name)
    try:
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=True).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # The PIL backend on purpose (it needs only Pillow); the torchvision one would add torchvision.
        processor = AutoImageProcessor.from_pretrained(path, backend="pil", local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        raise BackboneError(f"--backbone {name}: could not be loaded from {path} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
    model.requires_grad_(False)
    meta = Path(path) / "pilot_backbone.json"
    prompt = json.loads(meta.read_text())["prompt"] if meta.exists() else chat_prompt(path, tokenizer)
    return Backbone(model, tokenizer, processor, str(name), prompt)
