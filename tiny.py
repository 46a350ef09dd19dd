"""
The embedded tiny backbone, built from its recipe (backbone.TINY, backbone.PRETRAIN): a real
LlavaForConditionalGeneration (a small CLIP vision tower, a small Llama, the LLaVA-1.5 two-layer
projector), a word-level tokenizer over the synthetic world's vocabulary and a CLIP image processor,
pretrained briefly and deterministically so that the frozen parts mean something.

    python tiny.py                         # check the shipped tiny-backbone/ against its recipe
    python tiny.py --build tiny-backbone   # rebuild it from its recipe (about 2.5 min on 2 cores)

Every run loads the shipped files (backbone.load_backbone("tiny")); nothing here runs at run time.
The recipe: the vision tower alone on a dense per-patch objective (pretrain_vision), then the whole
model on data.pretraining_corpus, a neutral "describe the objects" set disjoint from every client's
data. A rebuild is deterministic on one machine (the same bytes); another machine's arithmetic may
round differently, which is why the shipped files, not the recipe, define the benchmark.
"""
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

import data
import pilot
from backbone import PRETRAIN, TINY, TINY_DIR, TINY_PROMPT, Backbone, collate, cosine_schedule, tiny_backbone_dir, \
    tiny_backbone_key, tiny_recipe


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
    # foreach, as in client.client_round: the same weights bit for bit, fewer calls per step
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
            ids, mask, labels = collate([items[i] for i in idx], bb.pad_id)
            loss = pilot.lm_loss(model, x_img, ids, mask, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    log(f"pretrained {steps} steps, loss {losses[0]:.3f} -> {sum(losses[-20:]) / 20:.3f}")
    model.eval()
    return {"steps": steps, "loss_first": losses[0], "loss_last20": sum(losses[-20:]) / 20}


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
