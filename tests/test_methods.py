"""Each baseline and ablation switch really changes what it names, and only that."""
from dataclasses import replace

import pytest
import torch

import aggregate
import backbone
import data
import features
import pilot
import run

TASKS = ["caption", "caption", "vqa"]
N = [2, 6, 4]


def _uploads():
    g = torch.Generator().manual_seed(0)
    return [{"task_adapter.linear_1.weight": torch.randn(3, 2, generator=g),
             "lora.layer.lora_A": torch.randn(2, 4, generator=g), "lora.layer.lora_B": torch.randn(4, 2, generator=g)}
            for _ in TASKS]


def test_pilot_no_ata_aggregates_text_adapters_by_plain_fedavg():
    ups = _uploads()
    downs = run.server_round(ups, TASKS, N, top_m=2, method=run.METHODS["pilot-no-ata"])
    expected = aggregate.fedavg([{k: v for k, v in u.items() if k.startswith("lora.")} for u in ups], N)
    for d in downs:
        for k, v in expected.items():
            assert torch.allclose(d[k], v)
    # pilot itself personalises: clients get different Θ̄^l
    pilot_downs = run.server_round(ups, TASKS, N, top_m=2, method=run.METHODS["pilot"])
    assert not torch.allclose(pilot_downs[0]["lora.layer.lora_A"], pilot_downs[2]["lora.layer.lora_A"])
    # the visual side is unchanged by the switch: task-aware in both
    assert all(torch.equal(a[k], b[k]) for a, b in zip(downs, pilot_downs) for k in a if k.startswith("global_"))


def test_fedavg_averages_everything_over_all_clients_and_local_keeps_its_own():
    ups = _uploads()
    downs = run.server_round(ups, TASKS, N, top_m=2, method=run.METHODS["fedavg"])
    avg = aggregate.fedavg([pilot.sub_state(u, "task_adapter.") for u in ups], N)
    for k, d in enumerate(downs):
        assert torch.allclose(d[f"global_task_adapter.{TASKS[k]}.linear_1.weight"], avg["linear_1.weight"])
        assert len([key for key in d if key.startswith("global_")]) == 1     # one adapter, not one per task
    local = run.server_round(ups, TASKS, N, top_m=2, method=run.METHODS["local"])
    for k, d in enumerate(local):
        assert torch.equal(d["lora.layer.lora_A"], ups[k]["lora.layer.lora_A"])
        assert torch.equal(d[f"global_task_adapter.{TASKS[k]}.linear_1.weight"], ups[k]["task_adapter.linear_1.weight"])


class _Dims:  # the two numbers build_connector needs from a backbone, plus a projector
    def __init__(self):
        proj = torch.nn.Module()
        proj.multi_modal_projector = pilot.MLPAdapter(4, 5)
        self.model = torch.nn.Module()
        self.model.model = proj
        self.dims = (4, 5)


def _conn(method, stage, private=None):
    bb = _Dims()
    g = torch.Generator().manual_seed(1)
    download = {f"global_task_adapter.{t}.{k}": v for t in ("caption", "vqa", "grounding")
                for k, v in {"linear_1.weight": torch.randn(5, 4, generator=g), "linear_1.bias": torch.randn(5, generator=g),
                             "linear_2.weight": torch.randn(5, 5, generator=g), "linear_2.bias": torch.randn(5, generator=g)}.items()}
    return run.build_connector(bb, stage, ["caption", "vqa", "grounding"], "vqa", download, private or {}, 0,
                               run.METHODS[method])


def test_connector_switches_per_method_and_stage():
    h = torch.randn(2, 3, 4)
    full = _conn("pilot", 2)
    assert full.n_tasks == 3 and full.router is not None and full.client_adapter is not None
    no_ctmoa = _conn("pilot-no-ctmoa", 2)
    assert no_ctmoa.n_tasks == 1 and no_ctmoa.router is None and no_ctmoa.foreign_w1.shape[0] == 0
    x, aux = no_ctmoa(h)      # own task adapter + frozen ψ_s, nothing else
    assert torch.allclose(x, no_ctmoa.task_adapter(h) + no_ctmoa.client_adapter(h), atol=1e-6) and aux == 0
    assert _conn("pilot-no-client-s2", 2).client_adapter is None
    assert _conn("pilot-no-client-s2", 1).client_adapter is not None          # stage 1 keeps ψ_s
    s1 = _conn("pilot-no-stage1", 1)
    x, aux = s1(h)
    assert s1.client_adapter is None and aux == 0 and torch.allclose(x, s1.task_adapter(h))
    assert _conn("pilot-no-stage1", 2).client_adapter is None
    for m in ("fedavg", "fedprox", "local"):
        c = _conn(m, 2)
        assert isinstance(c, pilot.Stage1Connector) and c.client_adapter is None


def test_fedprox_pulls_towards_the_round_start(small_backbone_dir):
    cfg = run.Config(clients=[2], n_train=8, n_test=2, batch_size=4, backbone=str(small_backbone_dir))
    bb = backbone.load_backbone(cfg.backbone)
    pilot.install_lora(bb.model.model.language_model, 8, 16, seed=0)
    ct = features.prepare_client(bb, data.make_scenario("A", 0, [2], 8, 2)[0], "cpu")
    start = {k: v.detach().clone() for k, v in pilot.lora_state(bb.model).items()}

    def drift(method, mu):
        up, _, _ = run.client_round(bb, ct, dict(start), {}, 1, ["vqa"], replace(cfg, method=method, mu=mu), 0, log_bar=False)
        return sum((up[k] - start[k]).pow(2).sum().item() for k in start)
    assert drift("fedprox", 1e4) < 0.5 * drift("fedavg", 0.0)


def test_centralized_trains_one_model_on_the_union_and_scores_every_client(small_backbone_dir, tmp_path):
    logs = []
    cfg = run.Config(method="centralized", clients=[0, 2], n_train=8, n_test=2, batch_size=4, local_steps=2,
                     rounds_stage1=1, rounds_stage2=1, backbone=str(small_backbone_dir), out=str(tmp_path))
    res = run.run(cfg, log=logs.append)
    # one trainer with K x local steps per round over the union; every client scored on its own test set
    assert sum("client 0 (all) round" in line and ": 4 steps" in line for line in logs) == 2
    assert [c["id"] for c in res["clients"]] == [0, 2] and res["bytes_up"] == 0
    from safetensors.torch import load_file
    a, b = load_file(str(tmp_path / "client_0.safetensors")), load_file(str(tmp_path / "client_2.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("lora."))
    assert torch.equal(a["global_task_adapter.caption.linear_2.weight"], b["global_task_adapter.vqa.linear_2.weight"])


def test_one_schedule_over_the_whole_run():
    """Round r continues the cosine schedule where round r - 1 left it (no restart per round)."""
    p = torch.nn.Parameter(torch.zeros(1))
    whole = torch.optim.SGD([p], lr=1.0)
    s = backbone.cosine_schedule(whole, 30, 3)
    lrs = []
    for _ in range(30):
        lrs.append(whole.param_groups[0]["lr"])
        whole.step()
        s.step()
    per_round = []
    for r in range(3):
        opt = torch.optim.SGD([p], lr=1.0)
        s = backbone.cosine_schedule(opt, 30, 3, offset=10 * r)
        for _ in range(10):
            per_round.append(opt.param_groups[0]["lr"])
            opt.step()
            s.step()
    assert per_round == pytest.approx(lrs) and lrs[0] < lrs[3] and lrs[-1] < 0.01


def test_per_sample_loss_weighs_a_one_word_answer_as_much_as_a_caption(small_backbone_dir):
    """--loss-mean samples: the mean over samples of each sample's own mean answer-token loss; the
    default mean over the batch's answer tokens weighs a sample by its answer's length."""
    bb = backbone.load_backbone(str(small_backbone_dir))
    samples = [s for c in data.make_scenario("A", 0, [0, 2], 2, 1) for s in c.train]   # captions, VQA
    conn = run.build_connector(bb, 1, ["caption"], "caption", {}, {}, 0, run.METHODS["fedavg"])
    x_img = conn(pilot.image_features(bb.model, bb.pixels([s.image for s in samples])))[0].detach()
    encoded = [bb.encode(s)[:2] for s in samples]
    n_answer = [len(answer) for _, answer in encoded]                      # answer tokens, EOS included
    assert len(set(n_answer)) > 1                                         # answers of different lengths

    def loss(idx, reduction):
        ids, mask, labels = backbone.collate([encoded[i] for i in idx], bb.tokenizer.pad_token_id)
        return pilot.lm_loss(bb.model, x_img[idx], ids, mask, labels, reduction)

    alone = torch.stack([loss([i], "mean") for i in range(len(samples))])   # each sample's own token mean
    every = list(range(len(samples)))
    torch.testing.assert_close(loss(every, "sample"), alone.mean(), rtol=1e-5, atol=1e-6)
    weights = torch.tensor(n_answer, dtype=torch.float32)                  # the token mean weighs by length
    torch.testing.assert_close(loss(every, "mean"), (alone * weights).sum() / weights.sum(), rtol=1e-5, atol=1e-6)
    assert not torch.isclose(loss(every, "mean"), alone.mean(), rtol=1e-3)


def test_fedavg_of_one_sgd_step_each_equals_one_step_on_the_union(small_backbone_dir):
    """The aggregation invariant: K clients of equal size, each one plain SGD step (no momentum, no
    weight decay) from the same start on a batch with as many answer tokens as the others (so the
    mean loss of the union is the mean of the clients' mean losses), then FedAvg of the uploads
    (LoRA and connector), equal one SGD step of one model on the union of the batches."""
    bb = backbone.load_backbone(str(small_backbone_dir))
    pilot.install_lora(bb.model.model.language_model, 8, 16, seed=0)
    with torch.no_grad():   # a non-zero B, so that every LoRA tensor has a gradient
        for k, v in pilot.lora_state(bb.model).items():
            if k.endswith("lora_B"):
                v.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    start = {k: v.detach().clone() for k, v in pilot.lora_state(bb.model).items()}
    samples = [s for c in data.make_scenario("A", 0, [2, 3], 12, 1) for s in c.train]
    one_word = [s for s in samples if len(bb.encode(s)[1]) == 2][:9]      # answer word + EOS
    batches = [one_word[i:i + 3] for i in range(0, 9, 3)]
    lr = 0.5

    def sgd_step(batch):
        run.load_text_adapter(bb.model, start)
        conn = run.build_connector(bb, 1, ["vqa"], "vqa", {}, {}, 0, run.METHODS["fedavg"])
        params = list(pilot.trainable_parameters(bb.model, conn).values())
        opt = torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=0.0)
        opt.zero_grad(set_to_none=True)
        h = pilot.image_features(bb.model, bb.pixels([s.image for s in batch]))
        ids, mask, labels = backbone.collate([bb.encode(s)[:2] for s in batch], bb.tokenizer.pad_token_id)
        pilot.lm_loss(bb.model, conn(h)[0], ids, mask, labels).backward()
        opt.step()
        up_conn, _ = pilot.split_connector_state(conn)
        return {**up_conn, **{k: v.detach().clone() for k, v in pilot.lora_state(bb.model).items()}}

    uploads = [sgd_step(b) for b in batches]
    union = sgd_step([s for b in batches for s in b])
    avg = aggregate.fedavg(uploads, [3, 3, 3])
    assert any(not torch.equal(union[k], start[k]) for k in start)
    for k, v in union.items():
        torch.testing.assert_close(avg[k], v, rtol=1e-4, atol=1e-6)


def test_comparison_gives_mean_std_and_the_paired_difference_to_local():
    import compare

    def res(avg, ce, ata=None):
        return {"per_task": {"vqa": avg}, "average": avg, "per_task_ce": {"vqa": ce}, "average_ce": ce,
                "rounds": [{"round": 1, "average": avg}], "bytes_up": 0, "bytes_down": 0, "trainable_params": 1,
                "communicated_params": 0, "wall_s": 1.0, "config": {"rounds_stage1": 1, "rounds_stage2": 0},
                "clients": [{"id": 0, "task": "vqa"}], "ata": [{"same_task_mean": a, "neighbours": {}} for a in ata or []]}
    # local 10, 20, 30; pilot 12, 21, 36: differences 2, 1, 6 -> mean 3, std sqrt(7) = 2.65
    s = compare.summarise("A", [0, 1, 2], {"local": [res(10, 1.0), res(20, 0.9), res(30, 0.8)],
                                           "pilot": [res(12, 0.9, [0.5, 1.0]), res(21, 0.9, [0.5]), res(36, 0.7, [0.0])]})
    p = s["methods"]["pilot"]
    assert p["average"] == {"mean": 23.0, "std": 12.12} and p["vs_local"] == {"mean": 3.0, "std": 2.65}
    assert p["ce_vs_local"] == {"mean": -0.0667, "std": 0.0577} and p["ata_same_task"] == 0.5
    assert s["methods"]["local"]["vs_local"] == {"mean": 0.0, "std": 0.0} and s["methods"]["local"]["ata_same_task"] is None
    table = compare.markdown(s)
    assert "| pilot | **23.0 ± 12.1** | **23.0 ± 12.1** | +3.0 ± 2.6 |" in table
    assert "| pilot | 0.833 ± 0.116 | -0.067 ± 0.058 | 0.50 |" in table
    assert table.startswith("Scenario A, seeds 0, 1, 2 (mean") and s["data_seed"] is None
    held = {m: [dict(r, config=dict(r["config"], data_seed=0)) for r in runs] for m, runs in
            {"local": [res(10, 1.0), res(20, 0.9)]}.items()}
    assert compare.markdown(compare.summarise("A", [0, 1], held)).startswith(
        "Scenario A, seeds 0, 1, the data drawn once with seed 0 (mean")


def test_spread_check_reads_a_spread_target_with_the_chi_square_interval():
    import compare
    # the chi-square law's tabulated quantiles (9 and 4 degrees of freedom; 1: 1.96², its 95% quantile)
    for p, k, x in [(0.05, 9, 3.325), (0.95, 9, 16.919), (0.05, 4, 0.711), (0.95, 4, 9.488), (0.95, 1, 3.8415)]:
        assert compare.chi2_quantile(p, k) == pytest.approx(x, abs=5e-4)
    lo, hi = compare.std_interval(10)          # sqrt(9 / 16.919), sqrt(9 / 3.325)
    assert (round(lo, 3), round(hi, 3)) == (0.729, 1.645)
    # 10 seeds, std 2 on a mean of 100: 2% within [1.46, 3.29] -> undecided against 3%, within 4%, above 1%
    ms = {"mean": 100.0, "std": 2.0}
    assert compare.spread_check(ms, 10, 3.0) == {"percent": 2.0, "low": 1.46, "high": 3.29, "target": 3.0,
                                                 "verdict": "undecided"}
    assert compare.spread_check(ms, 10, 4.0)["verdict"] == "within"
    assert compare.spread_check(ms, 10, 1.0)["verdict"] == "above"
    assert compare.spread_check({"mean": 0.0, "std": 0.0}, 10, 10.0)["verdict"] == "undefined"   # a task at 0

    def res(avg, vqa):
        return {"per_task": {"vqa": vqa}, "average": avg, "per_task_ce": {"vqa": 1.0}, "average_ce": 1.0,
                "rounds": [{"round": 1, "average": avg}], "bytes_up": 0, "bytes_down": 0, "trainable_params": 1,
                "communicated_params": 0, "wall_s": 1.0, "config": {"rounds_stage1": 1, "rounds_stage2": 0},
                "clients": [{"id": 0, "task": "vqa"}]}
    # 3 seeds: 2 degrees of freedom, whose quantiles are -2 ln(1 - p): [sqrt(2 / 5.991), sqrt(2 / 0.1026)] x the std;
    # average 99, 100, 101: std 1 (1.0%, [0.58, 4.42]); vqa 10, 20, 30: std 10 (50%, [28.9, 220.8])
    s = compare.summarise("A", [0, 1, 2], {"local": [res(99, 10), res(100, 20), res(101, 30)]})
    check = s["methods"]["local"]["spread_check"]
    assert check["average"]["verdict"] == "undecided" and check["vqa"]["verdict"] == "above"
    assert "| local | 50.0 [28.9, 220.8] ✗ | 1.0 [0.6, 4.4] ? |" in compare.markdown(s)
    zero = compare.summarise("A", [0, 1], {"local": [res(99, 0), res(101, 0)]})
    # vqa at 0: no relative spread; the average's std sqrt(2) on 100, x [0.51, 15.95] for 2 seeds (1 degree of freedom)
    assert "| local | – (mean 0) | 1.4 [0.7, 22.5] ? |" in compare.markdown(zero)
    one = compare.summarise("A", [0], {"local": [res(99, 10)]})
    assert one["methods"]["local"]["spread_check"] is None and "spread targets" not in compare.markdown(one)


def test_ata_by_task_says_which_tasks_fill_a_clients_neighbours():
    import compare
    clients = [{"id": 0, "task": "caption"}, {"id": 1, "task": "caption"}, {"id": 2, "task": "vqa"},
               {"id": 3, "task": "grounding"}]
    rounds = [{"same_task_mean": 0.25, "neighbours": {"0": [1, 2], "1": [0, 3], "2": [0, 3], "3": [2, 1]},
               "other_task_weight_mean": 0.5},
              {"same_task_mean": 0.25, "neighbours": {"0": [1, 3], "1": [0, 3], "2": [3, 1], "3": [2, 0]},
               "other_task_weight_mean": 0.3}]
    res = {"clients": clients, "ata": rounds}
    # the caption clients' 8 neighbours: 4 caption, 1 vqa, 3 grounding
    assert compare.ata_by_task(res) == {"caption": {"caption": 0.5, "vqa": 0.125, "grounding": 0.375},
                                        "vqa": {"caption": 0.5, "vqa": 0.0, "grounding": 0.5},
                                        "grounding": {"caption": 0.5, "vqa": 0.5, "grounding": 0.0}}
    assert compare.ata_by_task({"clients": clients, "ata": []}) == {}
    alone = {"clients": clients[:1], "ata": [{"neighbours": {"0": []}}]}     # one client: no neighbour
    assert compare.ata_by_task(alone) == {"caption": {"caption": 0.0}}
    base = {"per_task": {"vqa": 1.0}, "average": 1.0, "per_task_ce": {"vqa": 1.0}, "average_ce": 1.0,
            "rounds": [{"round": 2, "average": 1.0}], "bytes_up": 0, "bytes_down": 0, "trainable_params": 1,
            "communicated_params": 0, "wall_s": 1.0, "config": {"rounds_stage1": 1, "rounds_stage2": 1}}
    other = {"clients": clients, "ata": [rounds[0], rounds[0]]}   # round 1 twice: caption -> vqa 0.25
    s = compare.summarise("A", [0, 1], {"pilot": [base | res, base | other], "local": [base | {"clients": clients}] * 2})
    assert s["methods"]["local"]["ata_by_task"] is None
    table = compare.markdown(s)
    assert "| pilot | caption | caption 0.50 / 0.50; vqa 0.12 / 0.25; grounding 0.38 / 0.25 |" in table
    assert "| local |" not in table.split("ATA's neighbours by task")[1]
    # the weight from other tasks: 0.5, 0.3 at seed 0, 0.5, 0.5 at seed 1
    assert s["methods"]["pilot"]["ata_other_task_weight"] == 0.45 and table.endswith("seeds): pilot 0.45")


def test_a_comparison_is_summarised_again_from_its_runs(tmp_path):
    import json
    import compare
    for m, s in [("pilot", 1), ("pilot", 0), ("local", 0), ("local", 1)]:
        (tmp_path / f"{m}-seed{s}").mkdir()
        (tmp_path / f"{m}-seed{s}" / "results.json").write_text(json.dumps({"method": m, "seed": s}))
    seeds, results = compare.load(tmp_path, ["local", "fedavg", "pilot"])
    assert seeds == [0, 1] and list(results) == ["local", "pilot"]
    assert [r["seed"] for r in results["pilot"]] == [0, 1]
    (tmp_path / "fedavg-seed0").mkdir()
    (tmp_path / "fedavg-seed0" / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="fedavg lacks seeds \\[1\\] that another method has"):
        compare.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no <method>-seed<s>/results.json"):
        compare.load(tmp_path / "fedavg-seed0")


def test_a_comparison_run_side_by_side_gives_the_same_results(small_backbone_dir, tmp_path):
    import compare
    cfg = run.Config(clients=[0, 2], n_train=8, n_test=2, batch_size=4, local_steps=2, rounds_stage1=1, rounds_stage2=1,
                     backbone=str(small_backbone_dir))
    threads = torch.get_num_threads()     # the same thread count both ways: this checks the running, not rounding
    one = compare.run_comparison(replace(cfg, out=str(tmp_path / "one")), ["pilot"], [0, 1], log=lambda *a: None)
    logs = []
    two = compare.run_comparison(replace(cfg, out=str(tmp_path / "two")), ["pilot"], [0, 1], jobs=2,
                                 threads=threads, log=logs.append)
    drop = lambda summary: {m: {k: v for k, v in x.items() if k != "wall_s"} for m, x in summary["methods"].items()}
    assert drop(one) == drop(two) and one["spread_sources"] == two["spread_sources"]
    for m, s, k in [("pilot", 0, 0), ("pilot", 1, 2)]:
        assert ((tmp_path / "one" / f"{m}-seed{s}" / f"predictions_client_{k}.jsonl").read_text()
                == (tmp_path / "two" / f"{m}-seed{s}" / f"predictions_client_{k}.jsonl").read_text())
        assert "round 2/2" in (tmp_path / "two" / f"{m}-seed{s}" / "run.log").read_text()
    assert sum(" seed " in line and "(2/2)" in line for line in logs) == 1
    assert one["methods"]["pilot"]["ata_by_task"] is not None    # ATA's record names the run's clients by id
    assert (tmp_path / "two" / "compare.md").read_text() == (tmp_path / "one" / "compare.md").read_text()


def test_jobs_belongs_to_a_comparison(capsys):
    import cli
    assert cli.parse_command(["--methods", "local", "--jobs", "2"])[3] == 2 and cli.parse_command([])[3] == 1
    for argv in (["--jobs", "2"], ["--methods", "local", "--jobs", "0"]):
        with pytest.raises(SystemExit) as e:
            cli.parse_command(argv)
        assert e.value.code == 2 and "--jobs" in capsys.readouterr().err


def test_spread_sources_splits_a_spread_into_the_test_sets_part_and_the_trainings(tmp_path):
    import json
    import compare
    # one vqa client of two test samples and one caption client of one, two seeds; item scores:
    items = {0: {0: [100.0, 0.0], 1: [300.0]}, 1: {0: [100.0, 100.0], 1: [100.0]}}
    for s, clients in items.items():
        run_dir = tmp_path / f"local-seed{s}"
        run_dir.mkdir()
        (run_dir / "results.json").write_text(json.dumps({"clients": [{"id": 0, "task": "vqa"}, {"id": 1, "task": "caption"}]}))
        for k, xs in clients.items():
            (run_dir / f"predictions_client_{k}.jsonl").write_text("".join(json.dumps({"score": x}) + "\n" for x in xs))
    parts = compare.spread_sources(tmp_path, [0, 1], ["local"])["local"]
    # vqa 50 then 100: variance 1250, all of it the second item's own (var 5000 / 2^2)
    assert parts["vqa"] == {"std": round(1250 ** 0.5, 2), "test_set_std": round(1250 ** 0.5, 2), "test_set_share": 1.0}
    # the average, 175 then 100: variance 2812.5; its items' part (1250 + 20000) / 2^2
    assert parts["average"]["test_set_share"] == round(5312.5 / 2812.5, 2)
    # two items that move together: half the variance of their mean is their own, half their covariance
    for s, xs in {0: [0.0, 0.0], 1: [100.0, 100.0]}.items():
        (tmp_path / f"local-seed{s}" / "predictions_client_0.jsonl").write_text("".join(json.dumps({"score": x}) + "\n" for x in xs))
    assert compare.spread_sources(tmp_path, [0, 1], ["local"])["local"]["vqa"]["test_set_share"] == 0.5
    (tmp_path / "local-seed1" / "predictions_client_1.jsonl").write_text(json.dumps({"prediction": "a"}) + "\n")
    with pytest.raises(ValueError, match="predictions_client_1.jsonl: a prediction without its score"):
        compare.spread_sources(tmp_path, [0, 1], ["local"])
    summary = {"scenario": "A", "seeds": [0, 1], "methods": {"local": {
        "per_task": {"vqa": {"mean": 1, "std": 0}}, "average": {"mean": 1, "std": 0}, "vs_local": None,
        "average_ce": {"mean": 1, "std": 0}, "ce_vs_local": None, "ata_same_task": None,
        "bytes_up_per_round": 0, "bytes_down_per_round": 0, "trainable_params": 1, "communicated_params": 0}},
        "spread_sources": {"local": {"vqa": {"std": 35.36, "test_set_std": 35.36}, "average": {"std": 2.0, "test_set_std": 1.5}}}}
    assert "| local | 35.4 (35.4) | 2.0 (1.5) |" in compare.markdown(summary)


def test_a_change_of_rounding_moves_results_less_than_a_change_of_seed(small_backbone_dir, tmp_path):
    """Numbers that hold: the images exported to 8-bit PNG and read back through the LLaVA-format
    loader (pixel values off by at most one step), or another thread count (another order of
    floating-point sums), must move a small Pilot run's test loss by less than the seeds'
    standard deviation does, each seed drawing its own data (data_seed None). At this size (3 steps a
    round, 16 samples) the export moves it about as much as the training seed alone does (data held):
    README's "Rounding" compares the two at the benchmark's size."""
    import statistics
    base = dict(batch_size=4, local_steps=3, rounds_stage1=1, rounds_stage2=2, top_m=1, backbone=str(small_backbone_dir))
    small = dict(base, clients=[0, 2], n_train=16, n_test=8)

    def loss(name, **kw):
        return run.run(run.Config(**kw, out=str(tmp_path / name)), log=lambda *a: None)["average_ce"]
    seeds = [loss(f"s{s}", **small, seed=s, data_seed=None) for s in (0, 1, 2)]
    spread = statistics.stdev(seeds)
    manifest = data.export_scenario(tmp_path / "png", "A", 0, limit_clients=[0, 2], n_train=16, n_test=8)
    exported = loss("png", **base, data=str(manifest), seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        other_threads = loss("threads", **small, seed=0)
    finally:
        torch.set_num_threads(threads)
    assert exported != seeds[0]                     # the export does change the numbers ...
    assert abs(exported - seeds[0]) < spread, (exported, seeds)    # ... by less than a seed does
    assert abs(other_threads - seeds[0]) < spread, (other_threads, seeds)
