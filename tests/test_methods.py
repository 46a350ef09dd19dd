"""Each baseline and ablation switch really changes what it names, and only that."""
from dataclasses import replace

import pytest
import torch

import aggregate
import backbone
import client
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


def test_fedavg_task_averages_within_each_task_only():
    ups = _uploads()
    downs = server.server_round([dict(u) for u in ups], TASKS, N, top_m=2, method=METHODS["fedavg-task"])
    lora = lambda u: {k: v for k, v in u.items() if k.startswith("lora.")}
    adapter = lambda u: pilot.sub_state(u, "task_adapter.")
    captions = aggregate.fedavg([lora(ups[0]), lora(ups[1])], N[:2])          # clients 0 and 1: caption
    cap_adapter = aggregate.fedavg([adapter(ups[0]), adapter(ups[1])], N[:2])
    for k in (0, 1):
        assert all(torch.allclose(downs[k][key], v) for key, v in captions.items())
        assert set(key for key in downs[k] if key.startswith("global_")) == {"global_task_adapter.caption.linear_1.weight"}
        assert torch.allclose(downs[k]["global_task_adapter.caption.linear_1.weight"], cap_adapter["linear_1.weight"])
    # the one VQA client gets its own upload back: nothing from another task
    assert all(torch.equal(downs[2][key], v) for key, v in lora(ups[2]).items())
    assert torch.equal(downs[2]["global_task_adapter.vqa.linear_1.weight"], ups[2]["task_adapter.linear_1.weight"])
    # in place, as the server runs it, the same downloads
    again = server.server_round([{k: v.clone() for k, v in u.items()} for u in ups], TASKS, N, top_m=2,
                                method=METHODS["fedavg-task"], consume=True)
    assert all(torch.allclose(a[k], b[k]) for a, b in zip(downs, again) for k in a)
    assert torch.equal(aggregate.task_fedavg_matrix(TASKS, N).sum(1), torch.ones(3, dtype=torch.float64))
    # a client whose upload failed keeps its text adapter and gets its task's new average
    prev = [{**{k: torch.zeros_like(v) for k, v in lora(u).items()},
             f"global_task_adapter.{t}.linear_1.weight": torch.zeros(3, 2)} for u, t in zip(ups, TASKS)]
    out = server.server_round([ups[0], None, ups[2]], TASKS, N, 2, METHODS["fedavg-task"], previous=prev)
    assert torch.equal(out[1]["lora.layer.lora_A"], prev[1]["lora.layer.lora_A"])
    assert torch.equal(out[1]["global_task_adapter.caption.linear_1.weight"], ups[0]["task_adapter.linear_1.weight"])


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


def test_centralized_task_trains_one_model_per_task_with_its_clients_steps(small_backbone_dir, tmp_path):
    """The step budget: a task's pooled model takes as many steps as that task's clients together, so
    centralized-task's trainers take Centralized's steps between them; each client is scored with its
    task's model on its own test set."""
    logs = {}
    base = dict(clients=[0, 1, 2], n_train=8, n_test=2, batch_size=4, local_steps=2, rounds_stage1=1, rounds_stage2=1,
                backbone=str(small_backbone_dir))
    res = {}
    for m in ("centralized-task", "centralized"):
        logs[m] = []
        res[m] = run.run(Config(**base, method=m, out=str(tmp_path / m)), log=logs[m].append)
    steps = lambda m, who: [int(line.split(": ")[1].split(" steps")[0]) for line in logs[m] if f"{who} round" in line]
    assert steps("centralized-task", "the pooled client (caption)") == [4, 4]      # 2 caption clients x 2 steps
    assert steps("centralized-task", "the pooled client (vqa)") == [2, 2]          # 1 vqa client x 2 steps
    assert steps("centralized", "the pooled client (all)") == [6, 6]               # = 4 + 2 a round
    assert "the pooled client (caption) round 1: 4 steps" in "\n".join(logs["centralized-task"])
    c = res["centralized-task"]
    assert [r["id"] for r in c["clients"]] == [0, 1, 2] and c["bytes_up"] == 0 and c["communicated_params"] == 0
    from safetensors.torch import load_file
    a, b, v = (load_file(str(tmp_path / "centralized-task" / f"client_{k}.safetensors")) for k in (0, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)                       # one model for the caption clients
    assert not torch.equal(a["lora.model.language_model.layers.0.self_attn.q_proj.lora_B"],
                           v["lora.model.language_model.layers.0.self_attn.q_proj.lora_B"])   # another for VQA
    assert "global_task_adapter.vqa.linear_1.weight" in v and "global_task_adapter.caption.linear_1.weight" not in v
    # whole epochs (--local-steps 0): an epoch of the union of the task's clients
    from client import steps_per_round
    cts = [features.ClientTensors(k, t, torch.zeros(n, 1, 1), features.Tokens([([1], [2])] * n), torch.zeros(0, 1, 1),
                                  features.Tokens(), []) for k, t, n in ((0, "caption", 5), (1, "caption", 7), (2, "vqa", 3))]
    sim = run.Simulation(None, cts, Config(method="centralized-task", local_steps=0, batch_size=4))
    assert sim.ids == [-2, -3] and sim.n == [12, 3] and sim.trainer_of == [0, 0, 1]
    assert [steps_per_round(c, n) for c, n in zip(sim.train_cfgs, sim.n)] == [3, 1]
    assert len(sim.trainers[0].h_train) == 12


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
