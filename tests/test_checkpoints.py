"""Any LLaVA checkpoint: a CLIP + Llama and a SigLIP + Qwen2 layout, built here with random weights and
transformers' own classes, end to end through run.py; H_v as each config selects it; real images
padded to a square; and every kind of broken --backbone ending in one line, exit 2, with nothing
downloaded and nothing written."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ask
import backbone
import data
import llava
import pilot
import tiny

ROOT = Path(__file__).resolve().parents[1]


def _tokenizer(bos=True, pad=True):
    """The tiny backbone's word-level tokenizer, with or without a BOS and a padding token (Qwen2's
    tokenizer has neither)."""
    from transformers import PreTrainedTokenizerFast
    base = tiny.tiny_tokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, eos_token="</s>", unk_token="<unk>",
                                   bos_token="<s>" if bos else None, pad_token="<pad>" if pad else None,
                                   extra_special_tokens={"image_token": "<image>"})


def build(path, layout):
    """A random-weight LlavaForConditionalGeneration saved with its tokenizer and image processor:
    'clip-llama' (CLIP tower, two feature layers concatenated, class token dropped, Llama LLM) or
    'siglip-qwen2' (SigLIP tower without a class token, every token kept, the last layer, Qwen2 LLM,
    a tokenizer without BOS or padding)."""
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, Qwen2Config, SiglipImageProcessorPil, SiglipVisionConfig)
    qwen = layout == "siglip-qwen2"
    tok = _tokenizer(bos=not qwen, pad=not qwen)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    if qwen:
        vision, lm = SiglipVisionConfig(**common), Qwen2Config(**text, num_key_value_heads=2)
        processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
        select = dict(vision_feature_select_strategy="full", vision_feature_layer=-1)
    else:
        vision = CLIPVisionConfig(**common, projection_dim=32)
        lm = LlamaConfig(**text, num_key_value_heads=4, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
        processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        select = dict(vision_feature_select_strategy="default", vision_feature_layer=[-2, -1])
    config = LlavaConfig(vision_config=vision, text_config=lm, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         image_seq_length=16, **select)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    tok.save_pretrained(path)
    processor.save_pretrained(path)
    return Path(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {layout: build(tmp_path_factory.mktemp(layout), layout) for layout in ("clip-llama", "siglip-qwen2")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return llava.export_scenario(tmp_path_factory.mktemp("exported"), "A", 0, limit_clients=[0, 2], n_train=4, n_test=2)


def test_features_follow_each_configs_layers_and_selection(checkpoints):
    clip = backbone.load_backbone(str(checkpoints["clip-llama"]))
    sig = backbone.load_backbone(str(checkpoints["siglip-qwen2"]))
    # CLIP: 16 patches + the class token, dropped; layers -2 and -1 side by side: 2 x 32 wide
    assert clip.feature_shape == (16, 64) and clip.dims == (64, 64)
    assert clip.model.model.multi_modal_projector.linear_1.in_features == 64
    px = clip.pixels([torch.rand(3, 32, 32)])
    out = clip.model.model.vision_tower(px, output_hidden_states=True).hidden_states
    assert torch.equal(pilot.image_features(clip.model, px), torch.cat([out[-2], out[-1]], -1)[:, 1:])
    # SigLIP: no class token, every token kept, the last layer
    assert sig.feature_shape == (16, 32) and sig.n_image_tokens == 16
    px = sig.pixels([torch.rand(3, 32, 32)])
    assert torch.equal(pilot.image_features(sig.model, px), sig.model.model.vision_tower(px, output_hidden_states=True)
                       .hidden_states[-1])
    # a tokenizer without BOS or padding: the prompt starts with the template, padding is EOS
    assert sig.tokenizer.bos_token_id is None and sig.pad_id == sig.tokenizer.eos_token_id
    (prompt, answer), _ = sig.encode(data.Sample(None, "what colour is the circle?", "red", "vqa"))
    assert prompt.count(sig.model.config.image_token_id) == 16 and answer[-1] == sig.tokenizer.eos_token_id
    (prompt, _), _ = clip.encode(data.Sample(None, "what colour is the circle?", "red", "vqa"))
    assert prompt[0] == clip.tokenizer.bos_token_id and prompt.count(clip.model.config.image_token_id) == 16


def test_a_real_image_is_padded_to_a_square_with_the_processors_mean(checkpoints, tmp_path):
    from PIL import Image
    bb = backbone.load_backbone(str(checkpoints["siglip-qwen2"]))          # mean 0.5: grey 127
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    sq = bb.square(wide)
    assert sq.size == (40, 40) and sq.getpixel((0, 0)) == (127, 127, 127) and sq.getpixel((0, 10)) == (255, 0, 0)
    assert sq.getpixel((0, 9)) == (127, 127, 127) and sq.getpixel((0, 29)) == (255, 0, 0) and sq.getpixel((0, 30)) == (127,) * 3
    assert bb.square(sq) is sq
    wide.save(tmp_path / "wide.png")
    assert torch.equal(bb.pixels([str(tmp_path / "wide.png")]), bb.pixels([sq]))


@pytest.mark.parametrize("layout", ["clip-llama", "siglip-qwen2"])
def test_each_layout_runs_end_to_end_and_names_clients_by_their_manifest_ids(checkpoints, exported, tmp_path, layout):
    out = tmp_path / "out"
    argv = [sys.executable, "run.py", "--backbone", str(checkpoints[layout]), "--data", str(exported), "--rounds-stage1",
            "1", "--rounds-stage2", "1", "--local-steps", "2", "--batch-size", "2", "--lora-r", "4", "--lora-alpha", "8",
            "--max-length", "128", "--top-m", "1", "--out", str(out), "--faults", "client=c2:scale=1"]
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "settings (real preset)" in p.stdout               # the paper's recipe
    res = json.loads((out / "results.json").read_text())
    assert [c["id"] for c in res["clients"]] == ["c0", "c2"] and res["scenario"] == "synthetic-A-seed0"
    assert res["ata"][0]["neighbours"] == {"c0": ["c2"], "c2": ["c0"]}
    assert "client c2 (vqa) round 2:" in p.stdout
    for cid in ("c0", "c2"):
        assert (out / f"client_{cid}.safetensors").is_file() and (out / f"predictions_client_{cid}.jsonl").is_file()
    # ask.py finds the client by its manifest id
    model = ask.Model(out, "c2")
    assert model.task == "vqa" and len(model.ask(llava.load_manifest(exported)[1][1].test[:1])) == 1


def _broken(tmp_path, source, what):
    """A copy of the checkpoint at source with one thing broken."""
    import shutil
    path = tmp_path / what
    shutil.copytree(source, path)
    if what == "no tokenizer":
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (path / f).unlink(missing_ok=True)
    elif what == "no processor":
        (path / "preprocessor_config.json").unlink()
    elif what == "truncated weights":
        w = path / "model.safetensors"
        w.write_bytes(w.read_bytes()[:-1000])
    elif what == "damaged header":
        w = path / "model.safetensors"
        w.write_bytes(b"\xff" * 8 + w.read_bytes()[8:])
    return path


@pytest.mark.parametrize("what, message", [
    ("missing path", "no such directory"),
    ("hub id not cached", "no hub id 'nobody/no-such-llava' in the local Hugging Face cache"),
    ("no tokenizer", "no tokenizer files (tokenizer.json, tokenizer.model, vocab.json)"),
    ("no processor", "no image processor config (preprocessor_config.json)"),
    ("truncated weights", "model.safetensors is truncated"),
    ("damaged header", "model.safetensors is not a readable safetensors file"),
])
def test_a_broken_backbone_ends_in_one_line_and_nothing_is_downloaded_or_written(checkpoints, tmp_path, what, message):
    if what == "missing path":
        name = str(tmp_path / "nothing-here")
    elif what == "hub id not cached":
        name = "nobody/no-such-llava"
    else:
        name = str(_broken(tmp_path, checkpoints["clip-llama"], what))
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}     # any network use would fail loudly
    p = subprocess.run([sys.executable, "run.py", "--backbone", name, "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert message in p.stderr, p.stderr
    assert not out.exists() and not (tmp_path / "hf" / "hub").exists()
