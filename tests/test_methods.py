"""Each baseline and ablation switch really changes what it names, and only that."""
from dataclasses import replace

import torch

import aggregate
import backbone
import data
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
    ct = run.prepare_client(bb, data.make_scenario("A", 0, [2], 8, 2)[0], "cpu")
    start = {k: v.detach().clone() for k, v in pilot.lora_state(bb.model).items()}

    def drift(method, mu):
        up, _, _ = run.client_round(bb, ct, dict(start), {}, 1, ["vqa"], replace(cfg, method=method, mu=mu), 0, log_bar=False)
        return sum((up[k] - start[k]).pow(2).sum().item() for k in start)
    assert drift("fedprox", 1e4) < 0.5 * drift("fedavg", 0.0)
