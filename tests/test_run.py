"""The shipped backbone, the client and server steps, the presets, the command line, and a small
end-to-end run."""
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

import backbone
import tiny
import config
import data
import evaluate
import features
import pilot
import run
import server
from client import client_round, steps_per_round
from config import Config


def test_the_shipped_tiny_backbone_is_the_recipes_build():
    # a recipe changed without `python tiny.py --build tiny-backbone` cannot land: the shipped
    # files name the recipe they were built from, and the weights are the ones recorded at the build
    meta = json.loads((backbone.TINY_DIR / "pilot_backbone.json").read_text())
    assert meta["key"] == backbone.tiny_backbone_key()
    assert meta["recipe"] == json.loads(json.dumps(backbone.tiny_recipe()))
    weights = (backbone.TINY_DIR / "model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == meta["model_sha256"]
    assert backbone.tiny_backbone_dir() == backbone.TINY_DIR
    bb = backbone.load_backbone("tiny")
    assert sum(p.numel() for p in bb.model.parameters()) == meta["n_parameters"]


def test_a_tiny_backbone_without_its_weights_says_how_to_name_one(monkeypatch, tmp_path):
    (tmp_path / "pilot_backbone.json").write_bytes((backbone.TINY_DIR / "pilot_backbone.json").read_bytes())
    monkeypatch.setattr(backbone, "TINY_DIR", tmp_path)        # as in a Flower App Bundle: no weights file
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing: name the tiny backbone by the path"):
        backbone.load_backbone("tiny")


def test_a_tiny_backbone_of_another_recipe_is_refused(monkeypatch):
    monkeypatch.setitem(backbone.PRETRAIN, "vision_steps", 1999)
    with pytest.raises(ValueError, match=r"rebuild it with 'python tiny.py --build tiny-backbone'"):
        backbone.load_backbone("tiny")


def test_tiny_backbone_round_trips_through_save_pretrained(small_backbone_dir, tmp_path):
    bb = backbone.load_backbone(str(small_backbone_dir))
    bb.model.save_pretrained(tmp_path)
    bb.tokenizer.save_pretrained(tmp_path)
    bb.image_processor.save_pretrained(tmp_path)
    again = backbone.load_backbone(str(tmp_path))
    a, b = bb.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.tokenizer.get_vocab() == bb.tokenizer.get_vocab()
    assert again.prompt == backbone.LLAVA_PROMPT          # no pilot_backbone.json copied: LLaVA's format
    s = data.make_scenario("A", 0, limit_clients=[4], n_train=1, n_test=1)[0].train[0]
    assert torch.equal(bb.pixels([s.image]), again.pixels([s.image]))
    assert all(not p.requires_grad for p in again.model.parameters())


def _setup(small_backbone_dir, clients=(0, 2)):
    cfg = Config(clients=list(clients), n_train=8, n_test=3, batch_size=4, backbone=str(small_backbone_dir))
    bb = backbone.load_backbone(cfg.backbone)
    pilot.install_lora(bb.model.model.language_model, 8, 16, seed=0)
    cs = data.make_scenario("A", 0, cfg.clients, cfg.n_train, cfg.n_test)
    return cfg, bb, [features.prepare_client(bb, c, "cpu") for c in cs]


def test_client_round_uploads_only_task_adapter_and_text_adapter(small_backbone_dir):
    cfg, bb, cts = _setup(small_backbone_dir)
    tasks = ["caption", "vqa"]
    theta0 = {k: v.detach().clone() for k, v in pilot.lora_state(bb.model).items()}
    up, private, st = client_round(bb, cts[0], dict(theta0), {}, 1, tasks, cfg, 0, log_bar=False)
    assert set(up) == set(theta0) | {f"task_adapter.linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}
    assert set(private) == {f"client_adapter.linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}
    assert any(not torch.equal(up[k], theta0[k]) for k in theta0)          # training changed Θ^l
    # stage 1 trained two different adapters: ψ_t (uploaded) and ψ_s (private), ψ_s away from its zero start
    for key in ("linear_1.weight", "linear_2.weight"):
        assert (up[f"task_adapter.{key}"] - private[f"client_adapter.{key}"]).abs().max() > 1e-3
    assert private["client_adapter.linear_2.weight"].abs().max() > 1e-4
    downloads = server.server_round([up, up], ["caption", "vqa"], [8, 8], top_m=3)
    assert set(downloads[0]) == set(theta0) | {f"global_task_adapter.{t}.linear_{i}.{w}" for t in tasks
                                               for i in (1, 2) for w in ("weight", "bias")}
    up2, private2, _ = client_round(bb, cts[0], downloads[0], private, 2, tasks, cfg, 1, log_bar=False)
    assert not any(k.startswith(("client_adapter", "cross_adapter", "router")) for k in up2)
    assert {k.split(".")[0] for k in private2} == {"client_adapter", "cross_adapter", "router"}
    assert all(torch.equal(private2[k], private[k]) for k in private)     # ψ_s frozen in stage 2


def test_end_to_end_two_clients_writes_results(small_backbone_dir, tmp_path):
    cfg = Config(clients=[0, 4], n_train=8, n_test=3, batch_size=4, rounds_stage1=1, rounds_stage2=1,
                     backbone=str(small_backbone_dir), out=str(tmp_path / "out"), top_m=1)
    res = run.run(cfg, log=lambda *a: None)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    for key in ("scenario", "seed", "method", "backbone", "clients", "per_task", "average", "bytes_up",
                "bytes_down", "wall_s"):
        assert key in saved
    assert saved["scenario"] == "A" and saved["method"] == "pilot" and saved["seed"] == 0
    assert [c["task"] for c in saved["clients"]] == ["caption", "grounding"]
    for c in saved["clients"]:
        assert {"id", "task", "n_train", "n_test", "metric", "score"} <= set(c) and 0 <= c["score"]
    assert set(saved["per_task"]) == {"caption", "grounding"}
    assert saved["average"] == round(sum(saved["per_task"].values()) / 2, 2)
    assert saved["bytes_up"] > 0 and saved["bytes_down"] > saved["bytes_up"]
    assert "| 0 | caption | cider | 8 | 3 |" in (tmp_path / "out" / "results.md").read_text()
    state = load_file(str(tmp_path / "out" / "client_0.safetensors"))
    assert any(k.startswith("private.client_adapter.") for k in state)
    assert any(k.startswith("global_task_adapter.grounding.") for k in state)
    assert res["average"] == saved["average"]
    # what ATA did each round: two clients of different tasks (scenario clients 0 and 4, named so) are
    # each other's only neighbour
    assert [a["round"] for a in saved["ata"]] == [1, 2]
    assert saved["ata"][0]["neighbours"] == {"0": [4], "4": [0]} and saved["ata"][0]["same_task_mean"] == 0.0
    # with equal sizes λ_k = 1/2: half of each client's Θ̄^l is the other task's client's
    assert saved["ata"][0]["weights"] == {"0": {"0": 0.5, "4": 0.5}, "4": {"4": 0.5, "0": 0.5}}
    assert saved["ata"][0]["other_task_weight_mean"] == 0.5
    # the smooth metric beside the score, and every prediction in a file of its own
    assert all(c["test_ce"] > 0 for c in saved["clients"]) and set(saved["per_task_ce"]) == {"caption", "grounding"}
    lines = (tmp_path / "out" / "predictions_client_4.jsonl").read_text().splitlines()
    assert len(lines) == 3 and {"id", "question", "answer", "prediction", "score"} == set(json.loads(lines[0]))
    # each prediction's score: the client's score is their mean
    client4 = next(c for c in saved["clients"] if c["id"] == 4)
    assert sum(json.loads(x)["score"] for x in lines) / 3 == pytest.approx(client4["score"], abs=0.01)


def test_ata_record_counts_the_weight_from_other_tasks():
    tasks_of = ["caption", "caption", "vqa"]
    weights = {0: {0: 0.25, 1: 0.5, 2: 0.25}, 1: {1: 0.5, 0: 0.5}, 2: {2: 0.4, 0: 0.35, 1: 0.25}}
    rec = server.ata_record({0: [1, 2], 1: [0], 2: [0, 1]}, tasks_of, weights)
    assert rec["same_task"] == {"0": 0.5, "1": 1.0, "2": 0.0}
    assert rec["other_task_weight"] == {"0": 0.25, "1": 0.0, "2": 0.6}
    assert rec["other_task_weight_mean"] == round(0.85 / 3, 4)
    assert "weights" not in server.ata_record({0: [1]}, tasks_of)
    # a run of scenario clients 0, 2 and 5 names them so, as results.json's clients and the predictions files do
    named = server.ata_record({0: [1, 2], 1: [0], 2: [0, 1]}, tasks_of, weights, ids=[0, 2, 5])
    assert named["neighbours"] == {"0": [2, 5], "2": [0], "5": [0, 2]}
    assert named["weights"]["5"] == {"5": 0.4, "0": 0.35, "2": 0.25} and named["other_task_weight"]["5"] == 0.6


def test_presets_the_benchmark_schedule_for_tiny_and_the_papers_recipe_for_checkpoints():
    tiny, _ = run.parse_config([])
    assert (tiny.rounds_stage1, tiny.rounds_stage2, tiny.local_steps, tiny.lora_r, tiny.checkpoint) == (4, 16, 10, 8, "round")
    assert (tiny.lr_stage1, tiny.lr_stage2, tiny.batch_size, tiny.grad_accum, tiny.dtype) == (3e-3, 3e-3, 8, 1, "fp32")
    # a checkpoint: docs/METHOD.md's paper-scale recipe, exactly, unless a flag overrides a value
    real, _ = run.parse_config(["--backbone", "llava-hf/llava-1.5-7b-hf", "--device", "cuda"])
    paper = dict(lr_stage1=2e-5, lr_stage2=4e-5, batch_size=16, grad_accum=2, warmup_ratio=0.03, dtype="bf16",
                 max_length=2048, lora_r=64, lora_alpha=128.0, rounds_stage1=1, rounds_stage2=3, local_steps=0,
                 local_epochs=1, checkpoint="client")
    assert {k: getattr(real, k) for k in paper} == paper
    recipe = config.recipe(real)
    assert recipe["lr_stage1"] == {"value": 2e-5, "source": "paper"} and recipe["rounds_stage1"]["source"].startswith("reading")
    # on a CPU without bf16 instructions the frozen weights are fp32 unless --dtype says bf16, and the
    # log says why; a CPU with them keeps the paper's bf16
    import unittest.mock
    with unittest.mock.patch.object(config, "cpu_bf16", lambda: False):
        cpu, _ = run.parse_config(["--backbone", "llava-hf/llava-1.5-7b-hf"])
        assert cpu.dtype == "fp32" and config.recipe(cpu)["dtype"]["source"] == config.CPU_DTYPE_SOURCE
        assert "dtype fp32 (ours)" in config.recipe_line(cpu)
        assert run.parse_config(["--backbone", "llava-hf/llava-1.5-7b-hf", "--dtype", "bf16"])[0].dtype == "bf16"
    with unittest.mock.patch.object(config, "cpu_bf16", lambda: True):
        assert run.parse_config(["--backbone", "llava-hf/llava-1.5-7b-hf"])[0].dtype == "bf16"
    given, _ = run.parse_config(["--backbone", "llava-hf/llava-1.5-7b-hf", "--device", "cuda", "--local-steps", "5",
                                 "--lr-stage2", "1e-4"])
    assert {k: getattr(given, k) for k in paper} == {**paper, "local_steps": 5, "lr_stage2": 1e-4}
    assert config.recipe(given)["lr_stage2"] == {"value": 1e-4, "source": "flag"}
    assert "lr_stage2 0.0001 (flag)" in config.recipe_line(given) and "lr_stage1 2e-05," in config.recipe_line(given)
    # whole epochs when --local-steps is 0: ceil(ceil(n / batch) / grad_accum) per epoch
    assert steps_per_round(Config(local_steps=0, local_epochs=2, batch_size=8, grad_accum=2), 33) == 6
    assert steps_per_round(Config(local_steps=7), 33) == 7


def test_every_setting_is_a_flag_and_bad_ones_end_in_one_line(capsys):
    flags = run.arg_parser().format_help()
    assert all("--" + f.name.replace("_", "-") in flags for f in __import__("dataclasses").fields(Config))
    cfg, _ = run.parse_config(["--warmup-ratio", "0.1", "--eval-batch-size", "20", "--clients", "0,2", "--local-steps", "0"])
    assert (cfg.warmup_ratio, cfg.eval_batch_size, cfg.clients, cfg.local_steps) == (0.1, 20, [0, 2], 0)
    for argv, why in ((["--method", "pilotx"], "unknown method 'pilotx'"), (["--features", "ram"], "--features ram"),
                      (["--top-m", "6"], "--top-m 6: must be at least 1 and below"), (["--scenario", "C"], "unknown scenario")):
        with pytest.raises(SystemExit):
            run.parse_config(argv)
        err = capsys.readouterr().err
        assert why in err and len(err.strip().splitlines()) == 1, err


def test_dense_targets_put_each_object_and_digit_in_the_patch_of_its_centre():
    objs = [data.Obj("red", "circle", "small", 4.0, 20.0, 3.0), data.Obj("blue", "cross", "large", 5.0, 21.0, 6.0)]
    s = data.Sample(None, "", "", "describe", extra={"objects": objs, "text": ("12", "green", 16.0, 0.0, 2.0)})
    cls, geo, digit = tiny.dense_targets(s, grid=4)       # 8-pixel patches, row-major
    assert cls.shape == (16, 3) and geo.shape == (16, 3)
    assert cls[8].tolist() == [0, 0, 0]                       # red, circle, small in patch (x 0, y 2); first wins
    assert torch.allclose(geo[8], torch.tensor([0.5, 0.5, 0.375]))
    assert (cls[torch.arange(16) != 8] == -1).all() and (geo[torch.arange(16) != 8] == 0).all()
    assert digit.tolist() == [-1, -1, 1, 2] + [-1] * 12        # digit centres at x 19 and 27, y 5


def test_vision_pretraining_trains_the_vision_tower_alone(monkeypatch):
    monkeypatch.setitem(backbone.PRETRAIN, "vision_steps", 3)
    tok, proc = tiny.tiny_tokenizer(), tiny.tiny_image_processor()
    model = tiny.tiny_model(tok, seed=0)
    bb = backbone.Backbone(model, tok, proc, "tiny", backbone.TINY_PROMPT)
    corpus = data.pretraining_corpus(40, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tiny.pretrain_vision(model, corpus, bb.pixels([s.image for s in corpus]), log=lambda *a: None)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.vision_tower.") for k in changed)
    assert any("layers.1." in k for k in changed)       # the layer LLaVA reads (-2) and those below it,
    assert not any("layers.2." in k for k in changed)   # not the last one, which nothing reads


def test_generation_limits_hold_the_tiny_backbones_longest_answers():
    # greedy decoding stops at EOS or at MAX_NEW_TOKENS: a limit below an answer's length cuts it
    # (a named box cut before its last number is unparsable and scores 0), with or without --data
    tok = tiny.tiny_tokenizer()
    longest = {"caption": "a large purple triangle left of a large yellow triangle left of a small purple triangle",
               "vqa": "purple", "grounding": "large purple triangle at [0.38, 0.35, 0.85, 0.82]", "ocr": "7"}
    for task, text in longest.items():
        assert len(tok(text, add_special_tokens=False)["input_ids"]) + 1 <= evaluate.MAX_NEW_TOKENS[task], task


def test_data_seed_holds_the_data_while_the_seed_varies_the_training(tmp_path, capsys):
    def drawn(**kw):
        _, (c,) = run.load_clients(Config(clients=[2], n_train=3, n_test=2, **kw))
        return [(s.question, s.answer, s.image) for s in c.train + c.test]

    def same(a, b):
        return all(x[:2] == y[:2] and torch.equal(x[2], y[2]) for x, y in zip(a, b))

    # the benchmark's world is data seed 0 whatever the seed; another data seed draws another world
    assert same(drawn(seed=3), drawn(seed=0)) and not same(drawn(data_seed=3), drawn())
    assert [run.parse_config(a)[0].data_seed for a in ([], ["--data-seed", "2"])] == [0, 2]
    manifest = tmp_path / "m.json"
    manifest.write_text('{"clients": []}')
    with pytest.raises(SystemExit):
        run.parse_config(["--data", str(manifest), "--data-seed", "1"])
    assert "--data-seed: draws the synthetic scenarios only, not --data" in capsys.readouterr().err
