"""Real-checkpoint and real-data paths, without downloading anything: a tiny random LLaVA saved
with save_pretrained, LLaVA-format data with real PNG files, and every kind of bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import backbone
import tiny
import config
import data
import evaluate
import features
import federation
import llava
import run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A random-weight LLaVA in Hugging Face format: real tokenizer and CLIP image processor files."""
    path = tmp_path_factory.mktemp("llava-hf")
    tok = tiny.tiny_tokenizer()
    tiny.tiny_model(tok, seed=3).save_pretrained(path)
    tok.save_pretrained(path)
    tiny.tiny_image_processor().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("exported")
    return llava.export_scenario(out, "A", 0, limit_clients=[0, 2], n_train=6, n_test=2)


def test_export_round_trips_through_the_llava_loader(exported):
    name, clients = llava.load_manifest(exported)
    direct = data.make_scenario("A", 0, [0, 2], 6, 2)
    assert name == "synthetic-A-seed0" and [c.task for c in clients] == ["caption", "vqa"]
    for c, d in zip(clients, direct):
        assert [(s.question, s.answer) for s in c.train] == [(s.question, s.answer) for s in d.train]
        assert all(Path(s.image).is_file() for s in c.train + c.test)


def test_real_checkpoint_loads_with_llava_prompt_and_png_pixels(hf_checkpoint, exported):
    bb = backbone.load_backbone(str(hf_checkpoint))
    assert bb.prompt == backbone.LLAVA_PROMPT
    _, clients = llava.load_manifest(exported)
    px = bb.pixels([s.image for s in clients[0].train[:2]])
    assert px.shape == (2, 3, 32, 32)
    (prompt, answer), cut = bb.encode(clients[0].train[0])
    assert bb.tokenizer.unk_token_id not in prompt + answer and not cut


def test_run_end_to_end_on_a_saved_checkpoint_and_exported_data(hf_checkpoint, exported, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "run.py", "--backbone", str(hf_checkpoint), "--data", str(exported),
                           "--rounds-stage1", "1", "--rounds-stage2", "0", "--top-m", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["scenario"] == "synthetic-A-seed0" and [c["task"] for c in res["clients"]] == ["caption", "vqa"]
    assert res["config"]["data"] == str(exported) and res["bytes_up"] > 0


def _write(tmp_path, records, task="vqa", image=True):
    (tmp_path / "images").mkdir(exist_ok=True)
    if image:
        from PIL import Image
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    (tmp_path / "train.json").write_text(records if isinstance(records, str) else json.dumps(records))
    (tmp_path / "test.json").write_text(json.dumps([_rec()]))
    manifest = {"name": "t", "clients": [{"id": "c0", "task": task, "train": "train.json", "test": "test.json",
                                          "image_folder": "images"}]}
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    return tmp_path / "m.json"


def _rec(image="a.png", human="<image>\nwhat colour?", gpt="red", id_="r1"):
    conv = [{"from": "human", "value": human}] + ([{"from": "gpt", "value": gpt}] if gpt is not None else [])
    return {"id": id_, "image": image, "conversations": conv}


@pytest.mark.parametrize("records, task, message", [
    ("[{not json", "vqa", "train.json: not valid JSON"),
    ([_rec(image="missing.png")], "vqa", "train.json, client 'c0', record 0 (id 'r1'): image file"),
    ([_rec(), _rec(human="what colour?", id_="r2")], "vqa", "record 1 (id 'r2'): the first human turn has no '<image>'"),
    ([_rec(gpt=None)], "vqa", "record 0 (id 'r1'): the conversation has no 'gpt' turn"),
    ([_rec()], "counting", "client 'c0': unknown task 'counting'"),
    ([], "vqa", "train.json: no records (an empty client)"),
])
def test_bad_input_names_file_and_record(tmp_path, records, task, message):
    with pytest.raises(llava.DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("'", "'")):
        llava.load_manifest(_write(tmp_path, records, task))


def test_unreadable_manifest(tmp_path):
    (tmp_path / "m.json").write_text("{")
    with pytest.raises(llava.DataError, match="m.json: not valid JSON"):
        llava.load_manifest(tmp_path / "m.json")


def _three_turns():
    rec = _rec()
    rec["conversations"] += [{"from": "human", "value": "what shape?"}, {"from": "gpt", "value": "circle"},
                             {"from": "human", "value": "what size?"}, {"from": "gpt", "value": "large"}]
    return rec


def test_a_multi_turn_record_trains_as_one_sequence_and_is_tested_question_by_question(tmp_path):
    rec = _three_turns()
    manifest = _write(tmp_path, [rec])
    (tmp_path / "test.json").write_text(json.dumps([rec]))
    _, (c,) = llava.load_manifest(manifest)
    (s,) = c.train          # one training sample: the image once, every answer supervised
    assert (s.question, s.answer, s.more) == ("what colour?", "red", (("what shape?", "circle"), ("what size?", "large")))
    assert [(t.question, t.answer, t.id) for t in c.test] == [("what colour?", "red", "r1#0"), ("what shape?", "circle", "r1#1"),
                                                             ("what size?", "large", "r1#2")]


def test_a_multi_turn_sequence_labels_every_answer_and_only_the_answers(hf_checkpoint, tmp_path):
    bb = backbone.load_backbone(str(hf_checkpoint))
    pilot_ = __import__("pilot")
    _, (c,) = llava.load_manifest(_write(tmp_path, [_three_turns()]))
    segments, cut = bb.encode(c.train[0])
    tok = lambda text: bb.tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = bb.tokenizer.eos_token_id
    assert not cut and len(segments) == 6 and [segments[j] for j in (1, 3, 5)] == \
        [tok("red") + [eos], tok("circle") + [eos], tok("large") + [eos]]
    assert segments[0].count(bb.model.config.image_token_id) == bb.n_image_tokens     # the image once
    assert segments[2] == tok("USER: ") + tok("what shape?") + tok(" ASSISTANT:")       # later turns: no image
    ids, mask, labels = backbone.collate([segments], bb.tokenizer.pad_token_id)
    answer_at = [i for i in range(ids.shape[1]) if labels[0, i] != -100]
    starts = [sum(map(len, segments[:j])) for j in (1, 3, 5)]
    assert answer_at == [p for j, st in zip((1, 3, 5), starts) for p in range(st, st + len(segments[j]))]
    assert torch.equal(labels[0, answer_at], ids[0, answer_at]) and mask.sum() == ids.shape[1]
    # the loss is the mean over all its answer tokens, each predicted from everything before it
    pilot_.install_lora(bb.model.model.language_model, 2, 4, seed=0)
    x_img = torch.randn(1, bb.n_image_tokens, bb.dims[1])
    loss = pilot_.lm_loss(bb.model, x_img, ids, mask, labels)
    logits = bb.model.lm_head(bb.model.model.language_model(inputs_embeds=pilot_.embed(bb.model, x_img, ids),
                                                            attention_mask=mask).last_hidden_state)[0]
    by_hand = [-torch.log_softmax(logits[p - 1], -1)[ids[0, p]] for p in answer_at]
    assert torch.allclose(loss, torch.stack(by_hand).mean(), atol=1e-6)
    # past max_length, later turns are dropped whole: never an answer cut
    short, cut = bb.encode(c.train[0], max_length=sum(map(len, segments[:4])) + 1)
    assert cut and short == segments[:4]


def test_too_long_sample_truncates_the_instruction_never_the_answer(hf_checkpoint):
    bb = backbone.load_backbone(str(hf_checkpoint))
    s = data.Sample(None, "what colour is the circle left of the square at the top?", "red", "vqa", id="x")
    (full_prompt, answer), cut = bb.encode(s)
    assert not cut
    (prompt, answer2), cut = bb.encode(s, max_length=len(full_prompt) + len(answer) - 3)
    assert cut and answer2 == answer and len(prompt) + len(answer) == len(full_prompt) + len(answer) - 3
    assert prompt[-len(bb.tokenizer("ASSISTANT:", add_special_tokens=False)["input_ids"]):] == \
        full_prompt[-len(bb.tokenizer("ASSISTANT:", add_special_tokens=False)["input_ids"]):]
    with pytest.raises(ValueError, match="sample 'x'.*exceeds the maximum length"):
        bb.encode(s, max_length=bb.n_image_tokens)


def test_truncations_are_counted_in_a_warning(hf_checkpoint, exported):
    bb = backbone.load_backbone(str(hf_checkpoint))
    _, clients = llava.load_manifest(exported)
    (prompt, answer), _ = bb.encode(clients[1].train[0])
    messages = []
    features.prepare_client(bb, clients[1], "cpu", max_length=len(prompt) + len(answer) - 1, log=messages.append)
    assert len(messages) == 1 and "client c2:" in messages[0] and "lost instruction words" in messages[0]


def test_vqa_answer_lists_reach_the_metric(tmp_path):
    rec = dict(_rec(gpt="red"), answers=["red", "red", "dark red"] + ["blue"] * 7)
    manifest = _write(tmp_path, [rec])
    (tmp_path / "test.json").write_text(json.dumps([rec]))
    _, clients = llava.load_manifest(manifest)
    s = clients[0].test[0]
    assert s.extra["answers"][:3] == ["red", "red", "dark red"]
    # the official accuracy: 1 of the 10 answers matches, so 9 of its 10 leave-one-out subsets hold it once
    assert evaluate.item_scores("vqa", ["dark red"], [s]) == pytest.approx([30.0])


def test_prompt_comes_from_the_chat_template_when_there_is_one(tmp_path):
    tok = tiny.tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
                         "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                         "{% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}")
    tiny.tiny_model(tok, seed=3).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    tiny.tiny_image_processor().save_pretrained(tmp_path)
    bb = backbone.load_backbone(str(tmp_path))
    assert bb.prompt == "USER: <image>\n{question} ASSISTANT:"
    s = data.Sample(None, "what colour is the circle?", "red", "vqa")
    (prompt, _), _ = bb.encode(s)
    assert bb.tokenizer.decode(prompt[-8:]) == "what colour is the circle? ASSISTANT:"


def test_manifest_reads_only_the_kept_clients_files(tmp_path):
    """A host holding one client's files (a Flower SuperNode) loads its client through the manifest."""
    manifest = llava.export_scenario(tmp_path, "A", 0, limit_clients=[0, 2], n_train=2, n_test=1)
    _, both = llava.load_manifest(manifest)
    missing = Path(manifest).parent / json.loads(Path(manifest).read_text())["clients"][1]["train"]
    missing.unlink()
    _, kept = llava.load_manifest(manifest, keep=[0])
    assert [c.id for c in kept] == [0] and [s.answer for s in kept[0].train] == [s.answer for s in both[0].train]
    with pytest.raises(llava.DataError, match=str(missing.name)):
        llava.load_manifest(manifest)


def test_an_empty_answer_is_a_data_error(tmp_path):
    with pytest.raises(llava.DataError, match=r"train.json, client 'c0', record 0 \(id 'r1'\): answer turn 0 .* is empty"):
        llava.load_manifest(_write(tmp_path, [_rec(gpt="  ")]))


def _prepare_all(manifest, hf_checkpoint):
    bb = backbone.load_backbone(str(hf_checkpoint))
    return [features.prepare_client(bb, c, "cpu") for c in llava.load_manifest(manifest)[1]]


def test_a_broken_image_is_a_data_error_naming_client_record_and_file(tmp_path, hf_checkpoint):
    manifest = _write(tmp_path, [_rec(), _rec(image="b.png", id_="r2")])
    from PIL import Image
    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "images" / "b.png")
    png = (tmp_path / "images" / "b.png").read_bytes()
    (tmp_path / "images" / "b.png").write_bytes(png[:40])           # truncated to 40 bytes
    with pytest.raises(llava.DataError, match=r"client c0, record r2: image .*b\.png cannot be read"):
        _prepare_all(manifest, hf_checkpoint)
    # run.py: one line on stderr, exit 2, before any training
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "run.py", "--backbone", str(hf_checkpoint), "--data", str(manifest),
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "record r2: image" in p.stderr and "b.png cannot be read" in p.stderr
    assert not (out / "state.json").exists()


def test_greyscale_rgba_and_large_images_are_read(tmp_path, hf_checkpoint):
    from PIL import Image
    manifest = _write(tmp_path, [_rec(image=f"{m}.png", id_=m) for m in ("L", "RGBA", "big")])
    Image.new("L", (20, 30), 128).save(tmp_path / "images" / "L.png")
    Image.new("RGBA", (16, 16), (10, 200, 10, 90)).save(tmp_path / "images" / "RGBA.png")
    Image.new("RGB", (3000, 2000), (0, 0, 255)).save(tmp_path / "images" / "big.png")
    ct, = _prepare_all(manifest, hf_checkpoint)
    assert ct.h_train.shape[0] == 3 and torch.isfinite(ct.h_train).all()


def test_default_top_m_fits_a_three_client_manifest(tmp_path):
    manifest = llava.export_scenario(tmp_path, "A", 0, limit_clients=[0, 2, 4], n_train=1, n_test=1)
    cfg, _ = run.parse_config(["--data", str(manifest)])
    assert cfg.top_m is None
    logs = []
    assert config.with_defaults(cfg, logs.append).top_m == 2 and "M = min(3, K - 1) = 2" in logs[0]
    assert config.with_defaults(config.Config(), logs.append).top_m == 3          # Scenario A's 6 clients
    with pytest.raises(SystemExit):
        run.parse_config(["--data", str(manifest), "--top-m", "3"])          # explicit and too large: an error


def test_loss_weights_are_settings_recorded_and_checked_on_resume():
    cfg, _ = run.parse_config(["--lambda-d", "0.5", "--lambda-b", "0.2", "--lambda-z", "0"])
    assert (cfg.lambda_d, cfg.lambda_b, cfg.lambda_z) == (0.5, 0.2, 0.0)
    assert run.parse_config([])[0].lambda_d == 0.1 and run.parse_config([])[0].lambda_z == 0.01
    assert not {"lambda_d", "lambda_b", "lambda_z"} & set(federation.RESUME_MAY_DIFFER)   # a resume keeps them


def test_the_servers_roster_comes_from_the_scenario_or_the_manifest_never_from_data_files(exported, tmp_path):
    assert llava.roster("B", keep=[1, 6]) == [(1, 1, "caption", 100), (6, 6, "ocr", 400)]
    assert llava.roster("A", keep=[4], n_train=8) == [(4, 4, "grounding", 8)]
    # an exported manifest records each client's training-sample count; the roster reads only the manifest
    assert llava.roster("", str(exported)) == [(0, "c0", "caption", 6), (1, "c2", "vqa", 6)]
    m = json.loads(exported.read_text())
    m["clients"][1]["n_train"] = 7          # a manifest that disagrees with its client's file
    wrong = exported.with_name("wrong.json")
    wrong.write_text(json.dumps(m))
    with pytest.raises(llava.DataError, match=r"wrong.json, client 'c2': 'n_train' is 7, but .*train.json holds 6"):
        llava.load_manifest(wrong)
    del m["clients"][0]["n_train"]
    wrong.write_text(json.dumps(m))
    with pytest.raises(llava.DataError, match=r"wrong.json, client 'c0': no 'n_train'"):
        llava.roster("", str(wrong))
    assert len(llava.load_manifest(wrong, keep=[0])[1]) == 1     # run.py does not need it


R = '{"id": "r", "image": "x.png", "conversations": [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}]}'


@pytest.mark.parametrize("text, message", [
    (f"[{R}, {R} {R}]", "not valid JSON \\(expected ',' or ']' at character"),
    (f"[{R}] [", "not valid JSON \\(extra data after the list"),
    (f"[{R}, {{\"id\": ", "not valid JSON"),
    ('{"id": 1}', "expected a JSON list of records, got dict"),
    ('', "not valid JSON")])
def test_records_are_decoded_one_by_one_and_malformed_lists_name_the_file(tmp_path, text, message):
    (tmp_path / "x.png").write_bytes(b"")      # the loader checks that the file exists; it decodes it later
    path = tmp_path / "train.json"
    path.write_text(text)
    with pytest.raises(llava.DataError, match=f"{path}: {message}"):
        llava.load_llava_records(path, tmp_path, "vqa")
    path.write_text(' [ ] ')
    with pytest.raises(llava.DataError, match="no records"):
        llava.load_llava_records(path, tmp_path, "vqa")
