"""Each baseline and ablation switch really changes what it names, and only that."""
from dataclasses import replace

import pytest
import torch

import aggregate
import backbone
import client
import compare
import data
import features
import llava
import pilot
import run
import server
from config import METHODS, Config

TASKS = ["caption", "caption", "vqa"]
N = [2, 6, 4]


def _uploads():
    g = torch.Generator().manual_seed(0)
    return [{"task_adapter.linear_1.weight": torch.randn(3, 2, generator=g),
             "lora.layer.lora_A": torch.randn(2, 4, generator=g), "lora.layer.lora_B": torch.randn(4, 2, generator=g)}
            for _ in TASKS]


def test_pilot_no_ata_aggregates_text_adapters_by_plain_fedavg():
    ups = _uploads()
    downs = server.server_round(ups, TASKS, N, top_m=2, method=METHODS["pilot-no-ata"])
    expected = aggregate.fedavg([{k: v for k, v in u.items() if k.startswith("lora.")} for u in ups], N)
    for d in downs:
        for k, v in expected.items():
            assert torch.allclose(d[k], v)
    # pilot itself personalises: clients get different Θ̄^l
    pilot_downs = server.server_round(ups, TASKS, N, top_m=2, method=METHODS["pilot"])
    assert not torch.allclose(pilot_downs[0]["lora.layer.lora_A"], pilot_downs[2]["lora.layer.lora_A"])
    # the visual side is unchanged by the switch: task-aware in both
    assert all(torch.equal(a[k], b[k]) for a, b in zip(downs, pilot_downs) for k in a if k.startswith("global_"))


def test_fedavg_averages_everything_over_all_clients_and_local_keeps_its_own():
    ups = _uploads()
    downs = server.server_round(ups, TASKS, N, top_m=2, method=METHODS["fedavg"])
    avg = aggregate.fedavg([pilot.sub_state(u, "task_adapter.") for u in ups], N)
    for k, d in enumerate(downs):
        assert torch.allclose(d[f"global_task_adapter.{TASKS[k]}.linear_1.weight"], avg["linear_1.weight"])
        assert len([key for key in d if key.startswith("global_")]) == 1     # one adapter, not one per task
    local = server.server_round(ups, TASKS, N, top_m=2, method=METHODS["local"])
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
    return client.build_connector(bb, stage, ["caption", "vqa", "grounding"], "vqa", download, private or {}, 0,
                                  Config(method=method))


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
    cfg = Config(clients=[2], n_train=8, n_test=2, batch_size=4, backbone=str(small_backbone_dir))
    bb = backbone.load_backbone(cfg.backbone)
    pilot.install_lora(bb.model.model.language_model, 8, 16, seed=0)
    ct = features.prepare_client(bb, data.make_scenario("A", 0, [2], 8, 2)[0], "cpu")
    start = {k: v.detach().clone() for k, v in pilot.lora_state(bb.model).items()}

    def drift(method, mu):
        up, _, _ = client.client_round(bb, ct, dict(start), {}, 1, ["vqa"], replace(cfg, method=method, mu=mu), 0, log_bar=False)
        return sum((up[k] - start[k]).pow(2).sum().item() for k in start)
    assert drift("fedprox", 1e4) < 0.5 * drift("fedavg", 0.0)


def test_centralized_trains_one_model_on_the_union_and_scores_every_client(small_backbone_dir, tmp_path):
    logs = []
    cfg = Config(method="centralized", clients=[0, 2], n_train=8, n_test=2, batch_size=4, local_steps=2,
                     rounds_stage1=1, rounds_stage2=1, backbone=str(small_backbone_dir), out=str(tmp_path))
    res = run.run(cfg, log=logs.append)
    # one trainer with K x local steps per round over the union; every client scored on its own test set
    assert sum("the pooled client (all) round" in line and ": 4 steps" in line for line in logs) == 2
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
    one_word = [s for s in samples if len(bb.encode(s)[0][1]) == 2][:9]      # answer word + EOS
    batches = [one_word[i:i + 3] for i in range(0, 9, 3)]
    lr = 0.5

    def sgd_step(batch):
        client.load_text_adapter(bb.model, start)
        conn = client.build_connector(bb, 1, ["vqa"], "vqa", {}, {}, 0, Config(method="fedavg"))
        params = list(pilot.trainable_parameters(bb.model, conn).values())
        opt = torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=0.0)
        opt.zero_grad(set_to_none=True)
        h = pilot.image_features(bb.model, bb.pixels([s.image for s in batch]))
        ids, mask, labels = backbone.collate([bb.encode(s)[0] for s in batch], bb.tokenizer.pad_token_id)
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


def _res(avg, ce=1.0, ata=None, vqa=None, clients=None, rounds=None):
    """A results.json of one run, as compare.py reads it."""
    return {"per_task": {"vqa": avg if vqa is None else vqa}, "average": avg, "per_task_ce": {"vqa": ce}, "average_ce": ce,
            "rounds": rounds or [{"round": 1, "average": avg, "average_ce": ce}], "bytes_up": 0, "bytes_down": 0,
            "trainable_params": 1, "communicated_params": 0, "wall_s": 1.0, "scenario": "A",
            "config": {"rounds_stage1": 1, "rounds_stage2": 0}, "clients": clients or [{"id": 0, "task": "vqa"}],
            "ata": [{"same_task_mean": a, "other_task_weight_mean": 0.0, "neighbours": {}} for a in ata or []]}


def test_comparison_gives_mean_std_paired_differences_and_verdicts():
    # local 10, 20, 30; pilot 12, 21, 36: differences 2, 1, 6 -> mean 3, std sqrt(7) = 2.65, the 90%
    # interval 3 ± t(0.95, 2) 2.65 / sqrt(3) = 3 ± 4.46: undecided; all three seeds above 0
    s = compare.summarise("A", [0, 1, 2], {"local": [_res(10, 1.0), _res(20, 0.9), _res(30, 0.8)],
                                           "pilot": [_res(12, 0.9, [0.5, 1.0]), _res(21, 0.9, [0.5]), _res(36, 0.7, [0.0])],
                                           "pilot-no-ata": [_res(10), _res(19), _res(33)]})
    p = s["methods"]["pilot"]
    assert p["average"] == {"mean": 23.0, "std": 12.12}
    v = p["vs_local"]["average"]
    assert (v["mean"], v["std"], v["same_sign"], v["per_seed"], v["verdict"]) == (3.0, 2.65, 3, [2, 1, 6], "undecided")
    assert (v["low"], v["high"]) == (round(3 - 2.919986 * 7 ** 0.5 / 3 ** 0.5, 2), round(3 + 2.919986 * 7 ** 0.5 / 3 ** 0.5, 2))
    assert p["ce_vs_local"]["mean"] == -0.0667 and p["ata_same_task"] == 0.5
    # an ablation's paired difference to Pilot: -2, -2, -3: the interval -2.33 ± 2.92 x 0.58 / 1.73, below 0
    a = s["methods"]["pilot-no-ata"]["vs_pilot"]["average"]
    assert (a["mean"], a["same_sign"], a["verdict"], a["high"]) == (-2.33, 3, "below", -1.36)
    assert s["methods"]["pilot"]["vs_pilot"] is None and s["methods"]["local"]["vs_pilot"] is None
    claims = {c["baseline"]: c for c in s["claims"]}
    assert claims["local"]["verdict"] == "undecided" and claims["pilot-no-ata"]["verdict"] == "holds"
    assert "fedavg" not in claims                        # a claim needs both of its runs
    t = compare.sections(s)
    assert "| pilot | **23.0 ± 12.1** | **23.0 ± 12.1** | +3.0 ± 2.6 (3/3) | 0.833 ± 0.116 | -0.067 ± 0.058 (2/3) |" in t["results"]   # a difference of 0 is on neither side
    assert "| pilot-no-ata | -2.3 ± 0.6 (3/3) | -2.3 ± 0.6 (3/3) |" in t["ablations"]
    assert "| ATA helps over averaging the text adapters (pilot − pilot-no-ata) | +2.3 ± 0.6 |" in t["claims"]
    assert t["claims"].rstrip().endswith("| 3/3 | **holds** |")


def test_t_and_chi_square_quantiles_against_tables():
    for p, df, t in [(0.95, 4, 2.132), (0.95, 9, 1.833), (0.95, 2, 2.920), (0.975, 30, 2.042), (0.95, 1, 6.314)]:
        assert compare.t_quantile(p, df) == pytest.approx(t, abs=1e-3)
    lo, hi = compare.std_interval(10)          # sqrt(9 / 16.919), sqrt(9 / 3.325)
    assert (round(lo, 3), round(hi, 3)) == (0.729, 1.645)
    assert [round(x, 2) for x in compare.std_interval(5)] == [0.65, 2.37]


def test_spreads_are_read_against_the_targets_for_the_bounds_only():
    # 3 seeds: [sqrt(2 / 5.991), sqrt(2 / 0.1026)] x the std; average 99, 100, 101: 1.0% [0.58, 4.42];
    # vqa 10, 20, 30: 50% [28.9, 220.8]
    runs = [_res(99, vqa=10), _res(100, vqa=20), _res(101, vqa=30)]
    s = compare.summarise("A", [0, 1, 2], {"local": runs, "pilot": runs})
    assert s["methods"]["local"]["spread"]["average"]["verdict"] == "undecided"
    assert s["methods"]["local"]["spread"]["vqa"]["verdict"] == "above"
    assert "verdict" not in s["methods"]["pilot"]["spread"]["vqa"]      # a federated method's spread is a finding
    table = compare.sections(s)["spreads"]
    assert "| local | 50.0 [28.9, 220.8] ✗ | 1.0 [0.6, 4.4] ? |" in table and "| pilot | 50.0 [28.9, 220.8] | 1.0 [0.6, 4.4] |" in table
    zero = compare.summarise("A", [0, 1], {"local": [_res(99, vqa=0), _res(101, vqa=0)]})
    assert "| local | – | 1.4 [0.7, 22.5] ? |" in compare.sections(zero)["spreads"]
    assert compare.summarise("A", [0], {"local": [_res(99)]})["methods"]["local"]["spread"] is None


def test_ata_by_task_says_which_tasks_fill_a_clients_neighbours():
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
    other = {"clients": clients, "ata": [rounds[0], rounds[0]]}   # round 1 twice: caption -> vqa 0.25
    s = compare.summarise("A", [0, 1], {"pilot": [_res(1) | res, _res(1) | other], "local": [_res(1, clients=clients)] * 2})
    assert s["methods"]["local"]["ata_by_task"] is None
    table = compare.sections(s)["ata"]
    assert "| pilot | 0.25 | 0.45 | caption → caption 0.50/0.50, vqa 0.12/0.25, grounding 0.38/0.25;" in table
    assert "| local |" not in table


def test_a_comparison_is_summarised_again_from_its_runs_and_fills_documents(tmp_path):
    import json
    for m, s, avg in [("pilot", 1, 12), ("pilot", 0, 11), ("local", 0, 10), ("local", 1, 9), ("pilot-top1", 0, 13),
                      ("pilot-top1", 1, 14)]:
        (tmp_path / f"{m}-seed{s}").mkdir()
        (tmp_path / f"{m}-seed{s}" / "results.json").write_text(json.dumps(_res(avg) | {"method": m, "seed": s}))
    seeds, results = compare.load(tmp_path)
    assert seeds == [0, 1] and list(results) == ["local", "pilot", "pilot-top1"]     # METHODS' order, then the rest
    assert [r["seed"] for r in results["pilot"]] == [0, 1]
    summary = compare.write(tmp_path, log=lambda *a: None)
    assert summary["methods"]["pilot-top1"]["vs_pilot"]["average"]["per_seed"] == [2, 2]
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- compare A claims -->\nold\n<!-- end -->\nmiddle\n<!-- compare A results -->\n<!-- end -->\n")
    compare.into(doc, {"A": compare.sections(summary)})
    text = doc.read_text()
    assert "\nold\n" not in text and "| pilot | 11.5 ± 0.7 |" in text and "| Pilot above Local (pilot − local) | +2.0 ± 1.4 |" in text
    compare.into(doc, {"A": compare.sections(summary)})
    assert doc.read_text() == text                                   # filling again changes nothing
    with pytest.raises(KeyError, match="no section 'claims' of scenario 'B'"):
        doc.write_text("<!-- compare B claims -->\n<!-- end -->\n")
        compare.into(doc, {"A": compare.sections(summary)})
    (tmp_path / "fedavg-seed0").mkdir()
    (tmp_path / "fedavg-seed0" / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="fedavg lacks seeds \\[1\\] that another method has"):
        compare.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no <method>-seed<s>/results.json"):
        compare.load(tmp_path / "fedavg-seed0")


def test_plots_draw_a_panel_per_task_and_the_test_loss_round_by_round(tmp_path):
    pytest.importorskip("matplotlib")
    rounds = lambda avg: [{"round": 1, "average_ce": 1.2}, {"round": 2, "average": avg, "average_ce": 1.0}]
    s = compare.summarise("A", [0, 1], {m: [_res(10 + i, rounds=rounds(10 + i)), _res(12 + i, rounds=rounds(12 + i))]
                                        for i, m in enumerate(["local", "pilot", "pilot-no-ata"])})
    assert [r["round"] for r in s["methods"]["pilot"]["rounds"]] == [1, 2]
    assert compare.plots(s, tmp_path) == f"wrote {tmp_path}/scores.png, {tmp_path}/rounds.png"
    assert (tmp_path / "scores.png").stat().st_size > 5000 and (tmp_path / "rounds.png").stat().st_size > 5000


def test_a_comparison_run_side_by_side_gives_the_same_results(small_backbone_dir, tmp_path):
    cfg = Config(clients=[0, 2], n_train=8, n_test=2, batch_size=4, local_steps=2, rounds_stage1=1, rounds_stage2=1,
                 backbone=str(small_backbone_dir))
    threads = torch.get_num_threads()     # the same thread count both ways: this checks the running, not rounding
    one = compare.run_comparison(replace(cfg, out=str(tmp_path / "one")), ["pilot"], [0, 1], log=lambda *a: None)
    logs = []
    two = compare.run_comparison(replace(cfg, out=str(tmp_path / "two")), ["pilot"], [0, 1], jobs=2,
                                 threads=threads, log=logs.append)
    drop = lambda summary: {m: {k: v for k, v in x.items() if k != "wall_s"} for m, x in summary["methods"].items()}
    assert drop(one) == drop(two)
    for m, s, k in [("pilot", 0, 0), ("pilot", 1, 2)]:
        assert ((tmp_path / "one" / f"{m}-seed{s}" / f"predictions_client_{k}.jsonl").read_text()
                == (tmp_path / "two" / f"{m}-seed{s}" / f"predictions_client_{k}.jsonl").read_text())
        assert "round 2/2" in (tmp_path / "two" / f"{m}-seed{s}" / "run.log").read_text()
    assert sum("-seed" in line and "(2/2)" in line for line in logs) == 1
    assert one["methods"]["pilot"]["ata_by_task"] is not None    # ATA's record names the run's clients by id
    assert [r["round"] for r in one["methods"]["pilot"]["rounds"]] == [1, 2]   # the test loss after every round
    sections = lambda d: (d / "compare.md").read_text().split("\n\n")
    assert sections(tmp_path / "two")[:-1] == sections(tmp_path / "one")[:-1]   # all but the wall times


def test_a_comparisons_command_line(capsys):
    for argv, why in ((["--methods", "local", "--jobs", "0"], "--jobs 0"), (["--methods", "nope"], "unknown method 'nope'")):
        with pytest.raises(SystemExit) as e:
            compare.main(argv)
        assert e.value.code == 2 and why in capsys.readouterr().err


def test_a_change_of_rounding_moves_results_less_than_a_change_of_seed(small_backbone_dir, tmp_path):
    """Numbers that hold: the images exported to 8-bit PNG and read back through the LLaVA-format
    loader (pixel values off by at most one step), or another thread count (another order of
    floating-point sums), must move a small Pilot run's test loss by less than the seeds'
    standard deviation does, each seed drawing its own data."""
    import statistics
    base = dict(batch_size=4, local_steps=3, rounds_stage1=1, rounds_stage2=2, top_m=1, backbone=str(small_backbone_dir))
    small = dict(base, clients=[0, 2], n_train=16, n_test=8)

    def loss(name, **kw):
        return run.run(Config(**kw, out=str(tmp_path / name)), log=lambda *a: None)["average_ce"]
    seeds = [loss(f"s{s}", **small, seed=s, data_seed=s) for s in (0, 1, 2)]
    spread = statistics.stdev(seeds)
    manifest = llava.export_scenario(tmp_path / "png", "A", 0, limit_clients=[0, 2], n_train=16, n_test=8)
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
