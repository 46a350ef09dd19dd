"""
The whole loop at LLaVA-1.5-7B's widths, rehearsed on the CPU with nothing downloaded, and what a
real run costs, extrapolated from what the rehearsal measures.

    python bench.py --rehearse --out DIR        # DIR/rehearsal.json and the cost table (about 10 min, 2 cores)

The model is a random-weight LlavaForConditionalGeneration with LLaVA-1.5-7B's widths (CLIP ViT-L/14
at 336 px: width 1024, 576 image tokens; Vicuna-7B: width 4096, MLP 11008, 32 heads, the 32,064-token
vocabulary of llava-hf/llava-1.5-7b-hf) and LAYERS layers each instead of 24 and 32, saved as a
checkpoint directory. Three clients (a caption, a VQA and a grounding client) come from small
official-layout fixtures through prepare.py. Then, with the paper's recipe (LoRA r 64, a checkpoint
after every client, the dtype the real preset takes on this CPU) and one optimiser step per round:
the features, a stage-1 and a stage-2 round (CT-MoA, ATA), the final evaluation (generation,
scoring). That run is measured in this process; the same run is then started in a subprocess,
SIGKILLed after its first stage-2 client and resumed, and must end with the same tensors and
predictions. Streamed features are compared with cached ones bit for bit at this width, and bf16
with fp32 on this CPU (a matrix product and a training step).
"""
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

LAYERS = {"vision": 2, "text": 2}
VOCAB = 32064
REAL = dict(layers_vision=24, layers_text=32, n_train=5000, n_test=500, rounds=4, tokens=640, utilisation=0.25,
            peak_tflops=989.0)   # prepare.py's defaults, the paper's R = 1 + 3, an H100's dense bf16 rate


# ----------------------------------------------------------------------------- the model and the data
def llava7b_widths(layers_vision, layers_text, vocab=VOCAB, image_token=32000):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers_vision,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                              hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers_text,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token, image_seq_length=576,
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def tokenizer():
    """A word-level tokenizer of VOCAB entries: the tiny backbone's words, the image token at 32000 as
    in llava-hf's, and filler words, so that every id the random LM head can emit decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    import data
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [w for w in data.VOCAB_WORDS] + list("0123456789[],.?:;")
    words += ["Answer", "question", "using", "single", "word", "phrase", "Provide", "one-sentence", "caption",
              "provided", "Please", "provide", "bounding", "box", "coordinate", "region", "sentence", "describes"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    vocab.update({f"w{i}": i for i in range(len(vocab), 32000)})
    vocab["<image>"] = 32000
    vocab.update({f"x{i}": i for i in range(32001, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


def build_checkpoint(path: Path):
    """The random-weight model at 7B widths, saved in bf16 with its tokenizer and CLIP 336 processor."""
    from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(llava7b_widths(LAYERS["vision"], LAYERS["text"]))
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer().save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def write_fixtures(root: Path, n=4):
    """COCO, VQAv2 and RefCOCO in their official layouts, n images a split at COCO's sizes: enough for
    prepare.py to give each client a few records."""
    import pickle
    from PIL import Image
    cats = [{"id": 1, "name": "person", "supercategory": "person"}, {"id": 18, "name": "dog", "supercategory": "animal"}]
    (root / "coco" / "annotations").mkdir(parents=True)
    for split, year, base in (("train", 2017, 1), ("val", 2017, 101), ("train", 2014, 201), ("val", 2014, 301)):
        images, anns = [], []
        for i in range(base, base + 2 * n):
            name = f"COCO_{split}{year}_{i:012d}.jpg" if year == 2014 else f"{i:012d}.jpg"
            size = (640, 480) if i % 2 else (480, 640)
            (root / "coco" / f"{split}{year}").mkdir(exist_ok=True)
            Image.new("RGB", size, (i * 37 % 255, 120, 60)).save(root / "coco" / f"{split}{year}" / name)
            images.append({"id": i, "file_name": name, "width": size[0], "height": size[1]})
            anns.append({"id": i, "image_id": i, "category_id": 1 if i % 2 else 18, "area": 900.0,
                         "bbox": [40.0, 60.0, 200.0, 150.0]})
        instances = {"images": images, "annotations": anns, "categories": cats}
        (root / "coco" / "annotations" / f"instances_{split}{year}.json").write_text(json.dumps(instances))
        if year == 2017:
            caps = [{"id": 10 * i + j, "image_id": i, "caption": f"A dog sits on a mat {j}."} for i in range(base, base + 2 * n)
                    for j in range(5)]
            (root / "coco" / "annotations" / f"captions_{split}2017.json").write_text(json.dumps({"annotations": caps}))
        elif split == "train":
            (root / "refcoco").mkdir()
            (root / "refcoco" / "instances.json").write_text(json.dumps(instances))
            refs = [{"ref_id": i, "ann_id": i, "image_id": i, "split": "train" if i < base + n + 2 else "val",
                     "sentences": [{"sent": "the dog on the left"}]} for i in range(base, base + 2 * n)]
            (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
        if year == 2014:
            (root / "vqav2").mkdir(exist_ok=True)
            qs = [{"question_id": i, "image_id": i, "question": "What color is the dog?"} for i in range(base, base + 2 * n)]
            answers = [{"question_id": i, "multiple_choice_answer": "brown",
                        "answers": [{"answer": a} for a in ["brown"] * 6 + ["tan"] * 4]} for i in range(base, base + 2 * n)]
            (root / "vqav2" / f"v2_OpenEnded_mscoco_{split}2014_questions.json").write_text(json.dumps({"questions": qs}))
            (root / "vqav2" / f"v2_mscoco_{split}2014_annotations.json").write_text(json.dumps({"annotations": answers}))


# ----------------------------------------------------------------------------- measuring
class Timer:
    """Wall seconds and calls per component, and the bytes of each checkpoint write."""

    def __init__(self):
        self.seconds, self.calls, self.writes = {}, {}, []

    def wrap(self, owner, name, key):
        fn = getattr(owner, name)

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t
                self.calls[key] = self.calls.get(key, 0) + 1
                if key.startswith("checkpoint"):
                    meta = json.loads((a[0] / "state.json").read_text())
                    entry = meta["round_file"] if key == "checkpoint_round" else meta["turns"][str(a[2])]
                    self.writes.append({"kind": key.split("_")[1], "bytes": entry["size"],
                                        "seconds": round(time.perf_counter() - t, 3),
                                        "whole_state_bytes": meta["round_file"]["size"] +
                                        sum(x["size"] for x in meta["turns"].values())})
        setattr(owner, name, timed)
        return lambda: setattr(owner, name, fn)


def matmul_rates():
    """GFLOP/s of a [576 x 4096] x [4096 x 4096] product on this CPU in fp32 and in bf16."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(576, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
        a @ b
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        out[name] = round(3 * 2 * 576 * 4096 * 4096 / (time.perf_counter() - t) / 1e9, 1)
    return out


def step_seconds(settings):
    """Seconds of one training step of a VQA client at these widths with fp32 and with bf16 frozen
    weights (the second of two steps, so that the first's one-off costs are left out)."""
    import features
    from client import client_round
    from config import Config
    from federation import load_clients, load_model
    out = {}
    for dtype in ("fp32", "bf16"):
        cfg = Config(**dict(settings, clients=[2], local_steps=1, features="memory"), dtype=dtype)
        bb, theta0, _ = load_model(cfg, log=lambda *a: None)
        ct = features.prepare_client(bb, load_clients(cfg)[1][0], "cpu", mode="memory", log=lambda *a: None)
        for _ in range(2):
            t = time.perf_counter()
            client_round(bb, ct, dict(theta0), {}, 1, ["vqa"], cfg, 0, log_bar=False)
            out[dtype] = round(time.perf_counter() - t, 1)
        del bb, ct
    return out


def killed_and_resumed(argv, out: Path, log):
    """Run argv in a subprocess, SIGKILL it when its first stage-2 client's turn is committed, run it
    again with --resume; returns (what the kill hit, the resumed run's results)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    hit = None
    while proc.poll() is None:
        try:
            p = json.loads((out / "state.json").read_text())["progress"]
        except (OSError, ValueError, KeyError):
            p = None
        if p and p["round"] == 1 and len(p["done"]) == 1:
            proc.send_signal(signal.SIGKILL)
            hit = dict(p, fleet=None, ata=None)
            break
        time.sleep(0.05)
    proc.wait()
    log(f"killed at round {hit and hit['round'] + 1}, clients done {hit and hit['done']}; resuming")
    r = subprocess.run(argv + ["--resume"], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"the resumed run failed: {r.stderr[-2000:]}")
    return hit, json.loads((out / "results.json").read_text()), r.stdout


# ----------------------------------------------------------------------------- the rehearsal
def rehearse(out: Path, log=print):
    import checkpoint
    import evaluate
    import features
    import llava
    import prepare
    import report
    import run
    import server
    from config import Config
    from federation import load_model
    from safetensors.torch import load_file
    t0, res = time.time(), {"layers": LAYERS}
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PILOT_CACHE", str(out / "cache"))
    ckpt = out / "llava-7b-widths"
    t = time.time()
    if not (ckpt / "model.safetensors").is_file():
        res["parameters"] = build_checkpoint(ckpt)
    res["seconds"] = {"build_checkpoint": round(time.time() - t, 1)}
    data_dir = out / "data"
    if not (data_dir / "manifest.json").is_file():
        write_fixtures(out / "official")
        prepare.prepare("A", data_dir, out / "official" / "coco", out / "official" / "vqav2", out / "official" / "refcoco",
                        n_train=2, n_test=1, log=log)
    settings = dict(backbone=str(ckpt), data=str(data_dir / "manifest.json"), clients=[0, 2, 4], rounds_stage1=1,
                    rounds_stage2=1, local_steps=1, batch_size=1, grad_accum=1, top_m=1, features="disk")
    # the reference: measured in this process
    timer = Timer()
    undo = [timer.wrap(features, "prepare_client", "features"), timer.wrap(run, "client_step", "client_turn"),
            timer.wrap(server, "server_step", "aggregation"), timer.wrap(evaluate, "evaluate_client", "evaluation"),
            timer.wrap(checkpoint, "save_turn", "checkpoint_turn"), timer.wrap(checkpoint, "save_round", "checkpoint_round")]
    t = time.time()
    report.reset_peak_memory("cpu")
    try:
        ref = run.run(Config(**settings, out=str(out / "reference")), log=log)
    finally:
        for u in undo:
            u()
    res["seconds"].update({"run": round(time.time() - t, 1), **{k: round(v, 1) for k, v in timer.seconds.items()}})
    res["calls"] = timer.calls
    res["peak_rss_mb"] = {"reference_run": round(report.resident_mb("VmHWM:"))}
    res["checkpoint_writes"] = timer.writes
    turns = [w for w in timer.writes if w["kind"] == "turn"]
    res["checkpoint_bytes_per_turn"] = {"per_turn_layout": max(w["bytes"] for w in turns),
                                        "whole_state_layout": max(w["whole_state_bytes"] for w in turns)}
    caches = list((Path(os.environ["PILOT_CACHE"]) / "features").glob("*.safetensors"))
    n_images = sum(c["n_train"] + c["n_test"] for c in ref["clients"])
    res["feature_bytes_per_image"] = round(sum(f.stat().st_size for f in caches) / n_images)
    K, rounds = len(ref["clients"]), ref["config"]["rounds_stage1"] + ref["config"]["rounds_stage2"]
    lora = ref["communicated_params"] - ADAPTER
    res["params"] = {"lora": lora, "adapter": ADAPTER, "trainable_per_client_max": ref["trainable_params"]}
    down = (ref["bytes_down"] - K * 4 * lora) // rounds
    res["bytes_per_round"] = {"up": ref["bytes_up"] // rounds, "down": down,
                              "up_per_client": ref["bytes_up"] // rounds // K, "down_per_client": down // K}
    res["scores"] = {c["id"]: c["score"] for c in ref["clients"]}
    # streamed against cached features at this width, on one client's images
    bb = load_model(Config(**settings), log=lambda *a: None)[0]
    client = llava.load_manifest(settings["data"], keep=[2])[1][0]
    cached, streamed = (features.prepare_client(bb, client, "cpu", mode=m, log=lambda *a: None) for m in ("disk", "stream"))
    idx = torch.arange(len(client.train)).flip(0)
    res["stream_equals_cache"] = bool(torch.equal(streamed.h_train[idx], cached.h_train[idx]))
    del bb, cached, streamed
    res["cpu_matmul_gflops"] = matmul_rates()
    res["dtype"], res["step_seconds"] = Config(**settings).dtype, step_seconds(settings)
    # killed after its first stage-2 client and resumed: the same tensors as the reference
    argv = [sys.executable, str(Path(__file__).with_name("run.py"))] + [
        f"--{k.replace('_', '-')}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in settings.items()]
    t = time.time()
    hit, resumed, _ = killed_and_resumed(argv + ["--out", str(out / "killed")], out / "killed", log)
    res["seconds"]["killed_and_resumed"] = round(time.time() - t, 1)
    res["peak_rss_mb"]["subprocesses"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    same = resumed["clients"] == ref["clients"]
    for c in ref["clients"]:
        a, b = (load_file(str(out / d / f"client_{c['id']}.safetensors")) for d in ("reference", "killed"))
        same = same and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    res["kill"] = {"at": hit, "resumed_to_identical_tensors": bool(same)}
    res["seconds"]["total"] = round(time.time() - t0, 1)
    res["extrapolated"] = extrapolate(res)
    (out / "rehearsal.json").write_text(json.dumps(res, indent=1))
    return res


# ----------------------------------------------------------------------------- a real run's costs
def lora_params(layers, r=64, c=4096, inter=11008):
    """LoRA r on q, k, v, o (c -> c), gate, up (c -> inter) and down (inter -> c) of every layer."""
    return layers * r * (4 * (c + c) + 2 * (c + inter) + (inter + c))


def adapter_params(c_v=1024, c=4096):
    """A projector-shaped adapter (ψ_t, ψ_s or ψ^c): c_v -> c -> c, with biases."""
    return c_v * c + c + c * c + c


ADAPTER = adapter_params()


def llm_params(layers, c=4096, inter=11008, vocab=VOCAB):
    return layers * (4 * c * c + 3 * c * inter) + 2 * vocab * c


def extrapolate(measured, clients=6, tasks=3):
    """A Scenario A run of the paper's recipe at 32 + 24 layers and prepare.py's default sizes, from
    the shapes (each figure's formula beside it) and the rehearsal's measured per-image and per-width
    figures. GPU time from the FLOP count at REAL's utilisation."""
    import prepare
    R = REAL
    adapter = ADAPTER
    lora = lora_params(R["layers_text"])
    n_llm = llm_params(R["layers_text"])
    images = clients * (R["n_train"] + R["n_test"])
    feature_gpu = 576 * 1024 * 2                                   # fp16 / bf16 on a GPU
    private = adapter + (tasks - 1) * adapter + 1024 * tasks + tasks   # ψ_s, ψ^c, φ (stage 2)
    down = lora + tasks * adapter
    samples = clients * R["n_train"] * R["rounds"]
    flops = samples * R["tokens"] * 6 * n_llm                          # 2N forward, 2N backward, 2N recompute
    gpu_s = flops / (R["utilisation"] * R["peak_tflops"] * 1e12)
    b_samples = sum(sum(f) for f in prepare.B_SIZES.values()) * R["n_train"] * R["rounds"]   # B: 8 clients, 0.25x-1x
    gb = lambda x: round(x / 1e9, 2)
    return {
        "assumptions": f"Scenario A, {clients} clients, {R['n_train']} training and {R['n_test']} test records each, "
                       f"{R['rounds']} rounds of one epoch, {R['tokens']} tokens a sample (576 image tokens), LoRA r 64 "
                       f"on the 7 projections of {R['layers_text']} layers, fp32 adapters and uploads, bf16 weights "
                       f"and features on the GPU, {int(R['utilisation'] * 100)}% of {R['peak_tflops']:.0f} TFLOP/s",
        "params": {"lora": lora, "adapter": adapter, "llm": n_llm},
        "upload_gb_per_client_round": gb(4 * (lora + adapter)),
        "download_gb_per_client_round": gb(4 * down),
        "bytes_gb_per_round": {"up": gb(clients * 4 * (lora + adapter)), "down": gb(clients * 4 * down)},
        "checkpoint_gb": {"round_file": gb(clients * 4 * (down + private)), "turn_file": gb(4 * (lora + adapter + private)),
                          "whole_state_per_turn_before": gb(clients * 4 * (down + private) + clients * 4 * (lora + adapter + private))},
        "feature_cache_gb": gb(images * feature_gpu),
        "feature_cache_gb_measured_basis": f"{measured.get('feature_bytes_per_image', 0):,} bytes an image measured in "
                                           f"{measured.get('dtype')} on the CPU: 576 x 1024 x its bytes, and a header",
        "host_ram_gb": {"weights_bf16_while_loading": gb(2 * (n_llm + 303_000_000 + adapter)),
                        "server_state": gb(clients * 4 * (down + private) + clients * 4 * (lora + adapter))},
        "gpu_memory_gb": {"weights_bf16": gb(2 * (n_llm + 303_000_000)),
                          "trainable_fp32_with_grads_and_adam": gb(16 * (lora + 3 * adapter + 1024 * tasks)),
                          "frozen_adapters_fp32": gb(4 * tasks * adapter),
                          "activations_batch16_grad_ckpt": gb(R["layers_text"] * 16 * R["tokens"] * 4096 * 2 +
                                                              16 * R["tokens"] * (10 * 4096 + 3 * 11008) * 2)},
        "training_pflop": round(flops / 1e15),
        "gpu_hours": round(gpu_s / 3600, 1),
        "gpu_hours_scenario_b": round(gpu_s * b_samples / samples / 3600, 1),
    }


def table(res):
    """The README table "What a real run costs" from a rehearsal's results."""
    e = res["extrapolated"]
    g = e["gpu_memory_gb"]
    slowest = {kind: max((w for w in res["checkpoint_writes"] if w["kind"] == kind), key=lambda w: w["seconds"])
               for kind in ("turn", "round")}
    rows = [
        ("upload / download per client and round", f"{e['upload_gb_per_client_round']} / {e['download_gb_per_client_round']} GB",
         "extrapolated: 4 bytes x (LoRA + one adapter) / (LoRA + T adapters); measured at 2 layers: "
         f"{res['bytes_per_round']['up_per_client'] / 1e6:.0f} / {res['bytes_per_round']['down_per_client'] / 1e6:.0f} MB"),
        ("all clients, per round", f"{e['bytes_gb_per_round']['up']} GB up, {e['bytes_gb_per_round']['down']} GB down", "extrapolated"),
        ("checkpoint after a client's turn", f"{e['checkpoint_gb']['turn_file']} GB (the whole state, as before: up to "
         f"{e['checkpoint_gb']['whole_state_per_turn_before']} GB)", "extrapolated; measured at 2 layers in stage 2: "
         f"{res['checkpoint_bytes_per_turn']['per_turn_layout'] / 1e6:.0f} MB a turn, against up to "
         f"{res['checkpoint_bytes_per_turn']['whole_state_layout'] / 1e6:.0f} MB for the whole state"),
        ("checkpoint after an aggregation", f"{e['checkpoint_gb']['round_file']} GB", "extrapolated"),
        ("checkpoint seconds on this CPU", " and ".join(f"{w['seconds']} s for {w['bytes'] / 1e6:.0f} MB" for w in slowest.values())
         + " (a turn, an aggregation)", f"measured at {LAYERS['text']} LLM layers: the slowest write of each kind"),
        ("peak RSS", f"{max(res['peak_rss_mb'].values()):,} MB", f"measured at {LAYERS['text']} + {LAYERS['vision']} layers "
         f"({res['parameters'] / 1e6:.0f}M parameters); the whole rehearsal {res['seconds']['total']:.0f} s"),
        ("feature cache (--features disk)", f"{e['feature_cache_gb']} GB; 0 with --features stream",
         f"576 x 1024 x 2 bytes an image (bf16); measured: {res['feature_bytes_per_image']:,} bytes an image in {res['dtype']}"),
        ("host RAM", f"{e['host_ram_gb']['weights_bf16_while_loading']} GB while loading, "
         f"{e['host_ram_gb']['server_state']} GB of federation state", "extrapolated"),
        ("GPU memory", f"{round(sum(g.values()), 1)} GB ({g['weights_bf16']} weights, "
         f"{g['trainable_fp32_with_grads_and_adam']} trainable with Adam, {g['activations_batch16_grad_ckpt']} activations)",
         "estimated from the shapes"),
        ("GPU time", f"{e['gpu_hours']} h ({e['training_pflop']:,} PFLOP of training); Scenario B {e['gpu_hours_scenario_b']} h",
         e["assumptions"]),
        ("a step at 7B widths on this CPU", f"{res['step_seconds']['bf16']} s in bf16, {res['step_seconds']['fp32']} s in fp32",
         f"measured, {LAYERS['text']} LLM layers, batch 1; --dtype default here: {res['dtype']}"),
    ]
    return "\n".join(["| | cost | how |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows])


def main(out):
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    res = rehearse(Path(out))
    print(table(res))
    print(f"wrote {out}/rehearsal.json ({res['seconds']['total']:.0f} s; resumed to identical tensors: "
          f"{res['kill']['resumed_to_identical_tensors']}; streamed features = cached: {res['stream_equals_cache']})")
